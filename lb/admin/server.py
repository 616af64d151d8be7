"""The admin HTTP server on ``admin.bind``: status page, JSON API, /metrics, /healthz.

``AdminService(root)`` binds when started, follows reloads (rebinding when ``admin.bind``
changes; the token is read from the running config on every request, so a new token applies
at once) and closes its socket and open HTTP connections on stop.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import EncodingResourceWrapper, IResource, Resource
from twisted.web.server import GzipEncoderFactory, Request

from lb.admin.api import MAX_BODY, ApiResource, write_json
from lb.admin.metrics import MetricsResource, make_registry
from lb.admin.status import StatusPage
from lb.config import Address, Config


class LimitedRequest(Request):
    """A request that stops buffering its body past MAX_BODY (the API then answers 413),
    so a huge upload cannot fill memory or disk."""

    body_too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        content = self.content
        if self.body_too_large or content is None:
            return
        if content.tell() + len(data) > MAX_BODY:
            self.body_too_large = True
            content.seek(0)
            content.truncate()
            return
        super().handleContentChunk(data)


class Healthz(Resource):
    """``GET /healthz``: 200 while the balancer runs, 503 once it is shutting down (so an
    outer load balancer or supervisor stops sending it clients)."""

    isLeaf = True

    def __init__(self, root: Any) -> None:
        super().__init__()
        self.root = root

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self.root.stopping:
            request.setResponseCode(503)
            return b"stopping\n"
        return b"ok\n"


class NotFound(Resource):
    """Unknown paths answer JSON like the rest of the API."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return write_json(request, 404, {"error": f"no such path {path} (try /, /api, "
                                                  "/metrics or /healthz)"})


class AdminRoot(Resource):
    """``/`` is the status page; ``/api``, ``/metrics``, ``/healthz`` below it."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound()


def build_resource(root: Any, registry: Any = None, clock: Any = None) -> Resource:
    """The whole admin resource tree for ``root`` (the LBService); tests call it through
    StubTreq."""
    clock = clock if clock is not None else root.reactor
    registry = registry if registry is not None else make_registry(root)
    tree = AdminRoot()
    tree.putChild(b"", StatusPage(root, clock))
    tree.putChild(b"api", ApiResource(root))
    tree.putChild(b"metrics", EncodingResourceWrapper(MetricsResource(registry),
                                                      [GzipEncoderFactory()]))
    tree.putChild(b"healthz", Healthz(root))
    return tree


class AdminSite(server.Site):
    """The admin site: limits request bodies and writes no access log line per request
    (the status page polls; the API logs every change itself)."""

    noisy = False
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
    """Serves the admin site on ``root.config.admin.bind`` while running."""

    log = Logger()
    name: Optional[str] = "admin"  # type: ignore[assignment]

    def __init__(self, root: Any, reactor: Any = None) -> None:
        self.root = root
        self.reactor = reactor if reactor is not None else root.reactor
        self.registry = make_registry(root)
        self.resource = build_resource(root, self.registry, self.reactor)
        self.site = AdminSite(self.resource, reactor=self.reactor)
        self.connections = Connections(self.site)
        self.bind: Address = root.config.admin.bind
        self.port: Any = None  # the IListeningPort while running
        self._token = root.config.admin.token
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
        super().startService()
        if self.reconfigure_hook not in self.root.global_hooks:
            self.root.global_hooks.append(self.reconfigure_hook)
        self.log.info("admin: status page, API and /metrics on http://{address}/{auth}",
                      address=self.address(),
                      auth="" if self._token is None else " (changes need the token)")

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self.reconfigure_hook in self.root.global_hooks:
            self.root.global_hooks.remove(self.reconfigure_hook)

        def close() -> defer.Deferred:
            port, self.port = self.port, None
            self.connections.close_all()
            if port is None:
                return defer.succeed(None)
            return defer.maybeDeferred(port.stopListening)
        return self._lock.run(close)  # after a rebind in flight

    # --- reloads ----------------------------------------------------------------------------

    def reconfigure_hook(self, root: Any, old: Config, new: Config) -> None:
        """The ``LBService.global_hooks`` form of ``reconfigure`` (added while running)."""
        self.reconfigure(old, new)

    def reconfigure(self, old: Config, new: Config) -> defer.Deferred:
        """Follow a reload: note a token change (requests read the running config's token)
        and move to a new ``admin.bind``. A new address that cannot be bound is logged and
        the old one stays. Fires when done; never fails."""
        if new.admin.token != self._token:
            self.log.info("admin: token {what}", what=(
                "removed: changes are open" if new.admin.token is None else
                "set: changes need it" if self._token is None else "changed"))
            self._token = new.admin.token
        if not self.running:
            self.bind = new.admin.bind
            return defer.succeed(None)
        bind = new.admin.bind
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
