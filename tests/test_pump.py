"""The pump's own connect over real sockets on 127.0.0.1: first write, refusal, timeout."""

import select
import socket
import struct
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor

from lb.proxy.carriers.pump import Pump
from lb.testing import PumpClock, RecordingSession, free_port, poll_until, tcp_pair

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


# --- the pump's event handling, unit by unit, on socketpairs and a private epoll set ----------


class Pumped:
    """A pair adopted by a pump on a PumpClock: the test plays ``client`` and ``peer``."""

    def __init__(self, splice: bool = False, tcp: bool = False) -> None:
        self.clock = PumpClock()
        self.pump = Pump(self.clock)
        self.pump.splice = splice
        self.session = RecordingSession(self.clock)
        pair = tcp_pair if tcp else socket.socketpair  # TCP when a reset must be a reset
        self.client, client_inner = pair()
        peer_inner, self.peer = pair()
        for s in (client_inner, peer_inner, self.client, self.peer):
            s.setblocking(False)
        self.pair = self.pump.adopt(self.session, client_inner, peer_inner)

    def run(self, batches: int = 5) -> None:
        for _ in range(batches):
            if not self.clock.run_pump():
                return

    def close(self) -> None:
        if not self.pair.closed:
            self.pair.abort()
        self.client.close()
        self.peer.close()
        self.clock.epoll.close()


@pytest.fixture
def pumped() -> Any:
    p = Pumped()
    yield p
    p.close()


def test_a_message_is_read_sent_on_and_counted_in_one_batch(pumped: Pumped) -> None:
    """A ready client socket: one batch reads it, sends it on to the peer at once (no
    buffering when the peer takes it) and reports the bytes; last_active is stamped."""
    pumped.clock.advance(7)
    pumped.client.send(b"ping")
    assert pumped.clock.run_pump() == 1
    assert pumped.peer.recv(100) == b"ping"
    assert (pumped.session.bytes_in, pumped.session.last_active) == (4, 7)
    assert pumped.pair.buffered() == 0


def test_a_fin_is_passed_on_at_the_end_of_its_batch(pumped: Pumped) -> None:
    """A FIN from the client becomes shutdown(SHUT_WR) towards the peer after the batch;
    the pair stays open for the answer."""
    pumped.client.shutdown(socket.SHUT_WR)
    pumped.run(1)
    assert pumped.peer.recv(100) == b""  # EOF
    assert pumped.session.fins == 1 and not pumped.pair.closed
    pumped.peer.send(b"late answer")
    pumped.run()
    assert pumped.client.recv(100) == b"late answer"


def test_both_fins_in_one_batch_just_close_the_pair(pumped: Pumped) -> None:
    """A client closing after its answer often arrives with the peer's FIN: both in one
    batch close the pair at once (no shutdown call), reported as done."""
    pumped.client.shutdown(socket.SHUT_WR)
    pumped.peer.shutdown(socket.SHUT_WR)
    assert pumped.clock.run_pump() == 2
    assert pumped.pair.closed
    assert pumped.session.closed == [("done", None, True, False)]


def test_a_full_destination_stops_reading_its_source(pumped: Pumped) -> None:
    """When the client does not read, what the peer sends piles up to one chunk in the
    pump; the peer's socket is then no longer read (epoll interest dropped) until the
    client drains, and nothing is lost."""
    sent = 0
    for _ in range(200):
        try:
            sent += pumped.peer.send(b"d" * 65536)
        except BlockingIOError:
            pass
        pumped.run(1)
        if pumped.pair.down.blocked and not pumped.pair.peer_mask & select.EPOLLIN:
            break
    assert pumped.pair.down.blocked, "the client never filled up"
    assert not pumped.pair.peer_mask & select.EPOLLIN
    assert pumped.pair.buffered() <= 65536
    received = 0
    for _ in range(10_000):
        try:
            received += len(pumped.client.recv(1 << 20))
        except BlockingIOError:
            pumped.run(1)
            try:
                sent += pumped.peer.send(b"")
            except BlockingIOError:
                pass
        if received == sent and not pumped.pair.down.blocked:
            break
    assert received == sent == pumped.session.bytes_out
    assert pumped.pair.peer_mask & select.EPOLLIN  # reading again


def test_bulk_reads_switch_a_direction_to_splice() -> None:
    """A read of 16 KiB or more marks its direction as bulk: with splice on, the next
    reads go socket → pipe → socket in the kernel, and every byte still arrives counted."""
    p = Pumped(splice=True)
    try:
        payload = bytes(range(256)) * 512  # 128 KiB
        p.client.send(payload[:65536])
        p.run(1)
        assert p.pair.up.bulk
        got = p.peer.recv(1 << 20)
        p.client.send(payload[65536:])
        for _ in range(20):
            p.run(1)
            try:
                got += p.peer.recv(1 << 20)
            except BlockingIOError:
                pass
            if len(got) == len(payload):
                break
        assert got == payload and p.session.bytes_in == len(payload)
    finally:
        p.close()


def test_a_peer_reset_is_reported_raw_after_passing_on_what_it_sent() -> None:
    """A peer that resets: the client gets what the peer had sent, then EOF; the carrier
    reports (reset, peer) and leaves the meaning to the session."""
    p = Pumped(tcp=True)
    try:
        p.peer.send(b"partial")
        p.run(1)
        p.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        p.peer.close()
        for _ in range(100):
            p.run(1)
            if p.pair.closed:
                break
        p.client.setblocking(True)
        p.client.settimeout(5)
        assert p.client.recv(100) == b"partial"
        assert p.client.recv(100) == b""
        assert p.session.closed == [("reset", "peer", False, False)]
    finally:
        p.close()
