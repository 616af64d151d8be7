"""Smooth weighted round-robin, nginx's algorithm, without a scan per pick.

nginx adds every peer's weight to its ``current`` at each pick, takes the largest
``current`` (first in order on ties) and subtracts the total weight from it: weights 5,1,1
give ``a a b a c a a``. Scanning every peer per pick is O(n); here peers of equal weight
share a heap. Between two of its own picks a peer's ``current`` grows by ``w`` per global
pick, so ``current = key + w * T`` where ``T`` counts picks and ``key`` changes only when
the peer itself is picked. Within a weight group the order by ``key`` is fixed, so a pick
compares the tops of the groups: O(groups + log n), and pools have few distinct weights.

Peers already tried for a client (``exclude``, connect retries) are skipped the way nginx
skips ``tried`` peers: they neither win nor gain weight in that pick, and the total that
the winner pays is the sum of the weights that took part.
"""

from __future__ import annotations

import heapq
import random as _random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from zope.interface import implementer

from lb.interfaces import NO_CONTEXT, IBalancer, PickContext
from lb.peer import Peer

_SCALE = 1000  # effective weights are floats (slow start); integers keep the sums exact

T = TypeVar("T")


def heap_in_order(heap: Sequence[T]) -> Iterator[T]:
    """Yield a binary heap's items smallest first without popping them.

    Best-first walk from the root: costs O(k log k) for the first k items, so finding the
    best item that is not excluded (connect retries) stays cheap in a big heap.
    """
    if not heap:
        return
    size = len(heap)
    frontier: List[Tuple[T, int]] = [(heap[0], 0)]
    while frontier:
        item, i = heapq.heappop(frontier)
        yield item
        left = 2 * i + 1
        if left < size:
            heapq.heappush(frontier, (heap[left], left))
            if left + 1 < size:
                heapq.heappush(frontier, (heap[left + 1], left + 1))


def scaled_weight(peer: Peer) -> int:
    """A peer's effective weight as an integer in thousandths (0 for no weight)."""
    return max(0, int(round(peer.effective_weight * _SCALE)))


class _Entry:
    __slots__ = ("neg_key", "order", "peer", "alive", "weight")

    def __init__(self, neg_key: int, order: int, peer: Peer, weight: int) -> None:
        self.neg_key = neg_key
        self.order = order
        self.peer = peer
        self.alive = True
        self.weight = weight

    def __lt__(self, other: "_Entry") -> bool:
        return (self.neg_key, self.order) < (other.neg_key, other.order)


class _Group:
    __slots__ = ("heap", "alive")

    def __init__(self) -> None:
        self.heap: List[_Entry] = []
        self.alive = 0

    def top(self) -> Optional[_Entry]:
        heap = self.heap
        while heap and not heap[0].alive:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def first(self, usable: Callable[[_Entry], bool]) -> Optional[_Entry]:
        """The best live entry that ``usable`` accepts."""
        for entry in heap_in_order(self.heap):
            if entry.alive and usable(entry):
                return entry
        return None


@implementer(IBalancer)
class Balancer:
    """nginx's smooth weighted round-robin (``balance: roundrobin``)."""

    def __init__(self, rng: Optional[_random.Random] = None,
                 hash_balance_factor: Optional[float] = None) -> None:
        self._groups: Dict[int, _Group] = {}
        self._entries: Dict[Peer, _Entry] = {}
        self._order: Dict[Peer, int] = {}  # first-seen order, nginx's tie-break
        self._next_order = 0
        self._picks = 0  # T
        self._total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _insert(self, peer: Peer, current: int) -> None:
        weight = scaled_weight(peer)
        order = self._order.get(peer)
        if order is None:
            order = self._order[peer] = self._next_order
            self._next_order += 1
        entry = _Entry(-(current - weight * self._picks), order, peer, weight)
        group = self._groups.get(weight)
        if group is None:
            group = self._groups[weight] = _Group()
        heapq.heappush(group.heap, entry)
        group.alive += 1
        self._entries[peer] = entry
        self._total += weight

    def _discard(self, peer: Peer) -> Optional[int]:
        entry = self._entries.pop(peer, None)
        if entry is None:
            return None
        entry.alive = False
        self._total -= entry.weight
        group = self._groups[entry.weight]
        group.alive -= 1
        if group.alive == 0:
            del self._groups[entry.weight]
        elif len(group.heap) > 2 * group.alive + 16:
            group.heap = [e for e in group.heap if e.alive]
            heapq.heapify(group.heap)
        return -entry.neg_key + entry.weight * self._picks  # its current

    def add(self, peer: Peer) -> None:
        if peer not in self._entries:
            self._insert(peer, 0)

    def remove(self, peer: Peer) -> None:
        self._discard(peer)
        self._order.pop(peer, None)

    def reweight(self, peer: Peer) -> None:
        entry = self._entries.get(peer)
        if entry is not None and entry.weight != scaled_weight(peer):
            current = self._discard(peer)
            self._insert(peer, current or 0)

    def pick(self, context: PickContext = NO_CONTEXT) -> Optional[Peer]:
        exclude = context.exclude
        entries = self._entries
        if not entries:
            return None
        if len(entries) == 1 and not exclude:
            # one peer: it is every pick (its `current` would grow by its weight and pay
            # it back, so the state need not move)
            for only in entries.values():
                return only.peer if only.weight else None
        skipped: List[_Entry] = []
        if exclude:
            skipped = [e for e in map(self._entries.get, exclude) if e is not None]
            if len(skipped) == len(self._entries):
                return None
        self._picks += 1
        picks = self._picks
        best: Optional[_Entry] = None
        best_current = 0
        for weight, group in self._groups.items():
            if weight == 0:
                continue
            entry = group.top()
            if entry is None:
                continue
            if skipped and entry.peer in exclude:
                entry = group.first(lambda e: e.peer not in exclude)
                if entry is None:
                    continue
            current = -entry.neg_key + weight * picks
            if best is None or current > best_current or (
                    current == best_current and entry.order < best.order):
                best, best_current = entry, current
        if best is None:
            self._picks -= 1  # nothing took part: nobody's current moves
            return None
        total = self._total - sum(e.weight for e in skipped)
        peer = best.peer
        self._discard(peer)
        self._insert(peer, best_current - total)
        for entry in skipped:
            # nginx does not add weight to tried peers: undo this pick's growth
            grown = self._discard(entry.peer)
            self._insert(entry.peer, (grown or 0) - entry.weight)
        return peer

    def load_added(self, peer: Peer) -> None:
        pass

    def load_removed(self, peer: Peer) -> None:
        pass
