"""Test helpers that lb's tests (and users') reuse: real-socket backends, config builders,
bounded polling. Nothing here sleeps to wait for a condition."""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from lb import config as lbconfig


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    """Echoes everything and closes its side only after the client half-closes and every
    echoed byte is flushed (Twisted's plain Echo drops buffered writes on EOF)."""

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
        return s.getsockname()[1]


def make_config(listeners: Dict[str, Dict[str, Any]], pools: Dict[str, Dict[str, Any]],
                path: str = "<test>", **top: Any) -> lbconfig.Config:
    """A validated Config from plain dicts (admin bound to an ephemeral port by default)."""
    raw: Dict[str, Any] = {"admin": {"bind": "127.0.0.1:0"}, "listeners": listeners,
                           "pools": pools}
    raw.update(top)
    return lbconfig.check(raw, path=path, environ={})


def poll_until(reactor: Any, condition: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.02, what: str = "condition") -> defer.Deferred:
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
    port: Optional[Any] = getattr(service, "port", service)
    return port.getHost().port  # type: ignore[union-attr]


class FakeTCPTransport(StringTransport):
    """A StringTransport with the TCP extras the proxy uses (no-delay, half-close) and
    Twisted's lenient producer unregistering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.no_delay = False
        self.write_closed = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None
