"""Slow start: the pool ramps a peer's effective weight from 10% to 100% over
``slow_start`` after it is added or comes up, and every weighted algorithm follows."""

from __future__ import annotations

import random
from typing import List, Optional

import pytest
from twisted.internet.task import Clock

from lb.config import Address, HealthConfig, PoolConfig
from lb.interfaces import PickContext
from lb.peer import PeerSpec
from lb.pool import Pool
from lb.slowstart import FLOOR as SLOW_START_FLOOR
from lb.slowstart import STEPS as SLOW_START_STEPS

OLD = [Address("127.0.0.1", 9001 + i) for i in range(3)]
NEW = Address("127.0.0.1", 9100)


def make_pool(balance: str = "roundrobin", slow_start: float = 30.0,
              health: Optional[HealthConfig] = None, clock: Optional[Clock] = None,
              factor: Optional[float] = None) -> Pool:
    config = PoolConfig(name="web", balance=balance, slow_start=slow_start, health=health,
                        hash_balance_factor=factor)
    return Pool(config, clock or Clock(), random.Random(5))


def ramp_ratio(pool: Pool, address: Address) -> float:
    peer = pool.peers[str(address)]
    return peer.effective_weight / peer.weight


def expected(t: float, duration: float = 30.0) -> float:
    return min(1.0, SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * t / duration)


def ramp_timers(clock: Clock) -> List[object]:
    return [c for c in clock.getDelayedCalls() if c.active()]


def test_ramp_is_linear_from_ten_percent_in_twenty_steps() -> None:
    """A peer added to a running pool starts at 10% of its weight and climbs linearly,
    updated every slow_start/20, reaching exactly 100% at slow_start; then no timer."""
    clock = Clock()
    pool = make_pool(clock=clock)
    pool.apply("static", [PeerSpec(a) for a in OLD])
    clock.advance(30)
    assert all(ramp_ratio(pool, a) == 1.0 for a in OLD)
    pool.apply("static", [PeerSpec(a) for a in OLD] + [PeerSpec(NEW, weight=4)])
    step = 30.0 / SLOW_START_STEPS
    for i in range(SLOW_START_STEPS + 1):
        assert ramp_ratio(pool, NEW) == pytest.approx(expected(i * step)), i
        assert pool.peers[str(NEW)].effective_weight == pytest.approx(4 * expected(i * step))
        clock.advance(step)
    assert ramp_ratio(pool, NEW) == 1.0
    assert ramp_timers(clock) == []


def test_peers_ramp_at_balancer_start_too() -> None:
    """Unlike HAProxy, peers present when the pool starts also begin at 10%."""
    clock = Clock()
    pool = make_pool(clock=clock)
    pool.apply("static", [PeerSpec(a, weight=2) for a in OLD])
    assert [ramp_ratio(pool, a) for a in OLD] == [SLOW_START_FLOOR] * 3
    clock.advance(15)
    assert [ramp_ratio(pool, a) for a in OLD] == [pytest.approx(0.55)] * 3
    clock.advance(15)
    assert [ramp_ratio(pool, a) for a in OLD] == [1.0] * 3


def test_ramp_starts_when_health_checks_bring_a_peer_up_and_restarts_after_down() -> None:
    """With checks, a peer ramps from the moment it goes up; after going down and up
    again it starts over from 10%."""
    clock = Clock()
    pool = make_pool(clock=clock, health=HealthConfig(type="tcp", rise=1, fall=1))
    pool.apply("static", [PeerSpec(NEW)])
    peer = pool.peers[str(NEW)]
    clock.advance(100)  # unknown: no ramp progress
    assert ramp_ratio(pool, NEW) == SLOW_START_FLOOR
    pool.report_check(peer, True, "ok")
    clock.advance(15)
    assert ramp_ratio(pool, NEW) == pytest.approx(0.55)
    pool.report_check(peer, False, "refused")
    pool.report_check(peer, True, "ok")
    assert ramp_ratio(pool, NEW) == SLOW_START_FLOOR
    clock.advance(30)
    assert ramp_ratio(pool, NEW) == 1.0


@pytest.mark.parametrize("duration", [0.074, 0.37, 3.3, 7.0, 29.97, 30.0])
def test_ramp_ends_exactly_on_time_whatever_the_clock(duration: float) -> None:
    """After slow_start the ramp is exactly 1.0 with no timer left, even when the clock's
    float arithmetic makes the last step land a hair short of the end."""
    clock = Clock()
    clock.advance(1234.567)
    pool = make_pool(clock=clock, slow_start=duration)
    pool.apply("static", [PeerSpec(NEW, weight=2)])
    for _ in range(SLOW_START_STEPS):
        clock.advance(duration / SLOW_START_STEPS)
    assert pool.peers[str(NEW)].effective_weight == 2.0
    assert ramp_timers(clock) == []


