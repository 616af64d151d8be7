"""The admin HTTP server on ``admin.bind``: status page, JSON API, /metrics, /healthz.

``AdminService(view, reactor, settings)`` serves what the ``IAdminView`` the root hands it
shows, binds when started, follows reloads (the root calls ``reconfigure``: it rebinds when
``admin.bind`` changes; the token is read from the running config on every request, so a
new token applies at once) and closes its socket and open HTTP connections on stop.

Apart from the successful answers of the status page (HTML), /metrics and /healthz (text),
every answer is JSON ``{"error": ...}``, down to requests Twisted's HTTP server would answer
with its own HTML or bare pages, or not at all.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import EncodingResourceWrapper, IResource, Resource
from twisted.web.server import GzipEncoderFactory, Request

from lb.admin.api import MAX_BODY, ApiError, ApiResource, check_body_size, write_json
from lb.admin.metrics import MetricsResource, make_registry
from lb.admin.status import StatusPage
from lb.admin.view import IAdminView
from lb.config import Address, AdminConfig

log = Logger()


class LimitedRequest(Request):
    """The admin server's request: it stops buffering a body past MAX_BODY (the resources
    then answer 413), so a huge upload cannot fill memory or disk; it leaves the body to
    the API instead of parsing forms; and its failures answer JSON like the rest."""

    body_too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY:
            self.body_too_large = True
            length = 0
        Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        content = self.content
        if self.body_too_large or content is None:
            return
        if content.tell() + len(data) > MAX_BODY:
            self.body_too_large = True
            content.seek(0)
            content.truncate()
            return
        Request.handleContentChunk(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Twisted's version also parses urlencoded and multipart POST bodies into ``args``,
        answering a bad multipart body with a bare 400 and raising (dropping the connection
        unanswered) on some it cannot read; the API reads JSON bodies itself, so only the
        query string becomes ``args`` here."""
        assert self.content is not None, "gotLength made it"
        self.content.seek(0, 0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path, _, query = path.partition(b"?")
        self.args = http.parse_qs(query, 1) if query else {}
        self.process()  # type: ignore[no-untyped-call]

    def processingFailed(self, reason: Failure) -> None:
        """A failure outside the resources' own handling (finding the resource, say): a
        logged JSON 500 instead of Twisted's HTML page."""
        log.failure("admin: {method} {uri} failed", reason,
                    method=self.method.decode("latin-1"), uri=self.uri.decode("latin-1"))
        if self.startedWriting:
            self.channel.loseConnection()  # half an answer is out: the client sees it cut
            return
        body = write_json(self, 500, {"error": "internal error (see the balancer's log)"})
        self.setHeader(b"content-length", b"%d" % len(body))  # type: ignore[no-untyped-call]
        self.write(body)  # type: ignore[no-untyped-call]
        self.finish()  # type: ignore[no-untyped-call]


def _raw_json(status: int, reason: bytes, message: str, head: bool = False) -> bytes:
    """A whole JSON error response for the channel to write when no request object can
    answer (the request could not be read), without its body for a HEAD request; the
    connection closes after it."""
    body = json.dumps({"error": message}).encode("utf-8") + b"\n"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (status, reason, len(body))
            + (b"" if head else body))


class AdminChannel(http.HTTPChannel):
    """Twisted's HTTP channel with JSON answers where it would answer a bare 400 (a request
    it cannot parse), close without a word (a line over its limit) or time out a request
    that stopped arriving (408)."""

    transport: ITransport  # connected: Twisted types it Optional for before the connection

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        # HTTPChannel keeps a request's method in _command from its request line on
        head = getattr(self, "_command", None) == b"HEAD"
        self.transport.write(_raw_json(status, reason, message, head))
        self.loseConnection()  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's one exit for requests it cannot frame: request line, headers, lengths,
        # chunks, or a head over totalHeadersSize
        self._refuse(400, b"Bad Request", f"malformed HTTP request: bad request line, "
                                          f"header, length or chunk, or a request head over "
                                          f"{self.totalHeadersSize} bytes")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(400, b"Bad Request", f"request line or header line too long (limit "
                                          f"{self.MAX_LENGTH} bytes)")

    def timeoutConnection(self) -> None:
        # The timeout runs while no request is being answered: with a request begun, the
        # client stopped sending it midway (say a Content-Length larger than its body).
        if self.requests:
            head = getattr(self, "_command", None) == b"HEAD"
            self.transport.write(_raw_json(
                408, b"Request Timeout", f"the request did not arrive in full within "
                                         f"{self.timeOut:g}s", head))
        http.HTTPChannel.timeoutConnection(self)


