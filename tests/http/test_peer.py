"""The recording peer: it keeps every byte, frames what it can leniently, answers each framed
request with a 200 of its own, and tells what arrived between two marks."""

from __future__ import annotations

import socket
import time
from typing import Iterator

import pytest

from tests.http.peer import PEER_HEADER, RecordingPeer, RequestFramer, Unframeable

pytestmark = pytest.mark.integration


@pytest.fixture
def peer() -> Iterator[RecordingPeer]:
    with RecordingPeer() as p:
        yield p


def talk(port: int, data: bytes, read_until: bytes = b"", timeout: float = 2.0) -> bytes:
    """Send ``data``; read until ``read_until`` has been seen, the peer closes, or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not read_until or read_until not in got):
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        return got


def test_framer_frames_content_length_chunked_and_no_body() -> None:
    """Requests come out whole, in order, with bodies de-chunked and the raw bytes kept."""
    framer = RequestFramer()
    stream = (b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
              b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"2;x=y\r\nhi\r\n0\r\nT: 1\r\n\r\n"
              b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
    done = framer.feed(stream)
    assert [(m, t, body) for m, t, _, _, body, _ in done] == [
        (b"POST", b"/a", b"abc"), (b"POST", b"/b", b"hi"), (b"GET", b"/c", b"")]
    assert b"".join(raw for *_, raw in done) == stream
    assert not framer.buffer


def test_framer_waits_for_whole_requests_fed_byte_by_byte() -> None:
    """Split anywhere, a request is framed once, when its last byte arrives."""
    framer = RequestFramer()
    stream = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    seen = []
    for i in range(len(stream)):
        seen += framer.feed(stream[i:i + 1])
        assert len(seen) == (1 if i == len(stream) - 1 else 0)
    assert seen[0][4] == b"hello"


def test_framer_is_lenient_about_line_ends() -> None:
    """A proxy that forwards LF-only lines must still be seen forwarding a request."""
    done = RequestFramer().feed(b"GET /x HTTP/1.1\nHost: h\n\n")
    assert [(m, t) for m, t, *_ in done] == [(b"GET", b"/x")]


def test_framer_refuses_what_is_no_request() -> None:
    """Bytes that cannot be a request line raise Unframeable rather than vanish."""
    with pytest.raises(Unframeable):
        RequestFramer().feed(b"\x16\x03\x01 junk\r\n\r\n")


def test_peer_records_and_answers(peer: RecordingPeer) -> None:
    """Each framed request gets a 200 marked as the peer's; the bytes are recorded as sent."""
    sent = (b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    mark = peer.mark()
    got = talk(peer.port, sent, read_until=b"ok" * 2)
    assert got.count(b"HTTP/1.1 200 OK") == 2
    assert got.count(PEER_HEADER) == 2
    peer.wait_quiet(0.05, 1)
    seen = peer.traffic_since(mark)
    assert seen.data == sent
    assert [r.target for r in seen.requests] == [b"/one", b"/two"]
    assert seen.requests[1].body == b"hi"
    assert seen.leftover == {}
    assert seen.connections == 1


def test_peer_keeps_unframed_bytes_as_leftover(peer: RecordingPeer) -> None:
    """An incomplete request is not answered and shows up as leftover bytes."""
    mark = peer.mark()
    with socket.create_connection(("127.0.0.1", peer.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        time.sleep(0.2)
        seen = peer.traffic_since(mark)
    assert seen.requests == []
    assert seen.leftover_bytes == len(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert list(seen.ended.values()) == [None]


def test_peer_closes_a_connection_it_cannot_frame(peer: RecordingPeer) -> None:
    """Garbage is recorded, never answered, and the connection is closed."""
    mark = peer.mark()
    got = talk(peer.port, b"\x00\x01garbage\r\n\r\n")
    assert got == b""
    seen = peer.traffic_since(mark)
    assert seen.data == b"\x00\x01garbage\r\n\r\n"
    assert list(seen.unframeable) == [0]


def test_peer_honours_connection_close(peer: RecordingPeer) -> None:
    """After a request with Connection: close the peer answers and closes; it frames nothing
    more from that connection."""
    got = talk(peer.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    assert got.count(b"HTTP/1.1 200") == 1
    assert b"Connection: close" in got


def test_peer_sends_100_continue_when_asked(peer: RecordingPeer) -> None:
    """A head with Expect: 100-continue and its body still missing gets a 100, then the 200."""
    with socket.create_connection(("127.0.0.1", peer.port), timeout=2) as s:
        s.sendall(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hi")
        assert s.recv(200).startswith(b"HTTP/1.1 200 OK")


def test_head_answer_has_no_body(peer: RecordingPeer) -> None:
    """HEAD is answered with Content-Length: 0, so any client parser stays in step."""
    got = talk(peer.port, b"HEAD / HTTP/1.1\r\n\r\n", read_until=b"\r\n\r\n")
    assert b"Content-Length: 0\r\n" in got


def test_marks_split_traffic_between_cases(peer: RecordingPeer) -> None:
    """traffic_since shows only what came after the mark, also on a reused connection, with
    requests in order of arrival over all connections."""
    with socket.create_connection(("127.0.0.1", peer.port), timeout=2) as s:
        s.sendall(b"GET /before HTTP/1.1\r\n\r\n")
        s.recv(1000)
        mark = peer.mark()
        s.sendall(b"GET /after HTTP/1.1\r\n\r\n")
        s.recv(1000)
    talk(peer.port, b"GET /other HTTP/1.1\r\n\r\n", read_until=b"ok")
    peer.wait_quiet(0.05, 1)
    seen = peer.traffic_since(mark)
    assert [r.target for r in seen.requests] == [b"/after", b"/other"]
    assert seen.data == b"GET /after HTTP/1.1\r\n\r\nGET /other HTTP/1.1\r\n\r\n"
    assert seen.connections == 1


def test_stop_closes_everything() -> None:
    """After stop the port refuses connections and open connections are closed."""
    p = RecordingPeer()
    port = p.start()
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    p.stop()
    assert s.recv(10) == b""
    s.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    p.stop()  # idempotent