def test_late_ticks_land_on_the_step_due_and_keep_the_schedule() -> None:
    """However late or irregular the clock, the ramp shows the whole steps elapsed since
    the start, and the next tick is due at the next step boundary (no drift)."""
    clock = Clock()
    pool = make_pool(clock=clock, slow_start=20.0)  # a step per second
    pool.apply("static", [PeerSpec(NEW)])
    elapsed = 0.0
    for jump in (0.4, 2.9, 0.05, 3.7, 0.6, 6.35, 1.0, 10.0):
        clock.advance(jump)
        elapsed += jump
        steps = min(20, int(elapsed + 1e-9))
        assert ramp_ratio(pool, NEW) == pytest.approx(0.1 + 0.9 * steps / 20), elapsed
        calls = ramp_timers(clock)
        if steps < 20:
            assert [c.getTime() for c in calls] == [pytest.approx(steps + 1, abs=1e-6)]
    assert ramp_ratio(pool, NEW) == 1.0 and ramp_timers(clock) == []


def test_peers_ramping_at_different_times_share_the_same_levels() -> None:
    """Peers that come up at scattered times take their ramp from the same 21 values,
    so roundrobin keeps a few weight groups instead of one per ramping peer."""
    clock = Clock()
    pool = make_pool(clock=clock)
    specs: List[PeerSpec] = []
    for i in range(60):
        specs.append(PeerSpec(Address("127.0.0.2", 10000 + i), weight=1 + i % 2))
        pool.apply("static", specs)
        clock.advance(0.37)
    levels = {round(0.1 + 0.9 * k / 20, 12) for k in range(21)}
    ramps = {round(p.ramp, 12) for p in pool.peers.values()}
    assert ramps <= levels and len(ramps) > 5
    assert len(pool.balancer._groups) <= 2 * 21


def test_without_slow_start_weight_is_full_at_once() -> None:
    """slow_start 0s: a new peer takes its full weight immediately, no timers."""
    clock = Clock()
    pool = make_pool(clock=clock, slow_start=0.0)
    pool.apply("static", [PeerSpec(NEW, weight=3)])
    assert pool.peers[str(NEW)].effective_weight == 3.0
    assert ramp_timers(clock) == []


def test_reload_without_slow_start_ends_ramps() -> None:
    """A reload that turns slow start off gives ramping peers their full weight."""
    clock = Clock()
    pool = make_pool(clock=clock)
    pool.apply("static", [PeerSpec(NEW, weight=3)])
    clock.advance(3)
    pool.reconfigure(PoolConfig(name="web", slow_start=0.0))
    assert pool.peers[str(NEW)].effective_weight == 3.0
    clock.advance(30)
    assert ramp_timers(clock) == []


def test_removed_peer_stops_ramping() -> None:
    """Removing a ramping peer cancels its ramp timer."""
    clock = Clock()
    pool = make_pool(clock=clock)
    pool.apply("static", [PeerSpec(NEW)])
    clock.advance(3)
    pool.apply("static", [])
    assert str(NEW) not in pool.peers
    assert ramp_timers(clock) == []


def test_weight_change_during_the_ramp_is_scaled_by_it() -> None:
    """An admin weight change mid-ramp applies the current ramp to the new weight."""
    clock = Clock()
    pool = make_pool(clock=clock)
    pool.apply("static", [PeerSpec(NEW, weight=2)])
    clock.advance(15)
    pool.set_weight(str(NEW), 10)
    assert pool.peers[str(NEW)].effective_weight == pytest.approx(5.5)
    clock.advance(15)
    assert pool.peers[str(NEW)].effective_weight == 10.0


def share_of_new(pool: Pool, n: int) -> float:
    """The ramping peer's share of ``n`` picks of short connections (source: of ``n``
    different client addresses)."""
    hits = 0
    for i in range(n):
        client = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        peer = pool.pick(PickContext(client))
        conn = object()
        pool.connection_started(peer, conn)
        pool.connection_ended(peer, conn)
        hits += peer.address == NEW
    return hits / n


@pytest.mark.parametrize("balance,factor,tolerance", [
    ("roundrobin", None, 0.005),
    ("leastconn", None, 0.005),
    ("random", None, 0.02),
    ("p2c", None, 0.02),
    ("source", None, 0.04),
    ("source", 1.5, 0.04),
])
def test_every_weighted_algorithm_follows_the_ramp(balance: str, factor: Optional[float],
                                                   tolerance: float) -> None:
    """A new peer beside three full-weight equals gets ramp/(3 + ramp) of new
    connections: about 3% at first, 15% halfway, 25% at the end."""
    clock = Clock()
    pool = make_pool(balance=balance, clock=clock, factor=factor)
    pool.apply("static", [PeerSpec(a) for a in OLD])
    clock.advance(30)
    pool.apply("static", [PeerSpec(a) for a in OLD] + [PeerSpec(NEW)])
    shares = []
    for t in (0.0, 15.0, 30.0):
        ramp = expected(t)
        share = share_of_new(pool, 4000)
        assert abs(share - ramp / (3 + ramp)) < tolerance, (t, share)
        shares.append(share)
        clock.advance(15)
    assert shares[0] < shares[1] < shares[2]
    pool.stop()
    assert ramp_timers(clock) == []
