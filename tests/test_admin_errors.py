"""Every answer of the admin server that is not a success is JSON ``{"error": ...}`` with the
right status: through the resource tree (StubTreq) for methods and paths, and over a real
socket for what Twisted decides below the resources (form bodies, framing, timeouts)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from lb.admin.server import AdminSite, build_resource
from lb.service import LBService
from lb.testing import make_config
from tests.admin_wire import assert_json_error, exchange, parse_answers
from tests.test_admin_api import Admin

GET_ONLY = ["/", "/healthz", "/metrics"]
OTHER_METHODS = ["PUT", "DELETE", "OPTIONS", "POST", "PATCH", "TRACE", "BREW"]


class AcceptingPort:
    """A listening port as ``ListenerService.accepting`` sees one that is open."""

    connected = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)


@pytest.fixture
def admin() -> Admin:
    return Admin()


def json_error(admin: Admin, method: str, path: str, status: int, **kw: Any) -> Any:
    code, body, headers = admin.call(method, path, **kw)
    ctype = headers.getRawHeaders("content-type", [""])[0]
    assert (code, ctype.startswith("application/json")) == (status, True), (code, body)
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"], headers


def raw_call(admin: Admin, method: str, path: str) -> Any:
    """One request through StubTreq; (status, body bytes, headers), nothing decoded."""
    results: list = []
    d = admin.stub.request(method, "http://127.0.0.1:9901" + path)
    d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r, c))))
    admin.stub.flush()
    response, content = results[0]
    return response.code, content, response.headers


# --- methods and paths, through the resource tree ---------------------------------------------


@pytest.mark.parametrize("path", GET_ONLY)
@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_on_the_get_only_pages_are_405_json_with_allow(
        admin: Admin, method: str, path: str) -> None:
    """The status page, /healthz and /metrics take GET and HEAD only: any other method
    (odd ones too) is a JSON 405 naming the method, with ``Allow``, not
    Twisted's HTML "Huh?"/405 pages; nothing changes."""
    before = admin.state()
    error, headers = json_error(admin, method, path, 405)
    assert method in error and "GET, HEAD" in error
    assert headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert admin.state() == before


@pytest.mark.parametrize("path, ctype", [
    ("/", "text/html"), ("/healthz", "text/plain"), ("/metrics", "text/plain"),
    ("/api/pools", "application/json"), ("/api/pools/web/peers/127.0.0.1:9001",
                                         "application/json")])
def test_head_works_where_get_does(admin: Admin, path: str, ctype: str) -> None:
    """HEAD answers like GET (status, content-type) without a body."""
    admin.root.listeners["front"].port = AcceptingPort()
    get_code, _, _ = admin.call("GET", path)
    code, body, headers = raw_call(admin, "HEAD", path)
    assert (code, get_code, body) == (200, 200, b"")
    assert headers.getRawHeaders("content-type")[0].startswith(ctype)


def test_api_405_lists_head_with_get(admin: Admin) -> None:
    """Since HEAD works wherever GET does, the API's ``Allow`` names it too."""
    _, headers = json_error(admin, "POST", "/api/pools", 405)
    assert headers.getRawHeaders("allow") == ["GET, HEAD"]
    _, headers = json_error(admin, "OPTIONS", "/api/pools/web/peers", 405)
    assert headers.getRawHeaders("allow") == ["GET, HEAD, POST"]


@pytest.mark.parametrize("path", ["/healthz/x", "/metrics/x/y", "//x", "/healthz%2Fx",
                                  "/%FF", "/x" * 300])
def test_paths_below_the_pages_are_404_json(admin: Admin, path: str) -> None:
    """A page is only its own path: anything longer (or an unknown name, percent-encoded
    or not UTF-8) is a JSON 404."""
    error, _ = json_error(admin, "GET", path, 404)
    assert "no such path" in error


@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/metrics"),
                                          ("GET", "/healthz"), ("GET", "/api/pools"),
                                          ("DELETE", "/api/pools/web/peers/127.0.0.1:9001")])
def test_a_body_over_the_limit_is_413_on_every_path(admin: Admin, method: str,
                                                    path: str) -> None:
    """A request whose body is over 64 KiB is refused with 413 whatever it asks for (the
    server keeps no more than the limit of it), and changes nothing."""
    before = admin.state()
    error, _ = json_error(admin, method, path, 413, raw=b"x" * (64 * 1024 + 1))
    assert "larger than" in error
    assert admin.state() == before


def test_a_failing_page_is_a_logged_json_500(admin: Admin, monkeypatch: Any) -> None:
    """A bug while rendering the status page answers a JSON 500, not Twisted's HTML."""
    from lb.admin.status import StatusPage

    def broken(self: Any, *args: Any) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(StatusPage, "render_page", broken)
    error, _ = json_error(admin, "GET", "/", 500)
    assert "internal error" in error


# --- below the resources: the HTTP channel and request ----------------------------------------


