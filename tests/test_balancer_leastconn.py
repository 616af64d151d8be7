"""Weighted least connections in lb.balancer.leastconn."""

from __future__ import annotations

from collections import Counter
from typing import Any, List, Optional, Sequence, Set

import pytest
from zope.interface.verify import verifyObject

from lb.balancer import create
from lb.balancer.leastconn import Balancer
from lb.interfaces import IBalancer, PickContext
from lb.testing import BalancerDriver, FakePeer, Mix


def balancer_with(*members: FakePeer) -> Balancer:
    b = Balancer()
    for peer in members:
        b.add(peer)
    return b


def open_(b: Balancer, peer: FakePeer) -> None:
    """What the pool does at pick time: count first, then tell the balancer."""
    peer.load += 1
    b.load_added(peer)


def close(b: Balancer, peer: FakePeer) -> None:
    peer.load -= 1
    b.load_removed(peer)


def held(b: Balancer, n: int) -> List[FakePeer]:
    """``n`` picks whose connections stay open."""
    got = []
    for _ in range(n):
        peer = b.pick(PickContext())
        open_(b, peer)
        got.append(peer)
    return got


def short(b: Balancer, n: int, exclude: Set[Any] = frozenset()) -> List[FakePeer]:
    """``n`` picks whose connections close before the next pick."""
    got = []
    for _ in range(n):
        peer = b.pick(PickContext(exclude=exclude))
        open_(b, peer)
        close(b, peer)
        got.append(peer)
    return got


def test_provides_the_interface() -> None:
    """The module's Balancer is an IBalancer and ``create`` finds it by name."""
    assert verifyObject(IBalancer, Balancer())
    assert isinstance(create("leastconn"), Balancer)


def test_held_connections_spread_evenly() -> None:
    """Connections that stay open land on the peer with the fewest, round-robin on ties."""
    ps = [FakePeer(k) for k in "abc"]
    b = balancer_with(*ps)
    got = held(b, 30)
    assert "".join(p.key for p in got[:6]) == "abcabc"
    assert [p.load for p in ps] == [10, 10, 10]


def test_freed_peer_takes_new_connections_until_it_catches_up() -> None:
    """When one peer's connections close, new ones go to it until loads are even again."""
    ps = [FakePeer(k) for k in "abc"]
    b = balancer_with(*ps)
    held(b, 30)
    for _ in range(6):
        close(b, ps[1])
    got = held(b, 6)
    assert [p.key for p in got] == ["b"] * 6
    assert [p.load for p in ps] == [10, 10, 10]


def test_held_connections_follow_weights() -> None:
    """Under load each peer holds connections in proportion to its weight."""
    ps = [FakePeer("a", 3), FakePeer("b", 1), FakePeer("c", 2)]
    b = balancer_with(*ps)
    held(b, 60)
    assert [p.load for p in ps] == [30, 10, 20]


def test_short_connections_still_follow_weights() -> None:
    """When every peer is idle at each pick (short connections), ties are shared by
    weighted round-robin, so weights 3:1 still give 3:1."""
    ps = [FakePeer("a", 3), FakePeer("b", 1)]
    b = balancer_with(*ps)
    counts = Counter(p.key for p in short(b, 400))
    assert counts == {"a": 300, "b": 100}
    # interleaved, not in bursts of three
    assert "bb" not in "".join(p.key for p in short(b, 40))


def test_equal_idle_peers_rotate() -> None:
    """Equal weights and short connections give plain round-robin."""
    b = balancer_with(*[FakePeer(k) for k in "abcd"])
    assert "".join(p.key for p in short(b, 12)) == "abcd" * 3


def test_exclude_returns_the_least_loaded_remaining_peer() -> None:
    """Connect retries skip tried peers and still prefer the least loaded of the rest."""
    a, b_, c = FakePeer("a"), FakePeer("b"), FakePeer("c")
    b = balancer_with(a, b_, c)
    for _ in range(3):
        open_(b, c)
    open_(b, b_)
    assert b.pick(PickContext()) is a
    assert b.pick(PickContext(exclude={a})) is b_
    assert b.pick(PickContext(exclude={a, b_})) is c
    assert b.pick(PickContext(exclude={a, b_, c})) is None


def test_reweight_changes_the_load_order() -> None:
    """A weight change re-ranks the peer at once (load is active / weight)."""
    a, b_ = FakePeer("a"), FakePeer("b")
    b = balancer_with(a, b_)
    for _ in range(2):
        open_(b, a)
    open_(b, b_)
    assert b.pick(PickContext()) is b_  # 2/1 against 1/1
    a.effective_weight = 4.0
    b.reweight(a)
    assert b.pick(PickContext()) is a  # 2/4 against 1/1


def test_removed_peer_returns_with_its_connections_counted() -> None:
    """A peer removed and added back is ranked by the connections it still has."""
    a, b_ = FakePeer("a"), FakePeer("b")
    b = balancer_with(a, b_)
    b.remove(a)
    assert len(b) == 1
    assert {p.key for p in short(b, 5)} == {"b"}
    a.load = 5  # kept while it was out of rotation (draining)
    b.add(a)
    assert len(b) == 2
    assert [p.key for p in held(b, 5)] == ["b"] * 5
    assert b.pick(PickContext()) in (a, b_)


def test_zero_weight_and_empty() -> None:
    """No peers, or only a peer without weight: nothing to pick."""
    b = Balancer()
    assert b.pick(PickContext()) is None
    z = FakePeer("z", 0)
    b.add(z)
    assert b.pick(PickContext()) is None
    z.effective_weight = 1.0
    b.reweight(z)
    assert b.pick(PickContext()) is z


def test_index_stays_bounded() -> None:
    """Lazy invalidation does not let the heap grow without bound."""
    ps = [FakePeer(str(i)) for i in range(5)]
    b = balancer_with(*ps)
    for _ in range(5000):
        peer = b.pick(PickContext())
        open_(b, peer)
        close(b, peer)
    assert len(b._heap) <= 2 * len(ps) + 65


def least_loaded(got: Optional[FakePeer], allowed: Sequence[FakePeer],
                 context: PickContext) -> bool:
    """no peer it may pick has fewer connections per weight"""
    return got is None or got.load / round(got.effective_weight * 1000) == min(
        p.load / round(p.effective_weight * 1000) for p in allowed)


@pytest.mark.parametrize("seed", range(5))
def test_always_picks_a_least_loaded_peer(seed: int) -> None:
    """Whatever the sequence of weights (slow-start fractions and 0 too), removals,
    retries and connections opening and closing, the pick has the lowest active/weight
    among the peers it may choose (checked by brute force); len counts the peers in
    rotation with weight."""
    driver = BalancerDriver(
        Balancer(), invariant=least_loaded, seed=seed, peers=10, start=6,
        weights=[1, 2, 3, 0.1, 0.55], reweights=[1, 2, 5, 0.1, 0.3, 0],
        mix=Mix(pick=63, toggle=3, reweight=3, close=34, open=1, repeat=1), hold=1,
        exclude=[0, 0, 1, 3], len_counts_weightless=False)
    driver.run(3000)
    assert driver.counts["pick"] > 1650 and driver.counts["close"] > 900