class GetOnly(Resource):
    """A page of the admin site that is only read (status page, /metrics, /healthz): GET,
    and HEAD like GET; any other method, a path below it or a body over the limit answers
    JSON like the API, and so does a failure while rendering it."""

    isLeaf = True
    methods = ("GET", "HEAD")

    def __init__(self, page: IResource) -> None:
        Resource.__init__(self)
        self.page = page

    def render(self, request: Request) -> bytes:
        try:
            if request.postpath not in ([], [b""]):
                return not_found(request)
            if request.method.decode("latin-1") not in self.methods:
                allowed = ", ".join(self.methods)
                return write_json(request, 405, {"error": (
                    f"method {request.method.decode('latin-1')} is not allowed on "
                    f"{_path(request)} (allowed: {allowed})")}, {"Allow": allowed})
            check_body_size(request)
            page: bytes = self.page.render(request)  # these pages answer at once
            return page
        except ApiError as e:
            return write_json(request, e.status, {"error": e.message}, e.headers)
        except Exception:
            log.failure("admin: rendering {path} failed", path=_path(request))
            return write_json(request, 500, {"error": "internal error (see the balancer's "
                                                      "log)"})


class Healthz(Resource):
    """``GET /healthz`` for an outer load balancer or supervisor: 200 while every listener
    accepts, 503 naming the listeners that do not (their socket was closed under lb) and
    503 once shutdown has begun, so clients are sent elsewhere."""

    isLeaf = True

    def __init__(self, view: IAdminView) -> None:
        Resource.__init__(self)
        self.view = view

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self.view.stopping():
            request.setResponseCode(503)
            return b"stopping\n"
        down = [f"listener {listener.name} ({listener.address}) is not accepting\n"
                for listener in self.view.listeners() if not listener.accepting]
        if down:
            request.setResponseCode(503)
            return "".join(down).encode("utf-8")
        return b"ok\n"


def _path(request: Request) -> str:
    """The request's path for an error message (it may not be UTF-8)."""
    return request.path.decode("utf-8", "replace")


def not_found(request: Request) -> bytes:
    """The JSON 404 of every path the admin server does not have."""
    return write_json(request, 404, {"error": f"no such path {_path(request)} (try /, /api, "
                                              "/metrics or /healthz)"})


class NotFound(Resource):
    """Unknown paths answer JSON like the rest of the API, whatever the method."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return not_found(request)


class AdminRoot(Resource):
    """``/`` is the status page; ``/api``, ``/metrics``, ``/healthz`` below it."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound()  # type: ignore[no-untyped-call]


def build_resource(view: IAdminView, clock: IReactorTime,
                   registry: Optional[CollectorRegistry] = None) -> Resource:
    """The whole admin resource tree over ``view``; tests call it through StubTreq."""
    registry = registry if registry is not None else make_registry(view)
    tree = AdminRoot()  # type: ignore[no-untyped-call]
    tree.putChild(b"", GetOnly(StatusPage(view, clock)))
    tree.putChild(b"api", ApiResource(view))
    # the encoder is taken from the leaf Twisted renders, so the wrapper goes outside
    tree.putChild(b"metrics", EncodingResourceWrapper(GetOnly(MetricsResource(registry)),
                                                      [GzipEncoderFactory()]))
    tree.putChild(b"healthz", GetOnly(Healthz(view)))
    return tree


class AdminSite(server.Site):
    """The admin site: JSON errors down to the HTTP channel, limited request bodies, and
    no access log line per request (the status page polls; the API logs every change)."""

    noisy = False
    # plain HTTP/1.1 (no TLS, so no HTTP/2 to negotiate); Twisted types this as a factory of
    # its HTTP/1-or-2 wrapper only
    protocol = AdminChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest

    def log(self, request: Any) -> None:
        pass


