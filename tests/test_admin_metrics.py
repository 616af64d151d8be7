"""/metrics: SPEC's metric names, read from live objects at scrape time, parsed back with
prometheus_client's own parser."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from lb.admin.metrics import LBCollector, make_registry
from lb.admin.server import build_resource
from lb.config import parse_address
from lb.interfaces import IPoolPart
from lb.service import LBService, default_pool_parts
from lb.stats import ConsulStats, HealthCheckStats
from lb.testing import make_config

BASE = "http://127.0.0.1:9901"
Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


@implementer(IPoolPart)
class FakeWatcher(Service):
    """A Consul part: requests by result and the last good answer's time."""

    def stats(self) -> ConsulStats:
        return ConsulStats(describe="service 'web'", service="web", kv_prefix=None,
                           requests={"ok": 4, "error": 1}, last_success=1700000123.5,
                           failures=0, last_error=None)

    def release(self) -> None:
        pass


@implementer(IPoolPart)
class FakeMonitor(Service):
    """A health part: probes run by peer and result, every peer with both results."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def stats(self) -> HealthCheckStats:
        results = {key: {"pass": 5, "fail": 2 if key == "127.0.0.1:9001" else 0}
                   for key in self.pool.peers}
        return HealthCheckStats(configured=True, type="tcp", path=None, interval=2.0,
                                timeout=1.0, rise=2, fall=3, results=results)

    def release(self) -> None:
        pass


def make_root(parts: bool = True) -> LBService:
    config = make_config(
        {"front": {"bind": "127.0.0.1:0", "pool": "web"}},
        {"web": {"peers": ["127.0.0.1:9001", "[::1]:9002"],
                 "health": {"type": "tcp", "interval": "2s", "timeout": "1s"}},
         "other": {"peers": ["127.0.0.1:9100"]}})
    builders: Dict[str, Any] = {}
    if parts:
        builders = {"consul": lambda root, pool, pc: FakeWatcher() if pool.name == "web" else None,
                    "health": lambda root, pool, pc: FakeMonitor(pool)}
    return LBService(config, MemoryReactorClock(), pool_parts=builders)


def scrape(root: LBService, accept: str = "") -> Tuple[int, str, Any]:
    view = root.admin_view
    stub = StubTreq(build_resource(view, root.reactor, make_registry(view, process=False)))
    results: list = []
    headers = {"Accept": accept} if accept else {}
    d = stub.get(BASE + "/metrics", headers=headers)
    d.addCallback(lambda r: r.text().addCallback(lambda t: results.append((r, t))))
    stub.flush()
    response, text = results[0]
    return response.code, text, response.headers


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> Optional[float]:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def root() -> LBService:
    return make_root()


def test_spec_metrics_parse_and_carry_the_live_values(root: LBService) -> None:
    """Every SPEC metric is there with its labels and the values of the live counters."""
    pool = root.pool("web")
    listener = root.listeners["front"].listener
    peer = pool.get("127.0.0.1:9001")
    pool.report_check(peer, True, "connected")
    peer.bytes_in, peer.bytes_out, peer.connect_failures = 100, 2000, 3
    for _ in range(3):
        listener.peer_connected(peer)
    listener.per_peer[peer.key][1] = 1  # two of the three ended
    listener.ended["no_peer"] = 6
    listener.refused["allow"] += 2
    listener.ended["closed"] += 2
    status, text, headers = scrape(root)
    assert status == 200
    assert headers.getRawHeaders("content-type")[0].startswith("text/plain; version=0.0.4")
    found = samples(text)
    peer_labels = {"pool": "web", "peer": "127.0.0.1:9001"}
    conn_labels = {"listener": "front", **peer_labels}
    assert value(found, "lb_connections_total", **conn_labels) == 3
    assert value(found, "lb_active_connections", **conn_labels) == 1
    assert value(found, "lb_bytes_total", direction="in", **peer_labels) == 100
    assert value(found, "lb_bytes_total", direction="out", **peer_labels) == 2000
    assert value(found, "lb_connect_failures_total", **peer_labels) == 3
    assert value(found, "lb_no_peer_total", listener="front") == 6
    assert value(found, "lb_peer_up", **peer_labels) == 1
    assert value(found, "lb_peer_up", pool="web", peer="[::1]:9002") == 0  # still unknown
    assert value(found, "lb_health_checks_total", result="pass", **peer_labels) == 5
    assert value(found, "lb_health_checks_total", result="fail", **peer_labels) == 2
    assert value(found, "lb_health_checks_total", result="fail", pool="web",
                 peer="[::1]:9002") == 0
    assert value(found, "lb_consul_requests_total", pool="web", result="ok") == 4
    assert value(found, "lb_consul_requests_total", pool="web", result="error") == 1
    assert value(found, "lb_consul_last_success_timestamp_seconds", pool="web") == 1700000123.5
    assert value(found, "lb_refused_connections_total", listener="front", reason="allow") == 2
    assert value(found, "lb_refused_connections_total", listener="front",
                 reason="max_connections") == 0
    assert value(found, "lb_connections_ended_total", listener="front", reason="closed") == 2
    assert value(found, "lb_peer_admin_state", state="ready", **peer_labels) == 1
    assert value(found, "lb_peer_admin_state", state="drain", **peer_labels) == 0


class Port:
    """A listening port as ``ListenerService.accepting`` reads it."""

    def __init__(self, connected: bool) -> None:
        self.connected = connected

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)


def test_listener_up_follows_whether_each_listener_accepts(tmp_path: Any) -> None:
    """``lb_listener_up{listener}`` is 1 while a listener's socket accepts and 0 once it
    does not, whatever closed it (here: one port lost, one never bound)."""
    config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"},
                          "back": {"bind": "127.0.0.1:0", "pool": "web"},
                          "spare": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"]}})
    root = LBService(config, MemoryReactorClock(), pool_parts={})
    root.listeners["front"].port = Port(connected=True)
    root.listeners["back"].port = Port(connected=False)
    found = samples(scrape(root)[1])
    assert value(found, "lb_listener_up", listener="front") == 1
    assert value(found, "lb_listener_up", listener="back") == 0
    assert value(found, "lb_listener_up", listener="spare") == 0
    types = {f.name: f.type for f in text_string_to_metric_families(scrape(root)[1])}
    assert types["lb_listener_up"] == "gauge"


def test_metric_types_follow_prometheus_conventions(root: LBService) -> None:
    """Counters are counters (``_total``), current values are gauges."""
    types = {f.name: f.type for f in text_string_to_metric_families(scrape(root)[1])}
    for name in ("lb_connections", "lb_bytes", "lb_connect_failures", "lb_no_peer",
                 "lb_health_checks", "lb_consul_requests", "lb_refused_connections"):
        assert types[name] == "counter", name
    for name in ("lb_active_connections", "lb_peer_up",
                 "lb_consul_last_success_timestamp_seconds", "lb_peer_admin_state"):
        assert types[name] == "gauge", name


def test_a_removed_peers_series_disappear(root: LBService) -> None:
    """Once a peer leaves its pool, no series carries its label (bounded label sets), while
    a peer still draining with open connections keeps its series."""
    pool = root.pool("other")
    peer = pool.add_peer(parse_address("127.0.0.1:9200"))
    peer.bytes_in = 50
    root.listeners["front"].listener.peer_connected(root.pool("web").get("[::1]:9002"))
    assert '127.0.0.1:9200' in scrape(root)[1]
    pool.remove_peer("127.0.0.1:9200")
    text = scrape(root)[1]
    assert '127.0.0.1:9200' not in text
    found = samples(text)
    assert value(found, "lb_active_connections", listener="front", pool="web",
                 peer="[::1]:9002") == 1
    web = root.pool("web")
    web.apply("static", [])  # both web peers leave; [::1]:9002 is "connected" per listener
    text = scrape(root)[1]
    assert "127.0.0.1:9001" not in text
    # the listener still counts an open connection to [::1]:9002: it stays visible
    assert value(samples(text), "lb_active_connections", listener="front", pool="web",
                 peer="[::1]:9002") == 1
    root.listeners["front"].listener.per_peer["[::1]:9002"][1] = 0
    assert "[::1]:9002" not in scrape(root)[1]


def test_without_parts_the_optional_metrics_are_empty(tmp_path: Any) -> None:
    """Pools without Consul or a health monitor yield no per-pool Consul or check samples
    (and nothing fails)."""
    root = make_root(parts=False)
    found = samples(scrape(root)[1])
    names = {name for name, _ in found}
    assert "lb_consul_requests_total" not in names
    assert "lb_health_checks_total" not in names
    assert "lb_peer_up" in names


def test_openmetrics_is_served_when_asked(root: LBService) -> None:
    """A scraper asking for OpenMetrics gets it (prometheus_client's negotiation)."""
    status, text, headers = scrape(root, "application/openmetrics-text; version=1.0.0")
    assert headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    names = {f.name for f in openmetrics_families(text)}
    assert {"lb_connections", "lb_peer_up"} <= names


def test_name_filter(root: LBService) -> None:
    """?name[]= limits the answer to those families (as prometheus_client's own apps do)."""
    view = root.admin_view
    stub = StubTreq(build_resource(view, root.reactor, make_registry(view, process=False)))
    results: list = []
    d = stub.get(BASE + "/metrics?name[]=lb_peer_up&name[]=lb_no_peer_total")
    d.addCallback(lambda r: r.text().addCallback(results.append))
    stub.flush()
    names = {f.name for f in text_string_to_metric_families(results[0])}
    assert names == {"lb_peer_up", "lb_no_peer"}


def test_each_admin_gets_its_own_registry(root: LBService) -> None:
    """Registries are private: two of them coexist and the global one has no lb metrics."""
    first, second = make_registry(root.admin_view), make_registry(root.admin_view)
    assert first is not REGISTRY and second is not first
    assert first.get_sample_value("lb_peer_up", {"pool": "web", "peer": "[::1]:9002"}) == 0
    assert REGISTRY.get_sample_value("lb_peer_up", {"pool": "web", "peer": "[::1]:9002"}) \
        is None
    assert first.get_sample_value("process_cpu_seconds_total") is not None


def test_collector_reads_at_scrape_time(root: LBService) -> None:
    """The collector holds no state: a counter bumped between two scrapes shows at once."""
    collector = LBCollector(root.admin_view)

    def bytes_in() -> float:
        for family in collector.collect():
            for s in family.samples:
                if s.name == "lb_bytes_total" and s.labels == {
                        "pool": "other", "peer": "127.0.0.1:9100", "direction": "in"}:
                    return s.value
        raise AssertionError("no sample")

    assert bytes_in() == 0
    root.pool("other").get("127.0.0.1:9100").bytes_in += 42
    assert bytes_in() == 42


def test_the_real_health_and_consul_parts_are_read(tmp_path: Any) -> None:
    """The collector reads the counters of lb's own HealthMonitor and ConsulWatcher (not
    started: their counters are bumped by hand), so a rename there breaks this test."""
    from lb.discovery.consul import watch
    from lb.health import monitor

    config = make_config(
        {"front": {"bind": "127.0.0.1:0", "pool": "web"}},
        {"web": {"peers": ["127.0.0.1:9001"], "consul": {"service": "web"},
                 "health": {"type": "tcp", "interval": "2s", "timeout": "1s"}}},
        consul={"url": "http://127.0.0.1:1"}, state_dir=str(tmp_path))
    root = LBService(config, MemoryReactorClock(),
                     pool_parts=default_pool_parts())
    health = root.pools["web"].parts["health"]
    watcher = root.pools["web"].parts["consul"]
    health.checks[("127.0.0.1:9001", monitor.PASS)] += 3
    watcher.requests[watch.OK] += 2
    watcher.last_success = 1700000000.0
    watcher.failures = 4
    found = samples(scrape(root)[1])
    peer = {"pool": "web", "peer": "127.0.0.1:9001"}
    assert value(found, "lb_health_checks_total", result=monitor.PASS, **peer) == 3
    assert value(found, "lb_health_checks_total", result=monitor.FAIL, **peer) == 0
    assert value(found, "lb_consul_requests_total", pool="web", result=watch.OK) == 2
    for result in watch.RESULTS:
        assert value(found, "lb_consul_requests_total", pool="web", result=result) is not None
    assert value(found, "lb_consul_last_success_timestamp_seconds", pool="web") == 1700000000.0
    assert value(found, "lb_consul_consecutive_failures", pool="web") == 4
