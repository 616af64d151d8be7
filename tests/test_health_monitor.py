"""The health monitor's scheduling on a Clock with a fake probe: spread, interval,
concurrency, timeouts, runtime changes, stop, reload, and the passive-only mode."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource

from lb.config import Address, HealthConfig, PoolConfig
from lb.discovery import static
from lb.health.monitor import FAIL, PASS, HealthMonitor, monitor_for
from lb.health.passive import THRESHOLDS_WITHOUT_CHECKS as PASSIVE_DEFAULTS
from lb.health.probes import HTTPProbe, ProbeResult, TCPProbe
from lb.peer import PeerSpec
from lb.pool import Pool
from lb.service import LBService, default_pool_parts
from lb.testing import make_config


class FakeProbe:
    """Records every probe; the test answers them (or not)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: List[Tuple[float, str, Deferred]] = []
        self.cancelled: List[str] = []
        self.raise_for: set = set()

    def __call__(self, address: Address) -> Deferred:
        key = str(address)
        if key in self.raise_for:
            raise RuntimeError("probe bug")

        def cancel(d: Deferred) -> None:
            self.cancelled.append(key)
        d: Deferred = Deferred(cancel)
        self.calls.append((self.clock.seconds(), key, d))
        return d

    def pending(self) -> List[str]:
        return [key for _, key, d in self.calls if not d.called]

    def answer(self, key: str, ok: bool = True, detail: str = "") -> None:
        for _, k, d in self.calls:
            if k == key and not d.called:
                d.callback(ProbeResult(ok, detail or ("HTTP 200" if ok else "HTTP 503")))
                return
        raise AssertionError(f"no probe of {key} in flight")

    def answer_all(self, ok: bool = True) -> None:
        for key in self.pending():
            self.answer(key, ok)

    def times(self, key: Optional[str] = None) -> List[float]:
        return [round(t, 6) for t, k, _ in self.calls if key is None or k == key]


def _key(i: int) -> str:
    return f"127.0.0.1:{9000 + i}"


def make_pool(clock: Clock, n: int, health: Optional[HealthConfig]) -> Pool:
    pool = Pool(PoolConfig(name="web", health=health), clock)
    pool.apply("static", [PeerSpec(Address("127.0.0.1", 9000 + i)) for i in range(n)])
    return pool


def make_monitor(clock: Clock, n: int, health: Optional[HealthConfig] = None,
                 start: bool = True, **settings: Any) -> Tuple[Pool, FakeProbe, HealthMonitor]:
    health = health if health is not None else HealthConfig(**settings)
    pool = make_pool(clock, n, health)
    probe = FakeProbe(clock)
    monitor = HealthMonitor(pool, clock, probe, health)
    if start:
        monitor.startService()
        clock.advance(0)  # "at once" is the next reactor turn
    return pool, probe, monitor


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logged() -> Iterator[List[Dict[str, Any]]]:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# --- spreading and interval ----------------------------------------------------------------


def test_unknown_peers_probed_at_once_then_spread(clock: Clock) -> None:
    """At start, peers without a verdict are all probed at once (quick first verdicts);
    their following probes are spread evenly over the interval, then `interval` apart."""
    pool, probe, monitor = make_monitor(clock, 4, interval=2.0, timeout=1.0)
    assert probe.times() == [0.0, 0.0, 0.0, 0.0]
    probe.answer_all()
    for _ in range(40):
        clock.advance(0.125)
        probe.answer_all()
    assert [probe.times(_key(i)) for i in range(4)] == [
        [0.0, 2.0, 4.0], [0.0, 2.5, 4.5], [0.0, 3.0, 5.0], [0.0, 3.5]]


