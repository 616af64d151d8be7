"""The ``stats()`` views (lb.stats) that pools, health monitors and listeners build for
the admin server: their values, their zeros, and peers that left."""

from __future__ import annotations

from typing import Any, Dict

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from lb.config import Address, HealthConfig, PoolConfig, parse_address
from lb.health.monitor import FAIL, PASS, HealthMonitor
from lb.health.probes import ProbeResult
from lb.peer import PeerSpec
from lb.pool import Pool
from lb.service import LBService
from lb.stats import CheckStats, HealthCheckStats, ListenerStats, PeerStats
from lb.testing import make_config


def web_pool(clock: Clock, **settings: Any) -> Pool:
    """Pool web with two static peers, 127.0.0.1:9001 and [::1]:9002 (weight 3)."""
    config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001",
                                            {"address": "[::1]:9002", "weight": 3}],
                                  **settings}})
    pool = Pool(config.pools["web"], clock)
    pool.apply("static", [PeerSpec(p.address, p.weight) for p in config.pools["web"].peers])
    return pool


# --- Pool.stats -------------------------------------------------------------------------------


def test_a_new_pool_shows_its_peers_with_zero_counters() -> None:
    """A pool's view names it and its balance, and lists its peers in the order they
    joined, each with its sources, states and every counter at zero; no parts given, no
    part views."""
    stats = web_pool(Clock(), balance="leastconn").stats()
    assert (stats.name, stats.balance, stats.slow_start) == ("web", "leastconn", 0.0)
    assert (stats.health_check, stats.consul) == (None, None)
    assert [p.address for p in stats.peers] == ["127.0.0.1:9001", "[::1]:9002"]
    assert stats.peers[1] == PeerStats(
        address="[::1]:9002", weight=3, sources=("static",), admin_state="ready",
        operator_state="ready", source_states={"static": "ready"}, removing=False,
        removable=True, health="up", ramp=1.0, active_connections=0, total_connections=0,
        bytes_in=0, bytes_out=0, connect_failures=0, last_check=None)


def test_peer_views_carry_the_live_values() -> None:
    """Counters, the last check, operator changes, what each source asks for and a slow
    start ramp all show in the peer's view as they are now."""
    clock = Clock()
    pool = web_pool(clock, slow_start="10s", health={"type": "tcp"})
    clock.advance(100)
    peer = pool.get("127.0.0.1:9001")
    pool.connection_started(peer, object())
    pool.connection_established(peer)
    peer.bytes_in, peer.bytes_out, peer.connect_failures = 10, 20, 1
    for _ in range(2):  # rise 2: up, and the slow start begins
        pool.report_check(peer, True, "connected")
    pool.set_weight(peer.key, 5)
    pool.apply("consul", [PeerSpec(peer.address, state="drain")])
    clock.advance(5)
    view = pool.stats().peers[0]
    assert (view.weight, view.sources, view.admin_state, view.operator_state) == (
        5, ("static", "consul"), "drain", "ready")
    assert view.source_states == {"consul": "drain", "static": "ready"}
    assert (view.health, view.active_connections, view.total_connections) == ("up", 1, 1)
    assert (view.bytes_in, view.bytes_out, view.connect_failures) == (10, 20, 1)
    assert view.last_check == CheckStats(True, "connected", 100.0)
    assert view.removable is False  # Consul announces it: DELETE would be refused
    assert 0.1 <= pool.stats().peers[1].ramp <= 1.0 and pool.stats().slow_start == 10.0


def test_a_peer_that_left_disappears_and_a_draining_one_shows_removing() -> None:
    """A peer removed while idle is gone from the next view; one removed with a
    connection open stays, marked removing and no longer removable, until it drains.
    ``peer_stats`` still describes a peer that is already gone (DELETE's answer)."""
    pool = web_pool(Clock())
    gone = pool.remove_peer("127.0.0.1:9001")
    assert [p.address for p in pool.stats().peers] == ["[::1]:9002"]
    assert pool.peer_stats(gone).removing is True
    busy = pool.get("[::1]:9002")
    conn = object()
    pool.connection_started(busy, conn)
    pool.remove_peer(busy.key)
    (view,) = pool.stats().peers
    assert (view.removing, view.removable, view.admin_state, view.sources) == (
        True, False, "drain", ())
    pool.connection_ended(busy, conn)
    assert pool.stats().peers == ()


# --- HealthMonitor.stats ----------------------------------------------------------------------


class Verdicts:
    """A probe answering at once from a table of peer key -> ok."""

    def __init__(self) -> None:
        self.ok: Dict[str, bool] = {}

    def __call__(self, address: Address) -> defer.Deferred[ProbeResult]:
        ok = self.ok.get(str(address), True)
        return defer.succeed(ProbeResult(ok, "ok" if ok else "refused"))


