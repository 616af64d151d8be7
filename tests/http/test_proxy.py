"""HTTP mode through real sockets: lb as a process in front of the test backends, driven by
raw-socket clients, curl, Python's http.client and a WebSocket client library."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Any, Callable, List

import pytest

from tests.http.backend import Backend, size_body, size_digest
from tests.http.clients import (
    ConnectionEnded,
    RawClient,
    build_request,
    curl_expect_upload,
    curl_head,
    curl_keepalive,
    curl_upload_chunked,
    http_client_request,
    keepalive,
    pipeline,
    ws_connect,
)
from tests.http.conftest import LB, indent, simple
from tests.processes import wait_for

pytestmark = pytest.mark.integration

Start = Callable[..., LB]


def test_requests_are_balanced_one_by_one_on_reused_peer_connections(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """One client connection's requests go to different peers (roundrobin per request),
    and lb reuses its connections to each peer (keep-alive): 20 requests, 2 backends,
    each backend sees one connection carrying 10 requests."""
    a, b = backends("a"), backends("b")
    lb = simple(lb_process, a, b)
    answers = keepalive(lb.port("www"), ["/"] * 20)
    assert [r.status for r in answers] == [200] * 20
    served = [r.header("X-Backend") for r in answers]
    assert served[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
    for backend in (a, b):
        stats = backend.stats()
        assert stats["requests"] == 10 and stats["connections"] == 1, stats


def test_what_the_peer_receives(lb_process: Start, backends: Callable[..., Backend]) -> None:
    """HTTP/1.1 to the peer whatever the client spoke; Host as sent; hop-by-hop headers
    (Connection and what it names, Keep-Alive, Proxy-Connection, TE but trailers, Trailer,
    Upgrade) removed; X-Forwarded-For/-Proto/-Host/-Port set; a request id generated."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    with RawClient(port=lb.port("www")) as client:
        r = client.request("GET", "/echo?x=1", host="app.example:8080", version="HTTP/1.0",
                           headers=[("Connection", "keep-alive, X-Secret"),
                                    ("X-Secret", "hop"), ("Keep-Alive", "timeout=5"),
                                    ("Proxy-Connection", "keep-alive"),
                                    ("TE", "trailers, deflate"), ("Trailer", "X-T"),
                                    ("Upgrade", "h2c"), ("X-Kept", "end-to-end"),
                                    ("X-Forwarded-For", "203.0.113.9")])
    seen = r.json()
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["version"] == "HTTP/1.1" and seen["target"] == "/echo?x=1"
    assert headers["host"] == "app.example:8080" and headers["x-kept"] == "end-to-end"
    for gone in ("x-secret", "keep-alive", "proxy-connection", "trailer", "upgrade",
                 "connection"):
        assert gone not in headers, gone
    assert headers["te"] == "trailers"
    assert headers["x-forwarded-for"] == "127.0.0.1"  # replaced: the client is not trusted
    assert (headers["x-forwarded-proto"], headers["x-forwarded-host"],
            headers["x-forwarded-port"]) == ("http", "app.example:8080", str(lb.port("www")))
    assert headers["x-request-id"]
    assert r.header("Connection") == "keep-alive"  # an HTTP/1.0 client kept alive


@pytest.mark.parametrize("forwarded,sent,expected", [
    ("append", "203.0.113.9", "203.0.113.9, 127.0.0.1"),
    ("replace", "203.0.113.9", "127.0.0.1"),
    ("off", "203.0.113.9", "203.0.113.9"),
])
def test_x_forwarded_for_per_the_forwarded_setting(
        lb_process: Start, backends: Callable[..., Backend], forwarded: str, sent: str,
        expected: str) -> None:
    """append keeps what a trusted previous hop sent and adds the client; replace and off
    do what they say; a client's own X-Request-Id is kept."""
    peer = backends("p")
    trusted = "trusted_proxies: [127.0.0.0/8]" if forwarded == "append" else ""
    lb = simple(lb_process, peer, listener=indent(f"""
        http:
          forwarded: {forwarded}
          {trusted}
        """, 4))
    r = keepalive(lb.port("www"), ["/echo"], headers=[("X-Forwarded-For", sent),
                                                       ("X-Request-Id", "abc-123")])[0]
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert headers.get("x-forwarded-for") == expected
    assert headers["x-request-id"] == "abc-123"