def test_known_peers_spread_over_interval(clock: Clock) -> None:
    """Peers that already have a verdict (a monitor rebuilt by a reload) are first probed
    at evenly spread offsets over one interval: no burst after a reload."""
    health = HealthConfig(interval=2.0, timeout=1.0)
    pool = make_pool(clock, 4, health)
    for peer in pool.peers.values():
        pool.report_check(peer, True, "HTTP 200")
    probe = FakeProbe(clock)
    HealthMonitor(pool, clock, probe, health).startService()
    clock.advance(0)
    assert probe.times() == [0.0]
    for _ in range(17):
        clock.advance(0.125)
        probe.answer_all()
    assert probe.times() == [0.0, 0.5, 1.0, 1.5, 2.125]  # 2s after the first one ended


def test_interval_between_probes(clock: Clock) -> None:
    """A peer's next probe starts `interval` after its last one ended (HAProxy's `inter`,
    Envoy's `interval`), so a slow peer is never probed back to back."""
    pool, probe, monitor = make_monitor(clock, 1, interval=2.0, timeout=1.0)
    clock.advance(0.75)
    probe.answer(_key(0))  # ended at 0.75
    clock.advance(1.875)  # t=2.625
    assert probe.times() == [0.0]
    clock.advance(0.125)  # t=2.75
    assert probe.times() == [0.0, 2.75]
    clock.advance(0.25)
    probe.answer(_key(0))  # ended at 3.0
    clock.advance(1.875)  # t=4.875
    assert probe.times() == [0.0, 2.75]
    clock.advance(0.125)
    assert probe.times() == [0.0, 2.75, 5.0]


def test_timeout_longer_than_interval(clock: Clock) -> None:
    """`timeout` may exceed `interval`: a hung probe is abandoned at `timeout`, the next
    one starts `interval` after that, and one peer never has two probes in flight."""
    pool, probe, monitor = make_monitor(clock, 1, interval=1.0, timeout=3.0, fall=1)
    most_in_flight = 0
    for _ in range(80):  # 10 s of a peer that never answers
        clock.advance(0.125)
        most_in_flight = max(most_in_flight, len(probe.pending()))
    assert most_in_flight == 1
    assert probe.times() == [0.0, 4.0, 8.0]
    assert pool.peers[_key(0)].health == "down"
    assert pool.peers[_key(0)].last_check.detail == "timeout after 3s"


# --- concurrency and timeouts --------------------------------------------------------------


def test_concurrency_cap(clock: Clock) -> None:
    """Never more than `concurrency` probes in flight; the rest wait in line and start,
    in order, as running probes finish."""
    pool, probe, monitor = make_monitor(clock, 5, concurrency=2, interval=2.0, timeout=1.0)
    assert probe.pending() == [_key(0), _key(1)]
    assert (monitor.in_flight, monitor.waiting) == (2, 3)
    probe.answer(_key(1))
    assert probe.pending() == [_key(0), _key(2)]
    probe.answer(_key(0), ok=False)
    assert probe.pending() == [_key(2), _key(3)]
    probe.answer(_key(2))
    probe.answer(_key(3))
    assert probe.pending() == [_key(4)]
    assert (monitor.in_flight, monitor.waiting) == (1, 0)


def test_concurrency_cap_under_timeouts(clock: Clock) -> None:
    """With probes that never answer, the cap still holds over many intervals, and every
    peer still gets its turn as timeouts free slots."""
    pool, probe, monitor = make_monitor(clock, 6, concurrency=2, interval=2.0, timeout=1.0)
    most = 0
    for _ in range(100):
        clock.advance(0.1)
        most = max(most, len(probe.pending()))
    assert most == 2
    assert {key for _, key, _ in probe.calls} == {_key(i) for i in range(6)}


def test_probe_never_outlives_timeout(clock: Clock) -> None:
    """A probe with no answer is cancelled at `timeout` and counts as a failed check
    named after the timeout."""
    pool, probe, monitor = make_monitor(clock, 1, interval=2.0, timeout=0.5)
    clock.advance(0.499)
    assert probe.cancelled == []
    clock.advance(0.001)
    assert probe.cancelled == [_key(0)]
    peer = pool.peers[_key(0)]
    assert (peer.last_check.ok, peer.last_check.detail, peer.last_check.at) == (
        False, "timeout after 500ms", 0.5)
    assert monitor.in_flight == 0
    assert monitor.checks[(_key(0), FAIL)] == 1


