"""Test helpers that lb's tests (and users') reuse: real-socket backends, config builders,
bounded polling. Nothing here sleeps to wait for a condition."""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer, task
from twisted.internet.interfaces import IHalfCloseableProtocol, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from lb import config as lbconfig


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    """Echoes everything and closes its side only after the client half-closes and every
    echoed byte is flushed (Twisted's plain Echo drops buffered writes on EOF)."""

    transport: ITransport  # connected: Twisted types it Optional for before the connection

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.bytes_received += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self in self.factory.connections:
            self.factory.connections.remove(self)


class EchoFactory(Factory):
    protocol = HalfCloseEcho
    noisy = False

    def __init__(self) -> None:
        self.connections: List[HalfCloseEcho] = []
        self.bytes_received = 0


class NamedServer(Protocol):
    """Answers every connection with its name and closes: shows who served a client."""

    transport: ITransport  # connected: Twisted types it Optional for before the connection

    def connectionMade(self) -> None:
        self.factory.hits += 1
        self.transport.write(self.factory.name.encode() + b"\n")
        self.transport.loseConnection()


class NamedFactory(Factory):
    protocol = NamedServer
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0


class FakePeer:
    """A peer as a balancer sees it: a key, an effective weight and a load (connections or
    requests in flight). Balancer tests use it instead of a whole pool."""

    def __init__(self, key: str, weight: float = 1.0) -> None:
        self.key = key
        self.effective_weight = float(weight)
        self.load = 0

    def __repr__(self) -> str:
        return self.key


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocesses that must be told a port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tcp_pair() -> "tuple[socket.socket, socket.socket]":
    """Two ends of one TCP connection on 127.0.0.1, non-blocking, TCP_NODELAY on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def make_config(listeners: Dict[str, Dict[str, Any]], pools: Dict[str, Dict[str, Any]],
                path: str = "<test>", **top: Any) -> lbconfig.Config:
    """A validated Config from plain dicts (admin bound to an ephemeral port by default)."""
    raw: Dict[str, Any] = {"admin": {"bind": "127.0.0.1:0"}, "listeners": listeners,
                           "pools": pools}
    raw.update(top)
    return lbconfig.check(raw, path=path, environ={})


def poll_until(reactor: Any, condition: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.02, what: str = "condition") -> defer.Deferred[Any]:
    """Fire with the condition's truthy value, or fail once ``timeout`` passes."""
    deadline = reactor.seconds() + timeout

    def check() -> Any:
        value = condition()
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        return task.deferLater(reactor, interval, check)

    return defer.maybeDeferred(check)


def listening_port(service: Any) -> int:
    """The port a started ListenerService (or an IListeningPort) is bound to."""
    port = getattr(service, "port", service)
    number: int = port.getHost().port
    return number


class FakeTCPTransport(StringTransport):
    """A StringTransport with the TCP extras the proxy uses (no-delay, half-close) and
    Twisted's lenient producer unregistering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        StringTransport.__init__(self, *args, **kwargs)
        self.no_delay = False
        self.write_closed = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


# --- the data path in memory: a session's surroundings ------------------------------------


class FakeFront:
    """A session's client side before the join, recording what the session does to it."""

    eof = False

    def __init__(self, has_socket: bool = False) -> None:
        self.socket: Any = object() if has_socket else None
        self.closed = self.aborted = self.detached = False

    def take_pending(self) -> bytes:
        return b""

    def detach(self) -> None:
        self.detached = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class FakeDial:
    """A dial the test answers: ``dials`` lists (address, timeout, first) in order; answer
    the latest with ``connect()`` or ``fail()``."""

    def __init__(self) -> None:
        self.dials: List[Any] = []
        self.cancelled: List[Any] = []
        self._callbacks: List[Any] = []

    def __call__(self, address: Any, timeout: float, first: bytes, connected: Any,
                 failed: Any) -> Any:
        self.dials.append((address, timeout, first))
        self._callbacks.append((connected, failed))
        dial = self

        class Handle:
            def cancel(self) -> None:
                dial.cancelled.append(address)
        return Handle()

    def connect(self, channel: Any = "channel", unsent: bytes = b"") -> None:
        self._callbacks[-1][0](channel, unsent)

    def fail(self, reason: Exception) -> None:
        self._callbacks[-1][1](reason)


class FakeCarrier:
    """A carrier that moves nothing: the test reports its facts to the session."""

    def __init__(self, session: Any, channel: Any, unsent: bytes) -> None:
        self.session = session
        self.channel = channel
        self.unsent = unsent
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.session.carrier_closed("aborted", None, False, False)

    def buffered(self) -> int:
        return 0


class FakeListener:
    """What a session needs from its listener, recording what the session reports: a pool,
    a clock, a ``FakeDial`` and ``FakeCarrier`` joins."""

    def __init__(self, pool: Any, clock: Any, name: str = "l") -> None:
        from types import SimpleNamespace

        self.pool = pool
        self.clock = clock
        self.config = SimpleNamespace(name=name, accept_proxy=False)
        self.pump = None
        self.dial = FakeDial()
        self.carriers: List[FakeCarrier] = []
        self.ended: List[Any] = []  # (session, reason)
        self.connected: List[Any] = []

    def dial_for(self, front: Any) -> FakeDial:
        return self.dial

    def join(self, session: Any, channel: Any, unsent: bytes) -> FakeCarrier:
        carrier = FakeCarrier(session, channel, unsent)
        self.carriers.append(carrier)
        return carrier

    def peer_connected(self, peer: Any) -> None:
        self.connected.append(peer)

    def session_ended(self, session: Any, reason: str) -> None:
        self.ended.append((session, reason))


class RecordingSession:
    """The session's side of the carrier contract (lb/proxy/carriers/__init__.py), recording
    what a carrier reports: bytes each way, FINs, and how the pair closed."""

    def __init__(self, clock: Any) -> None:
        from types import SimpleNamespace

        self.listener = SimpleNamespace(clock=clock, config=SimpleNamespace(
            accept_proxy=False, name="contract"), session_for=self._session_for)
        self.peer = SimpleNamespace(bytes_in=0, bytes_out=0)
        self.last_active = 0.0
        self.bytes_in = self.bytes_out = self.fins = 0
        self.closed: List[Tuple[str, Optional[str], bool, bool]] = []  # carrier_closed's arguments

    def _session_for(self, front: Any, client: Any, destination: Any) -> "RecordingSession":
        return self

    def start(self, pending: bytes = b"") -> None:
        pass  # the test joins the carrier itself

    def moved_in(self, n: int) -> None:
        self.bytes_in += n

    def moved_out(self, n: int) -> None:
        self.bytes_out += n

    def fin_received(self) -> None:
        self.fins += 1

    def carrier_closed(self, kind: str, side: Optional[str], answer_done: bool,
                       request_pending: bool) -> None:
        self.closed.append((kind, side, answer_done, request_pending))

    def front_closed(self, reset: bool = False) -> None:
        pass


class PumpClock(task.Clock):
    """A Clock whose epoll set a ``Pump`` can share (as lb's reactor does): the test runs
    the pump's events itself with ``run_pump()``, one batch at a time."""

    def __init__(self) -> None:
        import select

        super().__init__()
        self.epoll = select.epoll()
        self.handler: Optional[Callable[[Any], None]] = None

    def share_poller(self, handler: Callable[[Any], None]) -> Any:
        self.handler = handler
        return self.epoll

    def run_pump(self) -> int:
        """Hand the pump every event ready now, as one batch; how many there were."""
        events = self.epoll.poll(0)
        if events and self.handler is not None:
            self.handler(events)
        return len(events)
