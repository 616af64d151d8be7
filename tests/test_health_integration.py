"""Health checks for real: an in-process LBService with the health part, real twisted.web
backends on 127.0.0.1, real clients through the listener."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterator, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from lb.health.monitor import FAIL
from lb.service import LBService, default_pool_parts
from lb.testing import listening_port, make_config, poll_until

pytestmark = pytest.mark.integration


class _Health(Resource):
    isLeaf = True

    def __init__(self, backend: "HTTPBackend") -> None:
        super().__init__()
        self.backend = backend

    def render_GET(self, request: Any) -> bytes:
        code = self.backend.code
        self.backend.health_answers[code] += 1
        request.setResponseCode(code)
        return b"ok" if code == 200 else b"unavailable"


class _Name(Resource):
    isLeaf = True

    def __init__(self, backend: "HTTPBackend") -> None:
        super().__init__()
        self.backend = backend

    def render_GET(self, request: Any) -> bytes:
        self.backend.served += 1
        return f"served-by {self.backend.name}".encode()


class HTTPBackend:
    """A real HTTP server: /health answers `code`, everything else names the backend."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.code = 200
        self.health_answers: Counter = Counter()
        self.served = 0
        root = Resource()
        root.putChild(b"health", _Health(self))
        root.putChild(b"", _Name(self))
        self.site = Site(root)
        self.site.noisy = False
        self.port: Any = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.address = f"127.0.0.1:{self.number}"

    def revive(self) -> None:
        """Listen again on the same port (the process restarted)."""
        self.port = reactor.listenTCP(self.number, self.site, interface="127.0.0.1")

    def kill(self) -> defer.Deferred:
        """Stop listening: new connects are refused (the process died)."""
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)