def test_probe_detail_of_its_own_timeout_kept(clock: Clock) -> None:
    """A probe that turns its cancellation into its own verdict (the HTTP probe naming the
    phase) keeps that detail."""
    pool = make_pool(clock, 1, HealthConfig(timeout=1.0))

    def probe(address: Address) -> Deferred:
        return Deferred(lambda d: d.callback(ProbeResult(False, "timeout after 1s reading body")))
    HealthMonitor(pool, clock, probe, HealthConfig(timeout=1.0)).startService()
    clock.advance(0)
    clock.advance(1.0)
    assert pool.peers[_key(0)].last_check.detail == "timeout after 1s reading body"


# --- verdicts reach the pool ---------------------------------------------------------------


def test_rise_and_fall_through_the_monitor(clock: Clock, logged: list) -> None:
    """First pass: unknown → up; `fall` failing probes: down; `rise` passes: up again.
    Each transition is one log line with peer, old → new and the detail; last_check holds
    the latest probe."""
    pool, probe, monitor = make_monitor(clock, 1, interval=1.0, timeout=0.5, rise=2, fall=3)
    peer = pool.peers[_key(0)]
    assert peer.health == "unknown"
    states = []
    for ok in (True, False, False, False, True, True):
        probe.answer(_key(0), ok)
        states.append(peer.health)
        clock.advance(1.0)
    assert states == ["up", "up", "up", "down", "down", "up"]
    assert peer.last_check.ok and peer.last_check.detail == "HTTP 200"
    lines = [e for e in logged if "health {old} -> {new}" in e.get("log_format", "")]
    assert [(e["peer"], e["old"], e["new"], e["detail"]) for e in lines] == [
        (_key(0), "unknown", "up", "HTTP 200"),
        (_key(0), "up", "down", "HTTP 503"),
        (_key(0), "down", "up", "HTTP 200")]


def test_probe_that_breaks_keeps_monitor_running(clock: Clock) -> None:
    """A probe raising (a bug) is a failed check with a detail; the monitor logs it and
    keeps probing that peer and the others."""
    pool, probe, monitor = make_monitor(clock, 2, start=False, interval=1.0, timeout=0.5)
    probe.raise_for.add(_key(0))
    monitor.startService()
    clock.advance(0)
    assert pool.peers[_key(0)].last_check.detail == "check error: probe bug"
    probe.answer(_key(1))
    probe.raise_for.clear()
    clock.advance(1.5)  # peer 0 due at 1.0, peer 1 at its phase 0.5 + 1.0
    assert sorted(probe.pending()) == [_key(0), _key(1)]


def test_failed_deferred_is_a_failed_check(clock: Clock) -> None:
    """A probe whose Deferred fails (instead of answering) counts as failed, and the
    failure is not left unhandled."""
    pool = make_pool(clock, 1, HealthConfig())
    HealthMonitor(pool, clock, lambda a: _failed(ValueError("bad")),
                  HealthConfig()).startService()
    clock.advance(0)
    assert pool.peers[_key(0)].last_check.detail == "check error: bad"


