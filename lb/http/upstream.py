"""Connections to peers in HTTP mode, kept open and reused (Envoy's per-host connection pool,
nginx's ``keepalive``).

An ``UpstreamPool`` serves one lb pool: per peer, up to ``keepalive`` idle connections
(last used, first reused), each closed after ``keepalive_timeout`` idle or as soon as the peer
closes it. A connection goes back idle only when its last answer was read to its end and both
sides wanted to keep it; anything else closes it. ``dial`` is the connector's dial: an idle
connection when there is one (the request head written on it at once), else a new connect
through the pump whose first write is the request head.

Sockets are driven by the pump's epoll loop (``Pump.watch``): an ``UpstreamConnection`` hands
its events to the exchange it serves, and while idle watches for the peer closing it.
"""

from __future__ import annotations

import select
import socket
from typing import Any, Callable, Dict, List, Optional, Protocol, Set

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lb.http.sticky import StickyPeers
from lb.net import Address
from lb.peer import Peer
from lb.pool import Pool
from lb.proxy.carriers import transports
from lb.proxy.carriers.pump import Pump

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
CHUNK = 65536
SWEEP = 1.0  # at most this long between checks of idle connections' age


class UpstreamUser(Protocol):
    """What serves requests on an upstream connection (an exchange)."""

    splicing: bool

    def splice_body(self) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_closed(self, reset: bool) -> None: ...

    def upstream_drained(self) -> None: ...


