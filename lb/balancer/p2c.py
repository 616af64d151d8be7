"""Power of two choices: draw two different peers by weight, send to the less loaded one.

Load is active connections per unit of weight, as for leastconn; on a tie the first draw
wins, so idle peers still share traffic in proportion to their weights. Compared with
leastconn it needs no ordered index of loads (two O(log n) draws per pick), and because
the choice is randomized, many balancers sharing the same peers do not all herd onto the
one least-loaded peer (Mitzenmacher; Envoy's and nginx's ``random two``).
"""

from __future__ import annotations

import random as _random
from typing import AbstractSet, Any, Optional

from zope.interface import implementer

from lb.balancer.random import WeightedSet
from lb.balancer.roundrobin import scaled_weight
from lb.interfaces import IBalancer


@implementer(IBalancer)
class Balancer:
    """Weighted power of two choices on active connections (``balance: p2c``)."""

    def __init__(self, rng: Optional[_random.Random] = None,
                 hash_balance_factor: Optional[float] = None) -> None:
        self._rng = rng or _random.Random()
        self._set = WeightedSet()

    def __len__(self) -> int:
        return len(self._set)

    def add(self, peer: Any) -> None:
        if peer not in self._set:
            self._set.set(peer, scaled_weight(peer))

    def remove(self, peer: Any) -> None:
        self._set.discard(peer)

    def reweight(self, peer: Any) -> None:
        if peer in self._set:
            self._set.set(peer, scaled_weight(peer))

    def pick(self, client: Optional[str] = None,
             exclude: AbstractSet[Any] = frozenset()) -> Optional[Any]:
        first = self._set.draw(self._rng, exclude)
        if first is None:
            return None
        second = self._set.draw(self._rng, (exclude | {first}) if exclude else {first})
        if second is None:
            return first
        # a.active / a.weight <= b.active / b.weight, without division
        w1, w2 = self._set.weight(first), self._set.weight(second)
        if second.active_connections * w1 < first.active_connections * w2:
            return second
        return first

    def connection_opened(self, peer: Any) -> None:
        pass

    def connection_closed(self, peer: Any) -> None:
        pass
