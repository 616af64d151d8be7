"""A listener in HTTP mode: every accepted client becomes an ``HTTPSession``; this is where a
request finds its pool (the route), its peers' keep-alive connections, and where it is
counted and logged when it ends.

It is an ``lb.proxy.listener.Listener`` (accept policy, max_connections, allow, counters,
drain on stop) that accepts raw sockets always: HTTP mode runs on lb's own epoll loop.
"""

from __future__ import annotations

import random
import socket
from bisect import bisect_left
from collections import Counter
from typing import Any, Callable, Dict, Optional, Tuple

from lb.config import ListenerConfig
from lb.http.answers import ERROR_REASONS
from lb.http.messages import RequestHead
from lb.http.proxy import Exchange, HTTPSession
from lb.http.routes import Route, RouteTable
from lb.http.upstream import UpstreamPool
from lb.pool import Pool
from lb.proxy.carriers.pump import Pump
from lb.proxy.connlog import ConnectionLog
from lb.proxy.listener import IDLE_SWEEP, Listener
from lb.stats import HistogramStats, HTTPStats, RouteStats

ACCESS_NAMESPACE = "lb.access"
# lb_http_request_duration_seconds buckets (seconds): Prometheus' defaults, plus 1 ms
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts per bucket (not cumulative; /metrics sums them), the sum and the count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1


class HTTPCounters:
    """What /metrics reads of one HTTP listener (plain counters: nothing on the data path
    touches prometheus_client)."""

    def __init__(self) -> None:
        self.requests: Counter[Tuple[str, int]] = Counter()  # (pool, code) → answers sent
        self.errors: Counter[str] = Counter()  # reason → answers lb made itself
        self.retries: Counter[Tuple[str, str]] = Counter()  # (pool, condition) → retries
        self.durations: Dict[str, Histogram] = {}  # pool → request durations


class UpstreamPools:
    """Every pool's keep-alive connections, shared by the HTTP listeners that use the pool
    (one per service tree, made by the composition root)."""

    def __init__(self, pump: Pump, reactor: Any) -> None:
        self.pump = pump
        self.reactor = reactor
        self.pools: Dict[str, UpstreamPool] = {}

    def for_pool(self, pool: Pool) -> UpstreamPool:
        upstreams = self.pools.get(pool.name)
        if upstreams is None or upstreams.pool is not pool:
            if upstreams is not None:
                upstreams.close_all()
            upstreams = self.pools[pool.name] = UpstreamPool(pool, self.pump, self.reactor)
        return upstreams

    def drop(self, name: str) -> None:
        upstreams = self.pools.pop(name, None)
        if upstreams is not None:
            upstreams.close_all()

    def close_all(self) -> None:
        for name in list(self.pools):
            self.drop(name)


