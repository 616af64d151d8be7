"""Weighted least connections in lb.balancer.leastconn."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, List, Set

import pytest
from zope.interface.verify import verifyObject

from lb.balancer import create
from lb.balancer.leastconn import Balancer
from lb.interfaces import IBalancer, PickContext
from lb.testing import FakePeer


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


@pytest.mark.parametrize("seed", range(5))
def test_always_picks_a_least_loaded_peer(seed: int) -> None:
    """Whatever the sequence of weights, removals, retries and connections, the pick has
    the lowest active/weight among the peers it may choose (checked by brute force)."""
    rng = random.Random(seed)
    pool = [FakePeer(f"p{i}", rng.choice([1, 2, 3, 0.1, 0.55])) for i in range(10)]
    b = Balancer()
    inside: List[FakePeer] = []
    conns: List[FakePeer] = []
    for peer in pool[:6]:
        b.add(peer)
        inside.append(peer)
    for step in range(3000):
        op = rng.random()
        if op < 0.03:
            peer = rng.choice(pool)
            if peer in inside:
                b.remove(peer)
                inside.remove(peer)
            else:
                b.add(peer)
                inside.append(peer)
        elif op < 0.06 and inside:
            peer = rng.choice(inside)
            peer.effective_weight = rng.choice([1, 2, 5, 0.1, 0.3])
            b.reweight(peer)
        elif op < 0.4 and conns:
            peer = conns.pop(rng.randrange(len(conns)))
            peer.load -= 1
            if peer in inside:
                b.load_removed(peer)
        else:
            exclude = set(rng.sample(pool, rng.choice([0, 0, 1, 3])))
            got = b.pick(PickContext(exclude=exclude))
            allowed = [p for p in inside if p not in exclude]
            if not allowed:
                assert got is None
                continue
            best = min(p.load / round(p.effective_weight * 1000)
                       for p in allowed)
            assert got in allowed, f"step {step}"
            assert got.load / round(got.effective_weight * 1000) == best
            open_(b, got)
            conns.append(got)
