"""Weights from the config, from Consul and from the admin API all end in the peer's
effective weight that the pool hands its balancer; weight 0 takes no new connections."""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional

import pytest
from twisted.internet.task import Clock

from lb.config import BALANCE_ALGORITHMS, Address, PoolConfig
from lb.interfaces import PickContext
from lb.peer import PeerSpec
from lb.pool import Pool

A = Address("127.0.0.1", 9001)
B = Address("127.0.0.1", 9002)


def make_pool(balance: str = "roundrobin") -> Pool:
    return Pool(PoolConfig(name="web", balance=balance), Clock(), random.Random(3))


def picks(pool: Pool, n: int) -> Counter:
    counts: Counter = Counter()
    for i in range(n):
        peer = pool.pick(PickContext(f"10.0.{i >> 8}.{i & 255}"))
        if peer is None:
            counts[None] += 1
            continue
        conn = object()
        pool.connection_started(peer, conn)
        pool.connection_ended(peer, conn)
        counts[peer.key] += 1
    return counts


def test_config_weight_reaches_the_balancer() -> None:
    """Static weights from the config file set the split (smooth WRR: exact)."""
    pool = make_pool()
    pool.apply("static", [PeerSpec(A, 3), PeerSpec(B, 1)])
    assert picks(pool, 400) == {str(A): 300, str(B): 100}


def test_consul_weight_reaches_the_balancer() -> None:
    """Weights a Consul source reports (its ``Weights.Passing``) set the split too."""
    pool = make_pool()
    pool.apply("consul", [PeerSpec(A, 1), PeerSpec(B, 4)])
    assert picks(pool, 500) == {str(A): 100, str(B): 400}
    pool.apply("consul", [PeerSpec(A, 1), PeerSpec(B, 1)])  # Consul changed its mind
    assert picks(pool, 500) == {str(A): 250, str(B): 250}


def test_admin_weight_overrides_config_and_consul() -> None:
    """An operator's weight wins over the config's and Consul's, and applies at once."""
    pool = make_pool()
    pool.apply("static", [PeerSpec(A, 1)])
    pool.apply("consul", [PeerSpec(A, 5), PeerSpec(B, 1)])
    assert pool.peers[str(A)].weight == 1  # the config's weight beats discovery
    pool.set_weight(str(B), 3)
    assert pool.peers[str(B)].effective_weight == 3.0
    assert picks(pool, 400) == {str(A): 100, str(B): 300}


@pytest.mark.parametrize("balance", BALANCE_ALGORITHMS)
def test_weight_zero_takes_no_new_connections(balance: str) -> None:
    """Weight 0, from any source, is like drain: no new connections, existing ones stay
    counted; a positive weight brings the peer back."""
    pool = make_pool(balance)
    pool.apply("static", [PeerSpec(A, 1), PeerSpec(B, 0)])
    assert set(picks(pool, 200)) == {str(A)}
    pool.set_weight(str(B), 2)
    assert set(picks(pool, 400)) == {str(A), str(B)}
    held = object()
    peer_b = pool.peers[str(B)]
    pool.connection_started(peer_b, held)
    pool.set_weight(str(B), 0)
    assert set(picks(pool, 200)) == {str(A)}
    assert peer_b.active_connections == 1  # not cut, only no new ones
    pool.connection_ended(peer_b, held)
    pool.set_weight(str(A), 0)
    assert picks(pool, 5) == {None: 5}


@pytest.mark.parametrize("balance", BALANCE_ALGORITHMS)
def test_admin_weight_change_shifts_traffic_for_every_algorithm(balance: str) -> None:
    """Raising one peer's weight from the admin API shifts traffic to it whatever the
    algorithm (for source: of distinct client addresses)."""
    pool = make_pool(balance)
    pool.apply("static", [PeerSpec(A, 1), PeerSpec(B, 1)])
    before = picks(pool, 2000)[str(B)] / 2000
    pool.set_weight(str(B), 9)
    after = picks(pool, 2000)[str(B)] / 2000
    assert 0.35 < before < 0.65
    assert after > 0.8, (before, after)


def effective_weight(pool: Pool, address: Address) -> Optional[float]:
    peer = pool.peers.get(str(address))
    return None if peer is None else peer.effective_weight


def test_effective_weight_equals_weight_without_slow_start() -> None:
    """Without slow start the effective weight is the weight itself, for every source."""
    pool = make_pool()
    pool.apply("static", [PeerSpec(A, 7)])
    pool.add_peer(B, 2)
    assert (effective_weight(pool, A), effective_weight(pool, B)) == (7.0, 2.0)
