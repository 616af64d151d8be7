"""HTTP and TCP probes without a network: StubTreq and an in-memory reactor, time on a
Clock. Each bad peer behaviour must end as a failed check with a precise detail."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from lb.config import Address, HealthConfig
from lb.health.probes import BODY_CAP, HTTPProbe, ProbeResult, TCPProbe, request_url

PEER = Address("127.0.0.1", 9001)


def _result(d: Deferred) -> Optional[ProbeResult]:
    results: List[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result
    d.addBoth(keep)
    if not results:
        return None
    assert isinstance(results[0], ProbeResult), results[0]
    return results[0]


def _probe(probe: Any, address: Address, clock: Any, timeout: float) -> Deferred:
    """Start a probe the way the monitor does: cancelled by the clock at ``timeout``."""
    d = probe(address)
    d.addTimeout(timeout, clock)
    return d


class HealthPage(Resource):
    """A /health resource that answers the way a test tells it to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.body = b"ok"
        self.mode = "answer"  # answer | hang | stall_body | flood
        self.requests: List[Request] = []
        self.lost: List[Failure] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        request.notifyFinish().addErrback(self.lost.append)
        request.setResponseCode(self.code)
        if self.mode == "hang":
            return NOT_DONE_YET
        if self.mode == "stall_body":
            request.setHeader(b"content-length", b"100")
            request.write(b"part")
            return NOT_DONE_YET
        if self.mode == "flood":
            return b"x" * (BODY_CAP * 3)
        return self.body


@pytest.fixture
def page() -> HealthPage:
    return HealthPage()


@pytest.fixture
def stub(page: HealthPage) -> StubTreq:
    return StubTreq(page)


def _http(stub: Any, **health: Any) -> HTTPProbe:
    return HTTPProbe(stub, HealthConfig(**health))


# --- HTTP through StubTreq -----------------------------------------------------------------


@pytest.mark.parametrize("code, expect, ok", [
    (200, ((200, 200),), True),
    (204, ((200, 299),), True),
    (399, ((200, 399),), True),
    (404, ((200, 399), (404, 404)), True),
    (503, ((200, 200),), False),
    (500, ((200, 399),), False),
    (400, ((200, 399),), False),
])
def test_status_decides(stub: StubTreq, page: HealthPage, code: int, expect: tuple,
                        ok: bool) -> None:
    """Healthy exactly when the status is one of `expect_status`'s codes or ranges; the
    detail names the status."""
    page.code = code
    result = _result(_probe(_http(stub, expect_status=expect), PEER, Clock(), 1.0))
    assert result == ProbeResult(ok, f"HTTP {code}")


def test_request_line_and_headers(stub: StubTreq, page: HealthPage) -> None:
    """GET of the configured path, with Host = the peer address by default, and a
    User-Agent that tells backends' logs it is a check."""
    _result(_probe(_http(stub, path="/ready?deep=1"), PEER, Clock(), 1.0))
    [request] = page.requests
    assert request.method == b"GET"
    assert request.uri == b"/ready?deep=1"
    assert request.getHeader(b"host") == b"127.0.0.1:9001"
    assert request.getHeader(b"user-agent") == b"lb-health-check"


def test_host_header_from_config(stub: StubTreq, page: HealthPage) -> None:
    """`host` overrides the Host header (virtual-hosted backends)."""
    _result(_probe(_http(stub, host="web.example"), PEER, Clock(), 1.0))
    assert page.requests[0].getHeader(b"host") == b"web.example"


def test_redirect_not_followed(stub: StubTreq, page: HealthPage) -> None:
    """A 302 is the peer's answer: judged by expect_status, never followed."""
    page.code = 302
    result = _result(_probe(_http(stub), PEER, Clock(), 1.0))
    assert result == ProbeResult(False, "HTTP 302")
    assert len(page.requests) == 1


def test_no_answer_times_out_without_waiting(stub: StubTreq, page: HealthPage) -> None:
    """A peer that accepts and never answers fails at exactly `timeout` on the clock, with
    the phase in the detail, and its connection is cut."""
    page.mode = "hang"
    clock = Clock()
    d = _probe(_http(stub, timeout=1.0), PEER, clock, 1.0)
    clock.advance(0.999)
    assert _result(d) is None
    clock.advance(0.001)
    assert _result(d) == ProbeResult(False, "timeout after 1s waiting for response")
    stub.flush()
    assert len(page.lost) == 1  # the server saw the connection go


