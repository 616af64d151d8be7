"""What every balancing algorithm owes the pool (lb.interfaces.IBalancer), checked for
each name in lb.config.BALANCE_ALGORITHMS."""

from __future__ import annotations

import importlib
import random
from typing import Any, List, Optional

import pytest
from zope.interface.verify import verifyObject

from lb.balancer import create
from lb.config import BALANCE_ALGORITHMS
from lb.interfaces import IBalancer, PickContext
from lb.testing import BalancerDriver, FakePeer, Mix, ReferenceModel

ALGORITHMS = [(name, None) for name in BALANCE_ALGORITHMS] + [("source", 1.25)]
IDS = [name if factor is None else f"{name}-bounded" for name, factor in ALGORITHMS]


class CountingPeer:
    """Counts reads of the attributes a balancer uses, to show picks do not scan."""

    reads = 0

    def __init__(self, key: str, weight: float) -> None:
        self.key = key
        self._weight = weight
        self._active = 0

    @property
    def effective_weight(self) -> float:
        CountingPeer.reads += 1
        return self._weight

    @property
    def load(self) -> int:
        CountingPeer.reads += 1
        return self._active

    @load.setter
    def load(self, value: int) -> None:
        self._active = value


def make(name: str, factor: Optional[float], seed: int = 1) -> Any:
    return create(name, rng=random.Random(seed), hash_balance_factor=factor)


@pytest.mark.parametrize("name", BALANCE_ALGORITHMS)
def test_create_without_an_rng(name: str) -> None:
    """``create`` works for every algorithm with no rng given, whatever was imported
    before (lb.balancer.random shadows the stdlib name inside the package)."""
    importlib.import_module("lb.balancer.random")  # the import that shadows the name
    balancer = create(name)
    assert verifyObject(IBalancer, balancer)
    peer = FakePeer("10.0.0.1:80")
    balancer.add(peer)
    assert balancer.pick(PickContext("192.0.2.1", exclude=frozenset())) is peer


@pytest.mark.parametrize("name,factor", ALGORITHMS, ids=IDS)
def test_contract(name: str, factor: Optional[float]) -> None:
    """Empty gives None; every added peer gets picked; removed and tried peers are not;
    picks work with and without a client address; len counts peers in rotation."""
    b = make(name, factor)
    assert b.pick(PickContext(exclude=frozenset())) is None
    assert b.pick(PickContext("192.0.2.1", exclude=frozenset())) is None
    ps = [FakePeer(f"10.0.0.{i}:80") for i in range(1, 5)]
    for p in ps:
        b.add(p)
        b.add(p)  # idempotent
    assert len(b) == 4
    clients = [f"192.0.2.{i}" for i in range(200)] + [None] * 200
    seen = set()
    for client in clients:
        peer = b.pick(PickContext(client, exclude=frozenset()))
        peer.load += 1
        b.load_added(peer)
        seen.add(peer)
        peer.load -= 1
        b.load_removed(peer)
    assert seen == set(ps)
    b.remove(ps[0])
    b.remove(ps[0])  # idempotent
    assert len(b) == 3
    for client in clients:
        got = b.pick(PickContext(client, exclude={ps[1]}))
        assert got in (ps[2], ps[3])
    assert b.pick(PickContext("192.0.2.1", exclude=set(ps))) is None
    assert b.pick(PickContext(exclude=set(ps[1:]))) is None


@pytest.mark.parametrize("name,factor", ALGORITHMS, ids=IDS)
def test_reweight_to_a_tiny_share(name: str, factor: Optional[float]) -> None:
    """A weight change reaches the algorithm: at 0.1 against 1, a peer gets a small share
    (the slow-start floor)."""
    b = make(name, factor, seed=3)
    a, small = FakePeer("10.0.0.1:80"), FakePeer("10.0.0.2:80")
    b.add(a)
    b.add(small)
    small.effective_weight = 0.1
    b.reweight(small)
    hits = 0
    for i in range(2000):
        peer = b.pick(PickContext(f"198.51.{i >> 8}.{i & 255}", exclude=frozenset()))
        peer.load += 1
        b.load_added(peer)
        peer.load -= 1
        b.load_removed(peer)
        hits += peer is small
    assert 0.03 * 2000 < hits < 0.16 * 2000