def multipart(body: bytes, ctype: bytes = b"multipart/form-data; boundary=zz") -> bytes:
    return (b"POST /api/pools/web/peers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            + ctype + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body)


RFC2231_NAME = (b"--zz\r\nContent-Disposition: form-data; name*=utf-8''%ff\r\n\r\nx\r\n"
                b"--zz--\r\n")
CLOSE = b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n"

WIRE_CASES = [
    # (what, request bytes, status, text in the error)
    ("multipart body with an RFC 2231 field name", multipart(RFC2231_NAME), 400,
     "malformed JSON"),
    ("multipart without a boundary", multipart(b"hello", b"multipart/form-data"), 400,
     "malformed JSON"),
    ("multipart with a broken boundary", multipart(b"--zz\r\nhello", b"multipart/form-data; "
                                                   b"boundary=\"zz"), 400, "malformed JSON"),
    ("form-urlencoded junk", multipart(b"%%%=&;;", b"application/x-www-form-urlencoded"),
     400, "malformed JSON"),
    ("PUT on the status page", b"PUT / HTTP/1.1\r\nContent-Length: 0\r\n" + CLOSE, 405,
     "PUT"),
    ("an unknown method on /metrics", b"BREW /metrics HTTP/1.1\r\n" + CLOSE, 405, "BREW"),
    ("OPTIONS on /healthz", b"OPTIONS /healthz HTTP/1.1\r\n" + CLOSE, 405, "OPTIONS"),
    ("a lower-case get on /healthz (methods are case-sensitive)",
     b"get /healthz HTTP/1.1\r\n" + CLOSE, 405, "get"),
    ("a Content-Length that is not a number",
     b"POST /api/pools/web/peers HTTP/1.1\r\nContent-Length: abc\r\n" + CLOSE, 400,
     "malformed"),
    ("two Content-Lengths", b"POST /api/pools/web/peers HTTP/1.1\r\nContent-Length: 1\r\n"
     b"Content-Length: 2\r\n" + CLOSE + b"xx", 400, "malformed"),
    ("a request line that is not HTTP", b"GARBAGE\r\n\r\n", 400, "malformed"),
    ("a byte that is not ASCII in the path", b"GET /\xff HTTP/1.1\r\n" + CLOSE, 400,
     "malformed"),
    ("a header without a colon", b"GET /healthz HTTP/1.1\r\nNoColon\r\n" + CLOSE, 400,
     "malformed"),
    ("a request line over the line limit", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n" + CLOSE,
     400, "too long"),
    ("a bad chunk size", b"POST /api/pools/web/peers HTTP/1.1\r\nTransfer-Encoding: chunked"
     b"\r\n" + CLOSE + b"zz\r\nxx\r\n0\r\n\r\n", 400, "malformed"),
]


@pytest.fixture
def started() -> Iterator[LBService]:
    """A started balancer (real reactor) whose admin server listens on 127.0.0.1."""
    config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"]}})
    root = LBService(config, reactor)
    root.startService()
    try:
        yield root
    finally:
        pytest_twisted.blockon(root.stopService())


@pytest.mark.integration
@pytest.mark.parametrize("what, raw, status, problem", WIRE_CASES,
                         ids=[case[0] for case in WIRE_CASES])
@pytest_twisted.inlineCallbacks
def test_every_answer_on_the_wire_is_json(started: LBService, what: str, raw: bytes,
                                          status: int, problem: str) -> Any:
    """Requests Twisted's HTTP server used to answer with a bare or HTML page (or not at
    all: a multipart field named the RFC 2231 way raised in its form parser and dropped the
    connection) get one JSON error answer, and the pool is unchanged."""
    pool = started.pool("web")
    before = set(pool.peers)
    data = yield exchange(reactor, started.admin.port.getHost().port, raw)
    assert data, f"{what}: the connection closed without an answer"
    (answer,) = parse_answers(data)
    assert problem in assert_json_error(answer, status)
    assert set(pool.peers) == before


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_a_malformed_head_request_gets_an_answer_without_body(started: LBService) -> Any:
    """A HEAD request refused below the resources (a bad header) gets the JSON 400's head
    only: an answer to HEAD has no body, or a client would read it as the next answer."""
    data = yield exchange(reactor, started.admin.port.getHost().port,
                          b"HEAD /api/pools HTTP/1.1\r\nX-Bad: a\x00b\r\n" + CLOSE)
    (answer,) = parse_answers(data, head_first=True)
    assert answer.status == 400 and answer.body == b""
    assert answer.header("content-type").startswith("application/json")


def test_a_request_that_stops_midway_gets_a_json_408() -> None:
    """A client that announced more body than it sends (or stops in the head) gets a JSON
    408 when the admin server's timeout passes, rather than a silent close."""
    fake = MemoryReactorClock()
    root = LBService(make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                                 {"web": {"peers": ["127.0.0.1:9001"]}}), fake)
    site = AdminSite(build_resource(root.admin_view, fake), reactor=fake)
    for partial in (b"POST /api/pools/web/peers HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
                    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(partial)
        fake.advance(site.timeOut - 1)
        assert transport.value() == b""
        fake.advance(1)
        (answer,) = parse_answers(transport.value())
        assert "did not arrive" in assert_json_error(answer, 408)
        assert transport.disconnecting


def test_an_idle_connection_just_closes_at_the_timeout() -> None:
    """A kept-alive connection with no request in progress is closed without an answer:
    nobody asked anything."""
    fake = MemoryReactorClock()
    root = LBService(make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                                 {"web": {"peers": ["127.0.0.1:9001"]}}), fake)
    site = AdminSite(build_resource(root.admin_view, fake), reactor=fake)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    fake.advance(site.timeOut)
    assert transport.value() == b"" and transport.disconnecting


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_a_failure_below_the_resources_is_a_json_500(started: LBService,
                                                     monkeypatch: Any) -> Any:
    """A failure while finding the resource (Twisted's processingFailed) answers a JSON 500
    instead of Twisted's HTML page, and is logged."""
    def broken(path: bytes, request: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(started.admin.site.resource, "getChildWithDefault", broken)
    data = yield exchange(reactor, started.admin.port.getHost().port,
                          b"GET /api/pools HTTP/1.1\r\n" + CLOSE)
    (answer,) = parse_answers(data)
    assert "internal error" in assert_json_error(answer, 500)
