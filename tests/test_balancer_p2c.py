"""Power of two choices in lb.balancer.p2c."""

from __future__ import annotations

import random
from collections import Counter
from typing import List, Optional, Sequence

from zope.interface.verify import verifyObject

from lb.balancer import create
from lb.balancer.p2c import Balancer
from lb.interfaces import IBalancer, PickContext
from lb.testing import BalancerDriver, FakePeer, Mix


def balancer_with(seed: int, *members: FakePeer) -> Balancer:
    b = Balancer(rng=random.Random(seed))
    for peer in members:
        b.add(peer)
    return b


def hold(b: Balancer, n: int) -> List[FakePeer]:
    got = []
    for _ in range(n):
        peer = b.pick(PickContext())
        peer.load += 1
        b.load_added(peer)
        got.append(peer)
    return got


def test_provides_the_interface() -> None:
    """The module's Balancer is an IBalancer and ``create`` finds it by name."""
    assert verifyObject(IBalancer, Balancer())
    assert isinstance(create("p2c"), Balancer)


def test_two_peers_always_compare_both() -> None:
    """The two draws are different peers: with two peers the busier one never wins."""
    a, b_ = FakePeer("a"), FakePeer("b")
    b = balancer_with(1, a, b_)
    a.load = 1
    assert {b.pick(PickContext()).key for _ in range(200)} == {"b"}


def test_held_connections_stay_balanced() -> None:
    """Seeded: 1,000 held connections over 10 equal peers stay within a few of the mean,
    far tighter than plain random (whose spread here is about ±30)."""
    ps = [FakePeer(str(i)) for i in range(10)]
    b = balancer_with(7, *ps)
    hold(b, 1000)
    loads = [p.load for p in ps]
    assert sum(loads) == 1000
    assert max(loads) - min(loads) <= 4, loads


def test_held_connections_follow_weights() -> None:
    """Under load, active/weight evens out: weights 3:1 hold about 3:1."""
    a, b_ = FakePeer("a", 3), FakePeer("b", 1)
    b = balancer_with(2, a, b_)
    hold(b, 400)
    assert abs(a.load - 300) <= 3


def test_idle_peers_share_by_weight() -> None:
    """With no connections held, ties go to the first (weighted) draw: 3:1 traffic."""
    a, b_ = FakePeer("a", 3), FakePeer("b", 1)
    b = balancer_with(3, a, b_)
    counts = Counter(b.pick(PickContext()).key for _ in range(8000))
    assert abs(counts["a"] / 8000 - 0.75) < 0.02, counts


def test_exclude() -> None:
    """Retries never get a tried peer; one untried peer left is returned as is."""
    ps = [FakePeer(k) for k in "abc"]
    b = balancer_with(4, *ps)
    ps[2].load = 50
    assert {b.pick(PickContext(exclude={ps[0], ps[1]})).key for _ in range(20)} == {"c"}
    assert {b.pick(PickContext(exclude={ps[0]})).key for _ in range(50)} == {"b"}
    assert b.pick(PickContext(exclude=set(ps))) is None


def test_changes_and_empty() -> None:
    """Removed peers are not picked; an empty or weightless set gives None."""
    a, b_ = FakePeer("a"), FakePeer("b")
    b = balancer_with(5)
    assert b.pick(PickContext()) is None
    b.add(FakePeer("z", 0))
    assert b.pick(PickContext()) is None
    b.add(a)
    b.add(b_)
    b.remove(a)
    assert {b.pick(PickContext()).key for _ in range(30)} == {"b"}
    assert len(b) == 2  # b and the weightless z


def never_the_busier(got: Optional[FakePeer], allowed: Sequence[FakePeer],
                     context: PickContext) -> bool:
    """the pick has no more connections per weight than another peer it may pick (the
    other draw)"""
    def weight(peer: FakePeer) -> int:
        return round(peer.effective_weight * 1000)
    return got is None or len(allowed) < 2 or any(
        p is not got and got.load * weight(p) <= p.load * weight(got) for p in allowed)


def test_random_changes_never_pick_the_busier_of_two() -> None:
    """Whatever the sequence of adds, removes (redundant ones too), reweights (slow-start
    fractions and 0 too), connections opening and closing, and retries, a pick is a peer
    in rotation with weight that the context does not exclude (None only when there is
    none), and never busier, per weight, than every other peer it could have drawn; len
    counts every peer in rotation."""
    driver = BalancerDriver(
        Balancer(rng=random.Random(8)), invariant=never_the_busier, seed=8, peers=10,
        start=6, weights=[1, 2, 3, 0.1, 0.55], reweights=[1, 2, 5, 0.1, 0.3, 0],
        mix=Mix(pick=60, toggle=3, reweight=3, close=34, open=2, repeat=1), hold=1,
        exclude=[0, 0, 1, 3], len_counts_weightless=True)
    driver.run(3000)
    assert driver.counts["pick"] > 1600