def test_bodies_stream_both_ways_intact(lb_process: Start,
                                        backends: Callable[..., Backend]) -> None:
    """A 256 KiB Content-Length upload, a chunked upload from curl (`-T -`), a 10 MiB
    answer, and a chunked answer with trailers all arrive byte for byte."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    port = lb.port("www")
    data = size_body(256 * 1024)
    with RawClient(port=port) as client:
        up = client.request("POST", "/upload", body=data)
        assert up.json()["sha256"] == hashlib.sha256(data).hexdigest()
        big = client.request("GET", "/size?bytes=10485760", keep_body=False)
        assert big.body_length == 10485760 and big.body_sha256 == size_digest(10485760)
        chunked = client.request("GET", "/chunked?chunks=5&size=3000&trailers=1",
                                 headers=[("TE", "trailers")])
        assert chunked.framing == "chunked" and chunked.body == size_body(15000)
        assert chunked.trailer("X-Chunks") == "5"
    result = curl_upload_chunked(f"http://127.0.0.1:{port}/upload", data)
    assert result.status == 200
    answer = json.loads(result.body)
    assert answer["framing"] == "chunked" and answer["length"] == len(data)


def test_expect_100_continue_with_curl(lb_process: Start, backends: Callable[..., Backend],
                                       tmp_path: Any) -> None:
    """curl waits for 100 Continue before a large body: the peer's 100 reaches it through
    lb, and the body follows; a peer answering 417 instead ends the request cleanly."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    body = tmp_path / "body"
    body.write_bytes(size_body(2 * 1024 * 1024))
    result = curl_expect_upload(f"http://127.0.0.1:{lb.port('www')}/upload", str(body))
    assert result.status == 200
    answer = json.loads(result.body)
    assert answer["continue_sent"] and answer["length"] == 2 * 1024 * 1024
    refused = curl_expect_upload(f"http://127.0.0.1:{lb.port('www')}/upload?expect=417",
                                 str(body))
    assert refused.status == 417


def test_head_204_304_and_interim_answers(lb_process: Start,
                                          backends: Callable[..., Backend]) -> None:
    """HEAD, 204 and 304 have no body (HEAD keeps the Content-Length GET would have), 1xx
    answers are passed on before the final one, and the connection stays usable."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    with RawClient(port=lb.port("www")) as client:
        head = client.request("HEAD", "/size?bytes=5000")
        assert head.status == 200 and head.body == b"" and head.header(
            "Content-Length") == "5000"
        assert client.request("GET", "/status?code=204").body == b""
        assert client.request("GET", "/status?code=304").body == b""
        early = client.request("GET", "/interim?codes=103")
        assert [i.status for i in early.interim] == [103] and early.status == 200
        assert client.request("GET", "/").status == 200
    assert curl_head(f"http://127.0.0.1:{lb.port('www')}/size?bytes=7").status == 200


def test_pipelined_requests_are_answered_in_order(lb_process: Start,
                                                  backends: Callable[..., Backend]) -> None:
    """Requests sent back to back on one connection are answered in the order sent, even
    when the first is slow and each goes to another peer."""
    a, b = backends("a"), backends("b")
    lb = simple(lb_process, a, b)
    answers = pipeline(lb.port("www"), ["/slow?ms=200", "/echo?n=2", "/echo?n=3", "/"])
    assert [r.status for r in answers] == [200, 200, 200, 200]
    assert answers[0].text.endswith("(slow)\n")
    assert [r.json()["query"] for r in answers[1:3]] in (["n=2", "n=3"], [{"n": "2"},
                                                                           {"n": "3"}])


def test_pipelined_requests_before_a_bad_one_or_a_half_close_are_answered(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """RFC 9112 §9.3.2: the valid requests read before a malformed one get their answers,
    in order, then the 400 and the close (as HAProxy and nginx do); requests pipelined
    before the client half-closes are all answered. Only the last answer says
    Connection: close."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    with RawClient(port=lb.port("www")) as client:
        client.send(build_request("GET", "/slow?ms=100") + build_request("GET", "/echo?n=2")
                    + b"GET /smuggled HTTP/1.1\nHost: a\n\n")
        answers = [client.read_response(timeout=5) for _ in range(3)]
        assert [r.status for r in answers] == [200, 200, 400]
        assert [r.header("Connection") for r in answers[:2]] == [None, None]
        assert answers[2].header("Connection") == "close"
        assert client.peer_closed()
    assert peer.stats()["requests"] == 2
    with RawClient(port=lb.port("www")) as client:
        client.send(build_request("GET", "/slow?ms=100") + build_request("GET", "/echo?n=2"))
        client.shutdown_write()
        answers = [client.read_response(timeout=5) for _ in range(2)]
        assert [r.status for r in answers] == [200, 200]
        assert answers[0].header("Connection") is None
        assert client.peer_closed()
    assert peer.stats()["requests"] == 4


