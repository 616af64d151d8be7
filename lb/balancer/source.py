"""Consistent hashing of the client address on a weighted ring, with optional bounded load.

Each peer owns points on a 64-bit ring, ``round(effective_weight × points_per_weight)`` of
them, taken in order from a fixed sequence derived from its address (blake2b, so every lb
instance and every restart draws the same ring). A client goes to the owner of the first
point at or after the hash of its IP. Removing one of N peers therefore moves only that
peer's clients (about 1/N of them) and adding it back returns exactly those clients; a
weight change or a slow-start ramp adds or drops the tail of one peer's sequence, moving
only clients to or from that peer. This is HAProxy's ``hash-type consistent`` and Envoy's
``RING_HASH``; Maglev balances more evenly but must rebuild its whole table (O(table) in
Python) on every change, where the ring changes in place.

``hash_balance_factor`` (HAProxy's ``hash-balance-factor``, Envoy's bounded load) caps a
peer at ``ceil(factor × (active connections + 1) × weight / total weight)``: a peer at
its cap is passed over for the next peer clockwise, so a hot client range spills to
neighbours instead of overloading one peer. Without a client address the pick falls back
to a random point on the ring (weighted random, still bounded).

The ring is kept sorted in an ``array('Q')`` of ``hash | peer index`` values (8 bytes a
point). Changes are recorded and applied at the next pick: small ones in place with
``insort``/``del``, large ones (a new pool, a mass change) by one sort.
"""

from __future__ import annotations

import math
import random as _random
import struct
from array import array
from bisect import bisect_left, insort
from hashlib import blake2b
from typing import Dict, List, Optional, Set

from zope.interface import implementer

from lb.interfaces import NO_CONTEXT, IBalancer, PickContext
from lb.peer import Peer

_INDEX_BITS = 20  # up to 2**20 peers; a point keeps the upper 44 bits of its hash
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_HASH_MASK = ((1 << 64) - 1) ^ _INDEX_MASK
MAX_POINTS_PER_WEIGHT = 160  # ketama's count: a peer's share is within ~8% of fair
MAX_POINTS = 1 << 20  # 8 MB of ring; past it, points per weight halve (then 80, 40, ...)
_EIGHT = struct.Struct(">8Q")


def hash_client(client: str) -> int:
    """The ring position of a client address (IPv4-mapped IPv6 counts as IPv4)."""
    if client.startswith("::ffff:") and "." in client:
        client = client[7:]
    return int.from_bytes(blake2b(client.encode(), digest_size=8).digest(), "big")


