"""A recording peer: a raw TCP server on 127.0.0.1 that keeps every byte a proxy sends it.

It stands behind the proxy under test. Per connection it records the bytes received, frames
them as HTTP/1.1 requests with a deliberately *lenient* framer (a request the proxy forwarded
must show up as a request, however odd), and answers each framed request with a small 200
that carries ``X-Corpus-Peer`` so a client can tell the peer's answers from the proxy's own.
Bytes it cannot frame stay in the connection's ``leftover``; a connection whose bytes make no
sense at all is closed without an answer.

It runs its own thread with a selector, so it works beside Twisted's reactor, beside a
blocking client, and in a command-line tool alike::

    peer = RecordingPeer()
    port = peer.start()
    mark = peer.mark()
    ...                       # traffic through the proxy
    seen = peer.traffic_since(mark)
    peer.stop()
"""

from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

PEER_HEADER = b"X-Corpus-Peer"

_HEAD_END = re.compile(rb"\r?\n\r?\n")
Fields = List[Tuple[bytes, bytes]]
# method, target, version, fields, body (de-chunked), raw bytes
Framed = Tuple[bytes, bytes, bytes, Fields, bytes, bytes]
_LINE_END = re.compile(rb"\r?\n")


@dataclass
class PeerRequest:
    """One request the peer framed."""

    conn: int
    method: bytes
    target: bytes
    version: bytes
    headers: List[Tuple[bytes, bytes]]
    body: bytes  # de-chunked when it came chunked
    raw: bytes   # the request's bytes exactly as received
    seq: int = 0  # order of arrival over all connections

    def header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class Unframeable(Exception):
    """The bytes cannot be read as a request even leniently."""


class RequestFramer:
    """Frames a byte stream into requests, leniently: CRLF or LF line ends, any whitespace
    between request-line words; the body by ``Transfer-Encoding`` containing ``chunked``,
    else the first ``Content-Length``, else none."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.continued = False  # a 100 Continue was asked for the request in progress

    def feed(self, data: bytes) -> List[Framed]:
        """Add bytes; return the requests now complete as tuples
        ``(method, target, version, headers, body, raw)``. Raises Unframeable."""
        self.buffer += data
        done: List[Framed] = []
        while True:
            framed = self._one()
            if framed is None:
                return done
            done.append(framed)

    def wants_continue(self) -> bool:
        """True once a request head asking ``Expect: 100-continue`` is complete but its body
        is not (checked after ``feed``; answered once per request)."""
        if self.continued:
            return False
        parsed = self._head()
        if parsed is None:
            return False
        _, _, _, headers, _ = parsed
        expect = b",".join(v for k, v in headers if k.lower() == b"expect").lower()
        if b"100-continue" in expect:
            self.continued = True
            return True
        return False

    def _head(self) -> Optional[Tuple[bytes, bytes, bytes, Fields, int]]:
        start = 0
        while self.buffer.startswith(b"\r\n", start) or self.buffer.startswith(b"\n", start):
            start += 2 if self.buffer.startswith(b"\r\n", start) else 1
        end = _HEAD_END.search(self.buffer, start)
        if end is None:
            if len(self.buffer) - start > 1 << 20:
                raise Unframeable("no end of head within 1 MiB")
            return None
        lines = _LINE_END.split(bytes(self.buffer[start:end.start()]))
        words = lines[0].split()
        if len(words) != 3 or not words[2].upper().startswith(b"HTTP/"):
            raise Unframeable(f"not a request line: {lines[0][:80]!r}")
        headers = []
        for line in lines[1:]:
            if b":" not in line:
                raise Unframeable(f"not a header line: {line[:80]!r}")
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip(b" \t")))
        return words[0], words[1], words[2], headers, end.end()

    def _one(self) -> Optional[Framed]:
        parsed = self._head()
        if parsed is None:
            return None
        method, target, version, headers, pos = parsed
        te = b",".join(v for k, v in headers if k.lower() == b"transfer-encoding").lower()
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if b"chunked" in te:
            decoded = self._dechunk(pos)
            if decoded is None:
                return None
            body, pos = decoded
        elif lengths:
            digits = lengths[0].split(b",")[0].strip()
            if not digits.isdigit():
                raise Unframeable(f"Content-Length {lengths[0][:40]!r}")
            size = int(digits)
            if len(self.buffer) < pos + size:
                return None
            body = bytes(self.buffer[pos:pos + size])
            pos += size
        else:
            body = b""
        raw = bytes(self.buffer[:pos])
        del self.buffer[:pos]
        self.continued = False
        return method, target, version, headers, body, raw

    def _dechunk(self, pos: int) -> Optional[Tuple[bytes, int]]:
        body = bytearray()
        while True:
            eol = self.buffer.find(b"\n", pos)
            if eol < 0:
                return None
            size_text = bytes(self.buffer[pos:eol]).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Unframeable(f"chunk size {size_text[:40]!r}") from None
            pos = eol + 1
            if size == 0:
                break
            if len(self.buffer) < pos + size + 1:
                return None
            body += self.buffer[pos:pos + size]
            pos += size
            if self.buffer.startswith(b"\r\n", pos):
                pos += 2
            elif self.buffer.startswith(b"\n", pos):
                pos += 1
            elif len(self.buffer) - pos < 2:
                return None
            else:
                raise Unframeable("no line end after chunk data")
        while True:  # trailer fields, then the empty line
            eol = self.buffer.find(b"\n", pos)
            if eol < 0:
                return None
            line = bytes(self.buffer[pos:eol]).rstrip(b"\r")
            pos = eol + 1
            if not line:
                return bytes(body), pos


@dataclass
class PeerConnection:
    """Everything one connection from the proxy brought."""

    index: int
    received: bytearray = field(default_factory=bytearray)
    requests: List[PeerRequest] = field(default_factory=list)
    framer: RequestFramer = field(default_factory=RequestFramer)
    unframeable: Optional[str] = None  # why, once the bytes made no sense
    ended: Optional[str] = None        # "eof" or "reset" once the proxy closed it, "peer" if we did
    answers: int = 0

    @property
    def leftover(self) -> bytes:
        """Bytes received but not (yet) framed as a request, less blank lines."""
        return bytes(self.framer.buffer).lstrip(b"\r\n")


@dataclass
class Mark:
    """Where the peer's record stood at one moment."""

    received: Dict[int, int]
    requests: Dict[int, int]
    connections: int


