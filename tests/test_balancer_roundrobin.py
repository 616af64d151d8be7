"""Smooth weighted round-robin (nginx's algorithm) in lb.balancer.roundrobin."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, List, Optional, Set

import pytest
from zope.interface.verify import verifyObject

from lb.balancer import create
from lb.balancer.roundrobin import Balancer, heap_in_order
from lb.interfaces import IBalancer, PickContext
from lb.testing import BalancerDriver, FakePeer, Mix, ReferenceModel


def peers(**weights: float) -> List[FakePeer]:
    return [FakePeer(name, weight) for name, weight in weights.items()]


def balancer_with(*members: FakePeer) -> Balancer:
    b = Balancer()
    for peer in members:
        b.add(peer)
    return b


def sequence(b: Balancer, n: int, exclude: Set[Any] = frozenset()) -> str:
    return "".join(b.pick(PickContext(exclude=exclude)).key for _ in range(n))


class NginxReference(ReferenceModel):
    """nginx's ngx_http_upstream_get_peer, scanning every peer: the behaviour to match. (A
    peer without weight, which nginx cannot have, takes no part.)"""

    def __init__(self) -> None:
        self.peers: List[List[Any]] = []  # [peer, current], in order

    def add(self, peer: Any) -> None:
        if all(p is not peer for p, _ in self.peers):
            self.peers.append([peer, 0])

    def remove(self, peer: Any) -> None:
        self.peers = [e for e in self.peers if e[0] is not peer]

    def pick(self, context: PickContext) -> Optional[Any]:
        best = None
        total = 0
        for entry in self.peers:
            peer = entry[0]
            weight = int(round(peer.effective_weight * 1000))
            if peer in context.exclude or not weight:
                continue
            entry[1] += weight
            total += weight
            if best is None or entry[1] > best[1]:
                best = entry
        if best is None:
            return None
        best[1] -= total
        return best[0]


def test_provides_the_interface() -> None:
    """The module's Balancer is an IBalancer and ``create`` finds it by name."""
    assert verifyObject(IBalancer, Balancer())
    assert isinstance(create("roundrobin"), Balancer)


def test_nginx_sequence_for_weights_5_1_1() -> None:
    """Weights 5,1,1 interleave smoothly, a a b a c a a, as nginx does (not a a a a a b c)."""
    b = balancer_with(*peers(a=5, b=1, c=1))
    assert sequence(b, 14) == "aabacaa" * 2


def test_equal_weights_rotate_in_order_of_arrival() -> None:
    """Equal weights give plain round-robin, ties going to the peer added first."""
    b = balancer_with(*peers(a=1, b=1, c=1))
    assert sequence(b, 9) == "abc" * 3


def test_counts_are_exact_over_each_cycle() -> None:
    """Over every cycle of sum(weights) picks each peer gets exactly its weight."""
    b = balancer_with(*peers(a=3, b=2, c=1))
    for _ in range(50):
        counts = Counter(sequence(b, 6))
        assert counts == {"a": 3, "b": 2, "c": 1}


def test_fractional_effective_weights_keep_ratios() -> None:
    """Slow-start weights are floats: 0.25 against 1 gives one pick in five."""
    b = balancer_with(*peers(a=1, b=0.25))
    counts = Counter(sequence(b, 500))
    assert counts == {"a": 400, "b": 100}


def test_reweight_mid_stream_changes_the_ratio_and_keeps_smoothness() -> None:
    """A weight change applies from the next pick; the peer keeps its current credit."""
    a, b_, c = peers(a=1, b=1, c=1)
    b = balancer_with(a, b_, c)
    sequence(b, 4)
    b_.effective_weight = 4.0
    b.reweight(b_)
    counts = Counter(sequence(b, 600))
    assert counts == {"a": 100, "b": 400, "c": 100}
    # no burst: b never gets more than 4 in a row
    assert "bbbbb" not in sequence(b, 60)