def test_monitor_shows_its_checks_and_counts_every_peer_with_zeros() -> None:
    """The monitor's view has its check settings (path only for http) and, for every peer
    of the pool, probes run by result, zeros included before any probe."""
    clock = Clock()
    health = HealthConfig(type="http", path="/ping", interval=2.0, timeout=1.0, rise=1,
                          fall=2)
    pool = Pool(PoolConfig(name="web", health=health), clock)
    pool.apply("static", [PeerSpec(parse_address("127.0.0.1:9001")),
                          PeerSpec(parse_address("127.0.0.1:9002"))])
    probe = Verdicts()
    monitor = HealthMonitor(pool, clock, probe, health)
    assert monitor.stats() == HealthCheckStats(
        configured=True, type="http", path="/ping", interval=2.0, timeout=1.0, rise=1,
        fall=2, results={"127.0.0.1:9001": {PASS: 0, FAIL: 0},
                         "127.0.0.1:9002": {PASS: 0, FAIL: 0}})
    probe.ok["127.0.0.1:9002"] = False
    monitor.startService()
    clock.advance(0)
    clock.advance(3.0)  # the second peer's phase is half an interval: probed at 0 and 3
    assert monitor.stats().results == {"127.0.0.1:9001": {PASS: 2, FAIL: 0},
                                       "127.0.0.1:9002": {PASS: 0, FAIL: 2}}
    monitor.stopService()


def test_monitor_view_forgets_a_peer_that_left() -> None:
    """A peer removed from the pool leaves the monitor's counts (bounded metric labels)."""
    clock = Clock()
    pool = web_pool(clock, health={"type": "tcp"})
    assert pool.config.health is not None
    monitor = HealthMonitor(pool, clock, Verdicts(), pool.config.health)
    monitor.startService()
    clock.advance(0)
    assert set(monitor.stats().results) == {"127.0.0.1:9001", "[::1]:9002"}
    pool.remove_peer("127.0.0.1:9001")
    assert monitor.stats().results == {"[::1]:9002": {PASS: 1, FAIL: 0}}
    monitor.stopService()


# --- ListenerService.stats --------------------------------------------------------------------


class Port:
    """A listening port as ``ListenerService`` reads one: open or lost, or closed (its
    address can no longer be asked)."""

    def __init__(self, connected: bool = True, closed: bool = False) -> None:
        self.connected = connected
        self.closed = closed

    def getHost(self) -> IPv4Address:
        if self.closed:
            raise RuntimeError("closed")
        return IPv4Address("TCP", "127.0.0.1", 8080)


@pytest.fixture
def root() -> LBService:
    config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web",
                                    "max_connections": 50}},
                         {"web": {"peers": ["127.0.0.1:9001", "[::1]:9002"]}})
    return LBService(config, MemoryReactorClock(), pool_parts={})


def test_a_new_listener_shows_zeros_and_every_refusal_reason(root: LBService) -> None:
    """Before any client: zeros, both refusal reasons at 0, nothing ended; not accepting
    and its configured address while it has no socket."""
    assert root.listeners["front"].stats() == ListenerStats(
        name="front", bind="127.0.0.1:0", address="127.0.0.1:0", pool="web", mode="tcp",
        accepting=False, active_connections=0, total_connections=0, max_connections=50,
        no_peer=0, refused={"allow": 0, "max_connections": 0}, ended={}, per_peer={})


def test_listener_view_carries_the_counters(root: LBService) -> None:
    """Accepted, refused and ended counts, per-peer connections and the bound address
    show as they are; ends are sorted by reason."""
    service = root.listeners["front"]
    listener = service.listener
    service.port = Port()  # type: ignore[assignment]
    listener.total = 9
    listener.refused["allow"] += 2
    listener.ended.update({"no_peer": 3, "closed": 4})
    peer = root.pool("web").get("127.0.0.1:9001")
    for _ in range(3):
        listener.peer_connected(peer)
    listener.per_peer[peer.key][1] = 1
    stats = service.stats()
    assert (stats.address, stats.accepting, stats.total_connections, stats.no_peer) == (
        "127.0.0.1:8080", True, 9, 3)
    assert stats.refused == {"allow": 2, "max_connections": 0}
    assert list(stats.ended.items()) == [("closed", 4), ("no_peer", 3)]
    assert stats.per_peer == {"127.0.0.1:9001": (3, 1)}


def test_listener_view_drops_a_peer_that_left_once_its_connections_end(
        root: LBService) -> None:
    """A peer gone from the pool keeps its per-peer entry while connections to it are
    open, and loses it once they have ended."""
    service = root.listeners["front"]
    listener = service.listener
    pool = root.pool("web")
    listener.peer_connected(pool.get("[::1]:9002"))
    pool.apply("static", [])  # both peers leave the pool
    assert service.stats().per_peer == {"[::1]:9002": (1, 1)}
    listener.per_peer["[::1]:9002"][1] = 0
    assert service.stats().per_peer == {}


def test_a_closed_socket_shows_the_configured_address(root: LBService) -> None:
    """A port that can no longer tell its address (closed under lb) leaves the view
    with the configured bind, not an error."""
    service = root.listeners["front"]
    service.port = Port(connected=False, closed=True)  # type: ignore[assignment]
    stats = service.stats()
    assert (stats.address, stats.accepting) == ("127.0.0.1:0", False)
