"""Least connections, weighted: the peer with the fewest active connections per weight.

This is nginx's ``least_conn``: the load of a peer is ``active / weight``, and peers that
tie on the lowest load share the traffic by weighted round-robin, so with short
connections (everyone idle) weights 3 and 1 still get 3:1, and with held connections new
ones go where there are fewest relative to weight. The round-robin among ties is stride
scheduling: each peer carries a virtual ``pass`` that grows by ``1/weight`` when it is
picked, and the lowest pass wins a tie; equal passes go to whoever changed least recently
(HAProxy's leastconn puts a requeued server behind its equals the same way).

The index is one heap ordered by ``(load, pass, sequence)`` with lazy invalidation: every
change (pick, connection opened or closed, weight) pushes a fresh item for the peer and
stale items are dropped when they surface, so a pick costs O(log n) amortized and nothing
rescans the pool.
"""

from __future__ import annotations

import heapq
import random as _random
from typing import Dict, List, Optional, Tuple

from zope.interface import implementer

from lb.balancer.roundrobin import heap_in_order, scaled_weight
from lb.interfaces import NO_CONTEXT, IBalancer, PickContext
from lb.peer import Peer

_STRIDE_ONE = 1 << 40  # a pick of a weight-1 peer advances its pass by 2**40 / 1000

_Item = Tuple[float, int, int, Peer]  # (load, pass, sequence, peer)


@implementer(IBalancer)
class Balancer:
    """Weighted least connections with weighted round-robin among ties."""

    def __init__(self, rng: Optional[_random.Random] = None,
                 hash_balance_factor: Optional[float] = None) -> None:
        self._heap: List[_Item] = []
        self._live: Dict[Peer, _Item] = {}  # peer -> its current heap item
        self._pass: Dict[Peer, int] = {}
        self._weight: Dict[Peer, int] = {}
        self._seq = 0
        self._vtime = 0  # pass of the latest pick: where newcomers start

    def __len__(self) -> int:
        return len(self._live)

    def _stride(self, peer: Peer) -> int:
        return _STRIDE_ONE // max(1, self._weight[peer])

    def _push(self, peer: Peer) -> None:
        weight = self._weight[peer]
        if weight <= 0:
            self._live.pop(peer, None)  # no weight, no new connections
            return
        self._seq += 1
        item = (peer.load / weight, self._pass[peer], self._seq, peer)
        self._live[peer] = item
        heap = self._heap
        heapq.heappush(heap, item)
        if len(heap) > 2 * len(self._live) + 64:
            self._heap = [i for i in heap if self._live.get(i[3]) is i]
            heapq.heapify(self._heap)

    def add(self, peer: Peer) -> None:
        if peer in self._weight:
            return
        self._weight[peer] = scaled_weight(peer)
        # half a stride after the present: a newcomer neither jumps the queue nor waits
        self._pass[peer] = self._vtime + self._stride(peer) // 2
        self._push(peer)

    def remove(self, peer: Peer) -> None:
        if self._weight.pop(peer, None) is None:
            return
        self._pass.pop(peer, None)
        self._live.pop(peer, None)

    def reweight(self, peer: Peer) -> None:
        if peer in self._weight:
            self._weight[peer] = scaled_weight(peer)
            self._push(peer)

    def pick(self, context: PickContext = NO_CONTEXT) -> Optional[Peer]:
        exclude = context.exclude
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][3]) is not heap[0]:
            heapq.heappop(heap)
        if not heap:
            return None
        item = heap[0]
        if exclude and item[3] in exclude:
            found = None
            for candidate in heap_in_order(heap):
                peer = candidate[3]
                if live.get(peer) is candidate and peer not in exclude:
                    found = candidate
                    break
            if found is None:
                return None
            item = found
        peer = item[3]
        self._vtime = item[1]
        self._pass[peer] = item[1] + self._stride(peer)
        self._push(peer)
        return peer

    def load_added(self, peer: Peer) -> None:
        if peer in self._live:
            self._push(peer)

    def load_removed(self, peer: Peer) -> None:
        if peer in self._live:
            self._push(peer)