def test_removed_peer_is_never_picked_and_can_return() -> None:
    """After remove() a peer is not picked; after add() it is back in the rotation."""
    a, b_, c = peers(a=1, b=1, c=1)
    b = balancer_with(a, b_, c)
    b.remove(b_)
    assert len(b) == 2
    assert set(sequence(b, 20)) == {"a", "c"}
    b.add(b_)
    assert len(b) == 3
    assert Counter(sequence(b, 30)) == {"a": 10, "b": 10, "c": 10}


def test_exclude_skips_tried_peers() -> None:
    """Connect retries exclude tried peers: the best remaining one is returned."""
    a, b_, c = peers(a=5, b=1, c=1)
    b = balancer_with(a, b_, c)
    got = [b.pick(PickContext(exclude={a})).key for _ in range(10)]
    assert "a" not in got and Counter(got) == {"b": 5, "c": 5}
    assert b.pick(PickContext(exclude={a, b_})) is c
    assert b.pick(PickContext(exclude={a, b_, c})) is None


def test_exclude_all_does_not_disturb_the_rotation() -> None:
    """A pick that finds every peer excluded changes nothing, as in nginx."""
    ps = peers(a=5, b=1, c=1)
    b = balancer_with(*ps)
    assert sequence(b, 3) == "aab"
    assert b.pick(PickContext(exclude=set(ps))) is None
    assert sequence(b, 11) == "acaa" + "aabacaa"


def test_exclude_finds_live_peer_behind_stale_heap_entries() -> None:
    """A removed peer's stale heap entry does not hide the next live peer when the best
    one is excluded (a plain ``nsmallest`` over the heap would return nothing)."""
    a, b_, c, d = peers(a=1, b=1, c=1, d=1)
    b = balancer_with(a, b_, c, d)
    b.remove(b_)  # leaves a dead entry right under the top of the weight group's heap
    assert b.pick(PickContext(exclude={a})) is c
    ps = [FakePeer(f"p{i}") for i in range(8)]
    b = balancer_with(*ps)
    for step in range(40):
        if step % 5 == 0:
            victim = ps[step % 8]
            b.remove(victim)
            b.add(victim)
        best = b.pick(PickContext())
        other = b.pick(PickContext(exclude={best}))
        assert other is not None and other is not best


def test_empty_and_zero_weight() -> None:
    """No peers: None. A peer with no effective weight is never picked."""
    b = Balancer()
    assert b.pick(PickContext()) is None and len(b) == 0
    zero, one = peers(z=0, o=1)
    b.add(zero)
    assert b.pick(PickContext()) is None
    b.add(one)
    assert sequence(b, 5) == "ooooo"


def test_heap_in_order_yields_sorted_without_popping() -> None:
    """The best-first heap walk yields every item in order and leaves the heap as is."""
    import heapq
    rng = random.Random(7)
    heap = [rng.randrange(1000) for _ in range(200)]
    heapq.heapify(heap)
    before = list(heap)
    assert list(heap_in_order(heap)) == sorted(heap)
    assert heap == before
    assert list(heap_in_order([])) == []


@pytest.mark.parametrize("seed", range(6))
def test_matches_nginx_reference_under_random_changes(seed: int) -> None:
    """Any sequence of adds, removes (redundant ones too), reweights (slow-start floats and 0
    too) and picks with retries gives exactly the picks of nginx's O(n) scan; len counts
    every peer in rotation. (Load, which roundrobin ignores, is left out here; the
    contract test in test_balancer_common.py runs it with load too.)"""
    driver = BalancerDriver(
        Balancer(), model=NginxReference(), seed=seed, peers=12, start=6,
        weights=[1, 1, 2, 3, 5, 0.1, 0.55], reweights=[1, 2, 4, 0.1, 0.325, 3.7, 0],
        mix=Mix(pick=94, toggle=4, reweight=4, repeat=0.5), hold=None,
        exclude=[0, 0, 0, 1, 2, 5], len_counts_weightless=True)
    driver.run(3000)
    assert driver.counts["pick"] > 2500
