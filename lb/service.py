"""The composition root: a service tree built from a config, and config reloads as diffs.

Everything gets the reactor from here; only ``lb.tap`` imports the global one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from zope.interface import implementer

from lb import config as lbconfig
from lb.admin.server import AdminService
from lb.admin.view import IAdminView
from lb.config import (
    CONSUL_POOL_PREFIX,
    Config,
    ConsulConfig,
    ConsulRoutesConfig,
    ListenerConfig,
    PoolConfig,
)
from lb.discovery import static
from lb.discovery.consul import CatalogRoutesQuery, ConsulRoute, RoutesWatcher
from lb.http.listener import ACCESS_NAMESPACE, HTTPListener, UpstreamPools
from lb.http.routes import Route, RouteTable
from lb.interfaces import IPoolPart
from lb.net import Address
from lb.pool import Pool
from lb.proxy.carriers.pump import Pump
from lb.proxy.connlog import ConnectionLog
from lb.proxy.listener import Listener, ListenerService
from lb.reactor import Reactor
from lb.stats import ConsulStats, HealthCheckStats, ListenerStats, PoolStats

# Builders of per-pool services (health monitor, discovery watchers). Each takes the root
# service, the pool and its config and returns a part or None; later parts register here.
PoolPart = Callable[["LBService", Pool, PoolConfig], Optional[IPoolPart]]


class ReloadError(Exception):
    """A new config that cannot be applied (a listener cannot bind); one line that says why."""


def listen_failure(what: str, bind: object, e: CannotListenError) -> str:
    """``listener web: cannot listen on 0.0.0.0:80: Address already in use``."""
    why = getattr(e.socketError, "strerror", None) or str(e.socketError)
    return f"{what}: cannot listen on {bind}: {why}"


class PoolService(MultiService):
    """A pool and the services that keep it current (health checks, discovery)."""

    def __init__(self, pool: Pool) -> None:
        MultiService.__init__(self)
        self.pool = pool
        self.parts: Dict[str, IPoolPart] = {}

    def set_part(self, kind: str, part: Optional[IPoolPart]) -> None:
        """Run ``part`` as the pool's ``kind`` part, replacing the one before; None: the
        config no longer asks for one, so the old part gives back what it put in the pool
        (a source that went away drains its peers and forgets its snapshot)."""
        old = self.parts.pop(kind, None)
        if old is not None:
            self.removeService(old)  # type: ignore[no-untyped-call]  # stops it when running
            if part is None:
                old.release()
        if part is not None:
            part.setName(f"{self.pool.name}:{kind}")  # type: ignore[no-untyped-call]
            self.parts[kind] = part
            part.setServiceParent(self)  # type: ignore[no-untyped-call]

    def stats(self) -> PoolStats:
        """The pool's view with its parts' (a health monitor, a Consul watch)."""
        health: Optional[HealthCheckStats] = None
        consul: Optional[ConsulStats] = None
        for part in list(self.parts.values()):
            view = part.stats()
            if isinstance(view, HealthCheckStats):
                health = view
            else:
                consul = view
        return self.pool.stats(health=health, consul=consul)

    def stopService(self) -> Any:
        d = defer.maybeDeferred(super().stopService)

        def stop_pool(result: object) -> object:
            self.pool.stop()
            return result
        return d.addBoth(stop_pool)


class LBService(MultiService):
    log = Logger()

    def __init__(self, config: Config, reactor: Any, *,
                 pool_parts: Optional[Dict[str, PoolPart]] = None,
                 http_client: Any = None) -> None:
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.http_client = http_client
        self.pool_parts: Dict[str, PoolPart] = dict(default_pool_parts() if pool_parts is None
                                                    else pool_parts)
        self.pools: Dict[str, PoolService] = {}
        self.listeners: Dict[str, ListenerService] = {}
        # per http listener with consul_routes: its watch, and the routes it last handed in
        self.route_watchers: Dict[str, RoutesWatcher] = {}
        self.consul_routes: Dict[str, Tuple[ConsulRoute, ...]] = {}
        self.stopping = False  # shutdown has begun (/healthz answers 503 from then on)
        # lb's reactor runs the fast data path (its one pump); any other reactor does not
        self.pump: Optional[Pump] = reactor.pump if isinstance(reactor, Reactor) else None
        self.connection_log = ConnectionLog(reactor)
        self.access_log = ConnectionLog(reactor, namespace=ACCESS_NAMESPACE)
        self.upstream_pools = UpstreamPools(self.pump, reactor) if self.pump else None
        for pool_config in config.pools.values():
            self._add_pool(pool_config)
        for listener_config in config.listeners.values():
            self._add_listener(ListenerService(
                self._listener(listener_config, self._pool_of(listener_config)),
                config.shutdown_timeout))
            self._watch_routes(listener_config)
        self._set_route_tables(log=False)
        self.admin_view = AdminView(self)
        # added last so it stops first, after the listeners have drained
        self.admin = AdminService(self.admin_view, reactor, config.admin)
        self.admin.setServiceParent(self)  # type: ignore[no-untyped-call]

    # --- building ---------------------------------------------------------------------------

    def _add_pool(self, pool_config: PoolConfig) -> PoolService:
        pool = Pool(pool_config, self.reactor)
        pool.subscribe(self._forget_removed_peer)
        service = PoolService(pool)
        self.pools[pool.name] = service
        static.apply(pool, pool_config)
        self._build_parts(service, pool_config)
        service.setServiceParent(self)  # type: ignore[no-untyped-call]
        return service

    def _build_parts(self, service: PoolService, pool_config: PoolConfig,
                     only: Optional[List[str]] = None) -> None:
        for kind, build in self.pool_parts.items():
            if only is None or kind in only:
                service.set_part(kind, build(self, service.pool, pool_config))

    def _pool_of(self, config: ListenerConfig) -> Optional[Pool]:
        """A listener's pool: for an http listener, its default route (none: only routes)."""
        service = self.pools.get(config.pool)
        return service.pool if service is not None else None

    def _listener(self, config: ListenerConfig, pool: Optional[Pool]) -> Listener:
        if config.mode == "http":
            if self.pump is None or self.upstream_pools is None:
                raise ReloadError(f"listener {config.name}: mode http needs lb's own reactor "
                                  "(twistd was started with another --reactor)")
            return HTTPListener(config, pool, self.reactor, self.pump, self.connection_log,
                                self.access_log, self.upstream_pools, self._pool_named)
        # pool is None only while a reload builds a new listener; it is set before use
        return Listener(config, pool, self.reactor, self.pump,  # type: ignore[arg-type]
                        self.connection_log)

    def _add_listener(self, service: ListenerService) -> None:
        self.listeners[service.listener.config.name] = service
        service.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _forget_removed_peer(self, pool: Pool, peer: object, event: str) -> None:
        """Listener counters of a peer that left its pool go too (bounded metric labels)."""
        if event == "removed":
            for service in self.listeners.values():
                if service.listener.pool is pool:
                    service.listener.prune_peer_counts(pool.peers)

    def pool(self, name: str) -> Pool:
        return self.pools[name].pool

    def _pool_named(self, name: str) -> Optional[Pool]:
        service = self.pools.get(name)
        return service.pool if service is not None else None

    def _remove_pool(self, name: str, why: str) -> None:
        """The pool stops: no new request or connection reaches it (routes and listeners no
        longer name it); those in flight finish; its idle peer connections close."""
        gone = self.pools.pop(name)
        if name.startswith(CONSUL_POOL_PREFIX):
            gone.set_part("consul", None)  # its peers drain and its snapshot goes
        self.removeService(gone)  # type: ignore[no-untyped-call]
        if self.upstream_pools is not None:
            self.upstream_pools.drop(name)
        self.log.info("pool {pool} removed {why} ({n} peer(s) let go)", pool=name, why=why,
                      n=len(gone.pool.peers))

    def _reconfigure_pool(self, service: PoolService, pc: PoolConfig) -> None:
        before = service.pool.config
        service.pool.reconfigure(pc)
        static.apply(service.pool, pc)  # also brings back static peers deleted by API
        changed = [kind for kind in self.pool_parts
                   if _part_config(kind, before) != _part_config(kind, pc)]
        if changed:
            self._build_parts(service, pc, only=changed)

    # --- routes -----------------------------------------------------------------------------

    def _consul_routes_config(self) -> Optional[ConsulRoutesConfig]:
        """consul_routes as every http listener has it (the config checks they agree on
        pool_defaults), or None when no listener routes from Consul."""
        for lc in self.config.listeners.values():
            if lc.consul_routes is not None:
                return lc.consul_routes
        return None

    def _watch_routes(self, lc: ListenerConfig) -> None:
        self._set_route_watch(lc.name, lc.consul_routes if lc.mode == "http" else None)

    def _set_route_watch(self, name: str, wanted: Optional[ConsulRoutesConfig]) -> None:
        """Start, replace or stop a listener's watch of the routes Consul tags announce."""
        current = self.route_watchers.get(name)
        if current is not None and wanted is not None and \
                current.query.tag_prefix == wanted.tag_prefix:  # type: ignore[attr-defined]
            return
        if current is not None:
            del self.route_watchers[name]
            self.removeService(current)  # type: ignore[no-untyped-call]
            if wanted is None:
                current.release()  # its routes go, its snapshot too
            self.consul_routes.pop(name, None)
        if wanted is None:
            return
        watcher = RoutesWatcher(
            name, CatalogRoutesQuery(wanted.tag_prefix),
            lambda: self.config.consul or ConsulConfig(),
            lambda routes, reason: self._routes_from_consul(name, routes),
            reactor=self.reactor, http=self.http_client,
            state_dir=lambda: self.config.state_dir)
        watcher.setName(f"routes:{name}")  # type: ignore[no-untyped-call]
        self.route_watchers[name] = watcher
        watcher.setServiceParent(self)  # type: ignore[no-untyped-call]

    def _routes_from_consul(self, listener: str, routes: Sequence[ConsulRoute]) -> None:
        """A listener's Consul routes changed (the watch logged how): pools for services
        that now announce routes are made first, the tables swapped, then pools no route
        names any more are removed (their requests in flight finish)."""
        if listener not in self.route_watchers:
            return  # a watch stopped by a reload, releasing what it had
        self.consul_routes[listener] = tuple(routes)
        self._sync_consul_pools()

    def _sync_consul_pools(self) -> None:
        template = self._consul_routes_config()
        wanted: Dict[str, str] = {}
        for name, routes in self.consul_routes.items():
            if name in self.route_watchers:
                wanted.update((route.pool, route.service) for route in routes)
        if template is not None:
            for pool_name, service in sorted(wanted.items()):
                if pool_name not in self.pools:
                    self._add_pool(template.pool_for(service))
                    self.log.info("pool {pool} created: service {service} announces routes "
                                  "in Consul", pool=pool_name, service=service)
        self._set_route_tables(log=True)
        for pool_name in list(self.pools):
            if pool_name.startswith(CONSUL_POOL_PREFIX) and (
                    pool_name not in wanted or template is None):
                self._remove_pool(pool_name, "(no route in Consul names it any more)")

    def _set_route_tables(self, log: bool) -> None:
        """Every http listener's table: its config routes, then its Consul routes, then its
        default pool. ``log``: one line per route that changed (the Consul watch logs the
        changes it brings in itself)."""
        for name, service in self.listeners.items():
            listener = service.listener
            if not isinstance(listener, HTTPListener):
                continue
            lc = listener.config
            consul = tuple(Route(host=r.host, path_prefix=r.path_prefix, pool=r.pool,
                                 strip=r.strip, source=r.pool)
                           for r in self.consul_routes.get(name, ()))
            table = RouteTable(lc.routes, consul, lc.pool or None)
            if log:
                _log_config_route_changes(self.log, name, listener.table, table)
            listener.set_routes(table)

    # --- reload -----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file and apply it; a bad file is logged and ignored."""
        try:
            new = lbconfig.load(self.config.path)
        except lbconfig.ConfigError as e:
            self.log.error("reload rejected, the running config stays:\n{problems}",
                           problems="\n".join(e.lines()))
            return False
        try:
            self.apply(new)
        except ReloadError as e:
            self.log.error("reload rejected, the running config stays: {error}", error=e)
            return False
        except Exception as e:
            self.log.failure("reload rejected, the running config stays: {error}", error=e)
            return False
        self.log.info("reloaded {path}: {summary}", path=new.path, summary=new.summary())
        return True

    def apply(self, new: Config) -> None:
        """Apply ``new`` as a diff. New sockets are opened first, so a bind that fails
        leaves everything as it was; unchanged listeners keep their sockets and connections."""
        opened: List[ListenerService] = []
        try:
            for name, lc in new.listeners.items():
                current = self.listeners.get(name)
                if current is not None and _same_socket(current.listener.config, lc):
                    continue
                service = ListenerService(self._listener(lc, None), new.shutdown_timeout)
                if self.running:
                    same_address = current is not None and \
                        current.listener.config.bind == lc.bind
                    try:
                        service.listen(taking_over=current if same_address else None)
                    except CannotListenError as e:
                        raise ReloadError(listen_failure(f"listener {name}", lc.bind,
                                                         e)) from None
                opened.append(service)
        except Exception:
            for service in opened:
                service.stop_accepting()
            raise

        # pools first: listeners point at them (Consul routes' pools follow pool_defaults)
        for name in list(self.pools):
            if name not in new.pools and not name.startswith(CONSUL_POOL_PREFIX):
                self._remove_pool(name, "by the reload")
        for name, pc in new.pools.items():
            pool_service = self.pools.get(name)
            if pool_service is None:
                self._add_pool(pc)
                continue
            self._reconfigure_pool(pool_service, pc)
        template = next((lc.consul_routes for lc in new.listeners.values()
                         if lc.consul_routes is not None), None)
        if template is not None:
            for name, pool_service in self.pools.items():
                if name.startswith(CONSUL_POOL_PREFIX):
                    self._reconfigure_pool(pool_service, template.pool_for(
                        name[len(CONSUL_POOL_PREFIX):]))

        # Removed or re-bound listeners stop accepting; their open connections get
        # shutdown_timeout, like an old HAProxy process after a reload.
        for name in list(self.listeners):
            wanted = new.listeners.get(name)
            if wanted is None or not _same_socket(self.listeners[name].listener.config, wanted):
                service = self.listeners.pop(name)
                if wanted is None:
                    moved = ""
                elif wanted.bind == service.listener.config.bind:
                    moved = f" (mode {wanted.mode} from now on, on the same socket)"
                else:
                    moved = f" (moving to {wanted.bind})"
                self.log.info("listener {name} on {bind} stopped by the reload{moved}; its "
                              "{n} open connection(s) get up to {timeout:g}s", name=name,
                              bind=service.address(), n=len(service.listener.sessions),
                              timeout=service.shutdown_timeout, moved=moved)
                self.removeService(service)  # type: ignore[no-untyped-call]
        for service in opened:
            service.listener.pool = self._pool_of(  # type: ignore[assignment]
                service.listener.config)
            self._add_listener(service)  # already bound: startService does not bind again
        for name, lc in new.listeners.items():
            service = self.listeners[name]
            service.listener.reconfigure(lc, self._pool_of(lc))  # type: ignore[arg-type]
            service.shutdown_timeout = new.shutdown_timeout
        self.config = new
        for name in list(self.route_watchers):
            if name not in new.listeners:
                self._set_route_watch(name, None)
        for lc in new.listeners.values():
            self._watch_routes(lc)
        self._sync_consul_pools()
        self.admin.reconfigure(new.admin)

    # --- start and stop ---------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every socket before the service tree starts (twistd calls this first, before
        dropping privileges): a port that cannot be bound is one line and exit status 1,
        not a traceback."""
        binds: List[Tuple[str, Address, Callable[[], None]]] = [
            (f"listener {name}", s.listener.config.bind, s.listen)
            for name, s in self.listeners.items()]
        binds.append(("admin", self.config.admin.bind, self.admin.listen))
        for what, bind, listen in binds:
            try:
                listen()
            except CannotListenError as e:
                self.log.error("{problem}", problem=listen_failure(what, bind, e))
                raise SystemExit(1) from None
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        """Start the children there are now: a pool made while they start (a routes watch
        serving its snapshot creates pools) is started by being added, and only then."""
        Service.startService(self)
        for service in list(self):
            service.startService()


    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop accepting everywhere, give open connections ``shutdown_timeout``, then stop
        the rest (health checks, discovery, admin)."""
        self.stopping = True
        listeners = list(self.listeners.values())
        yield defer.gatherResults([s.stop_accepting() for s in listeners])
        timeout = self.config.shutdown_timeout
        yield defer.gatherResults([s.drain(timeout) for s in listeners])
        if self.upstream_pools is not None:
            self.upstream_pools.close_all()
        self.connection_log.flush()
        self.access_log.flush()
        yield defer.maybeDeferred(super().stopService)