@dataclass
class Traffic:
    """What reached the peer between a mark and now."""

    data: bytes                         # all new bytes, connections one after another
    requests: List[PeerRequest]         # requests framed, in order of arrival
    leftover: Dict[int, bytes]          # per connection with new bytes: bytes not framed
    ended: Dict[int, Optional[str]]     # per connection with new bytes: how it ended, if it did
    unframeable: Dict[int, str]         # per connection with new bytes: why it made no sense
    connections: int                    # connections opened since the mark

    @property
    def leftover_bytes(self) -> int:
        return sum(len(b) for b in self.leftover.values())


class RecordingPeer:
    """See the module docstring. ``answer=False`` records without ever answering."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, answer: bool = True) -> None:
        self.host = host
        self.port = port
        self.answer = answer
        self.connections: List[PeerConnection] = []
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._selector: Optional[selectors.BaseSelector] = None
        self._listener: Optional[socket.socket] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._stopping = False
        self._out: Dict[socket.socket, bytearray] = {}
        self._close_after: Dict[socket.socket, bool] = {}
        self._seq = 0

    # -- life ---------------------------------------------------------------------------
    def start(self) -> int:
        """Listen and serve in a thread; return the port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._serve, name=f"recording-peer-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop serving and close every socket (idempotent)."""
        if self._thread is None:
            return
        self._stopping = True
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "RecordingPeer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the record ---------------------------------------------------------------------
    def mark(self) -> Mark:
        with self._lock:
            return Mark(received={c.index: len(c.received) for c in self.connections},
                        requests={c.index: len(c.requests) for c in self.connections},
                        connections=len(self.connections))

    def traffic_since(self, mark: Mark) -> Traffic:
        with self._lock:
            data = bytearray()
            requests: List[PeerRequest] = []
            leftover: Dict[int, bytes] = {}
            ended: Dict[int, Optional[str]] = {}
            unframeable: Dict[int, str] = {}
            for conn in self.connections:
                start = mark.received.get(conn.index, 0)
                if len(conn.received) <= start:
                    continue
                data += conn.received[start:]
                requests += conn.requests[mark.requests.get(conn.index, 0):]
                if conn.leftover:
                    leftover[conn.index] = conn.leftover
                ended[conn.index] = conn.ended
                if conn.unframeable:
                    unframeable[conn.index] = conn.unframeable
            requests.sort(key=lambda r: r.seq)
            return Traffic(bytes(data), requests, leftover, ended, unframeable,
                           len(self.connections) - mark.connections)

    @property
    def requests(self) -> List[PeerRequest]:
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    def wait_quiet(self, quiet: float, limit: float) -> None:
        """Return once no byte has arrived for ``quiet`` seconds (or ``limit`` passed)."""
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            with self._lock:
                total = sum(len(c.received) for c in self.connections)
            if total == last:
                return
            last = total
            time.sleep(quiet)

    # -- the loop -----------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._selector is not None
        conns: Dict[socket.socket, PeerConnection] = {}
        try:
            while not self._stopping:
                for key, events in self._selector.select(1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept(conns)
                    elif sock is self._wake_r:
                        continue
                    else:
                        if events & selectors.EVENT_READ:
                            self._read(sock, conns)
                        if events & selectors.EVENT_WRITE and sock in conns:
                            self._flush(sock, conns)
        finally:
            for sock in list(conns):
                self._drop(sock, conns, None)
            for s in (self._listener, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
            self._selector.close()

    def _accept(self, conns: Dict[socket.socket, PeerConnection]) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = PeerConnection(index=len(self.connections))
                self.connections.append(conn)
            conns[sock] = conn
            self._out[sock] = bytearray()
            self._close_after[sock] = False
            self._selector.register(sock, selectors.EVENT_READ, None)

    def _read(self, sock: socket.socket, conns: Dict[socket.socket, PeerConnection]) -> None:
        conn = conns[sock]
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self._drop(sock, conns, "reset")
            return
        if not data:
            self._drop(sock, conns, "eof")
            return
        answers: List[bytes] = []
        with self._lock:
            conn.received += data
            if conn.unframeable:
                return
            try:
                for method, target, version, headers, body, raw in conn.framer.feed(data):
                    self._seq += 1
                    request = PeerRequest(conn.index, method, target, version, headers, body, raw,
                                          self._seq)
                    conn.requests.append(request)
                    if self.answer and not self._close_after[sock]:
                        answers.append(self._answer(conn, request, sock))
                if self.answer and conn.framer.wants_continue():
                    answers.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            except Unframeable as e:
                conn.unframeable = str(e)
        if conn.unframeable:
            self._drop(sock, conns, "peer")
            return
        if answers:
            self._out[sock] += b"".join(answers)
            self._flush(sock, conns)

    def _answer(self, conn: PeerConnection, request: PeerRequest, sock: socket.socket) -> bytes:
        conn.answers += 1
        tokens = (request.header(b"connection") or b"").lower()
        close = b"close" in tokens or (request.version.upper() == b"HTTP/1.0"
                                       and b"keep-alive" not in tokens)
        if close:
            self._close_after[sock] = True
        body = b"" if request.method == b"HEAD" else b"ok"
        return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s: %d-%d\r\n%s\r\n%s"
                % (len(body), PEER_HEADER, conn.index, conn.answers,
                   b"Connection: close\r\n" if close else b"", body))

    def _flush(self, sock: socket.socket, conns: Dict[socket.socket, PeerConnection]) -> None:
        assert self._selector is not None
        out = self._out[sock]
        try:
            while out:
                sent = sock.send(out)
                del out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(sock, conns, "reset")
            return
        if out:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, None)
        elif self._close_after[sock]:
            self._drop(sock, conns, "peer")
        else:
            self._selector.modify(sock, selectors.EVENT_READ, None)

    def _drop(self, sock: socket.socket, conns: Dict[socket.socket, PeerConnection],
              how: Optional[str]) -> None:
        assert self._selector is not None
        conn = conns.pop(sock)
        with self._lock:
            if conn.ended is None:
                conn.ended = how
        self._selector.unregister(sock)
        self._out.pop(sock, None)
        self._close_after.pop(sock, None)
        sock.close()
