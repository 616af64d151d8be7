"""Peers from Consul: a blocking-query watch per pool (``watch``), what it asks and how it
reads the answers (``api``, ``health``, ``kv``), how long it pauses (``backoff``) and the
last good set on disk (``snapshot``). The rest of lb imports from here.
"""

from lb.discovery.consul.health import ServiceQuery
from lb.discovery.consul.kv import KVQuery
from lb.discovery.consul.watch import RESULTS, SOURCE, ConsulWatcher, make_query

__all__ = ["RESULTS", "SOURCE", "ConsulWatcher", "KVQuery", "ServiceQuery", "make_query"]
