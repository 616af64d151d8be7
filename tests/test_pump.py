"""The pump's own connect over real sockets on 127.0.0.1: first write, refusal, timeout."""

import socket
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor

from lb.proxy.carriers.pump import Pump
from lb.testing import free_port, poll_until

pytestmark = pytest.mark.integration


@pytest.fixture
def pump() -> Any:
    p = reactor.pump
    assert p is not None, "tests run on lb's reactor (tests/conftest.py)"
    return p


def start(pump: Pump, port: int, first: bytes, timeout: float = 2.0) -> defer.Deferred:
    """Connect through the pump; fires with ("connected", sock, unsent) or ("failed", exc)."""
    d: defer.Deferred = defer.Deferred()
    pump.connect("127.0.0.1", port, timeout, False, first,
                 lambda sock, unsent: d.callback(("connected", sock, unsent)),
                 lambda exc: d.callback(("failed", exc)))
    return d.addTimeout(5, reactor)  # a broken pump fails the test instead of hanging it


@pytest_twisted.inlineCallbacks
def test_first_bytes_are_the_connects_first_write(pump: Pump) -> Any:
    """With bytes to send, the connect is confirmed by writing them: the peer has them when
    ``connected`` runs, which hears what was not taken."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        kind, sock, unsent = yield start(pump, server.getsockname()[1], b"hello peer")
        assert (kind, unsent) == ("connected", b"")
        accepted, _ = server.accept()
        assert accepted.recv(100) == b"hello peer"
        accepted.close()
        sock.close()
    finally:
        server.close()


@pytest_twisted.inlineCallbacks
def test_refused_connect_fails_with_or_without_first_bytes(pump: Pump) -> Any:
    """A closed port fails the connect as a refusal whether the send or SO_ERROR tells."""
    for first in (b"data", b""):
        kind, exc = yield start(pump, free_port(), first)
        assert kind == "failed" and isinstance(exc, error.ConnectionRefusedError), first


@pytest_twisted.inlineCallbacks
def test_unanswered_connect_times_out_and_the_sweep_stops(pump: Pump) -> Any:
    """A SYN nobody answers (a full accept queue drops it) fails as a timeout after about
    ``timeout``; once no connect is pending the deadline sweep stops."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: List[socket.socket] = []
    try:
        for _ in range(2):  # fill the accept queue so the next SYN is dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        started = reactor.seconds()
        kind, exc = yield start(pump, port, b"never sent", timeout=0.3)
        elapsed = reactor.seconds() - started
        assert kind == "failed" and isinstance(exc, error.TimeoutError)
        assert 0.3 <= elapsed < 2.0
        yield poll_until(reactor, lambda: pump._connect_sweep is None, timeout=2,
                         what="the connect sweep to stop")
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_cancel_closes_the_socket_and_reports_cancelled(pump: Pump) -> None:
    """A cancelled connect (the client left) is forgotten and its failure callback hears
    CancelledError, once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(2):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        results: List[Any] = []
        handle = pump.connect("127.0.0.1", port, 5.0, False, b"", lambda s, n: results.append(s),
                              results.append)
        handle.cancel()
        handle.cancel()
        assert len(results) == 1 and isinstance(results[0], defer.CancelledError)
        assert pump._connects == {}
    finally:
        for filler in fillers:
            filler.close()
        server.close()