def test_stalled_body_times_out(stub: StubTreq, page: HealthPage) -> None:
    """Headers arrive but the body stalls: a timeout while reading the body."""
    page.mode = "stall_body"
    clock = Clock()
    d = _probe(_http(stub, timeout=0.5), PEER, clock, 0.5)
    stub.flush()
    assert _result(d) is None
    clock.advance(0.5)
    assert _result(d) == ProbeResult(False, "timeout after 500ms reading body")


def test_body_over_cap_fails(stub: StubTreq, page: HealthPage) -> None:
    """A body beyond the cap (an endless body) is not read to its end: failed, named."""
    page.mode = "flood"
    result = _result(_probe(_http(stub), PEER, Clock(), 1.0))
    assert result == ProbeResult(False, "HTTP 200, response body larger than 64 KiB")


def test_body_up_to_cap_passes(stub: StubTreq, page: HealthPage) -> None:
    """A body of exactly the cap is read and discarded; the check passes."""
    page.body = b"y" * BODY_CAP
    assert _result(_probe(_http(stub), PEER, Clock(), 1.0)) == ProbeResult(True, "HTTP 200")


def test_failing_status_does_not_read_body(stub: StubTreq, page: HealthPage) -> None:
    """A failing status is the verdict even when the body is huge."""
    page.code, page.mode = 503, "flood"
    assert _result(_probe(_http(stub), PEER, Clock(), 1.0)) == ProbeResult(False, "HTTP 503")


# --- HTTP against raw bytes (what twisted.web cannot be made to send) ----------------------


