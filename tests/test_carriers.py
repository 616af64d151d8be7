"""The carrier contract, one suite over every carrier: the pump with splice(2), the pump with
recv/send, and two Twisted transports (see lb/proxy/carriers/__init__.py for the contract).

Each test joins a real client socket and a real peer socket (TCP on 127.0.0.1) with one
carrier and a recording session, plays one side or both from the test, and checks what
arrives and what the carrier reported. The session's reading of those facts is tested in
tests/test_session.py.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor

from lb.net import Address
from lb.proxy.carriers import transports
from lb.proxy.carriers.pump import HAVE_SPLICE
from lb.testing import RecordingSession, poll_until, tcp_pair

pytestmark = pytest.mark.integration

CARRIERS = (["splice"] if HAVE_SPLICE else []) + ["copy", "transports"]


class Joined:
    """A client and a peer joined by one carrier; the test holds ``client`` and ``peer``
    (the far ends) and reads what the session heard."""

    def __init__(self, session: RecordingSession, carrier: Any, client: socket.socket,
                 peer: socket.socket, cleanup: List[Any]) -> None:
        self.session = session
        self.carrier = carrier
        self.client = client
        self.peer = peer
        self.cleanup = cleanup

    def received(self, sock: socket.socket) -> Tuple[bytes, bool]:
        """What ``sock`` can read now, and whether it saw EOF."""
        chunks = []
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks), False
            if not data:
                return b"".join(chunks), True
            chunks.append(data)


@pytest.fixture(params=CARRIERS)
def carrier_kind(request: Any) -> Iterator[str]:
    yield request.param
    reactor.pump.splice = HAVE_SPLICE


@defer.inlineCallbacks
def join(kind: str) -> Any:
    session = RecordingSession(reactor)
    cleanup: List[Any] = []
    if kind in ("splice", "copy"):
        reactor.pump.splice = kind == "splice"
        client, client_inner = tcp_pair()
        peer_inner, peer = tcp_pair()
        carrier = reactor.pump.adopt(session, client_inner, peer_inner)
        return Joined(session, carrier, client, peer, cleanup)
    # transports: the client accepted by Twisted, the peer dialled through an endpoint
    fronts: List[transports.TransportClient] = []

    class Factory(protocol.Factory):
        def buildProtocol(self, addr: Any) -> Any:
            front = transports.TransportClient(session.listener)  # type: ignore[arg-type]
            fronts.append(front)
            return front
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    cleanup.append(port.stopListening)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.setblocking(False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    dialled: defer.Deferred = defer.Deferred()
    transports.connect(reactor, Address("127.0.0.1", server.getsockname()[1]), 2.0, b"",
                       lambda p, first: dialled.callback(p), dialled.errback)
    peer_protocol = yield dialled.addTimeout(5, reactor)
    yield poll_until(reactor, lambda: fronts, what="the client accepted")
    peer, _ = server.accept()
    server.close()
    peer.setblocking(False)
    fronts[0].transport.resumeProducing()
    carrier = transports.TransportJoin(session, fronts[0], peer_protocol, b"", reactor)
    return Joined(session, carrier, client, peer, cleanup)


@pytest.fixture
def joined(carrier_kind: str) -> Iterator[Joined]:
    j = pytest_twisted.blockon(join(carrier_kind))
    yield j
    if not j.session.closed:
        j.carrier.abort()
    for sock in (j.client, j.peer):
        sock.close()
    for stop in j.cleanup:
        pytest_twisted.blockon(defer.maybeDeferred(stop))


def reads(j: Joined, sock: socket.socket, want: int) -> Any:
    """Poll (bounded) until ``sock`` has read ``want`` bytes; fires with them."""
    got: List[bytes] = []

    def enough() -> bool:
        got.append(j.received(sock)[0])
        return sum(map(len, got)) >= want
    return poll_until(reactor, enough, what=f"{want} bytes").addCallback(
        lambda _: b"".join(got))


def eof(j: Joined, sock: socket.socket) -> Any:
    """Poll (bounded) until ``sock`` sees EOF (or a reset); fires with what it read."""
    got: List[bytes] = []
    state = {"end": ""}

    def ended() -> bool:
        try:
            data, seen = j.received(sock)
        except ConnectionResetError:
            state["end"] = "reset"
            return True
        got.append(data)
        if seen:
            state["end"] = "eof"
        return bool(state["end"])
    return poll_until(reactor, ended, what="the end").addCallback(
        lambda _: (b"".join(got), state["end"]))


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest_twisted.inlineCallbacks
def test_bytes_pass_intact_both_ways_and_are_counted(joined: Joined) -> Any:
    """Whatever each side sends reaches the other byte for byte, every byte is reported
    once in its direction, and the session's last_active is stamped."""
    j = joined
    up = bytes(range(256)) * 4000  # about 1 MB: bulk enough to switch the pump to splice
    down = b"answer " * 50
    j.client.setblocking(True)
    j.client.sendall(up[:200_000])
    j.client.setblocking(False)
    got = yield reads(j, j.peer, 200_000)
    j.peer.sendall(down)
    back = yield reads(j, j.client, len(down))
    assert got == up[:200_000] and back == down
    assert (j.session.bytes_in, j.session.bytes_out) == (200_000, len(down))
    assert j.session.last_active > 0


