"""Active health probes: one attempt against one peer, ending in a verdict with a detail.

A probe is a callable ``probe(address) -> Deferred[ProbeResult]``. It never fails: every
error a peer can cause (refused, reset, garbage, a body that never ends) becomes
``ProbeResult(False, detail)`` with a short detail that the status page and logs show
(``HTTP 503``, ``connection refused``, ``timeout after 1s waiting for response``).

Timeouts are the caller's: the monitor cancels the Deferred after ``timeout`` on its clock
and the probe turns the cancellation into a ``timeout after ...`` verdict naming the phase
it was in. So nothing here reads the time or imports a reactor; the HTTP probe talks through
an injected treq client (tests use ``treq.testing.StubTreq``), the TCP probe through an
injected endpoint factory.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, cast

from hyperlink import EncodedURL
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import ParseError, ResponseFailed, ResponseNeverReceived
from twisted.web.client import HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory

from lb.config import HealthConfig
from lb.net import Address, describe_connect_failure, failure_message, format_seconds

BODY_CAP = 64 * 1024  # bytes of a check response body read (and discarded) at most
USER_AGENT = b"lb-health-check"

EndpointFactory = Callable[[Address, float], IStreamClientEndpoint]


class ProbeResult(NamedTuple):
    ok: bool
    detail: str


Probe = Callable[[Address], "Deferred[ProbeResult]"]


def _is_cancel(failure: Failure) -> bool:
    """Cancelled by the caller (the HTTP client wraps a cancel while waiting for the
    response in ``ResponseNeverReceived``)."""
    if failure.check(CancelledError, error.ConnectingCancelledError):
        return True
    reasons = _reasons(failure) if failure.check(ResponseNeverReceived, ResponseFailed) else []
    return any(r.check(CancelledError) for r in reasons)


def _reasons(failure: Failure) -> List[Failure]:
    """The failures a ``ResponseFailed``/``ResponseNeverReceived`` wraps."""
    reasons = getattr(failure.value, "reasons", None) or []
    return [r for r in reasons if isinstance(r, Failure)]


def describe_http_error(failure: Failure, timeout: float, phase: str) -> str:
    """A short, precise detail for an HTTP exchange that did not produce a response."""
    if failure.check(ResponseNeverReceived):
        reasons = _reasons(failure)
        for reason in reasons:
            if reason.check(ParseError):
                return f"invalid HTTP response ({_parse_error(reason)})"
        if any(r.check(error.ConnectionDone) for r in reasons):
            return "connection closed before response"
        if any(r.check(error.ConnectionLost) for r in reasons):
            return "connection reset before response"
        return f"no response ({failure_message(reasons[0]) if reasons else 'unknown reason'})"
    if failure.check(ResponseFailed):
        reasons = _reasons(failure)
        for reason in reasons:
            if reason.check(ParseError):
                return f"invalid HTTP response ({_parse_error(reason)})"
        if any(r.check(error.ConnectionDone, error.ConnectionLost,
                       http._DataLoss) for r in reasons):
            return f"connection closed mid {phase}"
        return f"response failed ({failure_message(reasons[0]) if reasons else 'unknown reason'})"
    return describe_connect_failure(failure, timeout)


def _parse_error(failure: Failure) -> str:
    value = failure.value
    args: Sequence[object] = getattr(value, "args", ())
    what = str(args[0]) if args else "parse error"
    if len(args) > 1:
        data = args[1]
        if isinstance(data, bytes):
            data = data[:40].decode("ascii", "backslashreplace")
        what = f"{what}: {str(data)[:40]!r}"
    return what


def _producer(transport: Optional[ITransport]) -> IPushProducer:
    """A response body's transport, which IResponse.deliverBody says provides IPushProducer
    (Twisted types a protocol's transport as an optional ITransport)."""
    return cast(IPushProducer, transport)


class _CappedBody(Protocol):
    """Reads a response body up to ``cap`` bytes and throws it away; fires ``done`` with
    None when the body ended, or with a detail string when it could not be read."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.done: Deferred[Optional[str]] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Optional[str]]) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            _producer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.cap and not self.done.called:
            self.done.callback(f"response body larger than {self.cap // 1024} KiB")
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, http.PotentialDataLoss):
            self.done.callback(None)  # PotentialDataLoss: a body delimited by close
        else:
            self.done.callback(describe_http_error(reason, 0, "body"))


class _Discard(Protocol):
    """Takes a body nobody needs: stop the transfer at once."""

    def connectionMade(self) -> None:
        _producer(self.transport).stopProducing()


class _IPLiteralURL(EncodedURL):
    """hyperlink's ``to_uri`` (which treq calls on every URL) IDNA-encodes the host, and
    that fails for IPv6 literals (python-hyper/hyperlink#68, #188): leave the host alone."""

    def to_uri(self) -> EncodedURL:
        uri = EncodedURL.from_text(self.to_text()).replace(host="ip.invalid").to_uri()
        return uri.replace(host=self.host)


def request_url(address: Address, path: str) -> EncodedURL:
    """The check URL for a peer (an IPv6 host in brackets)."""
    host = f"[{address.host}]" if address.is_ipv6 else address.host
    url_type = _IPLiteralURL if address.is_ip else EncodedURL
    return url_type.from_text(f"http://{host}:{address.port}{path}")


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False  # Twisted logs two lines per connection otherwise: one per probe


class QuietHTTPConnectionPool(HTTPConnectionPool):
    """A connection pool for probes that does not log every connection it opens."""

    _factory = _QuietHTTP11ClientFactory


class HTTPProbe:
    """GET ``path`` from a peer; healthy when the status is in ``expect_status`` and the
    body (read up to ``BODY_CAP`` and discarded) arrives whole."""

    def __init__(self, client: Any, config: HealthConfig, body_cap: int = BODY_CAP) -> None:
        self.client = client  # a treq HTTPClient (or StubTreq)
        self.config = config
        self.body_cap = body_cap

    def headers(self, address: Address) -> Dict[bytes, List[bytes]]:
        host = self.config.host or str(address)
        return {b"Host": [host.encode("idna" if not host.isascii() else "ascii")],
                b"User-Agent": [USER_AGENT], b"Accept": [b"*/*"]}

    def __call__(self, address: Address) -> "Deferred[ProbeResult]":
        return Deferred.fromCoroutine(self._run(address))

    async def _run(self, address: Address) -> ProbeResult:
        timeout = self.config.timeout
        phase = "headers"
        try:
            response = await self.client.get(
                request_url(address, self.config.path), headers=self.headers(address),
                allow_redirects=False, unbuffered=True)
            code = response.code
            if not self.config.status_ok(code):
                response.deliverBody(_Discard())
                return ProbeResult(False, f"HTTP {code}")
            phase = "body"
            body = _CappedBody(self.body_cap)
            response.deliverBody(body)
            problem = await body.done
        except Exception:
            failure = Failure()
            if _is_cancel(failure):
                if failure.check(error.ConnectingCancelledError):
                    return ProbeResult(False,
                                       f"connect timeout after {format_seconds(timeout)}")
                waiting = "waiting for response" if phase == "headers" else "reading body"
                return ProbeResult(False,
                                   f"timeout after {format_seconds(timeout)} {waiting}")
            return ProbeResult(False, describe_http_error(failure, timeout, phase))
        if problem is not None:
            return ProbeResult(False, f"HTTP {code}, {problem}")
        return ProbeResult(True, f"HTTP {code}")


class _Connected(Protocol):
    """Just connects: the probe closes it as soon as it is up."""

    transport: ITransport  # connected: the endpoint makes it with its transport


class _ConnectOnly(Factory):
    protocol = _Connected
    noisy = False  # no "Starting factory" line per probe


class TCPProbe:
    """Healthy when a TCP connection to the peer opens within the timeout; it is closed at
    once (HAProxy's plain ``check``)."""

    def __init__(self, endpoint_for: EndpointFactory, timeout: float) -> None:
        self.endpoint_for = endpoint_for
        self.timeout = timeout

    def __call__(self, address: Address) -> "Deferred[ProbeResult]":
        return Deferred.fromCoroutine(self._run(address))

    async def _run(self, address: Address) -> ProbeResult:
        try:
            endpoint = self.endpoint_for(address, self.timeout)
            protocol = await endpoint.connect(_ConnectOnly())
        except Exception:
            failure = Failure()
            if _is_cancel(failure):
                return ProbeResult(False,
                                   f"connect timeout after {format_seconds(self.timeout)}")
            return ProbeResult(False, describe_connect_failure(failure, self.timeout))
        assert isinstance(protocol, _Connected), "what _ConnectOnly builds"
        protocol.transport.loseConnection()
        return ProbeResult(True, "connected")


def unexpected(failure: Failure) -> ProbeResult:
    """A probe that broke instead of answering (a bug, not the peer's fault)."""
    return ProbeResult(False, f"check error: {failure_message(failure)}")
