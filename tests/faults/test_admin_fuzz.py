"""Property-based fuzzing of the admin server: odd methods, paths (known routes, percent-
encodings, invalid UTF-8, IPv6 addresses, very long ones), headers (Content-Type variants,
Content-Length lies, Authorization, Origin) and bodies (JSON of wrong shapes, non-JSON, deep
nesting, over the size limit).

Whatever arrives: no 5xx; every answer that is not a success is JSON ``{"error": str}`` with
a JSON content-type; a 405 carries ``Allow`` without the method; a request answered 4xx (and
any GET or HEAD) changes no pool; the connection always gets an answer.

Two runs: the resource tree through StubTreq (many examples, each on a fresh balancer on a
fake reactor), and raw bytes over 127.0.0.1 to a started admin server (fewer examples; the
examples run in a worker thread with blocking sockets while the reactor serves), which
alone sees what Twisted decides below the resources: framing, form bodies (StubTreq's
in-memory server is a plain Site, which parses multipart POST bodies itself, so that run
leaves those to the socket run) and lines over 16 KiB.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

import pytest
import pytest_twisted
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from lb.admin.api import MAX_BODY, pool_json
from lb.admin.metrics import make_registry
from lb.admin.server import build_resource
from lb.config import parse_address
from lb.peer import PeerSpec
from lb.service import LBService
from lb.testing import make_config
from tests.admin_wire import Answer, blocking_exchange, parse_answers

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
BASE = "http://127.0.0.1:9901"
LISTENERS = {"front": {"bind": "127.0.0.1:0", "pool": "web"}}
POOLS = {"web": {"peers": ["127.0.0.1:9001", {"address": "[::1]:9002", "weight": 3}],
                 "drain_timeout": "10s"},
         "api": {"balance": "leastconn", "peers": ["10.0.0.1:80"]}}
CONSUL_PEERS = ["127.0.0.1:9001", "127.0.0.1:9031"]  # DELETE of these answers 409

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the balancer under test ------------------------------------------------------------------


class AcceptingPort:
    """A listening port that accepts, so /healthz is 200 on a fake reactor."""

    connected = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)


def make_root(clock: Any, token: bool) -> LBService:
    """Pools with static, IPv6 and Consul-announced peers; a token when ``token``."""
    config = make_config(LISTENERS, POOLS)
    if token:
        config = dataclasses.replace(config, admin=dataclasses.replace(config.admin,
                                                                       token=TOKEN))
    root = LBService(config, clock, pool_parts={})
    root.pool("web").apply("consul", [PeerSpec(parse_address(a)) for a in CONSUL_PEERS])
    return root


def pools_state(root: LBService) -> str:
    """Everything the API shows of the pools, to compare before and after a request."""
    return json.dumps([pool_json(pool) for pool in root.admin_view.pools()], sort_keys=True)


# --- what is sent -------------------------------------------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)

METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                     "CONNECT", "PROPFIND", "BREW", "M-SEARCH"]),
    st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True))

ADDRESSES = st.sampled_from([
    "127.0.0.1:9001", "[::1]:9002", "%5B%3A%3A1%5D%3A9002", "[0:0::1]:9002", "127.0.0.1:9031",
    "10.0.0.1:80", "127.0.0.1:1", "::1:80", "[::1]", "[fe80::1%25eth0]:80", "127.0.0.1:99999",
    "127.0.0.1:0", "a..b:80", "x" * 64 + ":80", "%FF:80", "%C3%A9xample.com:80", "xn--:80",
    "-bad-.example:80", "%00", "", "127.0.0.1%3A9001", "%5B::1%5D:9002", "[::ffff:127.0.0.1]:9001"])

SEGMENTS = st.one_of(
    st.sampled_from(["api", "pools", "peers", "web", "listeners", "metrics", "healthz", "",
                     "nope", "..", ".", "%2F", "%FF", "%00", "%C0%AF", "%E2%82%AC", "API"]),
    ADDRESSES,
    st.text(alphabet=st.sampled_from("abcxyz0123-._~!$&'()*+,;=:@"), max_size=16),
    st.binary(max_size=8).map(lambda b: quote(b, safe="")))

KNOWN_PATHS = st.sampled_from([
    "/", "/healthz", "/metrics", "/api", "/api/", "/api/pools", "/api/pools/", "/api/pools/web",
    "/api/pools/api", "/api/pools/nope", "/api/pools/web/peers", "/api/pools/nope/peers",
    "/api/listeners", "/healthz/", "/metrics/x", "/index.html", "//", "/api//pools"])

PATHS = st.tuples(
    st.one_of(
        KNOWN_PATHS,
        st.builds(lambda pool, address, tail: f"/api/pools/{pool}/peers/{address}{tail}",
                  st.sampled_from(["web", "api", "nope", "%77eb"]), ADDRESSES,
                  st.sampled_from(["", "", "/", "/x"])),
        st.lists(SEGMENTS, max_size=6).map(lambda segments: "/" + "/".join(segments)),
        st.integers(1000, 12000).map(lambda n: "/api/pools/web/peers/" + "a" * n)),
    st.sampled_from(["", "", "?pretty=1", "?pretty=0", "?refresh=abc", "?refresh=99999",
                     "?name[]=lb_peer_up", "?%FF=%FF", "?a=b&a=c;d"])).map("".join)

# requests aimed at the routes that change things, so their validation gets most bodies
TARGETED = st.one_of(
    st.sampled_from([("POST", "/api/pools/web/peers"), ("POST", "/api/pools/api/peers/"),
                     ("PUT", "/api/pools/web/peers/127.0.0.1:9001"),
                     ("PUT", "/api/pools/web/peers/%5B%3A%3A1%5D%3A9002"),
                     ("PUT", "/api/pools/web/peers/127.0.0.1:9031"),
                     ("DELETE", "/api/pools/web/peers/127.0.0.1:9001"),
                     ("DELETE", "/api/pools/web/peers/%5B%3A%3A1%5D%3A9002"),
                     ("DELETE", "/api/pools/web/peers/127.0.0.1:9031"),
                     ("DELETE", "/api/pools/api/peers/10.0.0.1:80")]),
    st.tuples(st.sampled_from(["POST", "post"]),
              st.sampled_from(["/api/pools/web/peers", "/api/pools/nope/peers",
                               "/api/pools/web/peers/127.0.0.1:9001"])),
    st.tuples(st.sampled_from(["PUT", "DELETE", "GET", "HEAD"]),
              st.builds(lambda pool, address: f"/api/pools/{pool}/peers/{address}",
                        st.sampled_from(["web", "web", "api", "nope"]), ADDRESSES)))

ROUTES = st.one_of(TARGETED, st.tuples(METHODS, PATHS))

CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from([
        "application/json", "application/json; charset=latin-1", "text/plain", "*/*",
        "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; "
        "boundary=zz", 'multipart/form-data; boundary="zz', "Multipart/Form-Data; boundary=zz",
        "multipart/mixed; boundary=zz", "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-8", ";;;=", "text/html; q=\x7e"]),
    st.text(alphabet=PRINTABLE, max_size=40))

AUTHORIZATIONS = st.one_of(
    st.none(),
    st.just(f"Bearer {TOKEN}"),
    st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} ", "Bearer wrong",
                     "Bearer", "Basic czNjcmV0LXRva2Vu", TOKEN, ""]),
    st.text(alphabet=PRINTABLE, max_size=40))

ORIGINS = st.one_of(st.none(), st.none(), st.sampled_from(
    ["http://127.0.0.1:9901", "http://evil.example", "null", "", "http://127.0.0.1"]))

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)

SHAPED = st.fixed_dictionaries({}, optional={
    "address": st.one_of(ADDRESSES, st.integers(), st.none(), st.lists(st.text(max_size=5))),
    "weight": st.one_of(st.integers(-5, 300), st.floats(), st.booleans(), st.text(max_size=5),
                        st.none()),
    "admin_state": st.one_of(st.sampled_from(["ready", "drain", "maint", "down", "READY", ""]),
                             JSON_VALUES),
    "extra": JSON_VALUES})

# bodies a route takes: the fuzz then also exercises the changes themselves
VALID_BODIES = st.one_of(
    st.fixed_dictionaries({"address": st.sampled_from(
        ["127.0.0.1:9050", "[::1]:9051", "127.0.0.1:9001", "backend.internal:80"])},
        optional={"weight": st.integers(0, 256)}),
    st.fixed_dictionaries({}, optional={"admin_state": st.sampled_from(
        ["ready", "drain", "maint"]), "weight": st.integers(0, 256)})).map(
    lambda value: json.dumps(value).encode())

MULTIPART = (b"--zz\r\nContent-Disposition: form-data; name*=utf-8''%ff\r\n\r\nx\r\n"
             b"--zz--\r\n")

NASTY_BODIES = st.sampled_from([
    b"", b"{", b"[]", b"null", b'{"address": "127.0.0.1:9050"', b"\xff\xfe{}", b'{"a": 1}{"b": 2}',
    b"NaN", b'{"weight": 1e999}', b'{"weight": NaN}', b'{"address": "127.0.0.1:9050", '
    b'"weight": -0.0}', b'{"admin_state": "drain", "admin_state": "ready"}', MULTIPART,
    b"%%%=&;;", b"address=127.0.0.1:9050", b"\x00" * 64])

SMALL_BODIES = st.one_of(
    st.none(),
    SHAPED.map(lambda value: json.dumps(value).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda text: text.encode("utf-8")),
    NASTY_BODIES,
    # nested deeper than Python's recursion limit
    st.integers(900, 20000).map(lambda depth: b"[" * depth),
    st.integers(900, 12000).map(lambda depth: b'{"a":' * depth))

HUGE_BODIES = st.tuples(st.sampled_from([MAX_BODY, MAX_BODY + 1, 3 * MAX_BODY]),
                        st.sampled_from([b" ", b"{", b"["])).map(
    lambda size_fill: b'{"admin_state": "drain"}' + size_fill[1] * size_fill[0])

BODIES = st.one_of(VALID_BODIES, SMALL_BODIES, HUGE_BODIES)


# --- what must hold -----------------------------------------------------------------------------


def decoded(body: bytes, headers: Dict[str, List[str]]) -> bytes:
    if "gzip" in ",".join(headers.get("content-encoding", [])):
        return gzip.decompress(body)
    return body


def check_answer(method: str, status: int, headers: Dict[str, List[str]], body: bytes,
                 head: bool) -> None:
    """The answer itself: no 5xx, non-2xx answers are JSON errors, 405 has Allow."""
    ctype = ",".join(headers.get("content-type", []))
    assert status < 500, (status, body[:300])
    assert 200 <= status < 300 or 400 <= status < 500, status
    if status >= 300:
        assert ctype.startswith("application/json"), (status, ctype, body[:200])
        if not head:
            error = json.loads(decoded(body, headers))
            assert isinstance(error, dict) and set(error) == {"error"}, error
            assert isinstance(error["error"], str) and error["error"]
    if status == 405:
        allowed = [m.strip() for m in ",".join(headers.get("allow", [])).split(",")]
        assert allowed and allowed != [""], headers
        assert method not in allowed, (method, allowed)
    if head:
        assert body == b"", body[:100]


# --- through the resource tree ------------------------------------------------------------------


@settings(max_examples=500, **FUZZ)  # type: ignore[arg-type]
@given(route=ROUTES, body=BODIES, ctype=CONTENT_TYPES, authorization=AUTHORIZATIONS,
       origin=ORIGINS, token=st.booleans(), gzipped=st.booleans())
def test_the_resource_tree_answers_everything_cleanly(
        route: Tuple[str, str], body: Optional[bytes], ctype: Optional[str],
        authorization: Optional[str], origin: Optional[str], token: bool,
        gzipped: bool) -> None:
    """Any request through StubTreq gets a clean answer (see the module docstring), and
    one answered 4xx, or any GET or HEAD, leaves every pool as it was."""
    method, path = route
    # StubTreq's server is a plain Site, which parses multipart POST bodies before any
    # resource runs (the admin server does not): those go to the socket run
    assume(not (method.upper() == "POST" and "multipart" in (ctype or "").lower()))
    clock = MemoryReactorClock()
    root = make_root(clock, token)
    root.listeners["front"].port = AcceptingPort()
    stub = StubTreq(build_resource(root.admin_view, clock,
                                   make_registry(root.admin_view, process=False)))
    headers = {name: value for name, value in (
        ("Content-Type", ctype), ("Authorization", authorization), ("Origin", origin),
        ("Accept-Encoding", "gzip" if gzipped else None)) if value is not None}
    before = pools_state(root)
    results: list = []
    d = stub.request(method, BASE + path, data=body, headers=headers)
    d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r, c))))
    d.addErrback(results.append)
    stub.flush()
    assert results and isinstance(results[0], tuple), f"no answer: {results}"
    response, content = results[0]
    answer_headers = {name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
                      for name, values in response.headers.getAllRawHeaders()}
    sent = method.upper()  # treq sends methods upper-cased
    event(f"{sent if sent in ('GET', 'POST', 'PUT', 'DELETE') else 'other'} "
          f"{response.code}")
    check_answer(sent, response.code, answer_headers, content, head=sent == "HEAD")
    if 400 <= response.code < 500 or sent in ("GET", "HEAD"):
        assert pools_state(root) == before, (response.code, content[:300])


# --- over a real socket -------------------------------------------------------------------------

RAW_ROUTES = st.one_of(TARGETED.map(lambda route: (route[0].encode(), route[1].encode())),
                       st.tuples(st.just(None), st.just(None)))

RAW_METHODS = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"BREW", b"get",
                     b"head", b"G T", b"G\xffT", b""]),
    METHODS.map(lambda m: m.encode()))

RAW_PATHS = st.one_of(
    PATHS.map(lambda p: p.encode("latin-1")),
    st.sampled_from([b"/\xff", b"/api/pools/web/peers/\xe2\x82\xac:80", b"*", b"",
                     b"http://127.0.0.1/healthz", b"/healthz\x00", b"/api/pools/web peers",
                     b"/" + b"a" * 20000]))

FRAMINGS = st.sampled_from(
    # how the body is announced: as it is, shorter, longer (the client then stops: 408),
    # not at all, as a non-number, twice, chunked, or with a bad chunk
    ["length"] * 10 + ["short", "long", "none", "bogus", "twice", "chunked", "chunked",
                       "bad-chunk"])


# a request line Twisted reads (RFC 9112 with HTTP/1.0 or 1.1): only then does the server
# know a HEAD is a HEAD and leave its answer without a body
REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/1\.[01]")


@st.composite
def raw_requests(draw: Any) -> Tuple[bytes, bytes, bool]:
    """(request bytes, method, whether the server can tell it is a HEAD): one request,
    sent with ``Connection: close``."""
    method, path = draw(RAW_ROUTES)
    if method is None:
        method, path = draw(RAW_METHODS), draw(RAW_PATHS)
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]))
    framing = draw(FRAMINGS)
    body = draw(st.one_of(VALID_BODIES, SMALL_BODIES,
                          HUGE_BODIES if framing == "length" else st.nothing()))
    body = body or b""
    headers: List[Tuple[bytes, bytes]] = [(b"Host", b"127.0.0.1")]
    for name, value in ((b"Content-Type", draw(CONTENT_TYPES)),
                        (b"Authorization", draw(AUTHORIZATIONS)), (b"Origin", draw(ORIGINS))):
        if value is not None:
            headers.append((name, value.encode("latin-1")))
    if draw(st.booleans()):
        headers.append((b"Expect", b"100-continue"))
    bad_header = draw(st.sampled_from([None] * 9 + [
        (b"X-Bad", b"a\x00b"), (b"Bad Name", b"x"), (b"", b"x"), (b"X-Long", b"v" * 17000)]))
    if bad_header is not None:
        headers.append(bad_header)
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "short":
        headers.append((b"Content-Length", b"%d" % max(0, len(body) - 3)))
    elif framing == "long":
        headers.append((b"Content-Length", b"%d" % (len(body) + 10)))
    elif framing == "bogus":
        headers.append((b"Content-Length", draw(st.sampled_from([b"abc", b"-1", b"1.5", b" ",
                                                                 b"0x10", b"+5"]))))
    elif framing == "twice":
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"0")]
    elif framing in ("chunked", "bad-chunk"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        size = b"%x" % len(body) if framing == "chunked" else b"zz"
        body = (size + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    headers.append((b"Connection", b"close"))
    line = method + b" " + path + b" " + version
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    is_head = method == b"HEAD" and REQUEST_LINE.fullmatch(line) is not None
    return line + b"\r\n" + head + b"\r\n" + body, method, is_head


@settings(max_examples=120, **FUZZ)  # type: ignore[arg-type]
@given(request=raw_requests())
def wire_property(port: int, state: Callable[[], str],
                  request: Tuple[bytes, bytes, bool]) -> None:
    """Runs in a worker thread: the reactor thread serves the admin site meanwhile."""
    raw, method, is_head = request
    before = state()
    data = blocking_exchange(port, raw)
    assert data, f"the connection closed without an answer to {raw[:200]!r}"
    answers: List[Answer] = parse_answers(data, head_first=is_head)
    assert answers, data[:300]
    for i, answer in enumerate(answers):
        check_answer(method.decode("latin-1"), answer.status, answer.headers, answer.body,
                     head=is_head and i == 0)
    if 400 <= answers[0].status < 500 or method in (b"GET", b"HEAD"):
        assert state() == before, (answers[0].status, answers[0].body[:300])


@pytest_twisted.inlineCallbacks
def test_the_wire_always_gets_a_clean_answer() -> Any:
    """Raw requests to a started admin server on 127.0.0.1, malformed ones included, each
    get at least one complete answer before the server closes; every answer is clean (see
    the module docstring) and one answered 4xx leaves every pool as it was. A request that
    stops midway is timed out after 0.3 s (408) to keep the run short."""
    root = make_root(reactor, token=False)
    root.startService()
    root.admin.site.timeOut = 0.3
    try:
        yield threads.deferToThread(
            wire_property, root.admin.port.getHost().port,
            lambda: threads.blockingCallFromThread(reactor, pools_state, root))
    finally:
        yield root.stopService()
