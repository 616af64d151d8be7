"""Consistent hashing of the client address, with bounded load, in lb.balancer.source."""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections import Counter
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import pytest
from zope.interface.verify import verifyObject

from lb.balancer import create, source
from lb.balancer.source import Balancer, hash_client, peer_points
from lb.interfaces import IBalancer, PickContext
from lb.testing import BalancerDriver, FakePeer, Mix, ReferenceModel

CLIENTS = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(20000)]


def make_peers(n: int, weight: float = 1.0) -> List[FakePeer]:
    return [FakePeer(f"192.168.0.{i + 1}:8080", weight) for i in range(n)]


def balancer_with(*members: FakePeer, factor: Optional[float] = None,
                  seed: int = 1) -> Balancer:
    b = Balancer(rng=random.Random(seed), hash_balance_factor=factor)
    for peer in members:
        b.add(peer)
    return b


CONTEXTS = {c: PickContext(c) for c in CLIENTS}  # built once: mapping() is this file's hot loop


def mapping(b: Balancer, clients: List[str] = CLIENTS) -> Dict[str, str]:
    return {c: b.pick(CONTEXTS.get(c) or PickContext(c)).key for c in clients}


SHIFT = 20  # a ring point keeps the upper 44 bits of its 64-bit hash
OWNERS = 512  # PlainRing tags a point with its owner's number, as point × 512 + number in
# a float: exact (44 + 9 bits fit a double's 53), and floats sort twice as fast as big ints


class PlainRing(ReferenceModel):
    """Consistent hashing written plainly, rebuilt from scratch after every change: a peer
    with weight w owns the first max(1, round(160 w)) points of its fixed sequence; a pick
    walks clockwise from the hash of the hash key or client, skipping excluded peers and,
    with a balance factor, peers at their cap ceil(factor × (load in rotation + 1) × w /
    total weight), unless every one is (then the first met). Without a key or client the
    walk starts at a random point, drawn from an rng seeded like the balancer's. (160
    points per weight: pools too small to rescale.) Given the balancer it stands ``beside``,
    it checks at each rebuild that the balancer's ring holds as many points."""

    def __init__(self, factor: Optional[float] = None, rng: Optional[random.Random] = None,
                 beside: Optional[Balancer] = None) -> None:
        self.factor = factor
        self.beside = beside
        self.rng = rng or random.Random()
        self.inside: Dict[Any, None] = {}
        self.load = 0  # of the peers in rotation
        self.numbers: Dict[Any, int] = {}  # a peer's number, tagging its points
        self.peers: List[Any] = []  # by number
        self.points_of: Dict[Any, Tuple[int, List[float]]] = {}  # count, tagged points
        self.ring: List[float] = []  # tagged points, sorted
        self.owners: List[Any] = []  # peers with weight
        self.total = 0.0
        self.dirty = True
        self.spilled = 0  # bounded picks that passed over a peer at its cap
        self.hashes: Dict[str, int] = {}  # ring positions of clients and hash keys

    def add(self, peer: Any) -> None:
        self.inside[peer] = None
        self.load += peer.load
        self.dirty = True

    def remove(self, peer: Any) -> None:
        del self.inside[peer]
        self.load -= peer.load
        self.dirty = True

    def reweight(self, peer: Any) -> None:
        self.dirty = True

    def load_added(self, peer: Any) -> None:
        self.load += 1

    def load_removed(self, peer: Any) -> None:
        self.load -= 1

    def points(self) -> List[float]:
        if self.dirty:
            values: List[float] = []
            self.owners = [p for p in self.inside if p.effective_weight > 0]
            for peer in self.owners:
                n = max(1, round(peer.effective_weight * 160))
                cached = self.points_of.get(peer)
                if cached is None or cached[0] != n:
                    number = self.numbers.setdefault(peer, len(self.numbers))
                    assert number < OWNERS
                    cached = self.points_of[peer] = (n, [
                        float((h >> SHIFT) * OWNERS + number)
                        for h in peer_points(peer.key, 0, n)])
                values += cached[1]
            values.sort()
            self.ring = values
            self.peers = sorted(self.numbers, key=self.numbers.__getitem__)
            self.total = sum(p.effective_weight for p in self.owners)
            assert self.total * 160 <= source.MAX_POINTS  # the balancer keeps 160 per weight
            if self.beside is not None:  # it picked just now: its ring is up to date
                assert len(self.beside._ring) == len(values), "as many points"
            self.dirty = False
        return self.ring

    def pick(self, context: PickContext) -> Optional[Any]:
        ring, exclude = self.points(), context.exclude
        if not self.owners or exclude and all(p in exclude for p in self.owners):
            return None
        key = context.hash_key or context.client
        if key:
            position = self.hashes.get(key)
            if position is None:
                position = self.hashes[key] = hash_client(key)
        else:
            position = self.rng.getrandbits(64)
        start = bisect_left(ring, float((position >> SHIFT) * OWNERS))
        first = None
        for i in range(len(ring)):
            peer = self.peers[int(ring[(start + i) % len(ring)]) % OWNERS]
            if peer in exclude:
                continue
            if self.factor is None or peer.load < math.ceil(
                    self.factor * (self.load + 1) * peer.effective_weight / self.total - 1e-9):
                return peer
            self.spilled += 1
            if first is None:
                first = peer
        return first


