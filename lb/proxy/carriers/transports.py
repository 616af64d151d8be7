"""The transports carrier: a client and its peer joined over two Twisted transports.

The path for anything that must see the bytes before the join (a PROXY header from the
client), for peers given by host name (Twisted resolves and connects), and for reactors other
than lb's own (no pump). Each transport is the other's streaming producer, so a slow side
throttles the fast one (Twisted's ``portforward`` does the same), and a half-close passes
through: a FIN from one side becomes ``loseWriteConnection()`` on the other.

``TransportClient`` is the client's protocol: before the join it is the session's front
(reads a PROXY header, holds what arrives early, notices a client that leaves); after it,
it hands every event to the ``TransportJoin``. ``PeerProtocol`` is the peer's side, dialled
through an endpoint by ``connect``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple
from typing import Protocol as TypingProtocol

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from lb.net import Address, endpoint_for
from lb.proxy import proxyprotocol
from lb.proxy.carriers import CarrierEvents


class FrontSession(CarrierEvents, TypingProtocol):
    """What a ``TransportClient`` tells its session before the join."""

    end_reason: Optional[str]
    client: Any
    destination: Any
    attempt: Any

    def start(self, pending: bytes = b"") -> None: ...

    def front_closed(self, reset: bool = False) -> None: ...


class FrontHost(TypingProtocol):
    """What a ``TransportClient`` needs from its listener."""

    config: Any  # .accept_proxy

    def session_for(self, front: Any, client: Any, destination: Any) -> Any: ...


class ITCPStream(ITCPTransport, IConsumer, IPushProducer):
    """What the carrier uses of a connected Twisted TCP transport (``tcp.Server`` and
    ``tcp.Client`` have all of it, ``lb.testing.FakeTCPTransport`` what the tests use);
    Twisted's types know a protocol's transport only as an optional ``ITransport``."""

    def stopReading() -> None:
        """Stop watching the socket for reading (``abstract.FileDescriptor``)."""

    def stopWriting() -> None:
        """Stop watching the socket for writing (``abstract.FileDescriptor``)."""


def _clean(reason: Failure) -> bool:
    return reason.check(error.ConnectionDone) is not None


@implementer(IHalfCloseableProtocol)
class TransportClient(Protocol):
    """A client accepted as a Twisted transport (``listenTCP``)."""

    transport: ITCPStream  # connected: Twisted makes the protocol with its transport

    def __init__(self, listener: FrontHost) -> None:
        self.listener = listener
        self.session: Optional[FrontSession] = None
        self.join: Optional["TransportJoin"] = None
        self.eof = False  # the client sent FIN before the join
        self._header = proxyprotocol.HeaderReader() if listener.config.accept_proxy else None
        self._pending: List[bytes] = []

    # the front, as the session sees it

    @property
    def socket(self) -> Any:
        return getattr(self.transport, "socket", None)

    def detach(self) -> None:
        """The pump takes the socket: Twisted stops watching it."""
        self.transport.stopReading()
        self.transport.stopWriting()

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    # Twisted's events

    def connectionMade(self) -> None:
        transport = self.transport
        transport.setTcpNoDelay(True)
        self.session = self.listener.session_for(self, transport.getPeer(),
                                                 transport.getHost())
        if self._header is None:
            transport.pauseProducing()
            self.session.start()

    def dataReceived(self, data: bytes) -> None:
        join = self.join
        if join is not None:
            join.from_client(data)
            return
        if self._header is not None:
            self._read_header(data)
        elif data:
            self._pending.append(data)  # arrived before the pause took effect

    def _read_header(self, data: bytes) -> None:
        session = self.session
        assert session is not None and self._header is not None
        try:
            info, rest = self._header.feed(data)
        except proxyprotocol.InvalidProxyHeader:
            session.end_reason = "bad_proxy_header"
            self.transport.abortConnection()
            return
        if info is None:
            return
        self._header = None
        session.client = proxyprotocol.address_of(info) or session.client
        if info.destination is not None:
            session.destination = info.destination
        self.transport.pauseProducing()
        session.start(rest)

    def take_pending(self) -> bytes:
        pending, self._pending = b"".join(self._pending), []
        return pending

    def readConnectionLost(self) -> None:
        if self.join is not None:
            self.join.client_eof()
            return
        if self.eof:
            return
        self.eof = True
        if self.session is not None and self.session.attempt is None:
            self.transport.loseConnection()  # EOF inside a PROXY header

    def writeConnectionLost(self) -> None:
        if self.join is not None:
            self.join.client_write_closed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.join is not None:
            self.join.client_lost(reason)
        elif self.session is not None:
            self.session.front_closed(reset=not _clean(reason))


@implementer(IHalfCloseableProtocol)
class PeerProtocol(Protocol):
    """The peer's side; every event goes to its join."""

    join: Optional["TransportJoin"] = None
    transport: ITCPStream  # connected: the endpoint makes the protocol with its transport

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        assert self.join is not None, "joined as it connected"
        self.join.from_peer(data)

    def readConnectionLost(self) -> None:
        assert self.join is not None, "joined as it connected"
        self.join.peer_eof()

    def writeConnectionLost(self) -> None:
        assert self.join is not None, "joined as it connected"
        self.join.peer_write_closed()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.join is not None:
            self.join.peer_lost(reason)


