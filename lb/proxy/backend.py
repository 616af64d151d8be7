"""The peer side of a proxied connection: connect with a timeout, hand events back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lb.net import Address, endpoint_for

if TYPE_CHECKING:
    from lb.proxy.frontend import Frontend


@implementer(IHalfCloseableProtocol)
class Backend(Protocol):
    """Forwards everything to its ``Frontend``, which owns the connection pair."""

    def __init__(self, frontend: "Frontend") -> None:
        self.frontend = frontend

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.frontend.from_peer(data)

    def readConnectionLost(self) -> None:
        self.frontend.peer_eof()

    def writeConnectionLost(self) -> None:
        self.frontend.peer_write_closed()

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore
        self.frontend.peer_lost(reason)


class _Once(Factory):
    """Hands the endpoint one pre-built protocol."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def connect(reactor: Any, address: Address, timeout: float, backend: Backend) -> Deferred:
    """Connect ``backend`` to ``address``; the Deferred is cancellable."""
    return endpoint_for(reactor, address, timeout).connect(_Once(backend))
