"""Peers and routes from Consul: one blocking-query watch loop (``watch``) applied to a
pool's peers (``ConsulWatcher``, one per pool) or to the routes catalog tags announce
(``RoutesWatcher``); what each asks and how it reads the answers (``api``, ``health``,
``kv``, ``routes``), how long it pauses (``backoff``) and the last good answer on disk
(``snapshot``). The rest of lb imports from here.
"""

from lb.discovery.consul.health import ServiceQuery
from lb.discovery.consul.kv import KVQuery
from lb.discovery.consul.routes import (
    CatalogRoutesQuery,
    ConsulRoute,
    ParsedRoutes,
    RouteConflict,
    parse_tags,
)
from lb.discovery.consul.watch import (
    RESULTS,
    SOURCE,
    ConsulWatcher,
    OnRoutes,
    RoutesWatcher,
    make_query,
)

__all__ = ["RESULTS", "SOURCE", "CatalogRoutesQuery", "ConsulRoute", "ConsulWatcher",
           "KVQuery", "OnRoutes", "ParsedRoutes", "RouteConflict", "RoutesWatcher",
           "ServiceQuery", "make_query", "parse_tags"]