def test_provides_the_interface() -> None:
    """The module's Balancer is an IBalancer and ``create`` finds it by name."""
    assert verifyObject(IBalancer, Balancer())
    b = create("source", hash_balance_factor=1.5)
    assert isinstance(b, Balancer) and b._factor == 1.5


def test_same_client_same_peer_whatever_the_order_peers_arrive() -> None:
    """The ring is a function of the peer addresses and weights only: two balancers (two
    lb instances, or a restart) that learn the peers in a different order agree."""
    ps = make_peers(8)
    first = mapping(balancer_with(*ps), CLIENTS[:3000])
    shuffled = list(ps)
    random.Random(3).shuffle(shuffled)
    assert mapping(balancer_with(*shuffled), CLIENTS[:3000]) == first
    b = balancer_with(*ps)
    assert all(b.pick(CONTEXTS[c]).key == first[c] for c in CLIENTS[:3000])


def test_clients_spread_evenly() -> None:
    """20,000 clients over 10 equal peers: every peer within 25% of its fair share."""
    counts = Counter(mapping(balancer_with(*make_peers(10))).values())
    assert len(counts) == 10
    for n in counts.values():
        assert 0.75 * 2000 < n < 1.25 * 2000, counts


def test_weights_set_the_share() -> None:
    """A weight-3 peer gets about three times the clients of a weight-1 peer."""
    ps = make_peers(4)
    ps[0].effective_weight = 3.0
    counts = Counter(mapping(balancer_with(*ps)).values())
    share = counts[ps[0].key] / len(CLIENTS)
    assert abs(share - 0.5) < 0.06, counts