def peer_points(key: str, start: int, stop: int) -> List[int]:
    """Ring positions ``start`` to ``stop`` of a peer's fixed sequence (64-bit hashes)."""
    out: List[int] = []
    for block in range(start // 8, (stop + 7) // 8):
        out.extend(_EIGHT.unpack(blake2b(f"{key}#{block}".encode(),
                                          digest_size=64).digest()))
    first = start - (start // 8) * 8
    return out[first:first + stop - start]


class _Member:
    __slots__ = ("key", "peer", "index", "points", "count", "target", "live")

    def __init__(self, peer: Peer, index: int) -> None:
        self.key: str = peer.key
        self.peer = peer
        self.index = index
        self.points = array("Q")  # the first points of its sequence, tagged with its index
        self.count = 0  # points in the ring now
        self.target = 0  # points it should have
        self.live = True

    def ensure(self, n: int) -> None:
        have = len(self.points)
        if n > have:
            index = self.index
            self.points.extend((h & _HASH_MASK) | index for h in peer_points(self.key, have, n))


@implementer(IBalancer)
class Balancer:
    """Consistent hashing of the client IP (``balance: source``)."""

    def __init__(self, rng: Optional[_random.Random] = None,
                 hash_balance_factor: Optional[float] = None) -> None:
        self._rng = rng or _random.Random()
        if hash_balance_factor is not None and not math.isfinite(hash_balance_factor):
            hash_balance_factor = None  # .inf: no bound (config should refuse .nan/.inf)
        self._factor = hash_balance_factor
        self._ring = array("Q")
        self._members: Dict[str, _Member] = {}  # by peer key: a returning peer is the same
        self._by_index: Dict[int, _Member] = {}
        self._free: List[int] = []
        self._next_index = 0
        self._dirty: Set[_Member] = set()
        self._live = 0
        self._per_weight = float(MAX_POINTS_PER_WEIGHT)
        self._weights: Dict[str, float] = {}  # effective weights of live members
        self._total_weight = 0.0
        self._active = 0  # connections to live members

    def __len__(self) -> int:
        return self._live

    # --- changes -------------------------------------------------------------------------------

    def _points_for(self, weight: float) -> int:
        if weight <= 0:
            return 0
        return max(1, int(round(weight * self._per_weight)))

    def add(self, peer: Peer) -> None:
        member = self._members.get(peer.key)
        if member is not None and member.live:
            return
        if member is None:
            if self._free:
                index = self._free.pop()
            else:
                index = self._next_index
                if index > _INDEX_MASK:
                    raise ValueError(f"source balancing supports up to {_INDEX_MASK + 1} peers")
                self._next_index += 1
            member = self._members[peer.key] = self._by_index[index] = _Member(peer, index)
        member.peer = peer
        member.live = True
        self._live += 1
        self._active += peer.load
        self._set_weight(member, peer.effective_weight)

    def remove(self, peer: Peer) -> None:
        member = self._members.get(peer.key)
        if member is None or not member.live or member.peer is not peer:
            return
        member.live = False
        self._live -= 1
        self._active -= peer.load
        self._set_weight(member, 0.0)

    def reweight(self, peer: Peer) -> None:
        member = self._members.get(peer.key)
        if member is not None and member.live and member.peer is peer:
            self._set_weight(member, peer.effective_weight)

    def _set_weight(self, member: _Member, weight: float) -> None:
        old = self._weights.pop(member.key, 0.0)
        if weight > 0:
            self._weights[member.key] = weight
        self._total_weight += weight - old
        if not self._weights:
            self._total_weight = 0.0  # no float residue once empty
        member.target = self._points_for(weight)
        if member.target != member.count or not member.live:
            self._dirty.add(member)

    def load_added(self, peer: Peer) -> None:
        member = self._members.get(peer.key)
        if member is not None and member.live and member.peer is peer:
            self._active += 1

    def load_removed(self, peer: Peer) -> None:
        member = self._members.get(peer.key)
        if member is not None and member.live and member.peer is peer:
            self._active = max(0, self._active - 1)

    # --- the ring ------------------------------------------------------------------------------

    def _sync(self) -> None:
        """Bring the ring in line with the members' targets (at the next pick).

        Three ways, cheapest first for the size of the change: in place (each point an
        ``insort``/``del``, a memmove of the ring), one merge pass over the ring (a sorted
        run of new points merged by Timsort, dropped points filtered out), or a rebuild
        from every member's points (a new pool, or points per weight changed).
        """
        dirty, self._dirty = self._dirty, set()
        size = len(self._ring)
        if self._rescale() or not size:
            for member in self._members.values():
                member.ensure(member.target)
                member.count = member.target
            values: List[int] = []
            for member in self._members.values():
                values.extend(member.points[:member.count])
            values.sort()
            self._ring = array("Q", values)
        else:
            for member in dirty:
                member.ensure(member.target)
            moved = sum(abs(m.target - m.count) for m in dirty)
            # per point in place: ~1us + a memmove of the ring; a merge pass: ~0.15us a point
            if moved * (4000 + size) <= 600 * size:
                ring = self._ring
                for member in dirty:
                    if member.target > member.count:
                        for value in member.points[member.count:member.target]:
                            insort(ring, value)
                    else:
                        for value in member.points[member.target:member.count]:
                            del ring[bisect_left(ring, value)]
            else:
                dropped: Set[int] = set()
                added: List[int] = []
                for member in dirty:
                    if member.target > member.count:
                        added.extend(member.points[member.count:member.target])
                    else:
                        dropped.update(member.points[member.target:member.count])
                values = self._ring.tolist()
                if dropped:
                    values = [v for v in values if v not in dropped]
                if added:
                    added.sort()
                    values.extend(added)
                    values.sort()  # two sorted runs: one merge
                self._ring = array("Q", values)
            for member in dirty:
                member.count = member.target
        for member in dirty:
            if not member.live and member.count == 0 and self._members.get(
                    member.key) is member:
                del self._members[member.key]
                del self._by_index[member.index]
                self._free.append(member.index)

    def _rescale(self) -> bool:
        """Halve or double points per weight to keep the ring within MAX_POINTS (with
        hysteresis, so a pool at the boundary does not flip back and forth)."""
        per_weight = self._per_weight
        wanted = self._total_weight * per_weight
        while wanted > MAX_POINTS and per_weight > 1e-6:
            per_weight /= 2
            wanted /= 2
        while per_weight < MAX_POINTS_PER_WEIGHT and wanted * 4 < MAX_POINTS:
            per_weight *= 2
            wanted *= 2
        if per_weight == self._per_weight:
            return False
        self._per_weight = per_weight
        for member in self._members.values():
            member.target = self._points_for(self._weights.get(member.key, 0.0))
        return True

    # --- picking -------------------------------------------------------------------------------

    def _cap(self, member: _Member) -> int:
        assert self._factor is not None, "called only when bounded"
        weight = self._weights.get(member.key, 0.0)
        cap = self._factor * (self._active + 1) * weight / self._total_weight
        return math.ceil(cap - 1e-9)  # 1.1 × 400 × 0.75 is 330, not 330.00000000000006

    def pick(self, context: PickContext = NO_CONTEXT) -> Optional[Peer]:
        exclude = context.exclude
        client = context.hash_key or context.client
        if self._dirty:
            self._sync()
        ring = self._ring
        size = len(ring)
        if not size:
            return None
        candidates = len(self._weights)  # live peers with points
        if exclude:
            members = self._members
            for peer in exclude:
                member = members.get(peer.key)
                if member is not None and member.peer is peer and member.key in self._weights:
                    candidates -= 1
            if candidates <= 0:
                return None
        position = hash_client(client) if client else self._rng.getrandbits(64)
        i = bisect_left(ring, position & _HASH_MASK)
        by_index = self._by_index
        bounded = self._factor is not None and self._total_weight > 0
        first: Optional[Peer] = None
        seen: Set[int] = set()
        for step in range(size):
            member = by_index[ring[(i + step) % size] & _INDEX_MASK]
            peer = member.peer
            if exclude and peer in exclude:
                continue
            if not bounded:
                return peer
            if peer.load < self._cap(member):
                return peer
            if first is None:
                first = peer
            seen.add(member.index)
            if len(seen) >= candidates:
                break  # everyone left is at its cap (only when retries exclude the rest)
        return first
