"""Each balancing algorithm end to end: an in-process LBService on 127.0.0.1 in front of
real backends that say who they are, clients over real sockets."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from lb.service import LBService
from lb.testing import make_config, poll_until

pytestmark = pytest.mark.integration


class Hold(protocol.Protocol):
    """Says its backend's name and keeps the connection open until the client closes."""

    def connectionMade(self) -> None:
        self.factory.hits += 1
        self.transport.write(self.factory.name.encode() + b"\n")


class HoldFactory(protocol.Factory):
    protocol = Hold
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0


class Client(protocol.Protocol):
    """Fires ``named`` with the backend's name, ``closed`` when the connection ends."""

    def __init__(self) -> None:
        self.buffer = b""
        self.named: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.named.called:
            self.named.callback(self.buffer.split(b"\n", 1)[0].decode())

    def connectionLost(self, reason: Any = None) -> None:
        if not self.named.called:
            self.named.errback(AssertionError(f"closed before a name: {reason}"))
        self.closed.callback(None)


@pytest.fixture
def stack() -> Any:
    """Backends and an LBService, all stopped at the end even when the test fails."""
    items: Dict[str, Any] = {"ports": [], "lb": None, "clients": []}
    yield items
    open_ = [c for c in items["clients"] if c.transport is not None and not c.closed.called]
    for client in open_:
        client.transport.loseConnection()
    pytest_twisted.blockon(defer.gatherResults([c.closed for c in open_]))
    if items["lb"] is not None:
        pytest_twisted.blockon(defer.maybeDeferred(items["lb"].stopService))
    for port in items["ports"]:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def start(stack: Dict[str, Any], pool: Dict[str, Any], names: List[str],
          weights: Optional[List[int]] = None) -> Dict[str, Any]:
    """Start backends ``names`` and an lb in front of them; return name → peer key."""
    keys = {}
    peers = []
    for i, name in enumerate(names):
        port = reactor.listenTCP(0, HoldFactory(name), interface="127.0.0.1")
        stack["ports"].append(port)
        keys[name] = f"127.0.0.1:{port.getHost().port}"
        peers.append({"address": keys[name], "weight": weights[i] if weights else 1})
    config = make_config({"l": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": dict(pool, peers=peers)}, shutdown_timeout="2s")
    lb = LBService(config, reactor)
    lb.startService()
    stack["lb"] = lb
    stack["port"] = lb.listeners["l"].port.getHost().port
    stack["keys"] = keys
    return keys


@defer.inlineCallbacks
def open_client(stack: Dict[str, Any], source_ip: str = "127.0.0.1") -> Any:
    client = Client()
    stack["clients"].append(client)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", stack["port"], timeout=5,
                                  bindAddress=(source_ip, 0))
    yield connectProtocol(endpoint, client)
    name = yield client.named
    return client, name


def idle(stack: Dict[str, Any], baseline: Optional[Dict[str, int]] = None) -> defer.Deferred:
    """Wait until each peer's active count is back to ``baseline`` (default 0)."""
    pool = stack["lb"].pool("web")
    baseline = baseline or {}

    def settled() -> bool:
        return all(peer.active_connections == baseline.get(key, 0)
                   for key, peer in pool.peers.items())
    return poll_until(reactor, settled, timeout=10, what="connections to end")


@defer.inlineCallbacks
def short(stack: Dict[str, Any], source_ip: str = "127.0.0.1",
          baseline: Optional[Dict[str, int]] = None) -> Any:
    """One connection: read the backend's name, close, wait until the lb saw the end."""
    client, name = yield open_client(stack, source_ip)
    client.transport.loseConnection()
    yield client.closed
    yield idle(stack, baseline)
    return name


@pytest_twisted.inlineCallbacks
def test_roundrobin_splits_by_weight(stack: Dict[str, Any]) -> Any:
    """roundrobin with weights 2,1: exactly two connections of three go to the first."""
    start(stack, {"balance": "roundrobin"}, ["a", "b"], weights=[2, 1])
    names = []
    for _ in range(9):
        names.append((yield short(stack)))
    assert Counter(names) == {"a": 6, "b": 3}
    assert "aa" in "".join(names) and "bb" not in "".join(names)


@pytest.mark.parametrize("balance", ["leastconn", "p2c"])
@pytest_twisted.inlineCallbacks
def test_held_connection_shifts_new_ones_elsewhere(stack: Dict[str, Any],
                                                   balance: str) -> Any:
    """leastconn and p2c: while one backend holds a connection, new short connections all
    go to the idle one; once it is closed, both serve again."""
    keys = start(stack, {"balance": balance}, ["a", "b"])
    held, busy = yield open_client(stack)
    other = "b" if busy == "a" else "a"
    baseline = {keys[busy]: 1}
    yield idle(stack, baseline)
    names = []
    for _ in range(8):
        names.append((yield short(stack, baseline=baseline)))
    assert names == [other] * 8
    held.transport.loseConnection()
    yield held.closed
    yield idle(stack)
    names = []
    for _ in range(20):
        names.append((yield short(stack)))
    assert set(names) == {"a", "b"}


@pytest_twisted.inlineCallbacks
def test_random_spreads_by_weight(stack: Dict[str, Any]) -> Any:
    """random with weights 3,1: both serve, the heavier about three times as often (the
    lb's rng is not seeded here, so the bounds are wide: ~5 standard deviations)."""
    start(stack, {"balance": "random"}, ["a", "b"], weights=[3, 1])
    names = []
    for _ in range(100):
        client, name = yield open_client(stack)
        client.transport.loseConnection()
        names.append(name)
        yield client.closed
    counts = Counter(names)
    assert 5 <= counts["b"] <= 50 and counts["a"] + counts["b"] == 100


@pytest_twisted.inlineCallbacks
def test_source_keeps_each_client_address_on_one_backend(stack: Dict[str, Any]) -> Any:
    """source: connections from one client IP always reach the same backend, different
    IPs spread over the backends (clients bind 127.0.0.x addresses)."""
    start(stack, {"balance": "source"}, ["a", "b", "c"])
    seen: Dict[str, set] = {}
    for _round in range(2):
        for i in range(2, 18):
            ip = f"127.0.0.{i}"
            name = yield short(stack, source_ip=ip)
            seen.setdefault(ip, set()).add(name)
    assert all(len(names) == 1 for names in seen.values()), seen
    assert len(set().union(*seen.values())) >= 2


@pytest_twisted.inlineCallbacks
def test_source_bounded_load_spills_a_hot_client(stack: Dict[str, Any]) -> Any:
    """source with hash_balance_factor: one client address holding many connections is
    spread so no backend exceeds ceil(factor × connections / backends)."""
    keys = start(stack, {"balance": "source", "hash_balance_factor": 1.5}, ["a", "b", "c"])
    names = []
    for _ in range(12):
        client, name = yield open_client(stack, source_ip="127.0.0.9")
        names.append(name)
    counts = Counter(names)
    assert max(counts.values()) <= 6  # ceil(1.5 × 12 / 3)
    pool = stack["lb"].pool("web")
    assert sum(pool.peers[k].active_connections for k in keys.values()) == 12
