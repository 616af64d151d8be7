"""One client connection's life: pick → connect (retrying) → join → end.

Every data path runs through here: whatever accepted the client (a raw socket or a Twisted
transport, with or without a PROXY header) and whatever carries the bytes once joined (the
pump or two Twisted transports). So what a connection means to the rest of lb is decided in
one place: the bytes counted for it and its peer, the pool told when it starts and ends, the
reason it ended (from the raw facts its carrier reports), the listener's counters and its one
log line.

A session's client side before the join is its *front* (``lb.proxy.accept.RawClient`` or
``lb.proxy.carriers.transports.TransportClient``): something that can give up its socket to
the pump, be closed or be reset. After the join its *carrier* owns both sides.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from lb.interfaces import IClosable, PickContext
from lb.net import host_port
from lb.peer import Peer
from lb.pool import Pool
from lb.proxy import proxyprotocol
from lb.proxy.connector import Attempt, Dial

ERROR = "error"  # lb failed handling this client (logged with its traceback)


class SessionHost(Protocol):
    """What a session needs from its listener (``lb.proxy.listener.Listener``; tests use
    ``lb.testing.FakeListener``)."""

    pool: Pool
    clock: Any
    config: Any  # .name

    def dial_for(self, front: Any) -> Dial: ...

    def join(self, session: "Session", channel: Any, unsent: bytes) -> Any: ...

    def peer_connected(self, peer: Peer) -> None: ...

    def session_ended(self, session: "Session", reason: str) -> None: ...


@implementer(IClosable)
class Session:
    """Kept small: 10,000 idle connections must fit in ~100 MB."""

    log = Logger()
    __slots__ = ("listener", "pool", "front", "client", "destination", "peer", "started",
                 "last_active", "half_closed", "bytes_in", "bytes_out", "end_reason",
                 "failures", "attempt", "carrier", "pending", "finished", "__weakref__")

    def __init__(self, listener: SessionHost, front: Any, client: Any, destination: Any,
                 now: float) -> None:
        self.listener = listener
        self.pool = listener.pool
        self.front = front  # the client side until the join
        self.client = client  # the client's address (the PROXY header's, if any)
        self.destination = destination
        self.peer: Optional[Peer] = None
        self.started = self.last_active = now  # last_active: stamped by the carrier
        self.half_closed = False  # a side sent FIN: fin_timeout applies
        self.bytes_in = 0  # client → peer
        self.bytes_out = 0  # peer → client
        self.end_reason: Optional[str] = None
        self.failures: Sequence[str] = ()
        self.attempt: Optional[Attempt] = None
        self.carrier: Any = None
        self.pending = b""  # client bytes read before the join (they go with the opening)
        self.finished = False

    # --- connecting ----------------------------------------------------------------------

    def start(self, pending: bytes = b"") -> None:
        """The client's address is known: find it a peer. ``pending``: what the client sent
        so far, passed to the peer after the PROXY header we send (if any)."""
        self.pending = pending
        try:
            first = pending
            if self.pool.config.send_proxy != "off":
                first = proxyprotocol.build_header(self.pool.config.send_proxy, self.client,
                                                   self.destination) + pending
            self.attempt = Attempt(
                self.pool, self, self.listener.dial_for(self.front),
                PickContext(getattr(self.client, "host", None)), first, self._connected,
                self._failed)
            self.attempt.start()  # may end at once (no peer): the callbacks clear it
        except Exception:
            self.fail()

    def _connected(self, peer: Peer, channel: Any, unsent: bytes) -> None:
        if self.attempt is not None and self.attempt.failures:
            self.failures = tuple(self.attempt.failures)  # peers tried before: logged
        self.attempt = None
        self.peer = peer
        n = len(self.pending)  # the client's part of the opening reached the peer
        self.pending = b""
        self.moved_in(n)
        self.pool.connection_established(peer)
        self.listener.peer_connected(peer)
        try:
            self.carrier = self.listener.join(self, channel, unsent)
        except Exception:
            self.fail()

    def _failed(self, reason: str, failures: Sequence[str]) -> None:
        self.attempt = None
        self.failures = tuple(failures)
        self.end_reason = reason
        self.front.close()
        self.front_closed()

    # --- what the carrier reports (see lb.proxy.carriers) ---------------------------------

    def moved_in(self, n: int) -> None:
        assert self.peer is not None, "connected"
        self.bytes_in += n
        self.peer.bytes_in += n

    def moved_out(self, n: int) -> None:
        assert self.peer is not None, "connected"
        self.bytes_out += n
        self.peer.bytes_out += n

    def fin_received(self) -> None:
        self.half_closed = True

    def carrier_closed(self, kind: str, side: Optional[str], answer_done: bool,
                       request_pending: bool) -> None:
        """The carrier closed both sides; decide what that was."""
        self.carrier = None
        if self.end_reason is None:
            if kind == "done" or (side == "client" and answer_done and not request_pending):
                # a client that resets after its whole answer (with nothing of its own left
                # to deliver) ended normally
                self.end_reason = "closed"
            elif side is None:
                self.end_reason = ERROR
            else:
                self.end_reason = f"{side}_{kind}"
        self._finish()

    # --- what the front reports before the join -------------------------------------------

    def front_closed(self, reset: bool = False) -> None:
        """The client side is gone before any join (closed by us, or the client left)."""
        if reset and self.end_reason is None:
            self.end_reason = "client_reset"
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
        if self.carrier is None:
            self._finish()

    # --- control ---------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """Cut both sides now (idle timeout, maint, shutdown timeout, an error)."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.carrier is not None:
            self.carrier.abort()
            return
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
        self.front.abort()
        self.front_closed()

    def fail(self) -> None:
        """Whatever went wrong handling this client ends this client only."""
        self.log.failure("listener {listener}: error handling a client; closing it",
                         listener=self.listener.config.name)
        self.abort(ERROR)

    def buffered(self) -> int:
        """Bytes this connection holds in user space or pipes (flow-control checks)."""
        return self.carrier.buffered() if self.carrier is not None else 0

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.peer is not None:
            self.pool.connection_ended(self.peer, self)
        self.listener.session_ended(self, self.end_reason or "closed")

    def describe(self, reason: str) -> Dict[str, Any]:
        return {
            "client": host_port(self.client),
            "listener": self.listener.config.name,
            "pool": self.pool.name,
            "peer": self.peer.key if self.peer is not None else "-",
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration": self.listener.clock.seconds() - self.started,
            "end": reason,
            "failures": "; ".join(self.failures),
        }