class UpstreamConnection:
    """One connection to a peer: active for one exchange at a time, or idle in its pool."""

    __slots__ = ("pool", "sock", "fd", "peer_key", "user", "pending", "reading", "idle_since",
                 "reused", "closed", "mask", "requests")

    def __init__(self, pool: "UpstreamPool", sock: socket.socket, peer_key: str,
                 registered: bool) -> None:
        self.pool = pool
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_key = peer_key
        self.user: Optional[UpstreamUser] = None
        self.pending: Optional[memoryview] = None  # request bytes the peer has not taken
        self.reading = True
        self.idle_since = 0.0
        self.reused = False  # has served an earlier request
        self.closed = False
        self.requests = 0
        self.mask = _IN
        pool.pump.watch(self.fd, self, _IN, registered=registered)

    # --- the exchange's side ---------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Write now what the peer takes, keep the rest (flow control: see ``blocked``);
        False when the connection is gone."""
        if self.closed:
            return False
        if self.pending is not None:
            self.pending = memoryview(bytes(self.pending) + data)
            return True
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost(reset=True)
            return False
        if sent < len(data):
            self.pending = memoryview(data)[sent:]
            self._update()
        return True

    def open(self) -> bool:
        """The peer has neither closed this idle connection nor sent anything on it (either
        makes it unusable: it is closed)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            pass
        self.close()
        return False

    @property
    def blocked(self) -> bool:
        """The peer is not taking request bytes: stop reading the client."""
        return self.pending is not None

    def pause(self) -> None:
        """The client is not taking the answer: stop reading the peer."""
        if self.reading:
            self.reading = False
            self._update()

    def resume(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            self._update()

    def _update(self) -> None:
        mask = (_IN if self.reading else 0) | (_OUT if self.pending is not None else 0)
        if mask != self.mask and not self.closed:
            self.mask = mask
            self.pool.pump.interest(self.fd, mask)

    # --- the pump's side ---------------------------------------------------------------------

    def on_event(self, fd: int, events: int) -> None:
        if events & _OUT and self.pending is not None:
            self._flush()
        if events & (_IN | _ERR) and not self.closed and (self.reading or self.user is None):
            user = self.user
            if user is not None and user.splicing:
                user.splice_body()  # the body goes socket → pipe → socket in the kernel
            else:
                self._read()

    def on_bug(self) -> None:
        self.close(reset=True)
        user, self.user = self.user, None
        if user is not None:
            user.upstream_closed(reset=True)

    def _flush(self) -> None:
        pending = self.pending
        assert pending is not None
        try:
            sent = self.sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._lost(reset=True)
            return
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self.pending = None
        self._update()
        if self.user is not None:
            self.user.upstream_drained()

    def _read(self) -> None:
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._lost(reset=True)
            return
        if not data:
            self._lost(reset=False)
            return
        user = self.user
        if user is None:  # an idle connection that talks: it cannot be trusted any more
            self.pool.discard(self)
            return
        user.upstream_data(data)

    def lost(self, reset: bool) -> None:
        """The exchange found the connection closed (while splicing)."""
        self._lost(reset)

    def _lost(self, reset: bool) -> None:
        user, self.user = self.user, None
        if user is None:
            self.pool.discard(self)  # the peer closed an idle connection
            return
        self.close()
        user.upstream_closed(reset)

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            except OSError:
                pass
        self.sock.close()

    def detach(self) -> socket.socket:
        """The socket leaves the pool for good (an Upgrade: the pump tunnels it)."""
        self.closed = True
        self.pool.forget(self)
        return self.sock


class _Ready:
    """The dial's handle when an idle connection answered at once (nothing to cancel)."""

    def cancel(self) -> None:
        pass


class UpstreamPool:
    """The keep-alive connections of one lb pool's peers."""

    log = Logger()

    def __init__(self, pool: Pool, pump: Pump, reactor: Any) -> None:
        self.pool = pool
        self.pump = pump
        self.reactor = reactor
        self.idle: Dict[str, List[UpstreamConnection]] = {}  # peer key → last used last
        self.active: Dict[str, int] = {}  # peer key → connections serving a request
        self.unwanted: Set[str] = set()  # peers leaving, draining or in maintenance
        self._sweep: Optional[LoopingCall] = None
        self.closed = False  # the pool is gone: connections coming back are closed
        self._sticky: Optional[StickyPeers] = None
        pool.subscribe(self._peer_event)

    def sticky_peers(self) -> StickyPeers:
        """The pool's sticky-cookie values (made when a request first needs them)."""
        if self._sticky is None:
            self._sticky = StickyPeers(self.pool)
        return self._sticky

    # --- the connector's dial -----------------------------------------------------------------

    def take(self, key: str, first: bytes, check: bool = False) -> Optional[UpstreamConnection]:
        """An idle connection to the peer ``key`` with ``first`` written on it (the last
        used first: its socket is warm), or None. ``check``: for a request that is not sent
        twice (a POST), first make sure the peer has not closed the connection already (a
        FIN not yet seen by the event loop); one peek, no byte consumed."""
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.closed or (check and not conn.open()) or not conn.send(first):
                continue  # the peer had just closed it
            self.active[key] = self.active.get(key, 0) + 1
            return conn
        return None

    def dial(self, address: Address, timeout: float, first: bytes,
             connected: Callable[[Any, bytes], None], failed: Callable[[Any], None]) -> Any:
        """An idle connection to ``address`` with ``first`` written on it, or a new one."""
        key = str(address)
        conn = self.take(key, first)
        if conn is not None:
            connected(conn, b"")
            return _Ready()

        def made(sock_or_protocol: Any, unsent: bytes) -> None:
            if isinstance(sock_or_protocol, socket.socket):
                sock, registered = sock_or_protocol, True
            else:  # a host name: Twisted resolved and connected; the pump takes the socket
                transport = sock_or_protocol.transport
                transport.stopReading()
                transport.stopWriting()
                sock, registered = transport.socket, False
            conn = UpstreamConnection(self, sock, key, registered)
            self.active[key] = self.active.get(key, 0) + 1
            if unsent:
                conn.send(unsent)
            connected(conn, b"")
        if address.is_ip:
            return self.pump.connect(address.host, address.port, timeout, address.is_ipv6,
                                     first, made, failed)
        return transports.connect(self.reactor, address, timeout, first, made, failed)

    # --- connections coming back --------------------------------------------------------------

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """An exchange is done with ``conn``: keep it idle when it may serve again."""
        conn.user = None
        self._done(conn.peer_key)
        if (not reusable or self.closed or conn.closed or conn.pending is not None
                or self.pool.config.keepalive <= 0 or conn.peer_key in self.unwanted):
            conn.close()
            return
        # Beyond `keepalive` idle connections the sweep closes the oldest, within a second:
        # a burst of answers does not close connections the next requests would reuse.
        idle = self.idle.get(conn.peer_key)
        if idle is None:
            idle = self.idle[conn.peer_key] = []
        conn.reused = True
        conn.idle_since = self.reactor.seconds()
        conn.reading = True
        conn._update()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = LoopingCall(self._expire)
            self._sweep.clock = self.reactor
            self._sweep.start(min(SWEEP, max(0.01, self.pool.config.keepalive_timeout / 10)),
                              now=False)

    def lost(self, conn: UpstreamConnection) -> None:
        """An exchange lost ``conn`` (closed, reset, taken for a tunnel)."""
        conn.user = None
        self._done(conn.peer_key)

    def _done(self, key: str) -> None:
        n = self.active.get(key, 0) - 1
        if n > 0:
            self.active[key] = n
        else:
            self.active.pop(key, None)

    def discard(self, conn: UpstreamConnection) -> None:
        conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """``conn`` closed: it is no longer watched or kept."""
        self.pump.forget(conn.fd)
        idle = self.idle.get(conn.peer_key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self.idle[conn.peer_key]

    def _expire(self) -> None:
        """Close connections idle for ``keepalive_timeout``, and the oldest beyond
        ``keepalive`` per peer; the sweep stops with the last idle connection."""
        if not self.idle:
            if self._sweep is not None and self._sweep.running:
                self._sweep.stop()
            self._sweep = None
            return
        limit = self.reactor.seconds() - self.pool.config.keepalive_timeout
        keep = self.pool.config.keepalive
        for conns in list(self.idle.values()):
            excess = len(conns) - keep
            for i, conn in enumerate(list(conns)):
                if i < excess or conn.idle_since <= limit:
                    conn.close()

    def _peer_event(self, pool: Pool, peer: Peer, event: str) -> None:
        """A peer leaving, draining or in maintenance keeps no idle connection (those
        serving a request close when it is answered)."""
        if event == "removed" or not peer.serving:
            self.unwanted.add(peer.key)
            for conn in list(self.idle.get(peer.key, ())):
                conn.close()
        else:
            self.unwanted.discard(peer.key)

    def counts(self) -> Dict[str, Dict[str, int]]:
        """Per peer: connections serving a request (``active``) and ``idle`` ones. Every peer
        of the pool is listed, at zero when it has none, so a series does not vanish when a
        peer closes its last idle connection."""
        out: Dict[str, Dict[str, int]] = {key: {"active": 0, "idle": 0} for key in self.pool.peers}
        for key, n in self.active.items():
            out.setdefault(key, {"active": 0, "idle": 0})["active"] = n
        for key, conns in self.idle.items():
            out.setdefault(key, {"active": 0, "idle": 0})["idle"] = len(conns)
        return out

    def close_all(self) -> None:
        self.closed = True
        self.pool.unsubscribe(self._peer_event)
        if self._sticky is not None:
            self._sticky.close()
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn.close()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
