"""``/metrics``: Prometheus metrics from views of the pools and listeners taken at scrape time.

Nothing on the data path touches prometheus_client: peers and listeners keep plain integer
counters, and ``LBCollector`` turns their views (``lb.stats``) into metric families when
Prometheus scrapes. A peer that left its pool is simply not in them any more, so its series
disappear and label sets stay bounded by what exists now.

The exposition is prometheus_client's (``choose_encoder``: text format, or OpenMetrics when
the scraper asks for it). Its bundled ``prometheus_client.twisted.MetricsResource`` is not
used because it imports the global reactor and renders in the reactor's thread pool, where
reading the pools would race with the reactor thread changing them; here the collector runs
in the reactor thread, which is cheap at these sizes.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Sequence, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

import lb
from lb.admin.view import IAdminView
from lb.config import ROUTES_WATCH_PREFIX
from lb.health.risefall import UP
from lb.peer import ADMIN_STATES
from lb.stats import ListenerStats, PoolStats


class LBCollector(Collector):
    """Yields lb's metrics from fresh views each time it is collected."""

    def __init__(self, view: IAdminView) -> None:
        self.view = view

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not walk the pools

    def collect(self) -> Iterator[Metric]:
        pools = self.view.pools()
        listeners = self.view.listeners()
        yield from self._listener_metrics(listeners)
        yield from self._peer_metrics(pools)
        yield from self._consul_metrics(pools, listeners)
        yield from self._http_metrics(listeners, pools)
        info = GaugeMetricFamily("lb_build_info", "lb's version (always 1).",
                                 labels=["version"])
        info.add_metric([lb.__version__], 1)
        yield info

    # per listener, and per listener and peer

    def _listener_metrics(self, listeners: Sequence[ListenerStats]) -> Iterator[Metric]:
        conns = CounterMetricFamily(
            "lb_connections_total",
            "Client connections proxied to a peer (counted when the peer connection opens).",
            labels=["listener", "pool", "peer"])
        active = GaugeMetricFamily(
            "lb_active_connections", "Open proxied connections, by listener and peer.",
            labels=["listener", "pool", "peer"])
        no_peer = CounterMetricFamily(
            "lb_no_peer_total", "Clients closed because no peer could take them.",
            labels=["listener"])
        refused = CounterMetricFamily(
            "lb_refused_connections_total",
            "Clients refused at accept: reason max_connections or allow (not in allow CIDRs).",
            labels=["listener", "reason"])
        ended = CounterMetricFamily(
            "lb_connections_ended_total", "Client connections that ended, by how they ended.",
            labels=["listener", "reason"])
        accepted = CounterMetricFamily(
            "lb_listener_connections_total", "Client connections accepted by a listener.",
            labels=["listener"])
        open_now = GaugeMetricFamily(
            "lb_listener_active_connections", "Client connections open on a listener.",
            labels=["listener"])
        max_conns = GaugeMetricFamily(
            "lb_listener_max_connections", "The listener's max_connections setting.",
            labels=["listener"])
        up = GaugeMetricFamily(
            "lb_listener_up", "1 while the listener's socket accepts connections, 0 when it "
            "has stopped accepting for any reason.", labels=["listener"])
        for listener in listeners:
            name, pool_name = listener.name, listener.pool
            for key, (total, in_flight) in listener.per_peer.items():
                conns.add_metric([name, pool_name, key], total)
                active.add_metric([name, pool_name, key], in_flight)
            no_peer.add_metric([name], listener.no_peer)
            for reason, count in listener.refused.items():
                refused.add_metric([name, reason], count)
            for reason, count in listener.ended.items():
                ended.add_metric([name, reason], count)
            accepted.add_metric([name], listener.total_connections)
            open_now.add_metric([name], listener.active_connections)
            max_conns.add_metric([name], listener.max_connections)
            up.add_metric([name], 1 if listener.accepting else 0)
        yield from (conns, active, no_peer, refused, ended, accepted, open_now, max_conns, up)

    # per pool and peer

    def _peer_metrics(self, pools: Sequence[PoolStats]) -> Iterator[Metric]:
        bytes_total = CounterMetricFamily(
            "lb_bytes_total", "Bytes proxied: direction in = client to peer, out = peer to "
            "client.", labels=["pool", "peer", "direction"])
        failures = CounterMetricFamily(
            "lb_connect_failures_total", "Failed connects to a peer on a client's behalf.",
            labels=["pool", "peer"])
        up = GaugeMetricFamily(
            "lb_peer_up", "1 if the peer's health is up (0 if down or not yet checked).",
            labels=["pool", "peer"])
        checks = CounterMetricFamily(
            "lb_health_checks_total", "Active health check results.",
            labels=["pool", "peer", "result"])
        admin = GaugeMetricFamily(
            "lb_peer_admin_state", "1 for the peer's current admin state (ready, drain, "
            "maint), 0 for the others.", labels=["pool", "peer", "state"])
        weight = GaugeMetricFamily(
            "lb_peer_weight", "The peer's configured weight.", labels=["pool", "peer"])
        active = GaugeMetricFamily(
            "lb_peer_active_connections", "Open connections to the peer over all listeners.",
            labels=["pool", "peer"])
        total = CounterMetricFamily(
            "lb_peer_connections_total",
            "Connections established to the peer over all listeners.",
            labels=["pool", "peer"])
        last_check = GaugeMetricFamily(
            "lb_peer_last_check_timestamp_seconds", "When the last active check finished.",
            labels=["pool", "peer"])
        peers_n = GaugeMetricFamily(
            "lb_pool_peers", "Peers in the pool by health.", labels=["pool", "health"])
        for pool in pools:
            monitor = pool.health_check
            by_health: Dict[str, int] = {"up": 0, "down": 0, "unknown": 0}
            for peer in pool.peers:
                labels = [pool.name, peer.address]
                bytes_total.add_metric(labels + ["in"], peer.bytes_in)
                bytes_total.add_metric(labels + ["out"], peer.bytes_out)
                failures.add_metric(labels, peer.connect_failures)
                up.add_metric(labels, 1 if peer.health == UP else 0)
                by_health[peer.health] = by_health.get(peer.health, 0) + 1
                if monitor is not None:  # a pool with a monitor: pass and fail, zeros too
                    counted = monitor.results.get(peer.address, {})
                    for result, count in sorted(counted.items()):
                        checks.add_metric(labels + [result], count)
                state = peer.admin_state
                for name in ADMIN_STATES:
                    admin.add_metric(labels + [name], 1 if state == name else 0)
                weight.add_metric(labels, peer.weight)
                active.add_metric(labels, peer.active_connections)
                total.add_metric(labels, peer.total_connections)
                if peer.last_check is not None:
                    last_check.add_metric(labels, peer.last_check.at)
            for health, count in sorted(by_health.items()):
                peers_n.add_metric([pool.name, health], count)
        yield from (bytes_total, failures, up, checks, admin, weight, active, total,
                    last_check, peers_n)

    # HTTP mode

    def _http_metrics(self, listeners: Sequence[ListenerStats],
                      pools: Sequence[PoolStats]) -> Iterator[Metric]:
        requests, durations, retries, errors, upstream, ejections = _http_families()
        retried: Dict[Tuple[str, str], int] = {}
        for listener in listeners:
            http = listener.http
            if http is None:
                continue
            for (pool, code), n in sorted(http.requests.items()):
                requests.add_metric([listener.name, pool, str(code)], n)
            for pool, histogram in sorted(http.durations.items()):
                running, buckets = 0, []
                for bound, n in zip(histogram.buckets, histogram.counts):
                    running += n
                    buckets.append((f"{bound:g}", running))
                buckets.append(("+Inf", histogram.count))
                durations.add_metric([listener.name, pool], buckets, histogram.sum)
            for reason, n in sorted(http.errors.items()):
                errors.add_metric([listener.name, reason], n)
            for key, n in http.retries.items():
                retried[key] = retried.get(key, 0) + n
        for (pool, reason), n in sorted(retried.items()):
            retries.add_metric([pool, reason], n)
        for pool_stats in pools:
            for peer, states in sorted(pool_stats.upstream.items()):
                for state in ("active", "idle"):
                    upstream.add_metric([pool_stats.name, peer, state], states.get(state, 0))
            for peer_stats in pool_stats.peers:
                ejections.add_metric([pool_stats.name, peer_stats.address],
                                     peer_stats.ejections)
        yield from (requests, durations, retries, errors, upstream, ejections)

    # per pool: Consul discovery

    def _consul_metrics(self, pools: Sequence[PoolStats],
                        listeners: Sequence[ListenerStats]) -> Iterator[Metric]:
        """Per pool with a Consul watch; an http listener's watch of the routes Consul tags
        announce shows as the pool ``routes:<listener>``."""
        requests = CounterMetricFamily(
            "lb_consul_requests_total", "Consul queries by result.", labels=["pool", "result"])
        last = GaugeMetricFamily(
            "lb_consul_last_success_timestamp_seconds",
            "When Consul last answered this pool's query successfully.", labels=["pool"])
        failing = GaugeMetricFamily(
            "lb_consul_consecutive_failures",
            "Consul queries failed in a row for this pool (0 once one succeeds).",
            labels=["pool"])
        watches = [(pool.name, pool.consul) for pool in pools] + [
            (ROUTES_WATCH_PREFIX + listener.name, listener.http.consul_routes)
            for listener in listeners
            if listener.http is not None]
        for name, consul in watches:
            if consul is None:
                continue
            # every result label, zeros included (rate() needs a zero)
            for result, count in sorted(consul.requests.items()):
                requests.add_metric([name, result], count)
            if consul.last_success is not None:
                last.add_metric([name], consul.last_success)
            failing.add_metric([name], consul.failures)
        yield from (requests, last, failing)


