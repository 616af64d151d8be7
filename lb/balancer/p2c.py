"""Power of two choices: draw two different peers by weight, send to the less loaded one.

Load is active connections per unit of weight, as for leastconn; on a tie the first draw
wins, so idle peers still share traffic in proportion to their weights. Compared with
leastconn it needs no ordered index of loads (two O(log n) draws per pick), and because
the choice is randomized, many balancers sharing the same peers do not all herd onto the
one least-loaded peer (Mitzenmacher; Envoy's and nginx's ``random two``).
"""

from __future__ import annotations

from typing import Optional

from zope.interface import implementer

from lb.balancer import random as weighted_random
from lb.interfaces import NO_CONTEXT, IBalancer, PickContext
from lb.peer import Peer


@implementer(IBalancer)
class Balancer(weighted_random.Balancer):
    """Weighted power of two choices on active connections (``balance: p2c``): the weighted
    random draw, twice."""

    def pick(self, context: PickContext = NO_CONTEXT) -> Optional[Peer]:
        exclude = context.exclude
        first = self._set.draw(self._rng, exclude)
        if first is None:
            return None
        second = self._set.draw(self._rng, (exclude | {first}) if exclude else {first})
        if second is None:
            return first
        # a.active / a.weight <= b.active / b.weight, without division
        w1, w2 = self._set.weight(first), self._set.weight(second)
        if second.load * w1 < first.load * w2:
            return second
        return first