@implementer(IAdminView)
class AdminView:
    """What the root hands its admin server: views of its pools and listeners, built when
    asked, and the live pools for operators' changes."""

    def __init__(self, root: LBService) -> None:
        self._root = root

    def config(self) -> Config:
        return self._root.config

    def stopping(self) -> bool:
        return self._root.stopping

    def pools(self) -> Sequence[PoolStats]:
        return [self._stats(service) for service in list(self._root.pools.values())]

    def pool(self, name: str) -> Optional[PoolStats]:
        service = self._root.pools.get(name)
        return None if service is None else self._stats(service)

    def _stats(self, service: PoolService) -> PoolStats:
        stats = service.stats()
        upstreams = self._root.upstream_pools
        mine = upstreams.pools.get(service.pool.name) if upstreams is not None else None
        if mine is not None and mine.pool is service.pool:
            stats = replace(stats, upstream=mine.counts())
        return stats

    def listeners(self) -> Sequence[ListenerStats]:
        out = []
        for name, service in list(self._root.listeners.items()):
            stats = service.stats()
            watcher = self._root.route_watchers.get(name)
            if watcher is not None and stats.http is not None:
                stats = replace(stats, http=replace(stats.http, consul_routes=watcher.stats()))
            out.append(stats)
        return out

    def pool_to_change(self, name: str) -> Optional[Pool]:
        service = self._root.pools.get(name)
        return None if service is None else service.pool