class HTTPListener(Listener):
    """Accepts HTTP clients for a listener with ``mode: http``."""

    def __init__(self, config: ListenerConfig, pool: Optional[Pool], reactor: Any,
                 pump: Pump, connection_log: ConnectionLog, access_log: ConnectionLog,
                 upstream_pools: UpstreamPools,
                 pools: Callable[[str], Optional[Pool]] = lambda name: None,
                 rng: Callable[[], float] = random.random) -> None:
        """``pools``: the pool of a name (a route names its pool; the root owns them all);
        ``rng``: what picks a ``split``'s pool."""
        super().__init__(config, pool, reactor, pump, connection_log)  # type: ignore[arg-type]
        self.access_log = access_log
        self.upstream_pools = upstream_pools
        self.pool_named = pools
        self.rng = rng
        # only the default route until the root hands the table it builds from the config
        # and Consul
        self.table = RouteTable((), (), pool.name if pool is not None else None)
        self.only_default = True  # no route to match: every request takes the default
        self.counters = HTTPCounters()
        self.id_lower: Optional[bytes] = None
        self.id_header = b""
        self._settings()

    def _settings(self) -> None:
        request_id = self.config.http.request_id
        self.id_lower = request_id.lower().encode() if request_id else None
        self.id_header = request_id.encode() if request_id else b""

    def reconfigure(self, config: ListenerConfig, pool: Optional[Pool]) -> None:
        super().reconfigure(config, pool)  # type: ignore[arg-type]
        self._settings()

    @property
    def raw_accept(self) -> bool:
        return True  # a PROXY header, if any, is read by the session itself

    def accept_raw(self, sock: socket.socket, addr: Any, host: Any) -> None:
        if self._refuse(addr) is not None:
            sock.close()
            return
        session = HTTPSession(self, sock, addr, host, self.clock.seconds())
        self.sessions.add(session)  # type: ignore[arg-type]
        self.total += 1
        if self._idle_sweep is None:
            self._sweep_idle()
        try:
            session.on_event(session.fd, 1)  # a request often comes with the connect
        except Exception:
            session.on_bug()
            raise

    # --- what sessions ask ----------------------------------------------------------------

    def set_routes(self, table: RouteTable) -> None:
        """Requests from now on are routed by ``table`` (built whole: a request never sees
        half a change)."""
        self.table = table
        self.only_default = len(table) == 0

    def route(self, head: RequestHead) -> Tuple[Optional[Route], Optional[Pool], str]:
        """The route a request takes (None: no route, 404), the pool it picked (None: that
        pool does not exist (any more), so it has no usable peer) and the pool's name. An
        empty pool never sends the request on to another route."""
        if self.only_default:
            route = self.table.default
        else:
            host = head.host.decode("latin-1") if head.host is not None else None
            route = self.table.match(host, head.target.decode("latin-1"), _header_of(head))
        if route is None:
            return None, None, ""
        name = route.pick_pool(self.rng)
        pool = self.pool if self.pool is not None and self.pool.name == name else \
            self.pool_named(name)
        return route, pool, name

    def upstreams(self, pool: Pool) -> UpstreamPool:
        return self.upstream_pools.for_pool(pool)

    def counted(self, exchange: Exchange) -> None:
        """One request ended: its counters and its access-log line."""
        counters = self.counters
        pool = exchange.route  # the pool's name ("" when no route matched)
        code = exchange.status
        counters.requests[(pool, code)] += 1
        if exchange.error:
            counters.errors[exchange.error] += 1
        now = exchange.session.now
        total = now - exchange.started
        histogram = counters.durations.get(pool)
        if histogram is None:
            histogram = counters.durations[pool] = Histogram()
        histogram.observe(total)
        self.access_log.add(access_line(exchange, self.config.name, now), {})

    def http_stats(self) -> HTTPStats:
        counters = self.counters
        errors = dict.fromkeys(ERROR_REASONS, 0)
        errors.update(counters.errors)
        table = self.table
        routes = table.routes() + ((table.default,) if table.default is not None else ())
        return HTTPStats(
            requests=dict(counters.requests), errors=errors, retries=dict(counters.retries),
            durations={pool: HistogramStats(BUCKETS, tuple(h.counts), h.sum, h.count)
                       for pool, h in counters.durations.items()},
            routes=tuple(RouteStats(r.host, r.path_prefix, r.headers, r.pool,
                                    tuple((w.pool, w.weight) for w in r.split), r.strip,
                                    r.source) for r in routes))

    def counted_retry(self, exchange: Exchange, condition: str) -> None:
        pool = exchange.pool.name if exchange.pool is not None else ""
        self.counters.retries[(pool, condition)] += 1

    # --- timeouts and the end ------------------------------------------------------------

    def _sweep_period(self) -> float:
        http = self.config.http
        timeouts = [t for t in (self.config.idle_timeout, self.config.fin_timeout,
                                http.client_header_timeout, http.client_keepalive_timeout,
                                http.response_timeout) if t > 0]
        return min([IDLE_SWEEP] + [t / 10 for t in timeouts]) if timeouts else 0.0

    def _close_idle(self) -> None:
        if not self.sessions:
            self.stop_idle_sweep()
            return
        now = self.clock.seconds()
        for session in list(self.sessions):
            session.expire(now)  # type: ignore[attr-defined]

    def drain_sessions(self) -> None:
        for session in list(self.sessions):
            session.drain()  # type: ignore[attr-defined]

    def session_ended(self, session: Any, reason: str) -> None:
        self.sessions.discard(session)
        self.ended[reason] += 1
        if not self.sessions and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)


def _header_of(head: RequestHead) -> Callable[[str], Optional[str]]:
    def header(name: str) -> Optional[str]:
        value = head.get(name.encode("latin-1"))
        return value.decode("latin-1") if value is not None else None
    return header


def access_line(exchange: Exchange, listener: str, now: float) -> str:
    """``client listener request-id "METHOD target HTTP/v" status in= out= pool= peer=
    wait= connect= first= total= retries=`` (timings in ms: waiting for a peer, connecting,
    the first byte of the answer, the whole request)."""
    head = exchange.head
    started = exchange.started
    picked = exchange.picked or now
    connected = exchange.connected_at or picked
    first = exchange.first_at
    target = head.target.decode("latin-1") or "-"  # a refused request may have none
    if len(target) > 500:
        target = target[:500] + "..."
    return '%s %s %s "%s %s HTTP/%s" %d in=%d out=%d pool=%s peer=%s wait=%.1f ' \
        'connect=%.1f first=%s total=%.1f retries=%d' % (
            exchange.session.client_text, listener,
            exchange.request_id.decode("latin-1") if exchange.request_id else "-",
            head.method.decode("latin-1") or "-", target, head.version.decode(), exchange.status,
            exchange.bytes_in, exchange.bytes_out, exchange.route or "-",
            exchange.peer_key or "-", (picked - started) * 1000,
            (connected - picked) * 1000,
            "%.1f" % ((first - (exchange.sent_at or connected)) * 1000) if first else "-",
            (now - started) * 1000, exchange.retries)