@pytest_twisted.inlineCallbacks
def test_a_client_fin_passes_on_and_the_peer_may_still_answer(joined: Joined) -> Any:
    """The client's FIN becomes the peer's EOF; the peer's answer still reaches the client;
    the peer's FIN then ends the pair as "done" with the answer delivered."""
    j = joined
    j.client.send(b"request")
    j.client.shutdown(socket.SHUT_WR)
    got, end = yield eof(j, j.peer)
    assert (got, end) == (b"request", "eof")
    assert j.session.fins == 1
    j.peer.send(b"reply")
    j.peer.shutdown(socket.SHUT_WR)
    back, end = yield eof(j, j.client)
    assert (back, end) == (b"reply", "eof")
    yield poll_until(reactor, lambda: j.session.closed, what="the pair closed")
    assert j.session.closed == [("done", None, True, False)]
    assert j.session.fins == 2


@pytest_twisted.inlineCallbacks
def test_a_peer_fin_passes_on_and_the_client_may_still_send(joined: Joined) -> Any:
    """The peer's FIN becomes the client's EOF while the client keeps sending."""
    j = joined
    j.peer.send(b"early answer")
    j.peer.shutdown(socket.SHUT_WR)
    back, end = yield eof(j, j.client)
    assert (back, end) == (b"early answer", "eof")
    j.client.send(b"more")
    got = yield reads(j, j.peer, 4)
    assert got == b"more" and j.session.closed == []


@pytest_twisted.inlineCallbacks
def test_a_client_reset_after_its_whole_answer_reports_it_so(joined: Joined) -> Any:
    """A client that resets once it has its whole answer (the peer's FIN passed on):
    the carrier reports a client reset with the answer done and nothing pending, which
    the session counts as a normal end."""
    j = joined
    j.client.send(b"GET")
    yield reads(j, j.peer, 3)
    j.peer.send(b"200 OK")
    j.peer.shutdown(socket.SHUT_WR)
    yield eof(j, j.client)
    reset(j.client)
    yield poll_until(reactor, lambda: j.session.closed, what="the pair closed")
    assert j.session.closed == [("reset", "client", True, False)]


@pytest_twisted.inlineCallbacks
def test_a_peer_reset_delivers_what_the_peer_sent_then_closes_the_client(
        joined: Joined) -> Any:
    """A peer that resets after sending part of an answer: the client gets those bytes,
    then an orderly close, and the carrier reports a peer reset."""
    j = joined
    j.peer.send(b"partial answer")
    yield reads(j, j.client, len(b"partial answer"))
    reset(j.peer)
    _, end = yield eof(j, j.client)
    assert end == "eof"
    yield poll_until(reactor, lambda: j.session.closed, what="the pair closed")
    kind, side, answer_done, _ = j.session.closed[0]
    assert (kind, side, answer_done) == ("reset", "peer", False)


@pytest_twisted.inlineCallbacks
def test_abort_resets_both_sides(joined: Joined) -> Any:
    """abort() (idle timeout, maint, shutdown) closes both sides at once with a reset and
    reports "aborted"."""
    j = joined
    j.client.send(b"x")
    yield reads(j, j.peer, 1)
    j.carrier.abort()
    for sock in (j.client, j.peer):
        _, end = yield eof(j, sock)
        assert end == "reset"
    yield poll_until(reactor, lambda: j.session.closed, what="the pair closed")
    assert j.session.closed[0][0] == "aborted"


@pytest_twisted.inlineCallbacks
def test_a_client_that_does_not_read_throttles_the_peer(joined: Joined) -> Any:
    """The peer writes as fast as it can to a client that reads nothing: the carrier stops
    reading the peer, so the peer's socket fills and the carrier holds a bounded amount."""
    j = joined
    j.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    chunk = b"z" * 65536
    sent = 0

    def peer_blocked() -> bool:
        nonlocal sent
        for _ in range(64):
            try:
                sent += j.peer.send(chunk)
            except BlockingIOError:
                return True
            except OSError as e:  # pragma: no cover - a broken pair fails the test below
                assert e.errno != errno.EPIPE, "the pair closed"
                raise
        return False
    yield poll_until(reactor, peer_blocked, timeout=10, what="the peer throttled")
    held = j.carrier.buffered()
    assert held <= 2 * 1024 * 1024, f"the carrier holds {held} bytes"
    assert sent < 64 * 1024 * 1024
    assert j.session.closed == []


class _Join:
    """Records what a transports-carrier protocol hands its join when its connection goes."""

    def __init__(self) -> None:
        self.lost: List[Any] = []

    def client_lost(self, reason: Any) -> None:
        self.lost.append(("client", reason.check(error.ConnectionDone) is not None))

    def peer_lost(self, reason: Any) -> None:
        self.lost.append(("peer", reason.check(error.ConnectionDone) is not None))


def test_connection_lost_without_a_reason_is_a_clean_close() -> None:
    """Both transport protocols default ``connectionLost``'s reason to Twisted's
    ``connectionDone`` Failure, as ``Protocol`` does (the default was a bare exception, which
    the join could not read)."""
    join = _Join()
    peer = transports.PeerProtocol()
    peer.join = join
    peer.connectionLost()
    client = transports.TransportClient(RecordingSession(None).listener)
    client.join = join
    client.connectionLost()
    assert join.lost == [("peer", True), ("client", True)]
