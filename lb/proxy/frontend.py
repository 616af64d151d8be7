"""The client side of a proxied connection, which owns the pair.

Per client: pause reading, ask the pool for a peer, connect (retrying other peers while no
byte has been sent), then join the two sides so a slow side throttles the fast one and
half-closes pass through in both directions: on an epoll reactor the pump (``pump.py``) takes
both sockets; otherwise the two Twisted transports become each other's streaming producers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lb.interfaces import IClosable, PickContext
from lb.peer import Peer
from lb.proxy import proxyprotocol
from lb.net import describe_connect_failure, host_port
from lb.proxy.backend import Backend, connect

if TYPE_CHECKING:
    from lb.proxy.listener import Listener


_NOTHING: frozenset = frozenset()


@implementer(IHalfCloseableProtocol, IClosable)
class Frontend(Protocol):
    log = Logger()

    def __init__(self, listener: "Listener") -> None:
        self.listener = listener
        self.pool = listener.pool
        self.clock = listener.clock
        self.peer: Optional[Peer] = None
        self.backend: Optional[Backend] = None
        self.client: Any = None  # the client's address (the PROXY header's, if any)
        self.destination: Any = None
        self.bytes_in = 0  # client → peer
        self.bytes_out = 0  # peer → client
        self.end_reason: Optional[str] = None
        self.started = 0.0
        self.last_active = 0.0  # when a byte last moved (the idle sweep reads it)
        self.half_closed = False  # a side sent FIN: fin_timeout applies
        # kept small per connection: 10,000 idle connections must fit in ~100 MB
        self._tried: Any = _NOTHING  # peers tried for this client (a set while connecting)
        self._failures: Any = ()
        self._connecting: Optional[defer.Deferred] = None
        self._header = proxyprotocol.HeaderReader() if listener.config.accept_proxy else None
        self._pending: Any = ()  # client bytes read before the peer connected
        self._client_eof = self._client_write_closed = False
        self._peer_eof = self._peer_write_closed = False
        self._client_gone = self._peer_gone = False
        self._finished = False
        self._pair: Any = None  # set while the pump moves this connection's bytes
        self.joined = False  # connected to a peer (either data path)

    # --- client events ---------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        """Whatever goes wrong while starting one client ends that client only."""
        try:
            super().makeConnection(transport)
        except Exception:
            self.log.failure("listener {listener}: error handling a client; closing it",
                             listener=self.listener.config.name)
            self.abort("error")

    def connectionMade(self) -> None:
        now = self.clock.seconds()
        self.started = self.last_active = now
        self.client = self.transport.getPeer()
        self.destination = self.transport.getHost()
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        self.listener.session_started(self)
        if self._header is None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            read_early = getattr(self.transport, "read_early", None)
            if read_early is not None:
                try:
                    data = read_early()
                except OSError:
                    self.end_reason = "client_reset"
                    self.transport.abortConnection()  # type: ignore[attr-defined]
                    return
                if data:
                    self._pending = (data,)
            self._connect()

    def dataReceived(self, data: bytes) -> None:
        self.last_active = self.clock.seconds()
        backend = self.backend
        if backend is not None:
            n = len(data)
            self.bytes_in += n
            self.peer.bytes_in += n  # type: ignore[union-attr]
            backend.transport.write(data)
            return
        if self._header is not None:
            try:
                info, data = self._header.feed(data)
            except proxyprotocol.InvalidProxyHeader:
                self.end_reason = "bad_proxy_header"
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return
            if info is None:
                return
            self._header = None
            self.client = proxyprotocol.address_of(info) or self.client
            if info.destination is not None:
                self.destination = info.destination
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            if data:
                self._pending = [*self._pending, data]
            self._connect()
            return
        if data:
            self._pending = [*self._pending, data]

    def readConnectionLost(self) -> None:
        if self._client_eof:
            return
        self._client_eof = self.half_closed = True
        backend = self.backend
        if backend is not None:
            backend.transport.unregisterProducer()
            backend.transport.loseWriteConnection()  # type: ignore[attr-defined]
        elif self._connecting is None:
            self.transport.loseConnection()  # EOF inside a PROXY header
        self._client_closed_both()

    def writeConnectionLost(self) -> None:
        self._client_write_closed = True
        self._client_closed_both()

    def _client_closed_both(self) -> None:
        if self._client_eof and self._client_write_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore
        self._client_gone = True
        clean = reason.check(error.ConnectionDone) is not None
        if not clean and self.end_reason is None:
            self.end_reason = "client_reset"
        if self._connecting is not None:
            self._connecting.cancel()
        backend = self.backend
        if backend is not None and not self._peer_gone:
            if clean:
                backend.transport.loseConnection()
            else:
                backend.transport.abortConnection()  # type: ignore[attr-defined]
        self._maybe_finish()

    # --- connecting ------------------------------------------------------------------------

    def _connect(self) -> None:
        """Pick a peer and connect; whatever goes wrong ends this client only."""
        try:
            self._pick_and_connect()
        except Exception:
            self.log.failure("listener {listener}: error handling a client; closing it",
                             listener=self.listener.config.name)
            self.abort("error")

    def _pick_and_connect(self) -> None:
        client_host = getattr(self.client, "host", None)
        peer = self.pool.pick(PickContext(client_host, None, self._tried))
        if peer is None:
            if not self._tried:
                self.listener.no_peer += 1
                self.end_reason = "no_peer"
            else:
                self.end_reason = "connect_failed"
            self.transport.loseConnection()
            return
        self._tried = self._tried | {peer}
        self.peer = peer
        self.pool.connection_started(peer, self)
        pump = self.listener.pump
        address = peer.address
        timeout = self.pool.config.connect_timeout
        try:
            if pump is not None and address.is_ip and hasattr(self.transport, "socket"):
                self._connecting = pump.connect(
                    address.host, address.port, timeout, address.is_ipv6, self._opening(),
                    self._pump_connected,
                    lambda exc: self._connect_failed(Failure(exc), peer))
                return
            d = connect(self.listener.reactor, address, timeout, Backend(self))
        except Exception:  # a connect that cannot even start fails like a refused one
            self._connect_failed(Failure(), peer)
            return
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed, errbackArgs=(peer,))

    def _opening(self) -> bytes:
        """The PROXY header (if any) and whatever the client sent before the connect."""
        first = b"".join(self._pending)
        if self.pool.config.send_proxy != "off":
            first = proxyprotocol.build_header(self.pool.config.send_proxy, self.client,
                                               self.destination) + first
        return first

    def _opening_sent(self) -> None:
        """``_opening()`` is on its way to the connected peer: count the client's bytes in it;
        retries are over."""
        n = sum(map(len, self._pending))
        self.bytes_in += n
        self.peer.bytes_in += n  # type: ignore[union-attr]
        self._pending = ()
        self._tried = _NOTHING

    def _established(self) -> None:
        """Connected to ``self.peer`` (either way): count it."""
        self._connecting = None
        self.joined = True
        self.pool.connection_established(self.peer)  # type: ignore[arg-type]
        self.listener.connected(self.peer)  # type: ignore[arg-type]

    def _hand_to_pump(self, transports: Any, peer_sock: Any, first: bytes,
                      registered: bool) -> None:
        """Both sockets leave Twisted's reactor; the pump moves the bytes from here on."""
        for transport in transports:
            transport.stopReading()
            transport.stopWriting()
        self._pair = self.listener.pump.adopt(  # type: ignore[union-attr]
            self, self.transport.socket, peer_sock,  # type: ignore[attr-defined]
            first, peer_registered=registered)

    def _pump_connected(self, sock: Any, unsent: bytes) -> None:
        """The pump's own connect succeeded; the peer took the opening but ``unsent``."""
        self._opening_sent()
        self._established()
        self._hand_to_pump((self.transport,), sock, unsent, registered=True)

    def _connected(self, backend: Backend) -> None:
        """A Twisted endpoint connected (host-name peers, or no pump)."""
        self.backend = backend
        self._established()
        bt, ct = backend.transport, self.transport
        first = self._opening()
        self._opening_sent()
        if self.listener.pump is not None and not self._client_eof and hasattr(
                ct, "socket") and hasattr(bt, "socket"):
            self._hand_to_pump((ct, bt), bt.socket, first, registered=False)  # type: ignore
            return
        if first:
            bt.write(first)
        bt.registerProducer(ct, True)
        ct.registerProducer(bt, True)  # type: ignore[attr-defined]
        if self._client_eof:
            bt.unregisterProducer()
            bt.loseWriteConnection()  # type: ignore[attr-defined]
        else:
            ct.resumeProducing()  # type: ignore[attr-defined]

    def _connect_failed(self, failure: Failure, peer: Peer) -> None:
        self._connecting = None
        if failure.check(defer.CancelledError):
            self.pool.connection_ended(peer, self)
            self._maybe_finish()
            return
        detail = describe_connect_failure(failure, self.pool.config.connect_timeout)
        self._failures = (*self._failures, f"{peer.key}: {detail}")
        self.pool.connection_failed(peer, self, detail)
        self.peer = None
        if self._client_gone:
            self._maybe_finish()
        elif len(self._tried) <= self.pool.config.retries:
            self._connect()
        else:
            self.end_reason = "connect_failed"
            self.transport.loseConnection()

    # --- peer events (from Backend) --------------------------------------------------------

    def from_peer(self, data: bytes) -> None:
        self.last_active = self.clock.seconds()
        n = len(data)
        self.bytes_out += n
        self.peer.bytes_out += n  # type: ignore[union-attr]
        self.transport.write(data)

    def peer_eof(self) -> None:
        if self._peer_eof:
            return
        self._peer_eof = self.half_closed = True
        if not self._client_gone:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self._peer_closed_both()

    def peer_write_closed(self) -> None:
        self._peer_write_closed = True
        self._peer_closed_both()

    def _peer_closed_both(self) -> None:
        if self._peer_eof and self._peer_write_closed:
            self.backend.transport.loseConnection()  # type: ignore[union-attr]

    def peer_lost(self, reason: Failure) -> None:
        self._peer_gone = True
        if self.peer is not None:
            self.pool.connection_ended(self.peer, self)
        if reason.check(error.ConnectionDone) is None and self.end_reason is None:
            self.end_reason = "peer_reset"
        if not self._client_gone:
            self.transport.loseConnection()  # flush what the peer sent, then close
        self._maybe_finish()

    # --- ending ----------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """Cut both sides now (idle timeout, maint, shutdown timeout)."""
        if self.end_reason is None:
            self.end_reason = reason
        if self._pair is not None:
            self._pair.abort(reason)
            return
        if self._connecting is not None:
            self._connecting.cancel()
        if self.backend is not None and not self._peer_gone:
            self.backend.transport.abortConnection()  # type: ignore[attr-defined]
        if not self._client_gone:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def pump_closed(self, reason: str) -> None:
        """The pump closed both sockets (both directions done, a reset, or an abort)."""
        self._pair = None
        if self.end_reason is None and reason != "closed":
            self.end_reason = reason
        self._client_gone = self._peer_gone = True
        if self.peer is not None:
            self.pool.connection_ended(self.peer, self)
        self._maybe_finish()

    def buffered_bytes(self) -> int:
        """Bytes this connection holds in user space or pipes (flow-control checks)."""
        if self._pair is not None:
            return self._pair.buffered()
        total = 0
        for transport in (self.transport, getattr(self.backend, "transport", None)):
            if transport is not None and hasattr(transport, "dataBuffer"):
                total += (len(transport.dataBuffer) - transport.offset
                          + transport._tempDataLen)
        return total

    def _maybe_finish(self) -> None:
        if self._finished or not self._client_gone or self._connecting is not None:
            return
        if self.backend is not None and not self._peer_gone:
            return
        self._finished = True
        reason = self.end_reason or "closed"
        self.listener.session_ended(self, reason)

    def describe(self, reason: str) -> dict:
        return {
            "client": host_port(self.client),
            "listener": self.listener.config.name,
            "pool": self.pool.name,
            "peer": self.peer.key if self.peer is not None else "-",
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration": self.clock.seconds() - self.started,
            "end": reason,
            "failures": "; ".join(self._failures),
        }
