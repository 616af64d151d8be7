"""Accepting clients without building a Twisted transport for each.

A new connection through Twisted costs a ``tcp.Server`` transport, address objects and
three epoll_ctl calls (register, pause, hand over) before the pump takes the socket. For
listeners whose bytes go through the pump from the start (no PROXY header to read first),
``RawPort`` accepts with a plain non-blocking socket and gives each ``Frontend`` a
``RawTransport``: just the socket and its addresses until the pump adopts it.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Optional

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

ACCEPTS_PER_WAKEUP = 128
READ_EARLY = 65536
_LINGER_RST = struct.pack("ii", 1, 0)


def _address(family: int, sockaddr: Any) -> Any:
    if family == socket.AF_INET6:
        return IPv6Address("TCP", sockaddr[0], sockaddr[1])
    return IPv4Address("TCP", sockaddr[0], sockaddr[1])


class RawClient:
    """A client accepted as a bare socket: the session's front until the pump adopts it.

    Nothing reads the socket before that, so there is nothing to pause, and a client that
    leaves meanwhile is noticed by the pump."""

    __slots__ = ("socket",)
    eof = False  # a FIN before the join shows up in the pump's first read

    def __init__(self, sock: socket.socket) -> None:
        self.socket: Optional[socket.socket] = sock

    def read_early(self) -> bytes:
        """What the client sent along with its connect (one non-blocking read; b"" if
        nothing yet). Passed to the peer as the connect's first write, it saves a wakeup per
        connection and tells at once whether the connect worked, as HAProxy does."""
        assert self.socket is not None, "read before the pump takes it"
        try:
            return self.socket.recv(READ_EARLY)
        except BlockingIOError:
            return b""

    def take_pending(self) -> bytes:
        return b""

    def detach(self) -> None:
        """The pump takes the socket."""
        self.socket = None

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def abort(self) -> None:
        if self.socket is not None:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
            self.close()


@implementer(IReadDescriptor, IListeningPort)
class RawPort:
    """A listening socket in the reactor whose accepts build Frontends directly."""

    log = Logger()

    def __init__(self, reactor: Any, factory: Any, host: str, port: int, backlog: int,
                 listening: Optional[socket.socket] = None) -> None:
        """Bind ``host:port``, or accept on ``listening``, a socket already listening there
        (a reload taking over another listener's socket)."""
        self.reactor = reactor
        self.factory = factory
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if listening is not None:
            sock = listening
        else:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # accepted sockets inherit it
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind((host, port))
                sock.listen(backlog)
            except OSError as e:
                sock.close()
                raise error.CannotListenError(host, port, e) from None
        sock.setblocking(False)
        self.socket: Optional[socket.socket] = sock
        self._host = _address(self.family, sock.getsockname())
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return "listener"

    def getHost(self) -> Any:
        return self._host

    def doRead(self) -> None:
        listening = self.socket
        factory = self.factory
        family = self.family
        host = self._host
        for _ in range(ACCEPTS_PER_WAKEUP):
            if listening is None:
                return
            try:
                # _accept() gives the bare descriptor: socket.accept() would also turn the
                # family and type into enums on every call
                fd, sockaddr = listening._accept()  # type: ignore[attr-defined]  # not in typeshed
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.error("accept failed: {error} (out of file descriptors?)",
                                   error=e.strerror)
                return
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            try:
                sock.setblocking(False)
                factory.accept_raw(sock, _address(family, sockaddr), host)
            except Exception:
                # One client's trouble ends that client: an exception escaping doRead
                # would make the reactor close this listening socket for good.
                self.log.failure("listener: error accepting a client; closing it")
                sock.close()

    def connectionLost(self, reason: Any) -> None:
        self.stopListening()

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        if self.socket is not None:
            self.reactor.removeReader(self)
            self.socket.close()
            self.socket = None
        return None