def _log_config_route_changes(log: Logger, listener: str, old: RouteTable,
                              new: RouteTable) -> None:
    """One line per config route (or default pool) a reload added or removed."""
    def mine(table: RouteTable) -> List[Route]:
        routes = [r for r in table.routes() if not r.source.startswith(CONSUL_POOL_PREFIX)]
        return routes + ([table.default] if table.default is not None else [])
    before, after = mine(old), mine(new)
    for what, routes, other in (("removed", before, after), ("added", after, before)):
        for route in routes:
            if route not in other:
                log.info("listener {listener}: route {what}: {route}", listener=listener,
                         what=what, route=describe_route(route))


def describe_route(route: Route) -> str:
    """``api.example.com/v1/ [X-Canary=1] -> api (strip /v1/)`` for logs."""
    where = f"{route.host or '*'}{route.path_prefix or '/'}"
    if route.source == "default":
        where = "(default)"
    headers = "".join(f" [{name}={value}]" for name, value in route.headers)
    to = route.pool if route.pool is not None else ", ".join(
        f"{w.pool}×{w.weight}" for w in route.split)
    strip = f" (strip {route.strip})" if route.strip is not None else ""
    return f"{where}{headers} -> {to}{strip}"


def _same_socket(old: ListenerConfig, new: ListenerConfig) -> bool:
    """A listener keeps its socket (and open connections) across a reload unless its address
    or its mode changed (a tcp and an http listener accept differently: a new listener
    takes over the socket and the old one's connections finish as they are)."""
    return old.bind == new.bind and old.mode == new.mode