class _Once(Factory):
    """Hands the endpoint one pre-built protocol."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def connect(reactor: Any, address: Address, timeout: float, first: bytes,
            connected: Callable[[PeerProtocol, bytes], None],
            failed: Callable[[Failure], None]) -> Deferred[None]:
    """Dial a peer through a Twisted endpoint (the Deferred is the cancellable handle);
    ``connected`` gets the protocol and ``first``, which the join writes."""
    protocol = PeerProtocol()
    d = endpoint_for(reactor, address, timeout).connect(_Once(protocol))
    return d.addCallbacks(lambda _: connected(protocol, first), failed)


class TransportJoin:
    """Two transports, each the other's producer; half-closes passed through."""

    __slots__ = ("session", "client", "peer", "client_eof_seen", "client_write_closed_",
                 "peer_eof_seen", "peer_write_closed_", "client_gone", "peer_gone", "fact",
                 "clock")

    def __init__(self, session: CarrierEvents, client: TransportClient, peer: PeerProtocol,
                 first: bytes, clock: Any) -> None:
        self.session = session
        self.client = client
        self.peer = peer
        self.clock = clock
        self.client_eof_seen = self.client_write_closed_ = False
        self.peer_eof_seen = self.peer_write_closed_ = False
        self.client_gone = self.peer_gone = False
        self.fact: Optional[Tuple[str, Optional[str]]] = None  # (kind, side): first failure
        client.join = peer.join = self
        ct, pt = client.transport, peer.transport
        if first:
            pt.write(first)
        pt.registerProducer(ct, True)
        ct.registerProducer(pt, True)
        if client.eof:
            self.client_eof()
        else:
            ct.resumeProducing()

    # client → peer

    def from_client(self, data: bytes) -> None:
        self.session.last_active = self.clock.seconds()
        self.session.moved_in(len(data))
        self.peer.transport.write(data)

    def client_eof(self) -> None:
        if self.client_eof_seen:
            return
        self.client_eof_seen = True
        self.session.fin_received()
        if not self.peer_gone:
            pt = self.peer.transport
            pt.unregisterProducer()
            pt.loseWriteConnection()
        self._client_done()

    def client_write_closed(self) -> None:
        self.client_write_closed_ = True
        self._client_done()

    def _client_done(self) -> None:
        if self.client_eof_seen and self.client_write_closed_:
            self.client.transport.loseConnection()

    def client_lost(self, reason: Failure) -> None:
        self.client_gone = True
        clean = _clean(reason)
        if not clean and self.fact is None:
            self.fact = ("reset", "client")
        if not self.peer_gone:
            if clean:
                self.peer.transport.loseConnection()
            else:
                self.peer.transport.abortConnection()
        self._maybe_closed()

    # peer → client

    def from_peer(self, data: bytes) -> None:
        self.session.last_active = self.clock.seconds()
        self.session.moved_out(len(data))
        self.client.transport.write(data)

    def peer_eof(self) -> None:
        if self.peer_eof_seen:
            return
        self.peer_eof_seen = True
        self.session.fin_received()
        if not self.client_gone:
            ct = self.client.transport
            ct.unregisterProducer()
            ct.loseWriteConnection()
        self._peer_done()

    def peer_write_closed(self) -> None:
        self.peer_write_closed_ = True
        self._peer_done()

    def _peer_done(self) -> None:
        if self.peer_eof_seen and self.peer_write_closed_:
            self.peer.transport.loseConnection()

    def peer_lost(self, reason: Failure) -> None:
        self.peer_gone = True
        if not _clean(reason) and self.fact is None:
            self.fact = ("reset", "peer")
        if not self.client_gone:
            self.client.transport.loseConnection()  # flush what the peer sent, then close
        self._maybe_closed()

    # both

    def _maybe_closed(self) -> None:
        if self.client_gone and self.peer_gone:
            kind, side = self.fact or ("done", None)
            peer_buffer = _buffered(self.peer.transport)
            self.session.carrier_closed(kind, side, self.peer_eof_seen, peer_buffer > 0)

    def abort(self) -> None:
        self.fact = ("aborted", None)
        if not self.peer_gone:
            self.peer.transport.abortConnection()
        if not self.client_gone:
            self.client.transport.abortConnection()

    def buffered(self) -> int:
        return _buffered(self.client.transport) + _buffered(self.peer.transport)


def _buffered(transport: Any) -> int:
    """Bytes a Twisted transport holds for writing."""
    if transport is None or not hasattr(transport, "dataBuffer"):
        return 0
    held: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return held