def test_a_websocket_upgrade_becomes_a_tunnel(lb_process: Start,
                                              backends: Callable[..., Backend]) -> None:
    """An Upgrade answered with 101 turns the connection into a byte tunnel: a WebSocket
    client library talks to the backend's echo through lb."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    with ws_connect(f"ws://127.0.0.1:{lb.port('www')}/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
    assert peer.stats()["upgrades"] == 1


def test_keep_alive_race_is_never_seen_by_the_client(lb_process: Start,
                                                     backends: Callable[..., Backend]) -> None:
    """A peer that closes idle connections after 200 ms: a request that reuses such a
    connection right as the peer closed it is sent again on a fresh one, never a 502."""
    peer = backends("p", idle_close_ms=200)
    lb = simple(lb_process, peer, pool="    retries: 0")
    port = lb.port("www")
    for _ in range(3):
        assert keepalive(port, ["/"])[0].status == 200
        deadline = time.monotonic() + 5
        while peer.stats()["idle_closes"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert keepalive(port, ["/"])[0].status == 200
    assert peer.stats()["idle_closes"] >= 1


def test_a_reused_connection_closed_without_an_answer_repeats_only_idempotent_requests(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A peer that closes a reused connection without answering (it may have acted on the
    request): a GET is sent once more on a fresh connection, counted as a
    ``reused-connection`` retry; a POST is never sent twice (502, the peer saw it once).
    A POST on a connection the peer closed while idle still goes through: lb checks the
    connection is open before reusing it for a request it will not repeat."""
    peer = backends("p", idle_close_ms=300)
    lb = simple(lb_process, peer, pool="    retries: 0")
    port = lb.port("www")
    with RawClient(port=port) as client:
        assert client.request("GET", "/").status == 200  # lb now holds an idle connection
        r = client.request("POST", "/close-before", body=b"pay once")
        assert r.status == 502
    assert peer.stats()["by_path"].get("/close-before") == 1
    with RawClient(port=port) as client:
        assert client.request("GET", "/").status == 200
        assert client.request("GET", "/close-before").status == 502
    assert peer.stats()["by_path"].get("/close-before") == 3  # the GET was sent twice
    assert 'lb_http_retries_total{pool="web",reason="reused-connection"} 1.0' in \
        lb.admin("/metrics")
    for _ in range(3):  # the peer closes lb's idle connection; the next POST still works
        assert keepalive(port, ["/"])[0].status == 200
        wait_for(lambda: peer.stats()["idle_closes"] >= 1, timeout=5, what="an idle close")
        with RawClient(port=port) as client:
            r = client.request("POST", "/upload", body=b"x" * 100)
            assert r.status == 200 and r.json()["length"] == 100
        peer.reset_stats()