def _failed(exc: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(exc)
    return d


# --- runtime changes -----------------------------------------------------------------------


def test_peer_added_at_runtime_is_probed_at_once(clock: Clock) -> None:
    """A peer added while the monitor runs (Consul, admin API) is probed immediately."""
    pool, probe, monitor = make_monitor(clock, 1, interval=2.0, timeout=1.0)
    probe.answer_all()
    clock.advance(0.3)
    pool.add_peer(Address("127.0.0.1", 9100))
    clock.advance(0)
    assert probe.pending() == ["127.0.0.1:9100"]
    assert probe.times("127.0.0.1:9100") == [0.3]
    probe.answer("127.0.0.1:9100")
    assert pool.peers["127.0.0.1:9100"].health == "up"


def test_peers_added_together_get_spread_phases(clock: Clock) -> None:
    """Peers added in one batch at runtime are probed at once, but their next probes do
    not all land at the same instant."""
    pool, probe, monitor = make_monitor(clock, 0, interval=2.0, timeout=1.0)
    pool.apply("consul", [PeerSpec(Address("127.0.0.1", 9200 + i)) for i in range(5)])
    clock.advance(0)
    probe.answer_all()
    for _ in range(40):
        clock.advance(0.1)
        probe.answer_all()
    seconds = sorted(probe.times(f"127.0.0.1:{9200 + i}")[1] for i in range(5))
    assert all(2.0 <= t < 4.0 for t in seconds)
    assert len(set(seconds)) == 5


def test_peer_removed_at_runtime(clock: Clock) -> None:
    """A removed peer's in-flight probe is cancelled, nothing is reported for it, and it
    is not probed again; the others carry on."""
    pool, probe, monitor = make_monitor(clock, 2, interval=1.0, timeout=0.5)
    gone = pool.peers[_key(0)]
    pool.apply("static", [PeerSpec(Address("127.0.0.1", 9001))])
    assert probe.cancelled == [_key(0)]
    assert gone.last_check is None
    assert monitor.watched() == [_key(1)]
    probe.answer(_key(1))
    clock.advance(5.0)
    assert _key(0) not in probe.pending()
    assert probe.times(_key(0)) == [0.0]


def test_removed_while_waiting_in_line(clock: Clock) -> None:
    """A peer removed while waiting for a concurrency slot is dropped from the line."""
    pool, probe, monitor = make_monitor(clock, 3, concurrency=1, interval=2.0, timeout=1.0)
    assert monitor.waiting == 2
    pool.apply("static", [PeerSpec(Address("127.0.0.1", 9000 + i)) for i in (0, 2)])
    assert monitor.waiting == 1
    probe.answer(_key(0))
    assert probe.pending() == [_key(2)]


def test_removed_then_readded_is_a_new_peer(clock: Clock) -> None:
    """A peer removed and added back is a new peer: unknown, probed at once."""
    pool, probe, monitor = make_monitor(clock, 1, interval=2.0, timeout=1.0)
    probe.answer(_key(0))
    pool.apply("static", [])
    clock.advance(0.5)
    pool.apply("static", [PeerSpec(Address("127.0.0.1", 9000))])
    clock.advance(0)
    assert pool.peers[_key(0)].health == "unknown"
    assert probe.times(_key(0)) == [0.0, 0.5]


def test_reannounced_peer_keeps_its_schedule_and_state(clock: Clock) -> None:
    """The same peer announced again (Consul refresh) is not re-probed or reset."""
    pool, probe, monitor = make_monitor(clock, 1, interval=2.0, timeout=1.0, rise=2, fall=3)
    probe.answer(_key(0))
    clock.advance(2.0)
    probe.answer(_key(0), ok=False)
    state = pool.peers[_key(0)].health_state
    pool.apply("static", [PeerSpec(Address("127.0.0.1", 9000))])
    pool.apply("consul", [PeerSpec(Address("127.0.0.1", 9000))])
    assert pool.peers[_key(0)].health_state == state
    assert probe.times() == [0.0, 2.0]


# --- stop and reload -----------------------------------------------------------------------


def test_stop_cancels_everything(clock: Clock) -> None:
    """stopService cancels in-flight probes and every timer, drops the line, and stops
    following the pool; late answers are ignored."""
    pool, probe, monitor = make_monitor(clock, 4, concurrency=2, interval=2.0, timeout=1.0)
    probe.answer(_key(0))
    in_flight = [d for _, _, d in probe.calls if not d.called]
    monitor.stopService()
    assert sorted(probe.cancelled) == [_key(1), _key(2)]
    assert all(d.called for d in in_flight)
    assert clock.getDelayedCalls() == []
    assert (monitor.in_flight, monitor.waiting) == (0, 0)
    pool.add_peer(Address("127.0.0.1", 9100))
    clock.advance(10)
    assert len(probe.calls) == 3
    assert pool.peers[_key(1)].last_check is None


def test_new_monitor_keeps_health_state(clock: Clock) -> None:
    """A reload builds a new monitor; peers keep their health and last_check, and the new
    monitor's first failure counts against `fall` instead of starting over."""
    health = HealthConfig(interval=1.0, timeout=0.5, rise=2, fall=3)
    pool, probe, old = make_monitor(clock, 2, health)
    probe.answer_all()
    old.stopService()
    peer = pool.peers[_key(0)]
    before = (peer.health_state, peer.last_check)
    assert peer.health == "up"
    probe2 = FakeProbe(clock)
    new = HealthMonitor(pool, clock, probe2, health)
    new.startService()
    clock.advance(0)
    assert (peer.health_state, peer.last_check) == before
    assert probe2.pending() == [_key(0)]  # spread, not all at once: peers are known
    for _ in range(2):
        probe2.answer(_key(0), ok=False)
        clock.advance(1.0)
    assert peer.health == "up"
    probe2.answer(_key(0), ok=False)
    assert peer.health == "down"


# --- without a health section: passive checks, probes only to bring peers back -------------


def test_passive_only_pool(clock: Clock) -> None:
    """Without `health`, peers start up and are not probed; `fall` failed client connects
    take a peer out, a TCP probe schedule at the default interval brings it back after
    `rise` passes, then probing stops."""
    pool = make_pool(clock, 2, None)
    probe = FakeProbe(clock)
    monitor = HealthMonitor(pool, clock, probe, PASSIVE_DEFAULTS, all_peers=False)
    monitor.startService()
    peer = pool.peers[_key(0)]
    assert peer.health == "up" and probe.calls == [] and clock.getDelayedCalls() == []
    for _ in range(PASSIVE_DEFAULTS.fall):
        conn = object()
        pool.connection_started(peer, conn)
        pool.connection_failed(peer, conn, "connection refused")
    assert peer.health == "down"
    assert probe.calls == []
    clock.advance(PASSIVE_DEFAULTS.interval)
    assert probe.times() == [2.0]
    probe.answer(_key(0), ok=True, detail="connected")
    assert peer.health == "down"  # rise 2
    clock.advance(2.0)
    probe.answer(_key(0), ok=True, detail="connected")
    assert peer.health == "up"
    clock.advance(10.0)
    assert probe.times() == [2.0, 4.0]
    assert monitor.watched() == []


def test_passive_only_probes_unknown_peers(clock: Clock) -> None:
    """A reload that removes `health` leaves undecided (unknown) peers: the passive-only
    monitor probes them so they get a verdict."""
    pool = make_pool(clock, 1, HealthConfig())
    pool.reconfigure(PoolConfig(name="web"))
    probe = FakeProbe(clock)
    HealthMonitor(pool, clock, probe, PASSIVE_DEFAULTS, all_peers=False).startService()
    clock.advance(0)
    assert probe.pending() == [_key(0)]
    probe.answer(_key(0))
    assert pool.peers[_key(0)].health == "up"


# --- monitor_for and the service -------------------------------------------------------------


class Health(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.hosts: List[bytes] = []

    def render(self, request: Any) -> bytes:
        self.hosts.append(request.getHeader(b"host"))
        request.setResponseCode(self.code)
        return b"ok"


def _pool_config(health: Any) -> PoolConfig:
    config = make_config({"web": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"], **(
                             {"health": health} if health is not None else {})}})
    return config.pools["web"]


