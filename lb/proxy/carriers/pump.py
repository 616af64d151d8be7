"""The pump carrier: once a client and its peer are connected, lb's epoll loop moves the
bytes without Twisted's per-event dispatch.

Twisted keeps accept and timers. The pump does its own non-blocking connects and then owns both
sockets of a pair. Its sockets sit in the reactor's own epoll set (``lb/reactor.py``), whose
poll hands the pump all their events in one call: no Twisted transport, no logging-context
wrapper and no buffered write (two epoll_ctl calls) per message, which dominated the cost of a
proxied request. Bytes are moved with ``recv`` and an eager ``send``, and a direction switches to
``splice(2)`` (socket → pipe → socket, never entering Python) once a read shows bulk data; pipes
are pooled and only held while a destination is full.

Flow control: a direction whose destination does not take everything stops reading its source
until the destination drains, so at most one chunk (or one pipe) per direction is buffered.
Half-close: a FIN from one side becomes ``shutdown(SHUT_WR)`` towards the other once that
direction's buffer is flushed; the pair closes when both directions are done.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

CHUNK = 65536
BULK_READ = 16384  # a read this large means bulk data is queued: splice from then on
PIPE_SIZE = 262144
MAX_POOLED_PIPES = 256
CONNECT_SWEEP = 0.05  # seconds between checks of connect deadlines

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP

HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
if HAVE_SPLICE:
    _SPLICE_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ENOTCONN,
                 errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH}
_LINGER_RST = struct.pack("ii", 1, 0)


class _Flow:
    """One direction: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("src", "dst", "src_fd", "dst_fd", "pending", "pipe", "piped", "eof", "shut",
                 "inbound", "bulk")

    def __init__(self, src: socket.socket, dst: socket.socket, inbound: bool) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pending: Optional[memoryview] = None  # copy mode: bytes dst has not taken
        self.pipe: Optional[Tuple[int, int]] = None  # splice mode: pipe holding bytes
        self.piped = 0  # bytes in that pipe
        self.eof = False  # src sent FIN
        self.shut = False  # FIN passed on to dst
        self.inbound = inbound  # client → peer
        self.bulk = False  # reads fill whole chunks: splice from now on

    @property
    def blocked(self) -> bool:
        return self.pending is not None or self.piped > 0


class Pair:
    """A client socket and its peer socket, joined."""

    __slots__ = ("pump", "session", "client", "peer", "up", "down", "client_mask", "peer_mask",
                 "closed")

    def __init__(self, pump: "Pump", session: Any, client: socket.socket,
                 peer: socket.socket) -> None:
        self.pump = pump
        self.session = session
        self.client = client
        self.peer = peer
        self.up = _Flow(client, peer, True)  # client → peer
        self.down = _Flow(peer, client, False)  # peer → client
        self.client_mask = 0  # epoll interest currently registered for each socket
        self.peer_mask = 0
        self.closed = False

    def buffered(self) -> int:
        """Bytes held in user space or pipes for this pair (for tests and status)."""
        total = 0
        for flow in (self.up, self.down):
            if flow.pending is not None:
                total += len(flow.pending)
            total += flow.piped
        return total

    def abort(self) -> None:
        """Close both sockets now, with a reset (the session asked: idle, maint, shutdown)."""
        self.pump.close(self, "aborted", None, reset=True)