class Connections(WrappingFactory):
    """Wraps the site to know its open connections (browsers keep them alive), so
    stopping the service can close them."""

    noisy = False

    def close_all(self) -> None:
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.loseConnection()


class AdminService(Service):
    """Serves the admin site over ``view`` on ``settings.bind`` while running."""

    log = Logger()
    name: Optional[str] = "admin"

    def __init__(self, view: IAdminView, reactor: Any, settings: AdminConfig) -> None:
        """``reactor`` provides IReactorTCP and IReactorTime."""
        self.reactor = reactor
        self.registry = make_registry(view)
        self.resource = build_resource(view, reactor, self.registry)
        self.site = AdminSite(self.resource, reactor=reactor)  # type: ignore[no-untyped-call]
        self.connections = Connections(self.site)  # type: ignore[no-untyped-call]
        self.bind: Address = settings.bind
        self.port: Any = None  # the IListeningPort while running
        self._token = settings.token  # for the log lines; requests read the running config
        self._lock = defer.DeferredLock()  # rebinds and stop take turns

    def _listen(self, bind: Address) -> Any:
        return self.reactor.listenTCP(bind.port, self.connections, interface=bind.host)

    def address(self) -> str:
        """The bound ``host:port`` (the real port when admin.bind asks for port 0)."""
        if self.port is None:
            return str(self.bind)
        host = self.port.getHost()
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"

    def listen(self) -> None:
        """Bind now (the root binds every socket before the service tree starts)."""
        if self.port is None:
            self.port = self._listen(self.bind)

    def startService(self) -> None:
        self.listen()
        Service.startService(self)
        self.log.info("admin: status page, API and /metrics on http://{address}/{auth}",
                      address=self.address(),
                      auth="" if self._token is None else " (changes need the token)")

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)

        def close() -> defer.Deferred[None]:
            port, self.port = self.port, None
            self.connections.close_all()
            if port is None:
                return defer.succeed(None)
            return defer.maybeDeferred(port.stopListening)
        return self._lock.run(close)  # after a rebind in flight

    # --- reloads ----------------------------------------------------------------------------

    def reconfigure(self, settings: AdminConfig) -> defer.Deferred[None]:
        """Follow a reload (the root calls this with the new ``admin`` section): note a
        token change (requests read the running config's token) and move to a new bind.
        A new address that cannot be bound is logged and the old one stays. Fires when
        done; never fails."""
        if settings.token != self._token:
            self.log.info("admin: token {what}", what=(
                "removed: changes are open" if settings.token is None else
                "set: changes need it" if self._token is None else "changed"))
            self._token = settings.token
        if not self.running:
            self.bind = settings.bind
            return defer.succeed(None)
        bind = settings.bind
        d = self._lock.run(lambda: defer.ensureDeferred(self._rebind(bind)))

        def failed(failure: Failure) -> None:
            self.log.failure("admin: rebinding to {bind} failed", failure, bind=bind)
        return d.addErrback(failed)

    async def _rebind(self, bind: Address) -> None:
        old_port, old_bind = self.port, self.bind
        if bind == old_bind or not self.running or old_port is None:
            return
        try:
            new_port = self._listen(bind)
        except CannotListenError as e:
            if old_port is None or bind.port != old_bind.port:
                self.log.error("admin: cannot listen on {bind} ({error}); staying on "
                               "{old}", bind=bind, error=e.socketError, old=self.address())
                return
            # the same port on another address (say 127.0.0.1 -> 0.0.0.0): let go first
            self.port = None
            await defer.maybeDeferred(old_port.stopListening)
            try:
                new_port = self._listen(bind)
            except CannotListenError as e2:
                self.port = self._listen(old_bind)
                self.log.error("admin: cannot listen on {bind} ({error}); back on {old}",
                               bind=bind, error=e2.socketError, old=self.address())
                return
            old_port = None
        self.port, self.bind = new_port, bind
        if old_port is not None:
            await defer.maybeDeferred(old_port.stopListening)
        self.log.info("admin: now on http://{address}/", address=self.address())
