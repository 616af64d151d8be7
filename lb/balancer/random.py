"""Weighted random: each pick draws a peer with probability proportional to its weight.

The draw is a bisection in cumulative weights, rebuilt only after the peer set or a weight
changed (and then at the next pick, so a burst of changes costs one rebuild). Peers already
tried (connect retries) are skipped exactly, without redrawing: the random number is drawn
over the remaining weight and stepped over the excluded peers' intervals.

This module is named ``random`` inside ``lb.balancer``; absolute imports (the only kind
in Python 3) make ``import random`` below the standard library's module.
"""

from __future__ import annotations

import random as _random
from bisect import bisect_right
from itertools import accumulate
from typing import AbstractSet, Dict, List, Optional

from zope.interface import implementer

from lb.balancer.roundrobin import scaled_weight
from lb.interfaces import NO_CONTEXT, IBalancer, PickContext
from lb.peer import Peer

# Importing this module binds ``lb.balancer.random`` to it, shadowing the standard
# library's ``random`` that lb/balancer/__init__.py imported under the same name; keep
# ``random.Random`` there working whichever of the two the name points at.
Random = _random.Random


class WeightedSet:
    """Peers with integer weights, for weighted draws in O(log n) (shared with p2c)."""

    def __init__(self) -> None:
        self._weights: Dict[Peer, int] = {}  # insertion order is draw order: seeded = repeatable
        self._peers: List[Peer] = []
        self._cumulative: List[int] = []
        self._index: Dict[Peer, int] = {}
        self._dirty = False

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, peer: Peer) -> bool:
        return peer in self._weights

    def weight(self, peer: Peer) -> int:
        return self._weights.get(peer, 0)

    def set(self, peer: Peer, weight: int) -> None:
        if self._weights.get(peer) != weight:
            self._weights[peer] = weight
            self._dirty = True

    def discard(self, peer: Peer) -> None:
        if self._weights.pop(peer, None) is not None:
            self._dirty = True

    def _build(self) -> None:
        self._peers = [p for p, w in self._weights.items() if w > 0]
        self._cumulative = list(accumulate(self._weights[p] for p in self._peers))
        self._index = {p: i for i, p in enumerate(self._peers)}
        self._dirty = False

    def draw(self, rng: _random.Random,
             exclude: AbstractSet[Peer] = frozenset()) -> Optional[Peer]:
        """A peer drawn by weight among those not in ``exclude``; None if none is left."""
        if self._dirty:
            self._build()
        cumulative = self._cumulative
        if not cumulative:
            return None
        total = cumulative[-1]
        if not exclude:
            return self._peers[bisect_right(cumulative, rng.randrange(total))]
        holes = []  # (start, width) of excluded peers' intervals, in order
        for peer in exclude:
            i = self._index.get(peer)
            if i is not None:
                width = self._weights[peer]
                holes.append((cumulative[i] - width, width))
        left = total - sum(width for _, width in holes)
        if left <= 0:
            return None
        r = rng.randrange(left)
        for start, width in sorted(holes):
            if r >= start:
                r += width
            else:
                break
        return self._peers[bisect_right(cumulative, r)]


@implementer(IBalancer)
class Balancer:
    """Weighted random (``balance: random``)."""

    def __init__(self, rng: Optional[_random.Random] = None,
                 hash_balance_factor: Optional[float] = None) -> None:
        self._rng = rng or _random.Random()
        self._set = WeightedSet()

    def __len__(self) -> int:
        return len(self._set)

    def add(self, peer: Peer) -> None:
        if peer not in self._set:
            self._set.set(peer, scaled_weight(peer))

    def remove(self, peer: Peer) -> None:
        self._set.discard(peer)

    def reweight(self, peer: Peer) -> None:
        if peer in self._set:
            self._set.set(peer, scaled_weight(peer))

    def pick(self, context: PickContext = NO_CONTEXT) -> Optional[Peer]:
        exclude = context.exclude
        return self._set.draw(self._rng, exclude)

    def load_added(self, peer: Peer) -> None:
        pass

    def load_removed(self, peer: Peer) -> None:
        pass