class Pump:
    """All joined pairs of a reactor (an ``lb.reactor.Reactor``, whose epoll set it shares:
    the reactor makes its one pump, ``reactor.pump``)."""

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.splice = HAVE_SPLICE  # tests turn it off to run the copy path alone
        self._epoll = reactor.share_poller(self.handle)
        # fd → (pair, is_client), or (handler, None) for a socket another part drives
        self._fds: Dict[int, Tuple[Any, Optional[bool]]] = {}
        self._connects: Dict[int, "Connect"] = {}  # fd → connect in progress
        self._pipes: List[Tuple[int, int]] = []
        self._batch: Optional[List[Tuple[Pair, _Flow]]] = None  # FINs to pass on after a batch
        self._connect_sweep: Optional[LoopingCall] = None
        self.pairs = 0

    def handle(self, ready: List[Tuple[int, int]]) -> None:
        """The reactor's poll found these events on the pump's descriptors."""
        now = self.reactor.seconds()
        fds = self._fds
        batch: List[Tuple[Pair, _Flow]] = []
        self._batch = batch
        try:
            for fd, events in ready:
                entry = fds.get(fd)
                if entry is None:
                    connect = self._connects.get(fd)
                    if connect is not None:
                        connect.finish()
                    continue
                pair, is_client = entry
                if is_client is None:  # a socket of HTTP mode's, say
                    self._dispatch(pair, fd, events)
                    continue
                if pair.closed:
                    continue
                pair.session.last_active = now
                try:
                    if events & (_IN | _ERR):
                        flow = pair.up if is_client else pair.down
                        if not flow.eof and not flow.blocked:
                            self._read(pair, flow)
                    if events & _OUT and not pair.closed:
                        flow = pair.down if is_client else pair.up
                        if flow.blocked:
                            self._flush(pair, flow)
                    if events & _ERR and not pair.closed:
                        self._check_error(pair, is_client)
                except Exception:
                    self.log.failure("pump: error on a connection; closing it")
                    self.close(pair, "error", None, reset=True)
        finally:
            self._batch = None
            for pair, flow in batch:
                if not pair.closed:
                    self._pass_fin(pair, flow)

    def _dispatch(self, handler: Any, fd: int, events: int) -> None:
        try:
            handler.on_event(fd, events)
        except Exception:
            self.log.failure("pump: error handling a connection; closing it")
            try:
                handler.on_bug()
            except Exception:
                self.log.failure("pump: error closing a connection after an error")

    # --- sockets driven by other parts -----------------------------------------------------------

    def watch(self, fd: int, handler: Any, mask: int, registered: bool = False) -> None:
        """Hand ``fd``'s events to ``handler.on_event(fd, events)`` (an exception there is
        logged and ``handler.on_bug()`` called). ``registered``: the descriptor is in the
        epoll set already (a socket from the pump's own connect)."""
        self._fds[fd] = (handler, None)
        if registered:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)

    def interest(self, fd: int, mask: int) -> None:
        """Change what a watched descriptor is woken for."""
        self._epoll.modify(fd, mask)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (call before closing its socket, or when handing it on)."""
        if self._fds.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    # --- adopting and releasing ----------------------------------------------------------------

    def connect(self, host: str, port: int, timeout: float, ipv6: bool, first: bytes,
                connected: Callable[[socket.socket, bytes], None],
                failed: Callable[[Exception], None]) -> "Connect":
        """Start a non-blocking connect; exactly one of the callbacks runs, unless the
        returned handle is cancelled first. ``first`` is written as soon as the socket is
        writable; ``connected`` gets the socket and what of ``first`` the peer did not take."""
        return Connect(self, host, port, timeout, ipv6, first, connected, failed)

    def _watch(self, connect: "Connect") -> None:
        self._connects[connect.fd] = connect
        self._epoll.register(connect.fd, _OUT)
        if self._connect_sweep is None:
            sweep = self._connect_sweep = LoopingCall(self._expire_connects)
            sweep.clock = self.reactor
            sweep.start(CONNECT_SWEEP, now=False)

    def _expire_connects(self) -> None:
        """Time out connects past their deadline. One sweep for all connects is cheaper than
        a timer for each; it stops once no connect is pending."""
        connects = self._connects
        if not connects:
            assert self._connect_sweep is not None, "the sweep runs this"
            self._connect_sweep.stop()
            self._connect_sweep = None
            return
        now = self.reactor.seconds()
        for connect in [c for c in connects.values() if c.deadline <= now]:
            connect.timed_out()

    def adopt(self, session: Any, client: socket.socket, peer: socket.socket,
              first: bytes = b"", peer_registered: bool = False,
              to_client: bytes = b"") -> Pair:
        """Take over two connected non-blocking sockets; ``first`` goes to the peer first
        (and ``to_client`` to the client: what a peer sent after its 101 answer).
        ``peer_registered``: the peer socket is already in the epoll set (our own connect)."""
        pair = Pair(self, session, client, peer)
        client_fd, peer_fd = pair.up.src_fd, pair.down.src_fd
        self._fds[client_fd] = (pair, True)
        self._fds[peer_fd] = (pair, False)
        self.pairs += 1
        if first and not self._send(pair, pair.up, first):
            return pair
        if to_client and not self._send(pair, pair.down, to_client):
            return pair
        up_blocked, down_blocked = pair.up.blocked, pair.down.blocked
        client_mask = (0 if up_blocked else _IN) | (_OUT if down_blocked else 0)
        peer_mask = (0 if down_blocked else _IN) | (_OUT if up_blocked else 0)
        pair.client_mask = client_mask
        pair.peer_mask = peer_mask
        self._epoll.register(client_fd, client_mask)
        if peer_registered:
            self._epoll.modify(peer_fd, peer_mask)
        else:
            self._epoll.register(peer_fd, peer_mask)
        return pair

    def _send(self, pair: Pair, flow: _Flow, data: Any) -> bool:
        """Send at once what the destination takes and keep the rest as ``pending``;
        False when the destination failed (the pair is then closed)."""
        try:
            sent = flow.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._failed(pair, flow, e, sending=True)
            return False
        flow.pending = memoryview(data)[sent:] if sent < len(data) else None
        return True

    def close(self, pair: Pair, kind: str, side: Optional[str], reset: bool = False) -> None:
        """Close both sockets and tell the session what happened (raw: it classifies)."""
        if pair.closed:
            return
        pair.closed = True
        self.pairs -= 1
        for flow in (pair.up, pair.down):
            self._release_pipe(flow, drop=True)
            self._fds.pop(flow.src_fd, None)  # closing the socket leaves the epoll set too
        for sock in (pair.client, pair.peer):
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
            sock.close()
        pair.session.carrier_closed(kind, side, pair.down.shut, pair.up.blocked)

    # --- moving bytes --------------------------------------------------------------------------

    def _read(self, pair: Pair, flow: _Flow) -> None:
        if flow.bulk:
            pipe = flow.pipe
            if pipe is None:
                pipe = flow.pipe = self._pipes.pop() if self._pipes else self._new_pipe()
            try:
                n = os.splice(flow.src_fd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                self._release_pipe(flow)
                return
            except OSError as e:
                self._release_pipe(flow)
                self._failed(pair, flow, e, sending=False)
                return
            if n == 0:
                self._release_pipe(flow)
                self._eof(pair, flow)
                return
            flow.piped = n
            self._count(pair, flow, n)
            self._flush(pair, flow)
            return
        try:
            data = flow.src.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            self._failed(pair, flow, e, sending=False)
            return
        if not data:
            self._eof(pair, flow)
            return
        n = len(data)
        self._count(pair, flow, n)
        if n >= BULK_READ and self.splice:
            flow.bulk = True  # small messages are cheaper copied; bulk is cheaper spliced
        if self._send(pair, flow, data) and flow.pending is not None:
            self._update(pair)

    def _flush(self, pair: Pair, flow: _Flow) -> None:
        """Push what ``flow`` holds into its destination; resume reading when empty."""
        if flow.piped:
            assert flow.pipe is not None, "bytes are piped"
            try:
                m = os.splice(flow.pipe[0], flow.dst_fd, flow.piped, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                m = 0
            except OSError as e:
                self._failed(pair, flow, e, sending=True)
                return
            flow.piped -= m
            if flow.piped == 0:
                self._release_pipe(flow)
        elif flow.pending is not None and not self._send(pair, flow, flow.pending):
            return
        if flow.eof and not flow.blocked:
            self._shutdown(pair, flow)
        else:
            self._update(pair)

    def _count(self, pair: Pair, flow: _Flow, n: int) -> None:
        if flow.inbound:
            pair.session.moved_in(n)
        else:
            pair.session.moved_out(n)

    def _eof(self, pair: Pair, flow: _Flow) -> None:
        flow.eof = True
        pair.session.fin_received()
        if not flow.blocked:
            self._shutdown(pair, flow)
        else:
            self._update(pair)

    def _shutdown(self, pair: Pair, flow: _Flow) -> None:
        flow.shut = True
        other = pair.down if flow is pair.up else pair.up
        if other.shut:
            self.close(pair, "done", None)  # close() sends the last FIN itself
        elif self._batch is not None:
            # The other side's FIN often comes in the same batch (a client closing after its
            # answer): then close() alone ends both and the shutdown call is saved.
            self._batch.append((pair, flow))
        else:
            self._pass_fin(pair, flow)

    def _pass_fin(self, pair: Pair, flow: _Flow) -> None:
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._update(pair)

    def _failed(self, pair: Pair, flow: _Flow, e: OSError, sending: bool) -> None:
        # which socket failed: the source when reading, the destination when sending
        client_side = (flow.inbound and not sending) or (not flow.inbound and sending)
        kind = "reset" if e.errno in _RESET_ERRNOS or isinstance(e, ConnectionError) else "error"
        if not client_side:
            # give the client what the peer already sent, then close it
            self._drain_towards_client(pair)
        self.close(pair, kind, "client" if client_side else "peer", reset=client_side)

    def _drain_towards_client(self, pair: Pair) -> None:
        flow = pair.down
        if flow.blocked:
            try:
                if flow.piped:
                    assert flow.pipe is not None, "bytes are piped"
                    os.splice(flow.pipe[0], flow.dst_fd, flow.piped, flags=_SPLICE_FLAGS)
                elif flow.pending is not None:
                    flow.dst.send(flow.pending)
            except OSError:
                pass

    def _check_error(self, pair: Pair, is_client: bool) -> None:
        sock = pair.client if is_client else pair.peer
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return
        if err:
            if not is_client:
                self._drain_towards_client(pair)
            self.close(pair, "reset", "client" if is_client else "peer", reset=is_client)

    # --- epoll bookkeeping ---------------------------------------------------------------------

    def _update(self, pair: Pair) -> None:
        """Set each socket's interest: read while its outgoing flow can take more, write
        while its incoming flow holds bytes."""
        up, down = pair.up, pair.down
        client_mask = ((_IN if not up.eof and not up.blocked else 0)
                       | (_OUT if down.blocked else 0))
        peer_mask = ((_IN if not down.eof and not down.blocked else 0)
                     | (_OUT if up.blocked else 0))
        if pair.client_mask != client_mask:
            pair.client_mask = client_mask
            self._epoll.modify(up.src_fd, client_mask)
        if pair.peer_mask != peer_mask:
            pair.peer_mask = peer_mask
            self._epoll.modify(down.src_fd, peer_mask)

    # --- pipes ---------------------------------------------------------------------------------

    def _new_pipe(self) -> Tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        except OSError:
            pass
        return r, w

    def take_pipe(self) -> Tuple[int, int]:
        """A pipe for splicing (pooled: making one costs three system calls)."""
        return self._pipes.pop() if self._pipes else self._new_pipe()

    def give_pipe(self, pipe: Tuple[int, int], empty: bool) -> None:
        """Back to the pool when it holds nothing; closed otherwise (or when the pool is
        full)."""
        if empty and len(self._pipes) < MAX_POOLED_PIPES:
            self._pipes.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def _release_pipe(self, flow: _Flow, drop: bool = False) -> None:
        pipe = flow.pipe
        if pipe is None:
            return
        flow.pipe = None
        empty = not flow.piped
        if not empty and drop:
            flow.piped = 0
        self.give_pipe(pipe, empty)


class Connect:
    """A connect in progress on the pump: writable means done, and the first write tells
    whether it worked."""

    __slots__ = ("pump", "sock", "fd", "deadline", "first", "connected", "failed")

    def __init__(self, pump: Pump, host: str, port: int, timeout: float, ipv6: bool,
                 first: bytes, connected: Callable[[socket.socket, bytes], None],
                 failed: Callable[[Exception], None]) -> None:
        self.pump = pump
        self.first = first
        self.connected = connected
        self.failed = failed
        sock = self.sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET,
                                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = sock.fileno()
        self.deadline = pump.reactor.seconds() + timeout
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.fd = -1
            pump.reactor.callLater(0, failed, _connect_error(err))
            return
        pump._watch(self)

    def finish(self) -> None:
        """The socket is writable, or an event came for its descriptor number: the send
        tells which. It fails if the connect failed, would block while it is still in
        progress, and otherwise passes on the first bytes (a zero-length send when there
        are none)."""
        try:
            sent = self.sock.send(self.first)
        except BlockingIOError:
            return  # still connecting
        except OSError as e:
            self._give_up(_connect_error(e.errno or errno.EIO))  # send's errors have one
            return
        del self.pump._connects[self.fd]
        # still registered: adopt(peer_registered=True)
        self.connected(self.sock, self.first[sent:] if sent < len(self.first) else b"")

    def timed_out(self) -> None:
        self._give_up(_connect_error(errno.ETIMEDOUT))

    def cancel(self) -> None:
        """Give up (the client left): the failure callback hears CancelledError."""
        if self.fd != -1 and self.fd in self.pump._connects:
            from twisted.internet.defer import CancelledError
            self._give_up(CancelledError())

    def _give_up(self, reason: Exception) -> None:
        del self.pump._connects[self.fd]
        self.sock.close()  # which also takes it out of the epoll set
        self.failed(reason)


def _connect_error(err: int) -> Exception:
    from twisted.internet import error
    if err == errno.ECONNREFUSED:
        return error.ConnectionRefusedError()
    if err == errno.ETIMEDOUT:
        return error.TimeoutError()
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return error.NoRouteError()
    return error.ConnectError(string=os.strerror(err))
