"""The HTTP test peer (tests/http/backend.py) against the clients (tests/http/clients.py),
with no lb in between: every endpoint does what HTTP-mode tests will rely on."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time
from typing import Any, Callable, Iterator, List

import pytest

from tests.http import backend as hb
from tests.http import clients
from tests.http.backend import Backend, size_body, size_digest, start_backend
from tests.http.clients import ConnectionEnded, RawClient, build_request

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with start_backend("b1") as b:
        yield b


@pytest.fixture
def make_backend() -> Iterator[Callable[..., Backend]]:
    """Backends of the test's own (fresh counters, options), all stopped at the end."""
    made: List[Backend] = []

    def make(**kw: Any) -> Backend:
        b = start_backend(**kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.stop()


def raw(b: Backend, timeout: float = 10.0) -> RawClient:
    return RawClient(b.host, b.port, timeout)


# -- plain answers, keep-alive, pipelining ------------------------------------------------------

def test_root_names_the_backend_and_the_connection(backend: Backend) -> None:
    """GET / answers ``backend N`` and says which backend, connection and request it was."""
    with raw(backend) as c:
        r = c.request("GET", "/")
    assert (r.status, r.body) == (200, b"backend b1\n")
    assert r.header("X-Backend") == "b1"
    assert r.header("X-Backend-Request") == "1"
    assert int(r.header("X-Backend-Conn") or 0) >= 1
    assert r.framing == "length" and not r.closed


def test_echo_dumps_the_request_as_received(backend: Backend) -> None:
    """/echo answers the request line, headers in order and case, body size and hash."""
    with raw(backend) as c:
        r = c.request("POST", "/echo?a=1&b=", [("X-Mixed-CASE", " spaced\t"), ("x-dup", "1"),
                                               ("X-Dup", "2")], b"hello")
    e = r.json()
    assert e["method"] == "POST" and e["target"] == "/echo?a=1&b=" and e["path"] == "/echo"
    assert e["query"] == {"a": "1", "b": ""} and e["version"] == "HTTP/1.1"
    assert e["headers"] == [["Host", "test"], ["X-Mixed-CASE", "spaced"], ["x-dup", "1"],
                            ["X-Dup", "2"], ["Content-Length", "5"]]
    assert e["body_length"] == 5 and e["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert e["framing"] == "length" and e["remote"].startswith("127.0.0.1:")
    assert e["backend"] == "b1" and e["request"] == 1


def test_keepalive_reuse_is_counted_in_stats(make_backend: Callable[..., Backend]) -> None:
    """Five requests on one connection: one connection with five requests in /stats, and the
    test's own /stats queries are not counted."""
    b = make_backend(name="ka")
    rs = clients.keepalive(b.port, ["/", "/echo", "/size?bytes=10", "/status?code=204", "/"])
    assert [r.header("X-Backend-Request") for r in rs] == ["1", "2", "3", "4", "5"]
    assert len({r.header("X-Backend-Conn") for r in rs}) == 1
    with raw(b) as c:
        stats = c.request("GET", "/stats").json()
    assert stats["connections"] == 1 and stats["requests"] == 5
    assert stats["requests_per_connection"] == [5]
    assert stats["by_path"] == {"/": 2, "/echo": 1, "/size": 1, "/status": 1}
    assert [e["target"] for e in stats["log"]][:2] == ["/", "/echo"]
    assert b.stats()["requests"] == 5 and b.stats()["accepted"] == 2


def test_stats_reset(make_backend: Callable[..., Backend]) -> None:
    """/stats?reset=1 answers the counters, then zeroes them; a connection open across the
    reset is counted again when it carries more requests."""
    b = make_backend()
    clients.keepalive(b.port, ["/", "/"])
    with raw(b) as kept, raw(b) as c:
        assert kept.request("GET", "/").status == 200
        assert c.request("GET", "/stats?reset=1").json()["requests"] == 3
        assert c.request("GET", "/stats").json()["requests"] == 0
        kept.request("GET", "/")
        stats = c.request("GET", "/stats").json()
    assert stats["requests_per_connection"] == [1] and stats["requests"] == 1
    b.reset_stats()
    assert b.stats()["requests"] == 0


def test_connection_close_and_http10(backend: Backend) -> None:
    """``Connection: close`` and HTTP/1.0 without keep-alive close after the answer;
    HTTP/1.0 with ``Connection: keep-alive`` stays open."""
    with raw(backend) as c:
        r = c.request("GET", "/", {"Connection": "close"})
        assert r.header("Connection") == "close" and r.closed
    with raw(backend) as c:
        r = c.request("GET", "/", version="HTTP/1.0")
        assert r.header("Connection") == "close" and r.closed
    with raw(backend) as c:
        r = c.request("GET", "/", {"Connection": "keep-alive"}, version="HTTP/1.0")
        assert r.header("Connection") == "keep-alive" and not r.closed
        assert c.request("GET", "/").status == 200
    with raw(backend) as c:
        r = c.request("GET", "/?close=1")
        assert r.header("Connection") == "close" and r.closed


def test_pipelined_requests_are_answered_in_order(backend: Backend) -> None:
    """Requests written at once are answered in order, HEAD among them without a body."""
    rs = clients.pipeline(backend.port, ["/echo", "/size?bytes=7", "/status?code=204", "/",
                                         "/chunked?chunks=2&size=3"],
                          methods=["GET", "HEAD", "GET", "POST", "GET"])
    assert [r.status for r in rs] == [200, 200, 204, 200, 200]
    assert [r.header("X-Backend-Request") for r in rs] == ["1", "2", "3", "4", "5"]
    assert rs[1].header("Content-Length") == "7" and rs[1].body == b""
    assert rs[4].body == size_body(6)


def test_unknown_path_and_bad_request(backend: Backend) -> None:
    """An unknown path is 404 (kept alive); a request with both Content-Length and
    Transfer-Encoding is 400 and closed: the backend itself is strict."""
    with raw(backend) as c:
        r = c.request("GET", "/nope")
        assert r.status == 404 and not r.closed
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        r = c.read_response()
        assert r.status == 400 and r.closed


# -- bodies --------------------------------------------------------------------------------------

def test_size_body_and_head(backend: Backend) -> None:
    """/size sends exactly ``size_body(n)``; HEAD has the same Content-Length and no body (the
    next response on the connection parses)."""
    with raw(backend) as c:
        r = c.request("GET", "/size?bytes=200001")
        assert r.body == size_body(200001) and r.header("Content-Length") == "200001"
        assert r.body_sha256 == size_digest(200001)
        h = c.request("HEAD", "/size?bytes=200001")
        assert h.header("Content-Length") == "200001" and h.body == b""
        assert c.request("GET", "/size?bytes=0").body == b""


def test_chunked_with_trailers_and_extensions(backend: Backend) -> None:
    """/chunked sends the chunks and, asked, a declared Trailer with the count and hash;
    ``ext=1`` puts an extension on each size line; HEAD sends the head only."""
    with raw(backend) as c:
        r = c.request("GET", "/chunked?chunks=5&size=1000&trailers=1&ext=1")
        assert r.framing == "chunked" and r.body == size_body(5000)
        assert r.header("Trailer") == "X-Chunks, X-Body-Sha256"
        assert r.trailers == [("X-Chunks", "5"), ("X-Body-Sha256", size_digest(5000))]
        assert r.chunk_extensions == [b"ext=1"] * 6
        h = c.request("HEAD", "/chunked?chunks=5&size=1000")
        assert h.header("Transfer-Encoding") == "chunked" and h.body == b""
        assert c.request("GET", "/chunked?chunks=1&size=1").body == size_body(1)


def test_chunked_paced_chunks_arrive_apart(backend: Backend) -> None:
    """With ``ms`` the chunks come that far apart: the first before the rest."""
    with raw(backend) as c:
        c.send(build_request("GET", "/chunked?chunks=3&size=10&ms=500"))
        t0 = time.monotonic()
        chunk = b"\r\n\r\na\r\n" + size_body(10) + b"\r\n"
        c.read_until(chunk)
        assert time.monotonic() - t0 < 0.4
        c.read_until(b"a\r\n" + size_body(20)[10:] + b"\r\n")
        assert 0.5 <= time.monotonic() - t0 < 0.9
        c.read_until(b"a\r\n" + size_body(30)[20:] + b"\r\n0\r\n\r\n")
        assert time.monotonic() - t0 >= 1.0


def test_slow_and_slowbody(backend: Backend) -> None:
    """/slow answers after ``ms``; /slowbody sends its head at once and the body after ``ms``."""
    with raw(backend) as c:
        t0 = time.monotonic()
        assert c.request("GET", "/slow?ms=300").body == b"backend b1 (slow)\n"
        assert time.monotonic() - t0 >= 0.3
        c.send(build_request("GET", "/slowbody?ms=500&bytes=10"))
        t0 = time.monotonic()
        c.read_until(b"Content-Length: 10\r\n\r\n")
        assert time.monotonic() - t0 < 0.4 and not c.buf
        assert c.read_until(size_body(10)) == size_body(10) and time.monotonic() - t0 >= 0.5
        h = c.request("HEAD", "/slowbody?ms=10")
        assert h.header("Content-Length") == str(len(b"backend b1 (slow body)\n"))


@pytest.mark.parametrize("code", [200, 201, 404, 500, 502, 503, 504])
def test_status_codes_with_a_body(backend: Backend, code: int) -> None:
    """/status?code=C answers C with body ``status C``."""
    with raw(backend) as c:
        r = c.request("GET", f"/status?code={code}")
        assert (r.status, r.body) == (code, f"status {code}\n".encode())


@pytest.mark.parametrize("target,cl", [("/status?code=204", None), ("/status?code=304", None),
                                       ("/status?code=304&cl=123", "123"),
                                       ("/status?code=204&cl=5", "5")])
def test_204_and_304_have_no_body(backend: Backend, target: str, cl: Any) -> None:
    """204 and 304 carry no body (nor Content-Length unless ``cl`` forces one): the very next
    bytes on the connection are the next response."""
    with raw(backend) as c:
        c.send(build_request("GET", target) + build_request("GET", "/"))
        r = c.read_response()
        assert r.header("Content-Length") == cl and r.header("Transfer-Encoding") is None
        assert r.body == b"" and r.framing == "none"
        assert c.read_response().body == b"backend b1\n"


def test_interim_answers(backend: Backend) -> None:
    """/interim sends the 1xx answers asked for, then the final one."""
    with raw(backend) as c:
        r = c.request("GET", "/interim?codes=103,102")
    assert [i.status for i in r.interim] == [103, 102] and r.status == 200
    assert r.interim[0].header("Link") == "</interim-0.css>; rel=preload"


def test_bigheaders(backend: Backend) -> None:
    """/bigheaders sends ``count`` filler headers of ``size`` bytes."""
    with raw(backend) as c:
        r = c.request("GET", "/bigheaders?count=50&size=300")
    assert len([k for k, _ in r.headers if k.startswith("X-Filler-")]) == 50
    assert r.header("X-Filler-49") == "f" * 300


# -- uploads -------------------------------------------------------------------------------------

def test_upload_content_length_and_chunked_with_trailers(backend: Backend) -> None:
    """/upload reads Content-Length and chunked bodies (with trailers) and answers their length
    and sha256."""
    data = os.urandom(300000)
    with raw(backend) as c:
        r = c.request("POST", "/upload", body=data).json()
        assert (r["length"], r["sha256"], r["framing"]) == \
            (len(data), hashlib.sha256(data).hexdigest(), "length")
        r = c.request("PUT", "/upload", body=data, chunked=True,
                      trailers=[("X-Sum", "abc")]).json()
        assert (r["length"], r["framing"], r["trailers"]) == \
            (len(data), "chunked", [["X-Sum", "abc"]])
        assert c.request("GET", "/upload").status == 405


def test_upload_streams_a_large_chunked_body(backend: Backend) -> None:
    """A 64 MiB chunked upload sent part by part is read whole and hashed right."""
    part = os.urandom(1 << 20)
    with raw(backend, timeout=60) as c:
        r = c.request("POST", "/upload", body=(part for _ in range(64)), chunked=True).json()
    assert r["length"] == 64 << 20
    assert r["sha256"] == hashlib.sha256(part * 64).hexdigest()


def test_upload_expect_100_continue(backend: Backend) -> None:
    """With ``Expect: 100-continue`` the backend sends 100 before reading the body."""
    with raw(backend) as c:
        r = c.request("POST", "/upload", body=b"x" * 1000, expect_continue=True)
    assert [i.status for i in r.interim] == [100]
    assert r.json()["continue_sent"] is True and r.json()["length"] == 1000


def test_upload_expect_417_and_reject(backend: Backend) -> None:
    """``expect=417`` answers 417 instead of 100 and ``reject=413`` answers 413 at once; either
    way without reading the body, and the connection closes."""
    with raw(backend) as c:
        r = c.request("POST", "/upload?expect=417", body=b"x" * 1000, expect_continue=True)
        assert r.status == 417 and r.closed
    with raw(backend) as c:
        c.send(build_request("POST", "/upload?reject=413", {"Content-Length": "100000000"}))
        r = c.read_response()
        assert r.status == 413 and r.closed


def test_upload_expect_none_sends_no_100(backend: Backend) -> None:
    """``expect=none``: no 100 comes; the body sent anyway is read."""
    with raw(backend) as c:
        c.send(build_request("POST", "/upload?expect=none",
                             {"Expect": "100-continue", "Content-Length": "3"}))
        assert not c.peer_closed(0.3) and not c.buf
        c.send(b"abc")
        r = c.read_response()
    assert r.interim == [] and r.json()["length"] == 3 and r.json()["continue_sent"] is False


# -- misbehaviour --------------------------------------------------------------------------------

def test_reset_mid_answer(backend: Backend) -> None:
    """/reset sends the head and ``after`` body bytes, then an RST: ECONNRESET."""
    with raw(backend) as c:
        with pytest.raises(ConnectionEnded) as e:
            c.request("GET", "/reset?bytes=100000&after=1000")
    assert e.value.reset and e.value.partial is not None
    assert e.value.partial.header("Content-Length") == "100000"
    assert e.value.partial.body == size_body(1000)


def test_reset_before_is_an_econnreset(backend: Backend) -> None:
    """/reset-before resets with no byte sent: a plain socket sees ECONNRESET."""
    with socket.create_connection((backend.host, backend.port), timeout=5) as s:
        s.sendall(build_request("GET", "/reset-before"))
        with pytest.raises(ConnectionResetError):
            s.recv(100)
    with raw(backend) as c:
        with pytest.raises(ConnectionEnded) as e:
            c.request("GET", "/reset-before")
    assert e.value.reset and e.value.partial is None and e.value.raw == b""


def test_close_before_and_truncate_are_clean_closes(backend: Backend) -> None:
    """/close-before closes (FIN, not RST) with no byte; /truncate closes mid-body."""
    with raw(backend) as c:
        with pytest.raises(ConnectionEnded) as e:
            c.request("GET", "/close-before")
    assert not e.value.reset and e.value.raw == b""
    with raw(backend) as c:
        with pytest.raises(ConnectionEnded) as e:
            c.request("GET", "/truncate?bytes=5000&after=100")
    assert not e.value.reset and e.value.partial is not None
    assert e.value.partial.body == size_body(100)


def test_close_after(backend: Backend) -> None:
    """/close-after answers with ``Connection: close`` and then closes."""
    with raw(backend) as c:
        r = c.request("GET", "/close-after")
    assert r.status == 200 and r.header("Connection") == "close" and r.closed


@pytest.mark.parametrize("kind", sorted(hb.GARBAGE))
def test_garbage_kinds(backend: Backend, kind: str) -> None:
    """/garbage?kind=K sends exactly that invalid answer, then closes."""
    with raw(backend) as c:
        c.send(build_request("GET", f"/garbage?kind={kind}"))
        assert c.read_to_close() == hb.GARBAGE[kind]


def test_garbage_default_is_not_http(backend: Backend) -> None:
    """The default /garbage is refused by the client as not HTTP."""
    with raw(backend) as c:
        with pytest.raises(clients.BadResponse):
            c.request("GET", "/garbage")


def test_cl_te_smuggling_answer(backend: Backend) -> None:
    """/cl-te sends Content-Length and chunked at once; read as chunked (as the client does)
    its body is a whole fake response; the connection stays open for more."""
    with raw(backend) as c:
        r = c.request("GET", "/cl-te")
        assert r.header("Content-Length") == "4" and r.framing == "chunked"
        assert r.body.startswith(b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\n")
        assert r.body.endswith(b"smuggled!") and not r.closed
        assert c.request("GET", "/").status == 200


# -- connection lifetime -------------------------------------------------------------------------

def test_idle_close(make_backend: Callable[..., Backend]) -> None:
    """--idle-close: a connection idle that long is closed (FIN, no notice); one used more
    often stays open."""
    b = make_backend(idle_close_ms=300)
    with raw(b) as c:
        for _ in range(4):
            assert c.request("GET", "/").status == 200
            time.sleep(0.1)
        assert c.request("GET", "/").header("Connection") is None
        t0 = time.monotonic()
        assert c.peer_closed(3.0) and not c.reset_seen
        assert 0.25 <= time.monotonic() - t0 < 2.0
    stats = b.stats()
    assert stats["idle_closes"] == 1 and stats["requests_per_connection"] == [5]
    assert stats["connections_detail"][0]["closed_by"] == "idle"


def test_max_requests_closes_silently(make_backend: Callable[..., Backend]) -> None:
    """--max-requests N closes right after the N-th answer without ``Connection: close``."""
    b = make_backend(max_requests=2)
    with raw(b) as c:
        assert not c.request("GET", "/").closed
        r = c.request("GET", "/")
        assert r.header("Connection") is None and c.peer_closed(2.0)
    assert b.stats()["max_requests_closes"] == 1


def test_health_fail_recover(make_backend: Callable[..., Backend]) -> None:
    """/health is 200, 503 after /fail, 200 after /recover; none of them is counted."""
    b = make_backend()
    codes = [r.status for r in clients.keepalive(b.port, ["/health", "/fail", "/health",
                                                          "/recover", "/health"])]
    assert codes == [200, 200, 503, 200, 200] and b.stats()["requests"] == 0


# -- upgrades ------------------------------------------------------------------------------------

def test_websocket_handshake_accept_value(backend: Backend) -> None:
    """/ws answers 101 with the Sec-WebSocket-Accept of RFC 6455's own example, and the first
    offered subprotocol; a GET without Upgrade is 400."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    with raw(backend) as c:
        r = c.request("GET", "/ws", {"Upgrade": "websocket", "Connection": "Upgrade",
                                     "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13",
                                     "Sec-WebSocket-Protocol": "chat, superchat"})
        assert r.status == 101 and r.header("Sec-WebSocket-Accept") == \
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert r.header("Sec-WebSocket-Protocol") == "chat"
        mask = b"\x01\x02\x03\x04"
        c.send(b"\x81\x82" + mask + hb.unmask(b"hi", mask))  # a masked text frame
        assert c.recv_some() == b"\x81\x02hi"
    with raw(backend) as c:
        assert c.request("GET", "/ws").status == 400


def test_websocket_echo_with_the_websockets_client(backend: Backend) -> None:
    """The ``websockets`` client: text, binary, large and fragmented messages echo; a ping gets
    its pong; the close handshake completes with 1000."""
    with clients.ws_connect(f"ws://{backend.address}/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=5) == b"\x00\x01\xff"
        big = os.urandom(200000)
        ws.send(big)
        assert ws.recv(timeout=5) == big
        ws.send(["frag", "mented"])
        assert ws.recv(timeout=5) == "fragmented"
        assert ws.ping(b"p").wait(5)
        ws.close()
        assert ws.close_code == 1000


def test_websocket_rejects_unmasked_frames(backend: Backend) -> None:
    """An unmasked client frame is a protocol error: close 1002, then the server closes TCP."""
    key = base64.b64encode(os.urandom(16)).decode()
    with raw(backend) as c:
        c.request("GET", "/ws", {"Upgrade": "websocket", "Connection": "Upgrade",
                                 "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"})
        c.send(b"\x81\x02hi")
        assert c.read_to_close()[:4] == b"\x88\x10\x03\xea"  # close, 16 bytes, code 1002


def test_upgrade_raw_echo(backend: Backend) -> None:
    """/upgrade switches to any protocol named in Upgrade and echoes raw bytes until the client
    half-closes; without Upgrade it is 426."""
    with raw(backend) as c:
        r = c.request("GET", "/upgrade", {"Upgrade": "echo", "Connection": "upgrade"})
        assert r.status == 101 and r.header("Upgrade") == "echo"
        c.send(b"ping\r\n\r\nnot http")
        assert c.read_until(b"not http") == b"ping\r\n\r\nnot http"
        c.send(b"more")
        c.shutdown_write()
        assert c.read_to_close() == b"more"
    with raw(backend) as c:
        assert c.request("GET", "/upgrade").status == 426


# -- the process form ----------------------------------------------------------------------------

def test_process_form_can_be_stopped_and_killed(tmp_path: Any) -> None:
    """``python -m tests.http.backend``: serves; SIGSTOP leaves a request unanswered until
    SIGCONT; SIGKILL leaves the port refusing."""
    b = hb.start_backend_process(str(tmp_path / "b.log"), name="p1", idle_close_ms=5000)
    try:
        assert b.name == "p1"
        with RawClient(b.host, b.port, timeout=0.5) as c:
            assert c.request("GET", "/").body == b"backend p1\n"
            b.pause()
            c.send(build_request("GET", "/"))
            with pytest.raises(TimeoutError):
                c.read_response(timeout=0.5)
            b.resume()
            assert c.read_response(timeout=5).body == b"backend p1\n"
        assert b.stats()["requests_per_connection"] == [2]
        b.kill()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((b.host, b.port), timeout=2).close()
    finally:
        b.stop()


def test_one_gib_streams_without_the_backend_growing(tmp_path: Any) -> None:
    """1 GiB from /size reaches the client whole while the backend's peak RSS grows by less
    than 32 MiB: the body is streamed with flow control, not held."""
    b = hb.start_backend_process(str(tmp_path / "b.log"))
    try:
        with RawClient(b.host, b.port, timeout=60) as c:
            assert c.request("GET", "/size?bytes=1000").status == 200  # warm up
            before = b.rss_kib(peak=True)
            r = c.request("GET", f"/size?bytes={1 << 30}", keep_body=False)
            assert r.body_length == 1 << 30
            grown = b.rss_kib(peak=True) - before
        assert grown < 32 * 1024, f"backend peak RSS grew {grown} KiB"
    finally:
        b.stop()


# -- curl and http.client ------------------------------------------------------------------------

def test_curl_keepalive_with_two_urls(make_backend: Callable[..., Backend]) -> None:
    """curl with two URLs reuses its connection: one connection, two requests."""
    b = make_backend(name="c1")
    res = clients.curl_keepalive(b.url("/"), b.url("/echo"))
    assert res.returncode == 0, res.stderr
    assert [t.status for t in res.transfers] == [200, 200] and res.transfers[0].body == \
        b"backend c1\n"
    assert res.transfers[1].connects == 0 and res.reused
    assert b.stats()["requests_per_connection"] == [2]


def test_curl_chunked_upload_from_stdin(backend: Backend) -> None:
    """``curl -T -`` sends stdin chunked; /upload reads all of it."""
    data = os.urandom(500000)
    res = clients.curl_upload_chunked(backend.url("/upload"), data)
    assert res.returncode == 0, res.stderr
    r = clients.Response(200, "", body=res.body).json()
    assert (r["framing"], r["length"], r["sha256"]) == \
        ("chunked", len(data), hashlib.sha256(data).hexdigest())


def test_curl_expect_100_continue_large_file(backend: Backend, tmp_path: Any) -> None:
    """curl with ``Expect: 100-continue`` and an 8 MiB file gets 100 Continue, then sends it."""
    data = os.urandom(8 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    res = clients.curl_expect_upload(backend.url("/upload"), str(path))
    assert res.returncode == 0, res.stderr
    assert "< HTTP/1.1 100 Continue" in res.stderr
    r = clients.Response(200, "", body=res.body).json()
    assert r["continue_sent"] is True and r["length"] == len(data)
    assert r["sha256"] == hashlib.sha256(data).hexdigest()


def test_curl_head(backend: Backend) -> None:
    """``curl -I`` gets the head GET would have: status and Content-Length, no body."""
    res = clients.curl_head(backend.url("/size?bytes=12345"))
    assert res.returncode == 0, res.stderr
    assert res.status == 200 and b"Content-Length: 12345\r\n" in res.body
    assert res.transfers[0].size_download == 0


def test_http_client(make_backend: Callable[..., Backend]) -> None:
    """``http.client``: keep-alive requests share a connection; HEAD, chunked upload work."""
    b = make_backend()
    rs = clients.http_client_requests(b.port, [("GET", "/"), ("GET", "/size?bytes=5000"),
                                               ("HEAD", "/size?bytes=5000")])
    assert [r.status for r in rs] == [200, 200, 200]
    assert rs[1].body == size_body(5000) and rs[2].body == b""
    assert rs[2].header("Content-Length") == "5000"
    assert b.stats()["requests_per_connection"] == [3]
    r = clients.http_client_request(b.port, "POST", "/upload", body=iter([b"ab", b"cde"]),
                                    encode_chunked=True).json()
    assert (r["framing"], r["length"]) == ("chunked", 5)
    r2 = clients.http_client_request(b.port, "GET", "/chunked?chunks=3&size=7")
    assert r2.framing == "chunked" and r2.body == size_body(21)