def test_answers_lb_makes(lb_process: Start, backends: Callable[..., Backend]) -> None:
    """503 with no usable peer (naming the pool and how many are up), 502 when the peer
    closes without answering, 504 past response_timeout, 431 for headers over
    max_header_size, 414 for a request line over it, 408 for a head that never ends."""
    peer = backends("p")
    lb = lb_process(f"""\
        listeners:
          www:
            bind: "127.0.0.1:{{www}}"
            mode: http
            pool: web
            http:
              response_timeout: 500ms
              client_header_timeout: 300ms
              max_header_size: 2KiB
          empty:
            bind: "127.0.0.1:{{empty}}"
            mode: http
            pool: nobody
        pools:
          web:
            peers: ["{peer.address}"]
            retries: 0
          nobody: {{{{}}}}
        """, www=0, empty=0)
    port = lb.port("www")
    with RawClient(port=lb.port("empty")) as client:
        r = client.request("GET", "/")
        assert r.status == 503 and "pool nobody (0 of 0 peers up)" in r.text
    with RawClient(port=port) as client:
        r = client.request("GET", "/close-before")
        assert r.status == 502 and "pool web" in r.text
        r = client.request("GET", "/slow?ms=2000")
        assert r.status == 504 and "0.5s" in r.text
    with RawClient(port=port) as client:
        r = client.request("GET", "/", headers=[("X-Big", "x" * 3000)])
        assert r.status == 431 and r.closed or r.header("Connection") == "close"
    with RawClient(port=port) as client:
        r = client.request("GET", "/" + "a" * 3000)
        assert r.status == 414
    with RawClient(port=port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: slow\r\n")
        r = client.read_response(timeout=5)
        assert r.status == 408
    wait_for(lambda: any('"GET /close-before HTTP/1.1" 502' in line
                         for line in lb.access_lines()), what="the 502's access line")


def test_retries_follow_retry_on(lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A GET whose peer resets before answering is retried on the other peer (retry_on:
    reset); a POST is not (not idempotent) and gets 502; a 503 from a peer is retried when
    retry_on lists 503."""
    a, b = backends("a"), backends("b")
    lb = simple(lb_process, a, b, pool="    retry_on: [connect-failure, empty-response, "
                                          "reset, 503]")
    port = lb.port("www")
    for _ in range(4):
        r = keepalive(port, ["/reset-before"])[0]
        assert r.status == 502 or r.status == 200
    statuses = [keepalive(port, ["/status?code=503"])[0].status for _ in range(4)]
    assert statuses == [503] * 4  # both peers answer 503: retried once, then passed on
    with RawClient(port=port) as client:
        r = client.request("POST", "/reset-before", body=b"data")
        assert r.status == 502
    wait_for(lambda: "retries=1" in "\n".join(lb.access_lines()), what="a retried request")


def test_a_refused_connect_is_retried_on_another_peer(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A peer that refuses connections: the request goes to the other peer (connect
    failures are always retried), and the refused peer goes down by passive checks."""
    from lb.testing import free_port
    good = backends("good")
    dead = free_port()
    lb = simple(lb_process, f"127.0.0.1:{dead}", good)
    answers = keepalive(lb.port("www"), ["/"] * 6)
    assert all(r.status == 200 and r.header("X-Backend") == "good" for r in answers)
    peer = lb.admin(f"/api/pools/web/peers/127.0.0.1:{dead}")
    assert peer["connect_failures"] >= 1
    # the retry is counted, in the metric and in the request's access line
    assert 'lb_http_retries_total{pool="web",reason="connect-failure"}' in lb.admin("/metrics")
    wait_for(lambda: any(line.endswith(" retries=1") for line in lb.access_lines()),
             what="an access line with retries=1")


def test_clients_curl_and_http_client(lb_process: Start,
                                      backends: Callable[..., Backend]) -> None:
    """curl reuses its connection for two URLs through lb; Python's http.client works."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    port = lb.port("www")
    result = curl_keepalive(f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/echo")
    assert [t.status for t in result.transfers] == [200, 200]
    assert result.transfers[1].connects == 0  # reused
    r = http_client_request(port, "POST", "/upload", body=b"x" * 1000)
    assert r.status == 200 and r.json()["length"] == 1000


def test_the_access_log_line(lb_process: Start, backends: Callable[..., Backend]) -> None:
    """One line per request: client, listener, request id, request line, status, bytes,
    pool, peer, timings in ms and retries."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    keepalive(lb.port("www"), ["/size?bytes=1234"], headers=[("X-Request-Id", "rid-9")])
    wait_for(lambda: lb.access_lines(), what="an access line")
    line = lb.access_lines()[-1].split("] ", 1)[1]
    assert line.startswith("127.0.0.1:")
    assert (f' www rid-9 "GET /size?bytes=1234 HTTP/1.1" 200 in=0 out=1234 pool=web '
            f'peer={peer.address} wait=') in line
    assert " connect=" in line and " first=" in line and " total=" in line
    assert line.endswith(" retries=0")


def test_bad_requests_get_400_and_reach_no_peer(lb_process: Start,
                                                backends: Callable[..., Backend]) -> None:
    """A request that could be framed two ways is refused with 400 and the connection
    closed; the peer never sees it."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    for raw in (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                b"GET / HTTP/1.1\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\nab"):
        with RawClient(port=lb.port("www")) as client:
            client.send(raw)
            r = client.read_response(timeout=5)
            assert r.status == 400, raw
            assert client.peer_closed()
    with RawClient(port=lb.port("www")) as client:
        client.send(b"\x16\x03\x01 not http\r\n\r\n")
        assert client.read_response(timeout=5).status == 400
    assert peer.stats()["requests"] == 0
    # each has its access line, timed from its head's start (never negative), "-" for what
    # the client never sent
    wait_for(lambda: len(lb.access_lines()) == 5, what="five access lines")
    lines = [line.split("] ", 1)[1] for line in lb.access_lines()]
    assert all(" 400 in=0 out=" in line and " wait=-" not in line
               and " total=-" not in line for line in lines), lines
    assert '"- - HTTP/1.1" 400' in lines[-1], lines[-1]


def test_slow_reader_of_a_big_answer_keeps_lb_memory_bounded(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A client that reads a 200 MiB answer slowly: lb stops reading the peer while the
    client lags, so its memory stays bounded, and every byte arrives."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    assert lb.proc is not None
    pid = lb.proc.popen.pid

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    before = rss()
    sock = socket.create_connection(("127.0.0.1", lb.port("www")))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        sock.sendall(b"GET /size?bytes=209715200 HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        peak = before
        deadline = time.monotonic() + 60
        while got < 209715200 + 100 and time.monotonic() < deadline:
            data = sock.recv(1 << 16)
            if not data:
                break
            got += len(data)
            if got % (16 << 20) < (1 << 16):
                peak = max(peak, rss())
                time.sleep(0.01)  # a slow reader
    finally:
        sock.close()
    assert got > 209715200
    assert (peak - before) < 64 * 1024, f"RSS grew {(peak - before) // 1024} MiB"


def test_a_client_reset_mid_answer_does_not_poison_the_peer_connection(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A client that leaves in the middle of a big answer: the peer connection carrying it
    is closed (never reused half-read), and the next request is served normally."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    sock = socket.create_connection(("127.0.0.1", lb.port("www")))
    sock.sendall(b"GET /size?bytes=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(65536)
    sock.close()
    for _ in range(3):
        r = keepalive(lb.port("www"), ["/echo"])[0]
        assert r.status == 200
    with pytest.raises((ConnectionEnded, OSError)):
        raise ConnectionEnded(False, None, b"")  # the helper's error type is importable


def test_metrics_and_status_page_show_http(lb_process: Start,
                                           backends: Callable[..., Backend]) -> None:
    """/metrics carries lb_http_requests_total by code, the duration histogram, lb's own
    answers by reason, retries and the peers' keep-alive connections; the status page
    shows the pool's requests by status class."""
    peer = backends("p")
    lb = simple(lb_process, peer)
    port = lb.port("www")
    keepalive(port, ["/", "/status?code=404", "/close-before", "/"])
    metrics = lb.admin("/metrics")
    assert 'lb_http_requests_total{code="200",listener="www",pool="web"} 2.0' in metrics
    assert 'lb_http_requests_total{code="404",listener="www",pool="web"} 1.0' in metrics
    assert 'lb_http_requests_total{code="502",listener="www",pool="web"} 1.0' in metrics
    assert 'lb_http_request_duration_seconds_count{listener="www",pool="web"} 4.0' in metrics
    assert 'lb_http_errors_total{listener="www",reason="bad_gateway"} 1.0' in metrics
    assert 'lb_http_errors_total{listener="www",reason="no_peer"} 0.0' in metrics
    assert (f'lb_upstream_connections{{peer="{peer.address}",pool="web",state="idle"}} 1.0'
            in metrics)
    assert f'lb_outlier_ejections_total{{peer="{peer.address}",pool="web"}} 0.0' in metrics
    page = lb.admin("/")
    assert "HTTP <b>4</b> request(s)" in page and "5xx 1" in page and "2xx 2" in page


def test_outlier_detection_ejects_a_peer_serving_5xx(lb_process: Start,
                                                     backends: Callable[..., Backend]) -> None:
    """A peer answering 500s consecutive_5xx times in a row is ejected: requests go to the
    other peer; it comes back after ejection_time."""
    bad, good = backends("bad"), backends("good")
    lb = simple(lb_process, bad, good, pool=indent("""
        outlier:
          consecutive_5xx: 3
          ejection_time: 1s
          max_ejected: 50%
        """, 4))
    port = lb.port("www")
    seen = []
    with RawClient(port=port) as client:
        for _ in range(8):
            r = client.request("GET", "/status?code=500")
            seen.append(r.header("X-Backend"))
    peer = lb.admin(f"/api/pools/web/peers/{bad.address}")
    assert peer["admin_state"] == "ready"  # ejection is not an admin state...
    assert (peer["ejected"], peer["ejections"]) == (True, 1)  # ...the API shows it apart
    assert seen.count("bad") == 3, seen  # ejected after its third 500
    metrics = lb.admin("/metrics")
    assert f'lb_outlier_ejections_total{{peer="{bad.address}",pool="web"}} 1.0' in metrics
    wait_for(lambda: "back from ejection" in lb.log(), timeout=5, what="the ejection's end")
    served = {r.header("X-Backend") for r in keepalive(port, ["/"] * 4)}
    assert served == {"bad", "good"}


def test_leastconn_counts_requests_in_flight(lb_process: Start,
                                             backends: Callable[..., Backend]) -> None:
    """With leastconn, a peer busy with a slow request gets none of the next ones while the
    other is idle: load is counted per request in flight (a client connection waiting for
    its answer is one request on one peer)."""
    one, two = backends("one"), backends("two")
    lb = simple(lb_process, one, two, pool="    balance: leastconn")
    port = lb.port("www")
    with RawClient(port=port) as slow_client:
        slow_client.send_request("GET", "/slow?ms=2000")
        wait_for(lambda: one.stats()["in_flight"] + two.stats()["in_flight"] == 1,
                 timeout=5, what="the slow request in flight")
        busy = "one" if one.stats()["in_flight"] else "two"
        answers = keepalive(port, ["/"] * 6)
        assert busy not in {r.header("X-Backend") for r in answers}
        assert slow_client.read_response(timeout=5).status == 200


def test_sigterm_answers_requests_in_flight_with_connection_close(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """SIGTERM: an idle keep-alive client is closed at once, the requests in flight (one
    being answered, one pipelined behind it) are answered, the last with
    ``Connection: close``, and then their connection closes, and lb exits."""
    import signal
    peer = backends("p")
    lb = simple(lb_process, peer)
    port = lb.port("www")
    idle = RawClient(port=port)
    busy = RawClient(port=port)
    try:
        assert idle.request("GET", "/").status == 200
        # a request pipelined behind it was read too: answered as well, the last to say close
        busy.send(build_request("GET", "/slow?ms=800") + build_request("GET", "/echo?n=2"))
        wait_for(lambda: peer.stats()["in_flight"] == 1, timeout=5, what="the slow request")
        assert lb.proc is not None
        lb.proc.signal(signal.SIGTERM)
        assert idle.peer_closed(timeout=5)
        first, last = busy.read_response(timeout=5), busy.read_response(timeout=5)
        assert first.status == 200 and first.header("Connection") is None
        assert last.status == 200 and last.header("Connection") == "close"
        assert busy.peer_closed(timeout=5)
        assert lb.proc.wait(10) is not None
    finally:
        idle.close()
        busy.close()


def test_sigterm_answers_a_request_on_its_way_on_a_new_connection(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A client that connected but has not sent its first request yet (or is half-way
    through a head) when SIGTERM comes is surely sending one: it is read and answered with
    ``Connection: close``, not cut (which would reset the request on the wire)."""
    import signal
    peer = backends("p")
    lb = simple(lb_process, peer)
    port = lb.port("www")
    fresh, partial = RawClient(port=port), RawClient(port=port)
    try:
        partial.send(b"GET /echo?n=2 HTTP/1.1\r\nHost: a\r\n")
        wait_for(lambda: lb.admin("/api/listeners")["listeners"][0]["active_connections"] == 2,
                 timeout=5, what="both connections accepted")
        assert lb.proc is not None
        lb.proc.signal(signal.SIGTERM)
        wait_for(lambda: "waiting up to" in lb.log(), timeout=5, what="the shutdown")
        for client, rest in ((fresh, build_request("GET", "/echo?n=1")), (partial, b"\r\n")):
            client.send(rest)
            r = client.read_response(timeout=5)
            assert r.status == 200 and r.header("Connection") == "close"
            assert client.peer_closed(timeout=5)
        assert lb.proc.wait(10) is not None
    finally:
        fresh.close()
        partial.close()


def test_sigterm_gives_a_websocket_tunnel_shutdown_timeout(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """SIGTERM: an upgraded connection is not cut at once; it keeps working (like a TCP
    connection) until shutdown_timeout, then it is closed and lb exits."""
    import signal
    peer = backends("p")
    lb = simple(lb_process, peer, listener="shutdown_timeout: 2s")
    with ws_connect(f"ws://127.0.0.1:{lb.port('www')}/ws") as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        assert lb.proc is not None
        lb.proc.signal(signal.SIGTERM)
        wait_for(lambda: not accepts_now(lb.port("www")), timeout=5,
                 what="the listener closing")
        ws.send("during")  # the tunnel still carries messages after the listener closed
        assert ws.recv(timeout=5) == "during"
        assert lb.proc.wait(15) is not None  # cut at shutdown_timeout, then lb exits


def test_client_keepalive_timeout_runs_from_the_end_of_the_answer(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """client_keepalive_timeout is the idle time allowed between two requests: an answer
    that took longer than it does not make the connection count as idle."""
    peer = backends("p")
    lb = simple(lb_process, peer, listener="    http: {{client_keepalive_timeout: 1s}}")
    with RawClient(port=lb.port("www")) as client:
        assert client.request("GET", "/slow?ms=1500").status == 200
        time.sleep(0.4)  # the client's own pause between requests, shorter than the timeout
        assert client.request("GET", "/").status == 200
        assert client.peer_closed(timeout=5)  # and then idle past it: closed


def accepts_now(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_draining_a_peer_lets_requests_finish_and_closes_its_idle_connections(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """An operator drains a peer: its request in flight is answered, its idle keep-alive
    connections are closed, new requests go to the other peer."""
    a, b = backends("a"), backends("b")
    lb = simple(lb_process, a, b)
    port = lb.port("www")
    keepalive(port, ["/"] * 4)  # both peers now have an idle connection from lb
    with RawClient(port=port) as slow:
        slow.send_request("GET", "/slow?ms=700")
        wait_for(lambda: a.stats()["in_flight"] + b.stats()["in_flight"] == 1, timeout=5,
                 what="the slow request")
        busy = a if a.stats()["in_flight"] else b
        other = b if busy is a else a
        lb.admin(f"/api/pools/web/peers/{busy.address}", "PUT", {"admin_state": "drain"})
        answers = keepalive(port, ["/"] * 4)
        assert {r.header("X-Backend") for r in answers} == {other.name}
        assert slow.read_response(timeout=5).status == 200
    wait_for(lambda: busy.stats()["open"] == 0, timeout=5,
             what="the drained peer's connections closed")


def test_accept_proxy_on_an_http_listener(lb_process: Start,
                                          backends: Callable[..., Backend]) -> None:
    """Behind accept_proxy the client address comes from the PROXY header: it is what
    X-Forwarded-For carries."""
    peer = backends("p")
    lb = simple(lb_process, peer, listener="    accept_proxy: true")
    with RawClient(port=lb.port("www")) as client:
        client.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 80\r\n")
        r = client.request("GET", "/echo")
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert headers["x-forwarded-for"] == "198.51.100.7"
    assert headers["x-forwarded-port"] == "80"  # the port the client connected to


def test_client_keepalive_timeout_zero_closes_after_each_answer(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """client_keepalive_timeout: 0 answers every request with Connection: close and closes
    the connection after it (a pipelined request behind it is not read)."""
    peer = backends("p")
    lb = simple(lb_process, peer, listener="    http: {{client_keepalive_timeout: 0s}}")
    with RawClient(port=lb.port("www")) as client:
        r = client.request("GET", "/")
        assert r.status == 200 and r.header("Connection") == "close"
        assert client.peer_closed(timeout=5)



@pytest.mark.parametrize("accept_proxy", [False, True], ids=["raw", "proxy-protocol"])
def test_a_reload_switches_a_listener_between_tcp_and_http_on_its_socket(
        lb_process: Start, backends: Callable[..., Backend], accept_proxy: bool) -> None:
    """SIGHUP changing a listener's mode (tcp to http and back) is applied, not refused with
    'Address already in use': the new listener takes over the listening socket, so clients
    connecting all along are never refused, new connections get the new mode (X-Forwarded-For
    only through http), and a connection opened before goes on in the old mode. With
    accept_proxy, a tcp listener accepts through Twisted (its port must not shut the shared
    socket down when it closes)."""
    import signal
    import threading
    peer = backends("p")

    def config(mode: str) -> str:
        return f"""\
            listeners:
              www:
                bind: "127.0.0.1:{{www}}"
                mode: {mode}
                pool: web
                accept_proxy: {str(accept_proxy).lower()}
            pools:
              web:
                peers: ["{peer.address}"]
            """

    def connect() -> RawClient:
        client = RawClient(port=port, timeout=5)
        if accept_proxy:
            client.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 1111 80\r\n")
        return client

    def forwarded(client: RawClient) -> Any:
        r = client.request("GET", "/echo")
        assert r.status == 200
        return {k.lower(): v for k, v in r.json()["headers"]}.get("x-forwarded-for")

    lb = lb_process(config("tcp"), www=0)
    port = lb.port("www")
    stop = threading.Event()
    done: List[int] = []
    errors: List[str] = []

    def load() -> None:  # a new connection per request, bounded
        for _ in range(20000):
            if stop.is_set():
                return
            try:
                with connect() as c:
                    if c.request("GET", "/").status != 200:
                        errors.append("not 200")
                done.append(1)
            except Exception as e:  # recorded, asserted below
                errors.append(repr(e))

    thread = threading.Thread(target=load)
    with connect() as before:
        assert forwarded(before) is None  # tcp: the bytes as sent
        thread.start()
        try:
            for n, (mode, xff) in enumerate([("http", "127.0.0.1"), ("tcp", None)], 1):
                wait_for(lambda n=n: len(done) > 50 * n, what="load flowing")
                lb.write(config(mode).format(**lb.ports))
                assert lb.proc is not None
                lb.proc.signal(signal.SIGHUP)
                wait_for(lambda n=n: lb.log().count("on the same socket") == n, timeout=10,
                         what=f"the reload to {mode}")
                with connect() as after:
                    assert forwarded(after) == xff
                assert forwarded(before) is None  # opened in tcp mode: still a byte pipe
            at_end = len(done)
            wait_for(lambda: len(done) > at_end + 50, what="load after the reloads")
        finally:
            stop.set()
            thread.join(30)
    assert not errors, errors[:3]
    assert "reload rejected" not in lb.log()