def _http_families() -> Tuple[Any, ...]:
    return (
        CounterMetricFamily(
            "lb_http_requests_total", "HTTP requests answered, by the status sent to the "
            "client (pool is empty when no route matched).", labels=["listener", "pool", "code"]),
        HistogramMetricFamily(
            "lb_http_request_duration_seconds", "HTTP requests from their head received to "
            "their answer's last byte sent.", labels=["listener", "pool"]),
        CounterMetricFamily(
            "lb_http_retries_total", "HTTP requests sent again: to another peer after a "
            "failed connect or on a retry_on condition (reason = the condition), or on a fresh "
            "connection after a reused one closed unanswered (reason reused-connection).",
            labels=["pool", "reason"]),
        CounterMetricFamily(
            "lb_http_errors_total", "Answers lb made itself, by reason.",
            labels=["listener", "reason"]),
        GaugeMetricFamily(
            "lb_upstream_connections", "Connections to peers in HTTP mode: active (serving a "
            "request) and idle (kept alive for the next).", labels=["pool", "peer", "state"]),
        CounterMetricFamily(
            "lb_outlier_ejections_total", "Times outlier detection ejected the peer.",
            labels=["pool", "peer"]),
    )


def make_registry(view: IAdminView, process: bool = True) -> CollectorRegistry:
    """A registry of its own (never the global one) with lb's collector, and the process,
    platform and garbage-collector collectors Prometheus users expect."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LBCollector(view))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class _Only:
    """The families of ``registry`` named in ``names`` (by family or sample name). Unlike
    ``restricted_registry`` it needs no ``describe``, which would walk the pools."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str]) -> None:
        self.registry = registry
        self.names = set(names)

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            known = {metric.name, f"{metric.name}_total"} | {s.name for s in metric.samples}
            if known & self.names:
                yield metric


class MetricsResource(Resource):
    """``GET /metrics`` in the format the scraper accepts; ``?name[]=`` filters families."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        registry: Any = self.registry
        names = [n.decode("utf-8", "replace") for n in (request.args or {}).get(b"name[]", [])]
        if names:
            registry = _Only(registry, names)
        body = encoder(registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