def _part_config(kind: str, pc: PoolConfig) -> Any:
    """The slice of a pool's config that a part depends on; a change restarts the part."""
    return {
        "health": (pc.health,),
        "consul": (pc.consul,),
    }.get(kind, pc)


def default_pool_parts() -> Dict[str, PoolPart]:
    """The per-pool parts: a health monitor for every pool (active checks, or bringing back
    peers that passive checks took down), and a Consul watch for pools with a consul
    section."""
    from lb.discovery import consul
    from lb.health import monitor

    def health_part(root: LBService, pool: Pool, config: PoolConfig) -> IPoolPart:
        """Every pool has a monitor (without checks, it brings back what traffic took out)."""
        return monitor.monitor_for(pool, config.health, reactor=root.reactor,
                                   http=root.http_client)

    def consul_part(root: LBService, pool: Pool, config: PoolConfig) -> Optional[IPoolPart]:
        """Settings and state_dir are read when used, not now: on a reload the root builds
        parts before it switches to the new config."""
        if config.consul is None:
            return None
        return consul.ConsulWatcher(pool, consul.make_query(config.consul),
                                    lambda: root.config.consul or ConsulConfig(),
                                    reactor=root.reactor, http=root.http_client,
                                    state_dir=lambda: root.config.state_dir)

    return {"health": health_part, "consul": consul_part}