class RawPeer(Protocol):
    """Records the request and sends exactly what the test gives it."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RawExchange:
    """An HTTP probe over a real twisted.web Agent on an in-memory reactor."""

    def __init__(self, address: Address = PEER, **health: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.config = HealthConfig(**health)
        self.probe = HTTPProbe(HTTPClient(Agent(self.reactor)), self.config)
        self.d = _probe(self.probe, address, self.reactor, self.config.timeout)
        self.peer = RawPeer()
        self.pump: Optional[iosim.IOPump] = None

    def connect(self) -> None:
        factory = self.reactor.tcpClients[-1][2]
        client = factory.buildProtocol(None)
        self.pump = iosim.connect(self.peer, iosim.FakeTransport(self.peer, True),
                                  client, iosim.FakeTransport(client, False))
        self.pump.flush()

    def send(self, data: bytes, close: bool = False) -> None:
        assert self.pump is not None
        self.peer.transport.write(data)
        if close:
            self.peer.transport.loseConnection()
        self.pump.flush()


@pytest.mark.parametrize("data, detail", [
    (b"hello there\r\n\r\n", "invalid HTTP response (non-integer status code: 'hello there')"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "invalid HTTP response (wrong number of parts: "
                                 "'SSH-2.0-OpenSSH_9.6')"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "connection closed mid headers"),
    (b"", "connection closed before response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", "HTTP 200, connection closed mid body"),
])
def test_bad_answers(data: bytes, detail: str) -> None:
    """Garbage, a close in the middle of the headers or the body, or no answer at all:
    each a failed check with its own detail."""
    exchange = RawExchange()
    exchange.connect()
    exchange.send(data, close=True)
    assert _result(exchange.d) == ProbeResult(False, detail)


def test_body_ended_by_close_passes() -> None:
    """An HTTP/1.0-style body without length, ended by the peer closing, is complete."""
    exchange = RawExchange()
    exchange.connect()
    exchange.send(b"HTTP/1.0 200 OK\r\n\r\nfine", close=True)
    assert _result(exchange.d) == ProbeResult(True, "HTTP 200")


def test_request_sent_on_the_wire() -> None:
    """The request asks the server to close (probes never pool connections)."""
    exchange = RawExchange(path="/health")
    exchange.connect()
    head = exchange.peer.received.split(b"\r\n")
    assert head[0] == b"GET /health HTTP/1.1"
    assert b"Connection: close" in head and b"Host: 127.0.0.1:9001" in head


def test_ipv6_peer() -> None:
    """An IPv6 peer gets a bracketed URL and Host header (works around treq/hyperlink
    IDNA-encoding IPv6 literals)."""
    exchange = RawExchange(Address("::1", 8080))
    exchange.connect()
    assert b"Host: [::1]:8080" in exchange.peer.received.split(b"\r\n")
    exchange.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert _result(exchange.d) == ProbeResult(True, "HTTP 200")


def test_request_url() -> None:
    """URLs: IPv6 in brackets, host names as they are, the path with its query."""
    assert request_url(Address("::1", 80), "/h?x=1").to_uri().to_text() == \
        "http://[::1]/h?x=1"
    assert request_url(Address("web.internal", 8080), "/h").to_text() == \
        "http://web.internal:8080/h"


def test_connect_never_completes() -> None:
    """No SYN-ACK within the timeout: a connect timeout, and the attempt is abandoned."""
    exchange = RawExchange(timeout=1.0)
    exchange.reactor.advance(1.0)
    assert _result(exchange.d) == ProbeResult(False, "connect timeout after 1s")
    assert exchange.reactor.connectors[-1].stoppedConnecting


def test_connection_refused() -> None:
    """A refused connect is reported as such."""
    exchange = RawExchange()
    factory = exchange.reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(exchange.reactor.connectors[-1],
                                   Failure(error.ConnectionRefusedError()))
    exchange.reactor.advance(0.5)  # HostnameEndpoint notices its last attempt failed
    assert _result(exchange.d) == ProbeResult(False, "connection refused")


# --- TCP -----------------------------------------------------------------------------------


class TCPSetup:
    def __init__(self, timeout: float = 1.0) -> None:
        self.reactor = MemoryReactorClock()
        self.asked: List[Tuple[Address, float]] = []

        def endpoint_for(address: Address, timeout: float) -> Any:
            self.asked.append((address, timeout))
            kind = TCP6ClientEndpoint if address.is_ipv6 else TCP4ClientEndpoint
            return kind(self.reactor, address.host, address.port, timeout=timeout)
        self.probe = TCPProbe(endpoint_for, timeout)


def test_tcp_connect_passes_and_closes() -> None:
    """A TCP check passes once the connection opens, and closes it right away."""
    setup = TCPSetup()
    d = _probe(setup.probe, PEER, setup.reactor, 1.0)
    assert setup.asked == [(PEER, 1.0)]
    assert _result(d) is None
    factory = setup.reactor.tcpClients[-1][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert _result(d) == ProbeResult(True, "connected")
    assert transport.disconnecting


def test_tcp_refused() -> None:
    """A refused TCP check says so."""
    setup = TCPSetup()
    d = _probe(setup.probe, PEER, setup.reactor, 1.0)
    setup.reactor.tcpClients[-1][2].clientConnectionFailed(
        setup.reactor.connectors[-1], Failure(error.ConnectionRefusedError()))
    assert _result(d) == ProbeResult(False, "connection refused")


def test_tcp_timeout_without_waiting() -> None:
    """A TCP check that cannot connect fails at `timeout` on the clock."""
    setup = TCPSetup(timeout=0.25)
    d = _probe(setup.probe, PEER, setup.reactor, 0.25)
    setup.reactor.advance(0.2)
    assert _result(d) is None
    setup.reactor.advance(0.05)
    assert _result(d) == ProbeResult(False, "connect timeout after 250ms")


def test_tcp_endpoint_error() -> None:
    """An endpoint that cannot even start (bad address) is a failed check, not a crash."""
    def broken(address: Address, timeout: float) -> Any:
        raise ValueError("no route for this family")
    d = TCPProbe(broken, 1.0)(PEER)
    assert _result(d) == ProbeResult(False, "no route for this family")


def test_body_reader_lost_without_a_reason_reads_as_closed() -> None:
    """The body reader's ``connectionLost`` defaults its reason to Twisted's
    ``connectionDone`` Failure, as ``Protocol`` does (it was a bare exception, which it could
    not read)."""
    from lb.health.probes import _CappedBody

    body = _CappedBody(BODY_CAP)
    body.connectionLost()
    details: List[Optional[str]] = []
    body.done.addCallback(details.append)
    assert details == ["connection closed"]
