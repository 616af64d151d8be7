"""Weighted random in lb.balancer.random (and its WeightedSet, shared with p2c)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, List

import pytest
from zope.interface.verify import verifyObject

from lb.balancer import create
from lb.balancer.random import Balancer, WeightedSet
from lb.interfaces import IBalancer, PickContext
from lb.testing import BalancerDriver, FakePeer, Mix


class FixedDraw:
    """An rng whose ``randrange`` returns a chosen number: makes draws exact."""

    def __init__(self) -> None:
        self.value = 0
        self.bounds: List[int] = []

    def randrange(self, n: int) -> int:
        self.bounds.append(n)
        assert 0 <= self.value < n
        return self.value


def balancer_with(seed: int, *members: FakePeer) -> Balancer:
    b = Balancer(rng=random.Random(seed))
    for peer in members:
        b.add(peer)
    return b


def test_provides_the_interface() -> None:
    """The module's Balancer is an IBalancer and ``create`` finds it by name; inside
    lb.balancer.random, ``random`` is still the standard library."""
    assert verifyObject(IBalancer, Balancer())
    assert isinstance(create("random"), Balancer)
    import lb.balancer.random as module
    assert module._random is random


def test_seeded_distribution_follows_weights() -> None:
    """20,000 seeded picks over weights 5,3,2 land within 1.5 points of 50/30/20%."""
    ps = [FakePeer("a", 5), FakePeer("b", 3), FakePeer("c", 2)]
    b = balancer_with(1, *ps)
    counts = Counter(b.pick(PickContext()).key for _ in range(20000))
    for key, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[key] / 20000 - share) < 0.015, counts


def test_same_seed_same_sequence() -> None:
    """Picks are a function of the rng: a seeded run is repeatable."""
    def run() -> List[str]:
        b = balancer_with(42, *[FakePeer(k, w) for k, w in zip("abcd", (1, 2, 3, 4))])
        return [b.pick(PickContext()).key for _ in range(200)]
    first = run()
    assert first == run()
    assert len(set(first)) == 4


def test_every_weight_unit_is_hit_exactly_once() -> None:
    """Over every random number in the range, each peer is drawn exactly its (scaled)
    weight times: the cumulative-weight bisection has no off-by-one."""
    s = WeightedSet()
    ps = [FakePeer(k) for k in "abc"]
    for peer, weight in zip(ps, (3, 1, 2)):
        s.set(peer, weight)
    rng = FixedDraw()
    counts: Counter = Counter()
    for value in range(6):
        rng.value = value
        counts[s.draw(rng).key] += 1
    assert counts == {"a": 3, "b": 1, "c": 2}


@pytest.mark.parametrize("excluded", [(), (0,), (1,), (2,), (0, 2), (1, 3), (0, 1, 3)])
def test_exclusion_maps_onto_the_remaining_weights_exactly(excluded: Any) -> None:
    """With peers excluded, one draw over the remaining weight reaches each remaining peer
    exactly its weight times and never an excluded one (no rejection sampling)."""
    s = WeightedSet()
    ps = [FakePeer(k) for k in "abcd"]
    weights = (3, 1, 2, 4)
    for peer, weight in zip(ps, weights):
        s.set(peer, weight)
    exclude = {ps[i] for i in excluded}
    left = sum(w for p, w in zip(ps, weights) if p not in exclude)
    rng = FixedDraw()
    counts: Counter = Counter()
    for value in range(left):
        rng.value = value
        counts[s.draw(rng, exclude)] += 1
    assert rng.bounds == [left] * left
    assert counts == {p: w for p, w in zip(ps, weights) if p not in exclude}


def test_exclude_never_returns_a_tried_peer() -> None:
    """Retries get a peer by weight among the untried ones, None once all are tried."""
    ps = [FakePeer("a", 5), FakePeer("b", 3), FakePeer("c", 2)]
    b = balancer_with(3, *ps)
    counts = Counter(b.pick(PickContext(exclude={ps[0]})).key for _ in range(5000))
    assert set(counts) == {"b", "c"}
    assert abs(counts["b"] / 5000 - 0.6) < 0.03
    assert b.pick(PickContext(exclude=set(ps))) is None


def test_changes_apply_to_the_next_pick() -> None:
    """Adds, removals and weight changes take effect at once (lazy rebuild)."""
    a, b_, c = FakePeer("a"), FakePeer("b"), FakePeer("c")
    b = balancer_with(5, a, b_)
    assert {b.pick(PickContext()).key for _ in range(100)} == {"a", "b"}
    b.add(c)
    b.remove(a)
    assert len(b) == 2
    assert {b.pick(PickContext()).key for _ in range(100)} == {"b", "c"}
    c.effective_weight = 9.0
    b.reweight(c)
    counts = Counter(b.pick(PickContext()).key for _ in range(2000))
    assert counts["c"] > 1700


def test_zero_weight_and_empty() -> None:
    """No peers or only weightless peers: None."""
    b = Balancer(rng=random.Random(1))
    assert b.pick(PickContext()) is None
    b.add(FakePeer("z", 0))
    assert b.pick(PickContext()) is None
    one = FakePeer("o", 0.1)
    b.add(one)
    assert {b.pick(PickContext()) for _ in range(20)} == {one}


def test_random_changes_pick_only_allowed_peers() -> None:
    """Whatever the sequence of adds, removes (redundant ones too), reweights (slow-start
    fractions and 0 too), connections and retries, a pick is a peer in rotation with weight
    that the context does not exclude, None only when there is none, and every peer gets
    its turn; len counts every peer in rotation."""
    driver = BalancerDriver(
        Balancer(rng=random.Random(6)), seed=6, peers=12, start=6,
        weights=[1, 1, 2, 3, 5, 0.1, 0.55], reweights=[1, 2, 4, 0.1, 0.325, 0],
        mix=Mix(pick=88, toggle=4, reweight=4, close=20, repeat=1), hold=0.5,
        exclude=[0, 0, 0, 1, 2, 5], len_counts_weightless=True)
    driver.run(3000)
    assert driver.counts["pick"] > 2000 and set(driver.picks) >= set(driver.pool)