class _Collect(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.data = b""

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def fetch(port: int) -> Any:
    """One client request through the balancer; the raw response bytes (b"" when the
    balancer had to close the client)."""
    done: defer.Deferred = defer.Deferred()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    factory = Factory.forProtocol(lambda: _Collect(done))
    factory.noisy = False
    yield endpoint.connect(factory)
    data = yield done
    return data


def served_by(response: bytes) -> Optional[str]:
    if not response.startswith(b"HTTP/1.") or b" 200 " not in response.split(b"\r\n")[0]:
        return None
    return response.rsplit(b"served-by ", 1)[-1].decode() if b"served-by " in response \
        else None


@pytest.fixture
def logged() -> Iterator[List[Dict[str, Any]]]:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@defer.inlineCallbacks
def start_lb(backends: List[HTTPBackend], health: Optional[Dict[str, Any]],
             **pool: Any) -> Any:
    if health is not None:
        pool["health"] = health
    config = make_config(
        {"web": {"bind": "127.0.0.1:0", "pool": "web"}},
        {"web": {"peers": [b.address for b in backends], **pool}},
        shutdown_timeout="1s")
    service = LBService(config, reactor, pool_parts={"health": default_pool_parts()["health"]})
    service.startService()
    pool_ = service.pool("web")
    yield poll_until(reactor, lambda: all(p.health == "up" for p in pool_.peers.values()),
                     timeout=5, what="every backend up")
    return service


@defer.inlineCallbacks
def stop_all(service: Optional[LBService], backends: List[HTTPBackend]) -> Any:
    if service is not None:
        yield service.stopService()
    for backend in backends:
        yield backend.kill()


@pytest_twisted.inlineCallbacks
def test_503_leaves_after_fall_and_returns_after_rise(logged: list) -> None:
    """A backend whose /health turns 503 leaves rotation on exactly the `fall`-th failing
    probe (clients go to the other one), and comes back on exactly the `rise`-th passing
    probe; each transition is logged with the check detail."""
    a, b = HTTPBackend("a"), HTTPBackend("b")
    service = None
    try:
        service = yield start_lb([a, b], {"interval": "500ms", "timeout": "400ms",
                                          "rise": 2, "fall": 2})
        pool = service.pool("web")
        peer = pool.peers[a.address]
        at_transition: List[tuple] = []

        def watch(pool_: Any, p: Any, event: str) -> None:
            if p is peer and (not at_transition or at_transition[-1][0] != p.health):
                at_transition.append((p.health, a.health_answers[503],
                                      a.health_answers[200]))
        pool.subscribe(watch)
        port = listening_port(service.listeners["web"])

        a.code = 503
        passes_before = a.health_answers[200]
        yield poll_until(reactor, lambda: peer.health == "down", timeout=5,
                         what="backend a down")
        assert at_transition[-1][:2] == ("down", 2)
        assert peer.last_check.detail == "HTTP 503"
        names = []
        for _ in range(6):
            names.append(served_by((yield fetch(port))))
        assert names == ["b"] * 6

        a.code = 200
        passes_before = a.health_answers[200]
        yield poll_until(reactor, lambda: peer.health == "up", timeout=5,
                         what="backend a up again")
        assert at_transition[-1][0] == "up"
        assert at_transition[-1][2] - passes_before == 2
        names = []
        for _ in range(6):
            names.append(served_by((yield fetch(port))))
        assert sorted(set(names)) == ["a", "b"]

        lines = [(e["peer"], e["old"], e["new"], e["detail"]) for e in logged
                 if "health {old} -> {new}" in e.get("log_format", "")
                 and e.get("peer") == a.address]
        assert lines[-2:] == [(a.address, "up", "down", "HTTP 503"),
                              (a.address, "down", "up", "HTTP 200")]
    finally:
        yield stop_all(service, [a, b])


@pytest_twisted.inlineCallbacks
def test_killed_backend_leaves_by_passive_checks(logged: list) -> None:
    """With probes 5s apart, a backend that dies is taken out by `fall` failed client
    connects long before its next probe; the clients themselves are retried on the
    others and all get answers."""
    backends = [HTTPBackend(name) for name in "abc"]
    service = None
    try:
        service = yield start_lb(backends, {"interval": "5s", "timeout": "1s", "fall": 3},
                                 retries=2)
        pool = service.pool("web")
        monitor = service.pools["web"].parts["health"]
        dead = backends[2]
        peer = pool.peers[dead.address]
        port = listening_port(service.listeners["web"])
        started = reactor.seconds()
        yield dead.kill()
        names = []
        for _ in range(12):
            names.append(served_by((yield fetch(port))))
        assert peer.health == "down"
        assert reactor.seconds() - started < 4  # the next probe of `c` is 8s after start
        assert monitor.checks[(dead.address, FAIL)] == 0  # no probe saw it die
        assert peer.last_check.ok  # the last *probe* still passed
        assert set(names) <= {"a", "b"} and None not in names
        assert peer.connect_failures == 3
        lines = [e for e in logged if "health {old} -> {new}" in e.get("log_format", "")
                 and e.get("peer") == dead.address]
        assert [(e["old"], e["new"], e["detail"]) for e in lines] == [
            ("unknown", "up", "HTTP 200"),
            ("up", "down", "connection refused (client traffic)")]
    finally:
        yield stop_all(service, backends)


@pytest_twisted.inlineCallbacks
def test_no_client_error_while_one_of_three_dies() -> None:
    """Concurrent waves of clients while one of three backends dies mid-wave: every
    client gets a full answer from a live backend (connect retries), and the dead one
    ends up out of rotation."""
    backends = [HTTPBackend(name) for name in "abc"]
    service = None
    try:
        service = yield start_lb(backends, {"interval": "2s", "timeout": "1s", "fall": 3},
                                 retries=2, connect_timeout="1s")
        port = listening_port(service.listeners["web"])
        results: List[Optional[str]] = []
        for wave in range(4):
            requests = [fetch(port) for _ in range(25)]
            if wave == 1:
                yield backends[1].kill()  # dies while this wave is connecting
            answers = yield defer.gatherResults(requests)
            results.extend(served_by(r) for r in answers)
        assert len(results) == 100
        assert None not in results
        assert "b" not in results[50:]  # waves after the death
        assert service.pool("web").peers[backends[1].address].health == "down"
        assert service.listeners["web"].listener.ended.get("connect_failed", 0) == 0
    finally:
        yield stop_all(service, backends)


@pytest_twisted.inlineCallbacks
def test_pool_without_health_recovers_by_tcp_probe(logged: list) -> None:
    """A pool without `health`: nothing is probed while all is well; a dead backend is
    taken out by failed client connects, probed over TCP at the default interval while
    down, and back in rotation once it listens again (after `rise` passing probes)."""
    backends = [HTTPBackend(name) for name in "ab"]
    service = None
    try:
        service = yield start_lb(backends, None, retries=1)
        pool = service.pool("web")
        monitor = service.pools["web"].parts["health"]
        assert monitor.watched() == []
        port = listening_port(service.listeners["web"])
        dead = backends[1]
        peer = pool.peers[dead.address]
        yield dead.kill()
        names = []
        for _ in range(8):
            names.append(served_by((yield fetch(port))))
        assert names == ["a"] * 8
        assert peer.health == "down"
        assert monitor.watched() == [dead.address]
        dead.revive()
        yield poll_until(reactor, lambda: peer.health == "up", timeout=8,
                         what="revived backend back up")
        assert peer.last_check.detail == "connected"
        assert monitor.watched() == []
        names = []
        for _ in range(4):
            names.append(served_by((yield fetch(port))))
        assert sorted(set(names)) == ["a", "b"]
    finally:
        yield stop_all(service, backends)
