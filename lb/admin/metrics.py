"""``/metrics``: Prometheus metrics read from the live pools and listeners at scrape time.

Nothing on the data path touches prometheus_client: peers and listeners keep plain integer
counters, and ``LBCollector`` turns them into metric families when Prometheus scrapes. A
peer that left its pool is simply not yielded any more, so its series disappear and label
sets stay bounded by what exists now.

The exposition is prometheus_client's (``choose_encoder``: text format, or OpenMetrics when
the scraper asks for it). Its bundled ``prometheus_client.twisted.MetricsResource`` is not
used because it imports the global reactor and renders in the reactor's thread pool, where
reading the pools would race with the reactor thread changing them; here the collector runs
in the reactor thread, which is cheap at these sizes.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

import lb
from lb.peer import ADMIN_STATES
from lb.health.risefall import UP

REFUSE_REASONS = ("allow", "max_connections")


class LBCollector(Collector):
    """Yields lb's metrics from ``root`` (the LBService) each time it is collected."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not walk the pools

    def collect(self) -> Iterator[Metric]:
        root = self.root
        pools = list(root.pools.values())
        listeners = list(root.listeners.values())
        yield from self._listener_metrics(listeners)
        yield from self._peer_metrics(pools)
        yield from self._consul_metrics(pools)
        info = GaugeMetricFamily("lb_build_info", "lb's version (always 1).",
                                 labels=["version"])
        info.add_metric([lb.__version__], 1)
        yield info

    # per listener, and per listener and peer

    def _listener_metrics(self, listeners: list) -> Iterator[Metric]:
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
        for service in listeners:
            listener = service.listener
            name = listener.config.name
            pool = listener.pool
            pool_name = pool.name if pool is not None else listener.config.pool
            live = pool.peers if pool is not None else {}
            for key, counts in list(listener.per_peer.items()):
                total, in_flight = counts[0], counts[1]
                if key not in live and in_flight <= 0:
                    continue  # the peer left: its series go with it
                conns.add_metric([name, pool_name, key], total)
                active.add_metric([name, pool_name, key], max(in_flight, 0))
            no_peer.add_metric([name], listener.no_peer)
            for reason in sorted(set(REFUSE_REASONS) | set(listener.refused)):
                refused.add_metric([name, reason], listener.refused.get(reason, 0))
            for reason, count in sorted(listener.ended.items()):
                ended.add_metric([name, str(reason)], count)
            accepted.add_metric([name], listener.total)
            open_now.add_metric([name], len(listener.sessions))
            max_conns.add_metric([name], listener.config.max_connections)
            up.add_metric([name], 1 if service.accepting else 0)
        yield from (conns, active, no_peer, refused, ended, accepted, open_now, max_conns, up)

    # per pool and peer

    def _peer_metrics(self, pools: list) -> Iterator[Metric]:
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
        for service in pools:
            pool = service.pool
            results = _check_results(getattr(service, "parts", {}).get("health"))
            by_health: Dict[str, int] = {"up": 0, "down": 0, "unknown": 0}
            for peer in list(pool.peers.values()):
                labels = [pool.name, peer.key]
                bytes_total.add_metric(labels + ["in"], peer.bytes_in)
                bytes_total.add_metric(labels + ["out"], peer.bytes_out)
                failures.add_metric(labels, peer.connect_failures)
                up.add_metric(labels, 1 if peer.health == UP else 0)
                by_health[peer.health] = by_health.get(peer.health, 0) + 1
                if results is not None:
                    counted = {**results[""], **results.get(peer.key, {})}
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

    # per pool: Consul discovery

    def _consul_metrics(self, pools: list) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lb_consul_requests_total", "Consul queries by result.", labels=["pool", "result"])
        last = GaugeMetricFamily(
            "lb_consul_last_success_timestamp_seconds",
            "When Consul last answered this pool's query successfully.", labels=["pool"])
        failing = GaugeMetricFamily(
            "lb_consul_consecutive_failures",
            "Consul queries failed in a row for this pool (0 once one succeeds).",
            labels=["pool"])
        for service in pools:
            watcher = getattr(service, "parts", {}).get("consul")
            if watcher is None:
                continue
            raw = dict(getattr(watcher, "requests", None) or {})
            counts = {str(k): v for k, v in raw.items()}
            # every result the watcher can count shows from the start (rate() needs a zero)
            module = sys.modules.get(type(watcher).__module__)
            for result in getattr(module, "RESULTS", ()):
                counts.setdefault(str(result), 0)
            for result, count in sorted(counts.items()):
                requests.add_metric([service.pool.name, result], count)
            when = getattr(watcher, "last_success", None)
            if when is not None:
                last.add_metric([service.pool.name], when)
            failures = getattr(watcher, "failures", None)
            if isinstance(failures, int):
                failing.add_metric([service.pool.name], failures)
        yield from (requests, last, failing)


def _check_results(monitor: Any) -> Optional[Dict[str, Dict[str, int]]]:
    """The health part's per-probe counters as {peer key: {result: count}}, or None when the
    pool has no monitor. The monitor counts in ``checks`` (or ``results``), a Counter keyed
    (peer key, result); every peer shows at least the monitor's pass and fail labels."""
    if monitor is None:
        return None
    counts = getattr(monitor, "checks", None)
    if counts is None:
        counts = getattr(monitor, "results", None)
    if counts is None:
        return None
    module = sys.modules.get(type(monitor).__module__)
    labels = (getattr(module, "PASS", "pass"), getattr(module, "FAIL", "fail"))
    out: Dict[str, Dict[str, int]] = {}
    try:
        items = list(dict(counts).items())
    except (TypeError, ValueError):
        return None
    for key, count in items:
        if isinstance(key, tuple) and len(key) == 2:
            out.setdefault(str(key[0]), {})[str(key[1])] = count
    out[""] = {label: 0 for label in labels}  # the labels every peer shows
    return out


def make_registry(root: Any, process: bool = True) -> CollectorRegistry:
    """A registry of its own (never the global one) with lb's collector, and the process,
    platform and garbage-collector collectors Prometheus users expect."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LBCollector(root))
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
        super().__init__()
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