@pytest.mark.parametrize("n", [5, 10, 20])
def test_removing_a_peer_moves_only_its_clients_and_adding_it_back_restores_them(
        n: int) -> None:
    """Removing one of N peers remaps only the clients it had (about 1/N of all); adding
    it back returns every client to where it was."""
    ps = make_peers(n)
    b = balancer_with(*ps)
    before = mapping(b)
    gone = ps[n // 2]
    b.remove(gone)
    during = mapping(b)
    moved = [c for c in CLIENTS if before[c] != during[c]]
    assert all(before[c] == gone.key for c in moved)
    assert all(during[c] != gone.key for c in CLIENTS)
    fraction = len(moved) / len(CLIENTS)
    assert 0.6 / n < fraction < 1.4 / n, fraction
    b.add(gone)
    assert mapping(b) == before


def test_adding_a_peer_takes_about_one_share_from_the_others() -> None:
    """A new (N+1)th peer takes about 1/(N+1) of the clients, and only moves clients to
    itself."""
    ps = make_peers(10)
    b = balancer_with(*ps)
    before = mapping(b)
    newcomer = FakePeer("192.168.1.99:8080")
    b.add(newcomer)
    after = mapping(b)
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert all(after[c] == newcomer.key for c in moved)
    assert 0.6 / 11 < len(moved) / len(CLIENTS) < 1.4 / 11


def test_weight_ramp_moves_clients_only_onto_the_ramping_peer() -> None:
    """Slow start raises a peer's weight step by step; each step only moves clients from
    other peers onto it, never between the others."""
    ps = make_peers(6)
    ramping = ps[0]
    ramping.effective_weight = 0.1
    b = balancer_with(*ps)
    previous = mapping(b, CLIENTS[:5000])
    shares = []
    for step in range(1, 11):
        ramping.effective_weight = 0.1 + 0.09 * step
        b.reweight(ramping)
        now = mapping(b, CLIENTS[:5000])
        assert all(now[c] == ramping.key for c in now if now[c] != previous[c])
        shares.append(sum(1 for v in now.values() if v == ramping.key) / 5000)
        previous = now
    assert shares == sorted(shares)
    assert shares[0] < 0.1 < 1 / 6 - 0.04 < shares[-1]


def test_ipv4_mapped_ipv6_client_hashes_like_ipv4() -> None:
    """A client seen on a dual-stack listener as ::ffff:a.b.c.d maps like a.b.c.d."""
    b = balancer_with(*make_peers(5))
    for client in CLIENTS[:200]:
        assert b.pick(PickContext("::ffff:" + client)) is b.pick(PickContext(client))


def test_without_a_client_address_it_falls_back_to_weighted_random() -> None:
    """No client address: a random point of the ring, so peers share by weight."""
    ps = make_peers(3)
    ps[0].effective_weight = 2.0
    b = balancer_with(*ps, seed=9)
    counts = Counter(b.pick(PickContext()).key for _ in range(8000))
    assert abs(counts[ps[0].key] / 8000 - 0.5) < 0.06, counts


def test_exclude_walks_to_the_next_peer_on_the_ring() -> None:
    """A retry after the hashed peer failed goes to another peer, the same one each time
    for a client, and never to a tried peer."""
    ps = make_peers(5)
    b = balancer_with(*ps)
    for client in CLIENTS[:300]:
        first = b.pick(PickContext(client))
        second = b.pick(PickContext(client, exclude={first}))
        assert second is not None and second is not first
        assert b.pick(PickContext(client, exclude={first})) is second
        third = b.pick(PickContext(client, exclude={first, second}))
        assert third not in (first, second)
    assert b.pick(PickContext(CLIENTS[0], exclude=set(ps))) is None


def test_bounded_load_caps_every_peer() -> None:
    """With hash_balance_factor 1.25 no peer ever holds more than
    ceil(1.25 × connections / peers), even when every client has the same address."""
    ps = make_peers(4)
    b = balancer_with(*ps, factor=1.25)
    for total in range(1, 401):
        peer = b.pick(PickContext("203.0.113.7"))
        peer.load += 1
        b.load_added(peer)
        cap = math.ceil(1.25 * total / 4)
        assert max(p.load for p in ps) <= cap, total
    assert sum(p.load for p in ps) == 400


def test_without_the_factor_the_same_load_piles_onto_one_peer() -> None:
    """The cap is what spreads it: unbounded, one hot client address uses one peer."""
    ps = make_peers(4)
    b = balancer_with(*ps)
    for _ in range(100):
        peer = b.pick(PickContext("203.0.113.7"))
        peer.load += 1
        b.load_added(peer)
    assert sorted(p.load for p in ps) == [0, 0, 0, 100]


def test_bounded_load_keeps_affinity_below_the_cap() -> None:
    """Below the cap the bounded ring maps clients exactly like the plain ring, and
    closed connections free capacity again."""
    ps = make_peers(6)
    plain, bounded = balancer_with(*ps), balancer_with(*ps, factor=2.0)
    assert mapping(bounded, CLIENTS[:2000]) == mapping(plain, CLIENTS[:2000])
    hot = bounded.pick(PickContext("203.0.113.7"))
    opened = []
    for _ in range(12):
        peer = bounded.pick(PickContext("203.0.113.7"))
        peer.load += 1
        bounded.load_added(peer)
        opened.append(peer)
    assert hot.load < 12  # spilled
    for peer in opened:
        peer.load -= 1
        bounded.load_removed(peer)
    assert bounded.pick(PickContext("203.0.113.7")) is hot


def test_bounded_load_cap_is_weighted() -> None:
    """A heavier peer's cap is proportionally larger: weights 3,1 with all traffic from
    one address end near 3:1 rather than 1:1."""
    ps = make_peers(2)
    ps[0].effective_weight = 3.0
    b = balancer_with(*ps, factor=1.1)
    for _ in range(400):
        peer = b.pick(PickContext("198.51.100.1"))
        peer.load += 1
        b.load_added(peer)
    assert 280 <= ps[0].load <= 330  # 1:1 caps would stop it at 220


def test_ring_updates_in_place_match_a_fresh_ring() -> None:
    """However the ring got here (in-place inserts, merge passes, removals of many peers
    at once), it maps every client like a ring built from scratch for the same peers, and
    holds as many points."""
    b = Balancer(rng=random.Random(11))
    driver = BalancerDriver(
        b, model=PlainRing(rng=random.Random(11), beside=b), seed=11, peers=300, start=200,
        key=lambda i: f"172.16.{i // 250}.{i % 250}:80", weights=[1, 2, 3, 0.1, 0.37],
        reweights=[1, 2, 0.5, 0.13], mix=Mix(pick=2200, toggle=1.4, reweight=0.6),
        burst=[1, 3, 40, 150], exclude=[0, 0, 0, 1, 2], clients=CLIENTS[:1500] + [None] * 20,
        hold=None, len_counts_weightless=True)
    driver.run(18020)
    changes = driver.counts["add"] - 200 + driver.counts["remove"] + driver.counts["reweight"]
    assert driver.counts["pick"] >= 18000 and changes > 550


@pytest.mark.parametrize("seed,factor", [(0, None), (1, 1.25)], ids=["unbounded", "bounded"])
def test_matches_a_plain_ring_under_random_changes(seed: int, factor: Optional[float]) -> None:
    """Any sequence of adds, removes (redundant ones too), reweights (slow-start fractions
    and 0 too), connections opening and closing, and picks with retries, by client
    address, by hash key or by neither, picks exactly what a plainly built ring picks,
    bounded load included; len counts every peer in rotation."""
    plain = PlainRing(factor, random.Random(seed))
    hot = ["203.0.113.7", "198.51.100.1"]  # many connections from one address: caps bite
    driver = BalancerDriver(
        Balancer(rng=random.Random(seed), hash_balance_factor=factor), model=plain,
        seed=seed, peers=10, start=6, weights=[1, 1, 2, 3, 0.1, 0.55],
        reweights=[1, 2, 4, 0.1, 0.325, 0], exclude=[0, 0, 0, 1, 2, 4],
        mix=Mix(pick=65, toggle=3, reweight=3, close=30, open=2, repeat=1), hold=0.9,
        clients=CLIENTS[:30] + hot * 10 + [None] * 6, hash_keys=[None] * 8 + ["user-42"],
        len_counts_weightless=True)
    driver.run(2000)
    assert driver.counts["pick"] > 1150
    assert (plain.spilled > 100) is (factor is not None)


def test_same_peers_same_client_same_peer() -> None:
    """A client's peer depends on nothing but the peers it may go to and their weights:
    whatever happened in between (peers gone and back, weights changed and restored,
    connections, retries), the same key with the same peers to choose from maps to the
    same peer; in particular, while nothing changes, a key keeps its peer."""
    seen: Dict[Tuple[Optional[str], FrozenSet[Tuple[FakePeer, float]]], FakePeer] = {}

    def same_as_before(got: Optional[FakePeer], allowed: Sequence[FakePeer],
                       context: PickContext) -> bool:
        """the same key and peers to choose from gave this peer before"""
        if got is None:
            return True  # nobody to choose from: the contract's business
        state = frozenset((p, p.effective_weight) for p in allowed)
        return seen.setdefault((context.hash_key or context.client, state), got) is got

    driver = BalancerDriver(
        Balancer(rng=random.Random(2)), invariant=same_as_before, seed=2, peers=5,
        start=3, weights=[1, 2, 0.5], reweights=[1, 0.5], exclude=[0, 0, 0, 1, 2],
        mix=Mix(pick=85, toggle=8, reweight=4, close=10), hold=0.5,
        clients=CLIENTS[:12], hash_keys=[None] * 5 + ["user-42"])
    driver.run(2000)
    assert len(seen) < driver.counts["pick"] / 2  # most picks met a state seen before


def test_ring_size_is_bounded_with_hysteresis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_POINTS the points per weight halve (and double back only once the ring
    is well below the bound), so big pools keep a bounded ring."""
    monkeypatch.setattr(source, "MAX_POINTS", 4000)
    ps = make_peers(60)
    b = balancer_with(*ps)
    b.pick(PickContext(CLIENTS[0]))
    assert len(b._ring) <= 4000
    assert b._per_weight == source.MAX_POINTS_PER_WEIGHT / 4  # 60 × 40 = 2400 points
    for peer in ps[:50]:
        b.remove(peer)
    b.pick(PickContext(CLIENTS[0]))
    assert b._per_weight == source.MAX_POINTS_PER_WEIGHT  # 10 × 160 = 1600 points
    assert len(b._ring) == 1600
    assert mapping(b, CLIENTS[:2000]) == mapping(balancer_with(*ps[50:]), CLIENTS[:2000])


def test_empty_zero_weight_and_len() -> None:
    """No peers: None; a weightless peer owns no points; len counts peers in rotation."""
    b = Balancer(rng=random.Random(1))
    assert b.pick(PickContext("10.0.0.1")) is None and b.pick(PickContext()) is None
    z = FakePeer("10.9.9.9:80", 0)
    b.add(z)
    assert b.pick(PickContext("10.0.0.1")) is None
    p = FakePeer("10.9.9.8:80")
    b.add(p)
    assert len(b) == 2
    assert {b.pick(PickContext(c)) for c in CLIENTS[:50]} == {p}
    b.remove(p)
    b.remove(z)
    assert len(b) == 0 and b.pick(PickContext("10.0.0.1")) is None


def test_hash_key_is_hashed_instead_of_the_client() -> None:
    """A context's hash_key (a header or cookie in HTTP mode) decides the peer, whatever
    the client address; without one the client's IP does."""
    b = balancer_with(*make_peers(8))
    by_key = {b.pick(PickContext(client=c, hash_key="user-42")) for c in CLIENTS[:200]}
    assert len(by_key) == 1
    assert b.pick(PickContext(client="10.9.8.7")) is b.pick(PickContext(hash_key="10.9.8.7"))
    assert len({b.pick(PickContext(client=c)) for c in CLIENTS[:200]}) == 8