@pytest.mark.parametrize("name,factor", ALGORITHMS, ids=IDS)
def test_picks_do_not_scan_the_pool(name: str, factor: Optional[float]) -> None:
    """With 2,000 peers, a pick (with its connection opening and closing) reads the
    weights and connection counts of a handful of peers, not of the whole pool."""
    b = make(name, factor)
    ps = [CountingPeer(f"10.1.{i >> 8}.{i & 255}:80", 1 + i % 3) for i in range(2000)]
    for p in ps:
        b.add(p)
    b.pick(PickContext("192.0.2.1", exclude=frozenset()))  # lazy index building happens here, once
    CountingPeer.reads = 0
    held = []
    for i in range(500):
        peer = b.pick(PickContext(f"192.0.{i >> 8}.{i & 255}", exclude=frozenset()))
        peer.load += 1
        b.load_added(peer)
        held.append(peer)
    for peer in held:
        peer.load -= 1
        b.load_removed(peer)
    assert CountingPeer.reads < 20 * 500, CountingPeer.reads


@pytest.mark.parametrize("name,factor", ALGORITHMS, ids=IDS)
def test_random_operations_keep_the_contract(name: str, factor: Optional[float]) -> None:
    """Under a seeded random run of everything a pool does (peers in and out of rotation,
    redundant adds and removes, weights down to slow-start fractions and 0, load starting
    and ending, in rotation and draining, retries, picks by client address, hash key or
    neither), every pick is a peer in rotation with weight that the context does not
    exclude, None only when there is no such peer, and len counts the peers in rotation
    (those without weight too, or not: the algorithms differ)."""
    driver = BalancerDriver(
        make(name, factor, seed=7), seed=7, peers=9, start=5,
        weights=[1, 2, 3, 0.1, 0.55, 0], reweights=[1, 2, 0.001, 0.25, 0.6, 0],
        mix=Mix(pick=60, toggle=6, reweight=6, close=25, open=3, repeat=2), hold=0.8,
        exclude=[0, 0, 1, 2, 9], clients=[f"192.0.2.{i}" for i in range(40)] + [None] * 5,
        hash_keys=[None] * 6 + ["session-1"])
    driver.run(800)
    assert {"add", "remove", "add again", "remove again", "reweight", "open", "close", "pick",
            "pick (none)"} <= set(driver.counts)


class IgnoresExclude:
    """A roundrobin balancer with a bug: it forgets the peers already tried."""

    def __init__(self) -> None:
        self.inner = make("roundrobin", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def pick(self, context: PickContext) -> Any:
        return self.inner.pick(context._replace(exclude=frozenset()))


class FirstInRotation(ReferenceModel):
    """always the first peer in rotation with weight, which no balancer does"""

    def __init__(self) -> None:
        self.peers: List[Any] = []

    def add(self, peer: Any) -> None:
        self.peers.append(peer)

    def remove(self, peer: Any) -> None:
        self.peers.remove(peer)

    def pick(self, context: PickContext) -> Optional[Any]:
        return next((p for p in self.peers
                     if p.effective_weight > 0 and p not in context.exclude), None)


def test_driver_names_the_step_the_seed_and_what_led_there() -> None:
    """The reference-model driver catches a balancer that breaks the contract (here: a
    tried peer picked again) or disagrees with its reference model, and says at which step
    of which seed, with the peers' state and the operations that led there."""
    with pytest.raises(AssertionError) as failed:
        BalancerDriver(IgnoresExclude(), seed=3, exclude=[0, 1, 2], history=5).run(500)
    message = str(failed.value)
    assert "IgnoresExclude, seed 3, step " in message
    assert "which the context excludes" in message
    assert "  in rotation: p0 (weight 1, load " in message
    lines = message.splitlines()
    assert lines[-6] == "  last 5 operations:"
    assert " pick exclude={" in lines[-1]
    with pytest.raises(AssertionError, match=r"roundrobin.Balancer, seed 1, step \d+: picked "
                       r"p\d+ where the reference FirstInRotation \(always the first peer"):
        BalancerDriver(make("roundrobin", None), model=FirstInRotation(), seed=1).run(500)


def test_driver_is_a_function_of_its_seed() -> None:
    """The same seed gives the same run (a failure replays); another seed another run."""
    def picks(seed: int) -> List[Optional[str]]:
        driver = BalancerDriver(make("leastconn", None), seed=seed, weights=[1, 2, 0.5],
                                mix=Mix(close=30, open=5, repeat=1), exclude=[0, 1, 3])
        return [p.key if p is not None else None for p in driver.run(300).picks]
    assert picks(4) == picks(4) != picks(5)