def test_monitor_for_kinds() -> None:
    """monitor_for always returns a monitor: HTTP through the given client, TCP for
    type tcp, and a passive-only TCP monitor for pools without health."""
    reactor = MemoryReactorClock()
    stub = StubTreq(Health())
    for health, probe_type, all_peers in (({}, HTTPProbe, True),
                                          ({"type": "tcp"}, TCPProbe, True),
                                          (None, TCPProbe, False)):
        config = _pool_config(health)
        monitor = monitor_for(Pool(config, reactor), config.health, reactor=reactor,
                              http=stub)
        assert isinstance(monitor.probe, probe_type)
        assert monitor.all_peers is all_peers
    config = _pool_config({})
    http = monitor_for(Pool(config, reactor), config.health, reactor=reactor, http=stub)
    assert http.probe.client is stub  # type: ignore[attr-defined]


def test_monitor_for_own_client_is_closed_on_stop() -> None:
    """Without an injected client the monitor builds its own (non-persistent) and
    closes it when stopped."""
    reactor = MemoryReactorClock()
    config = _pool_config({})
    pool = Pool(config, reactor)
    static.apply(pool, config)
    monitor = monitor_for(pool, config.health, reactor=reactor)
    assert monitor.probe.client is not None  # type: ignore[attr-defined]
    monitor.startService()
    reactor.advance(0)
    assert reactor.tcpClients  # probing through the reactor it was given
    monitor.stopService()
    assert reactor.getDelayedCalls() == [] or all(
        not c.active() for c in reactor.getDelayedCalls())


