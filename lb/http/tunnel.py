"""After a peer answers an ``Upgrade`` (a WebSocket) with 101: the client connection becomes a
byte tunnel for the rest of its life, carried by the pump exactly like a TCP-mode connection
(flow control, half-close, splice for bulk), under the listener's ``idle_timeout`` and
``fin_timeout``."""

from __future__ import annotations

import socket
from typing import Any, Optional

from lb.peer import Peer


class Tunnel:
    """The carrier's session for an upgraded connection (the carrier contract in
    lb/proxy/carriers/__init__.py)."""

    __slots__ = ("session", "peer", "pool", "exchange", "pair", "last_active", "half_closed",
                 "bytes_in", "bytes_out", "finished")

    def __init__(self, exchange: Any, session: Any, peer_sock: socket.socket,
                 to_client: bytes) -> None:
        """``exchange``: the 101 answer's (``lb.http.proxy.Exchange``); ``session``: the
        client connection's (``HTTPSession``), which hands over its socket."""
        self.exchange = exchange
        self.session = session
        self.peer: Optional[Peer] = exchange.peer
        self.pool = exchange.pool
        self.last_active = session.listener.clock.seconds()
        self.half_closed = False
        self.bytes_in = self.bytes_out = 0
        self.finished = False
        session.tunnel = self
        pump = session.listener.pump
        pump.forget(session.fd)  # the pump takes the client socket afresh, as a pair's
        self.pair = pump.adopt(self, session.sock, peer_sock, exchange.early,
                               to_client=to_client)
        exchange.early = b""

    def moved_in(self, n: int) -> None:
        self.bytes_in += n
        if self.peer is not None:
            self.peer.bytes_in += n

    def moved_out(self, n: int) -> None:
        self.bytes_out += n
        if self.peer is not None:
            self.peer.bytes_out += n

    def fin_received(self) -> None:
        self.half_closed = True

    def carrier_closed(self, kind: str, side: Optional[str], answer_done: bool,
                       request_pending: bool) -> None:
        if self.finished:
            return
        self.finished = True
        peer, self.peer = self.peer, None
        if peer is not None and self.pool is not None:
            self.pool.connection_ended(peer, self.exchange)
        session = self.session
        if kind == "aborted" or session.end_reason != "closed":
            pass  # the reason was set by whoever cut it
        elif kind != "done" and side is not None and not (side == "client" and answer_done):
            session.end_reason = f"{side}_{kind}"
        session.tunnel_closed()

    def expire(self, now: float) -> None:
        config = self.session.listener.config
        if config.idle_timeout > 0 and now - self.last_active >= config.idle_timeout:
            self.abort("idle_timeout")
        elif (config.fin_timeout > 0 and self.half_closed
              and now - self.last_active >= config.fin_timeout):
            self.abort("fin_timeout")

    def abort(self, reason: str = "") -> None:
        if reason and self.session.end_reason == "closed":
            self.session.end_reason = reason
        if not self.pair.closed:
            self.pair.abort()

    def buffered(self) -> int:
        return int(self.pair.buffered())