def test_service_reload_keeps_health() -> None:
    """End to end in memory: LBService with the health part and a StubTreq client; a
    reload that changes the health section replaces the monitor, and peers keep their
    health and last_check; the old monitor is stopped."""
    reactor = MemoryReactorClock()
    page = Health()
    listeners = {"web": {"bind": "127.0.0.1:0", "pool": "web"}}
    pools = {"web": {"peers": ["127.0.0.1:9001", "127.0.0.1:9002"],
                     "health": {"interval": "2s", "timeout": "1s", "host": "app"}}}
    service = LBService(make_config(listeners, pools), reactor,
                        pool_parts={"health": default_pool_parts()["health"]},
                        http_client=StubTreq(page))
    service.startService()
    reactor.advance(0)
    pool = service.pool("web")
    assert [p.health for p in pool.peers.values()] == ["up", "up"]
    assert page.hosts == [b"app", b"app"]
    reactor.advance(3.0)
    old = service.pools["web"].parts["health"]
    before = {k: (p.health_state, p.last_check) for k, p in pool.peers.items()}
    pools["web"]["health"]["interval"] = "5s"
    service.apply(make_config(listeners, pools))
    new = service.pools["web"].parts["health"]
    assert new is not old and not old.running and new.running
    assert {k: (p.health_state, p.last_check) for k, p in pool.peers.items()} == before
    page.code = 503
    reactor.advance(5.0)
    assert pool.peers["127.0.0.1:9001"].last_check.detail == "HTTP 503"
    assert pool.peers["127.0.0.1:9001"].health == "up"  # one failure of fall 3
    service.stopService()
    assert not new.running


def test_checks_counted(clock: Clock) -> None:
    """Probe results are counted per peer and result (for lb_health_checks_total); a
    removed peer's counts are dropped so metric labels stay bounded."""
    pool, probe, monitor = make_monitor(clock, 1, interval=1.0, timeout=0.5)
    probe.answer(_key(0), ok=True)
    clock.advance(1.0)
    probe.answer(_key(0), ok=False)
    clock.advance(1.0)
    probe.answer(_key(0), ok=False)
    assert (monitor.checks[(_key(0), PASS)], monitor.checks[(_key(0), FAIL)]) == (1, 2)
    pool.apply("static", [])
    assert dict(monitor.checks) == {}
