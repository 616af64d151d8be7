"""An HTTP/1.1 test peer for lb's HTTP mode: correct where asked, and wrong precisely where asked.

Written on asyncio's transports with its own framing (no HTTP framework), so every byte it sends
is chosen here. Standard library only. Two ways to run it:

- as its own process (so a fault test can SIGKILL or SIGSTOP it)::

      python -m tests.http.backend --port P [--name N] [--idle-close MS] [--max-requests N]

  It listens on 127.0.0.1:P (``--port 0``: a free port) and prints
  ``http backend N listening on 127.0.0.1:P`` once it accepts. ``start_backend_process`` does
  this and waits for that line;
- in the test's process, on an asyncio loop of its own in a daemon thread:
  ``start_backend(name=..., idle_close_ms=...)`` returns a ``Backend`` (``.port``, ``.url()``,
  ``.stats()``, ``.stop()``; a context manager). It does not touch the Twisted reactor, so it
  serves blocking clients in plain tests and lb on the reactor alike.

Every answer carries ``X-Backend: N``, ``X-Backend-Conn: C`` (the connection's serial number,
from 1) and ``X-Backend-Request: R`` (the request's number on that connection, from 1), except the
deliberately broken ones (``/garbage``, ``/cl-te``). Connections are kept alive unless the
request asks to close (``Connection: close``, HTTP/1.0 without ``keep-alive``) or the endpoint
or ``close=1`` says so. Any method works on any endpoint unless said otherwise; HEAD answers the
head GET would have (same Content-Length or Transfer-Encoding), no body. A request body, if any
(Content-Length or chunked), is read before answering, and ``Expect: 100-continue`` gets
``100 Continue`` first. Pipelined requests are answered in order.

Endpoints (query parameters in brackets, defaults after ``=``):

``/``, ``*``             200 ``backend N\\n``.
``/echo``                200 JSON: ``backend, method, target, path, query, version, headers``
                         (``[[name, value], ...]`` as received: order and case kept),
                         ``body_length, body_sha256, framing`` (none|length|chunked),
                         ``trailers, remote`` (``ip:port`` of the client), ``conn, request``.
``/size``                [bytes=1024] 200, Content-Length body of that many bytes, streamed with
                         flow control (any size, memory stays flat). The bytes are
                         ``size_body(n)``: a fixed 64 KiB pseudo-random block, repeated.
``/chunked``             [chunks=4, size=1024, trailers=0, ms=0, ext=0] 200 chunked: that many
                         chunks of that size (together ``size_body(chunks*size)``), ``ms``
                         milliseconds apart; ``trailers=1`` declares ``Trailer: X-Chunks,
                         X-Body-Sha256`` and sends both after the last chunk; ``ext=1`` adds a
                         chunk extension ``;ext=1`` to every size line.
``/slow``                [ms=500] 200 ``backend N (slow)\\n`` after that many milliseconds.
``/slowbody``            [ms=500, bytes] the head (with Content-Length) at once, the body after
                         ``ms``: ``backend N (slow body)\\n``, or ``size_body(bytes)``.
``/status``              [code=200, cl] that status. 204 and 304 have no body and no
                         Content-Length (``cl=N`` adds ``Content-Length: N`` to them anyway, still
                         without a body: legal for 304, a peer's fault for 204); other codes have
                         body ``status C\\n``. 1xx is refused (400): see ``/interim``.
``/interim``             [codes=103, ms=0] those 1xx answers (comma-separated; each with a
                         ``Link`` header), ``ms`` apart, then 200 ``backend N\\n``.
``/upload``              POST or PUT (else 405). Reads the whole body (Content-Length or chunked,
                         streamed, any size) and answers 200 JSON ``backend, method, length,
                         sha256, framing, trailers, expect, continue_sent``.
                         [expect] with ``Expect: 100-continue``: by default ``100 Continue`` is
                         sent first; ``expect=417`` answers 417 instead (body not read,
                         connection closed); ``expect=none`` sends no 100 and reads the body when
                         it comes. [reject=CODE] answers CODE at once without reading the body,
                         with ``Connection: close``, then closes.
``/reset``               [bytes=100000, after=1000, ms=50] head with Content-Length ``bytes``,
                         ``after`` bytes of body, a pause of ``ms``, then a TCP RST (SO_LINGER 0).
``/reset-before``        reads the request, then RST before any byte of an answer.
``/close-before``        reads the request, then closes (FIN) without any byte of an answer.
``/close-after``         200 ``backend N (closing)\\n`` with ``Connection: close``, then FIN.
``/truncate``            [bytes=100000, after=1000] head with Content-Length ``bytes``, ``after``
                         bytes of body, then FIN (a body cut short by a clean close).
``/garbage``             [kind=junk] an invalid answer, then FIN. Kinds: ``junk`` (not HTTP at
                         all), ``status`` (non-numeric status), ``version`` (``XTTP/1.1``),
                         ``header`` (a header line without colon), ``space`` (space before a
                         header's colon), ``fold`` (obsolete line folding), ``cl`` (non-numeric
                         Content-Length), ``cl2`` (two different Content-Lengths), ``chunk`` (a
                         bad chunk size), ``lf`` (bare LF line ends), ``nul`` (NUL in a value).
``/cl-te``               a response smuggling attempt, connection kept open: ``Content-Length: 4``
                         and ``Transfer-Encoding: chunked``; read by Content-Length the body is the
                         size line and a complete fake response follows (``X-Smuggled: 1``, body
                         ``smuggled!``); read as chunked the fake response is the body.
``/bigheaders``          [count=10, size=100] 200 with ``count`` headers ``X-Filler-i`` of
                         ``size`` bytes each.
``/ws``                  GET with ``Upgrade: websocket`` (and Connection: upgrade,
                         Sec-WebSocket-Key, Sec-WebSocket-Version: 13; else 400/426): 101 with
                         the right ``Sec-WebSocket-Accept`` (and the first offered subprotocol),
                         then an RFC 6455 echo: text and binary messages (fragmented ones
                         reassembled) come back whole, ping gets pong, close is answered with the
                         same code and the server closes TCP. Unmasked frames: close 1002;
                         invalid UTF-8 text: close 1007.
``/upgrade``             with any ``Upgrade: X``: 101 ``Upgrade: X``, then raw echo of every
                         byte until the client half-closes (then FIN). Without: 426.
``/stats``               [reset=0] JSON counters (``Stats.snapshot``); ``reset=1`` zeroes them
                         after answering. Not counted itself.
``/health``              200 ``ok``, or 503 after ``/fail``; ``/recover`` undoes it. Not counted.
anything else            404.

Any endpoint: ``close=1`` answers with ``Connection: close`` and closes after.

Flags: ``--idle-close MS`` closes (FIN, no warning) any connection that has no request in
progress, and no byte of a next one, for MS milliseconds: the keep-alive race a proxy must
survive. ``--max-requests N`` closes (FIN, no ``Connection: close``) a connection right after its
N-th answer. Bad requests (unparseable head, ambiguous framing) get 400 and a close; heads over
64 KiB get 431.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import http
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Deque,
    Dict,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)
from urllib.parse import parse_qsl, urlsplit

HOST = "127.0.0.1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BLOCK = random.Random(6455).randbytes(65536)
_WRITE_SIZE = 4 * len(BLOCK)
_BIG = BLOCK * 4  # one write's worth, aligned on the block
HEAD_LIMIT = 65536
READ_HIGH = 256 * 1024  # pause reading past this much unread input
CONTROL_PATHS = frozenset({"/stats", "/health", "/fail", "/recover"})
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
Headers = List[Tuple[str, str]]


def size_body(n: int) -> bytes:
    """The exact body ``/size?bytes=n`` sends (and ``/chunked`` in all, ``/slowbody?bytes=n``)."""
    reps, rest = divmod(n, len(BLOCK))
    return BLOCK * reps + BLOCK[:rest]


def size_slice(start: int, n: int) -> bytes:
    """Bytes ``start`` to ``start + n`` of the endless ``size_body`` pattern."""
    off = start % len(BLOCK)
    return (BLOCK * ((off + n) // len(BLOCK) + 1))[off:off + n]


def size_digest(n: int) -> str:
    """sha256 hex of ``size_body(n)``, computed without holding it."""
    h = hashlib.sha256()
    reps, rest = divmod(n, len(BLOCK))
    for _ in range(reps):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def ws_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


@dataclass
class Options:
    name: str
    idle_close_ms: Optional[int] = None
    max_requests: Optional[int] = None


@dataclass
class ConnRecord:
    id: int
    peer: str
    requests: int = 0  # counted (non-control) requests
    open: bool = True
    closed_by: Optional[str] = None  # idle | max-requests | client | backend | reset | stop


class Stats:
    """What the backend has seen. Requests to the control paths (/stats, /health, /fail,
    /recover) are not counted, and a connection counts in ``connections`` and
    ``requests_per_connection`` from its first counted request on, so a test's own /stats
    queries and a health checker's probes do not disturb the numbers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, open_conns: Sequence[ConnRecord] = (), in_flight: int = 0) -> None:
        """Zero the counters; connections still open stay listed (with no requests yet)
        so that requests they carry later are counted, as are requests in flight."""
        for record in open_conns:
            record.requests = 0
        self.accepted = 0  # every TCP connection accepted
        self.conns: List[ConnRecord] = list(open_conns)
        self.requests = 0
        self.by_path: Dict[str, int] = {}
        self.log: Deque[Dict[str, Any]] = collections.deque(maxlen=1000)
        self.idle_closes = 0
        self.max_requests_closes = 0
        self.upgrades = 0
        self.ws_messages = 0
        self.in_flight = in_flight
        self.max_in_flight = in_flight
        self.bytes_received = 0  # request bodies, counted requests only

    def snapshot(self, open_now: int) -> Dict[str, Any]:
        counted = [c for c in self.conns if c.requests]
        return {
            "accepted": self.accepted,
            "open": open_now,
            "connections": len(counted),
            "requests": self.requests,
            "requests_per_connection": [c.requests for c in counted],
            "connections_detail": [vars(c).copy() for c in counted],
            "by_path": dict(self.by_path),
            "idle_closes": self.idle_closes,
            "max_requests_closes": self.max_requests_closes,
            "upgrades": self.upgrades,
            "ws_messages": self.ws_messages,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "bytes_received": self.bytes_received,
            "log": list(self.log),
        }


class BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class _Gone(Exception):
    """The client went away (EOF or reset) where the backend needed more."""


class _Done(Exception):
    """The connection is finished (already closed or aborted by the handler)."""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: Headers
    path: str
    query: Dict[str, str]
    seq: int
    framing: str = "none"  # none | length | chunked
    length: int = 0
    body_done: bool = False
    body_length: int = 0
    body_sha256: str = hashlib.sha256().hexdigest()
    trailers: Headers = field(default_factory=list)
    continue_sent: bool = False
    counted: bool = True

    def header(self, name: str) -> Optional[str]:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def tokens(self, name: str) -> Set[str]:
        value = self.header(name) or ""
        return {t.strip().lower() for t in value.split(",") if t.strip()}

    @property
    def keep_alive(self) -> bool:
        conn = self.tokens("connection")
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    @property
    def expects_continue(self) -> bool:
        return self.version == "HTTP/1.1" and (self.header("expect") or "").lower() == \
            "100-continue" and self.framing != "none"

    def int_arg(self, name: str, default: int) -> int:
        try:
            return int(self.query.get(name, default))
        except ValueError:
            raise BadRequest(400, f"{name} must be an integer") from None


def parse_head(head: bytes, seq: int) -> Request:
    """The request line and headers (``head`` without its final CRLF CRLF)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest(400, "undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, f"bad request line {lines[0]!r}")
    method, target, version = parts
    if not TOKEN.match(method) or version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, f"bad request line {lines[0]!r}")
    headers: Headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.match(name):
            raise BadRequest(400, f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    split = urlsplit(target)
    path = "*" if target == "*" else (split.path or "/")
    req = Request(method, target, version, headers, path,
                  dict(parse_qsl(split.query, keep_blank_values=True)), seq)
    te = [v for k, v in headers if k.lower() == "transfer-encoding"]
    cl = [v for k, v in headers if k.lower() == "content-length"]
    if te:
        codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
        if not codings or codings[-1] != "chunked" or cl:
            raise BadRequest(400, "ambiguous or unsupported Transfer-Encoding")
        req.framing = "chunked"
    elif cl:
        values = {v.strip() for value in cl for v in value.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise BadRequest(400, "invalid Content-Length")
        req.length = int(values.pop())
        req.framing = "length" if req.length else "none"
    if req.framing == "none":
        req.body_done = True
    return req


def reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"


class Server:
    """One backend: its options, counters and open connections, on one asyncio loop."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stats = Stats()
        self.healthy = True
        self.conns: Set["Connection"] = set()
        self.tasks: Set["asyncio.Task[None]"] = set()
        self._next_id = 0
        self.server: Optional[asyncio.AbstractServer] = None

    async def listen(self, port: int, host: str = HOST) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self), host, port,
                                               backlog=1024, reuse_address=True)
        return int(self.server.sockets[0].getsockname()[1])

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def snapshot(self) -> Dict[str, Any]:
        snap = self.stats.snapshot(len(self.conns))
        snap["name"] = self.options.name
        return snap

    def reset_stats(self) -> None:
        self.stats.reset([c.record for c in self.conns if c.record is not None],
                         self.stats.in_flight)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn.closed_by("stop")
            conn.transport.abort()


class Connection(asyncio.Protocol):
    """One client connection: buffered input with flow control both ways, and the request
    loop that reads a request, answers it, and goes on while the connection is kept alive."""

    transport: asyncio.Transport

    def __init__(self, server: Server) -> None:
        self.server = server
        self.opts = server.options
        self.buf = bytearray()
        self.eof = False
        self.lost = False
        self.reading_paused = False
        self._waiter: Optional[asyncio.Future[None]] = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.served = 0
        self.task: Optional[asyncio.Task[None]] = None
        self.record: Optional[ConnRecord] = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.server.stats.accepted += 1
        self.record = ConnRecord(self.server.new_id(), f"{peer[0]}:{peer[1]}")
        self.server.stats.conns.append(self.record)
        self.server.conns.add(self)
        self.task = asyncio.get_running_loop().create_task(self.run())
        self.server.tasks.add(self.task)
        self.task.add_done_callback(self.server.tasks.discard)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > READ_HIGH and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # half-open: the answer may still go out

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = self.eof = True
        self.server.conns.discard(self)
        if self.record is not None:
            self.record.open = False
            if self.record.closed_by is None:
                self.record.closed_by = "client"
        self._writable.set()
        self._wake()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- input ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for more input, EOF or loss; False when ``timeout`` passed first."""
        if self.eof:
            return True
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        if self.reading_paused and len(self.buf) < READ_HIGH // 2 and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        """Input up to ``sep`` (which is consumed, not returned)."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                data = self._take(i + len(sep))
                return data[:-len(sep)]
            if len(self.buf) > limit:
                raise BadRequest(431, "head too large")
            if self.eof:
                raise _Gone()
            start = max(0, len(self.buf) - len(sep) + 1)
            await self._wait()

    async def read_some(self, most: int) -> bytes:
        while not self.buf:
            if self.eof:
                raise _Gone()
            await self._wait()
        return self._take(min(most, len(self.buf)))

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof:
                raise _Gone()
            await self._wait()
        return self._take(n)

    # -- output --------------------------------------------------------------------------

    async def write(self, data: Union[bytes, memoryview]) -> None:
        if self.lost:
            raise _Gone()
        self.transport.write(data)
        await self._writable.wait()
        if self.lost:
            raise _Gone()

    async def flushed(self) -> None:
        """Until asyncio's buffer is empty: all written bytes are in the kernel."""
        while not self.lost and self.transport.get_write_buffer_size():
            await asyncio.sleep(0.001)

    def closed_by(self, why: str) -> None:
        if self.record is not None and self.record.closed_by is None:
            self.record.closed_by = why

    def reset(self) -> None:
        """Abort with an RST (SO_LINGER 0), unsent output dropped."""
        self.closed_by("reset")
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def finish(self, why: str = "backend", linger: float = 2.0) -> None:
        """Close after everything written is sent: FIN, then read and drop what the client
        still sends (for at most ``linger`` seconds) so unread input does not turn the close
        into an RST that would destroy the answer."""
        self.closed_by(why)
        if self.lost:
            return
        await self._writable.wait()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        deadline = time.monotonic() + linger
        while not self.eof:
            self.buf.clear()
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            left = deadline - time.monotonic()
            if left <= 0 or not await self._wait(left):
                break
        self.transport.close()

    # -- the request loop ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._serve()
        except _Done:
            pass
        except _Gone:
            self.transport.close()
        except Exception as exc:  # a bug here must not pass silently
            print(f"backend {self.opts.name}: {exc!r}", file=sys.stderr, flush=True)
            self.reset()

    async def _serve(self) -> None:
        idle = self.opts.idle_close_ms / 1000 if self.opts.idle_close_ms else None
        seq = 0
        while True:
            while self.buf[:2] == b"\r\n":  # empty lines before a request line are allowed
                del self.buf[:2]
            if not self.buf:
                if self.eof:
                    self.transport.close()
                    return
                if not await self._wait(idle):
                    self.server.stats.idle_closes += 1
                    self.closed_by("idle")
                    self.transport.close()
                    return
                continue
            seq += 1
            try:
                head = await self.read_until(b"\r\n\r\n", HEAD_LIMIT)
                req = parse_head(head, seq)
            except BadRequest as exc:
                await self.refuse(exc)
                return
            keep = await self.handle(req)
            self.served += 1
            if not keep:
                await self.finish()
                return
            if self.opts.max_requests and self.served >= self.opts.max_requests:
                self.server.stats.max_requests_closes += 1
                self.closed_by("max-requests")
                self.transport.close()
                return

    async def refuse(self, exc: BadRequest) -> None:
        body = f"{exc}\n".encode()
        await self.write(
            f"HTTP/1.1 {exc.status} {reason(exc.status)}\r\nX-Backend: {self.opts.name}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await self.finish()

    async def handle(self, req: Request) -> bool:
        stats = self.server.stats
        req.counted = req.path not in CONTROL_PATHS
        if req.counted:
            assert self.record is not None
            self.record.requests += 1
            stats.requests += 1
            stats.by_path[req.path] = stats.by_path.get(req.path, 0) + 1
            stats.log.append({"conn": self.record.id, "request": req.seq, "method": req.method,
                              "target": req.target, "version": req.version,
                              "framing": req.framing})
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            handler = ROUTES.get(req.path, Connection.h_not_found)
            try:
                keep = await handler(self, req)
            except BadRequest as exc:
                await self.refuse(exc)
                raise _Done() from None
            if keep and not req.body_done:
                await self.consume(req)  # the handler did not want it: drop it
            return keep
        finally:
            if req.counted:
                stats.in_flight -= 1

    # -- bodies ----------------------------------------------------------------------------

    async def send_continue(self, req: Request) -> None:
        if req.expects_continue and not req.continue_sent:
            req.continue_sent = True
            await self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def body_chunks(self, req: Request) -> AsyncIterator[bytes]:
        """The request's body as it arrives (Content-Length or chunked); trailers land in
        ``req.trailers``."""
        if req.framing == "length":
            left = req.length
            while left:
                data = await self.read_some(min(left, 65536))
                left -= len(data)
                yield data
        elif req.framing == "chunked":
            while True:
                line = await self.read_until(b"\r\n", 4096)
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
                    raise BadRequest(400, f"bad chunk size line {line[:40]!r}")
                size = int(size_text, 16)
                if size == 0:
                    break
                while size:
                    data = await self.read_some(min(size, 65536))
                    size -= len(data)
                    yield data
                if await self.read_exactly(2) != b"\r\n":
                    raise BadRequest(400, "chunk data not followed by CRLF")
            while True:
                line = await self.read_until(b"\r\n", HEAD_LIMIT)
                if not line:
                    break
                name, colon, value = line.decode("latin-1").partition(":")
                if not colon or not TOKEN.match(name):
                    raise BadRequest(400, f"bad trailer line {line[:40]!r}")
                req.trailers.append((name, value.strip(" \t")))
        req.body_done = True

    async def consume(self, req: Request) -> None:
        """Read the whole body (sending 100 Continue first when asked), hashing it."""
        if req.body_done:
            return
        await self.send_continue(req)
        h = hashlib.sha256()
        n = 0
        async for data in self.body_chunks(req):
            h.update(data)
            n += len(data)
        req.body_length, req.body_sha256 = n, h.hexdigest()
        if req.counted:
            self.server.stats.bytes_received += n

    # -- answers ---------------------------------------------------------------------------

    def head(self, req: Request, status: int, headers: Headers, keep: bool) -> bytes:
        assert self.record is not None
        lines = [f"HTTP/1.1 {status} {reason(status)}", f"X-Backend: {self.opts.name}",
                 f"X-Backend-Conn: {self.record.id}", f"X-Backend-Request: {req.seq}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if not keep:
            lines.append("Connection: close")
        elif req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def keep(self, req: Request) -> bool:
        return req.keep_alive and req.query.get("close") != "1"

    async def respond(self, req: Request, status: int, body: bytes,
                      headers: Optional[Headers] = None,
                      content_type: str = "text/plain") -> bool:
        await self.consume(req)
        keep = self.keep(req)
        hdrs = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        hdrs += headers or []
        await self.write(self.head(req, status, hdrs, keep)
                         + (b"" if req.method == "HEAD" else body))
        return keep

    async def respond_json(self, req: Request, obj: Any, status: int = 200) -> bool:
        return await self.respond(req, status, (json.dumps(obj) + "\n").encode(),
                                  content_type="application/json")

    # -- endpoints -------------------------------------------------------------------------

    async def h_root(self, req: Request) -> bool:
        return await self.respond(req, 200, f"backend {self.opts.name}\n".encode())

    async def h_not_found(self, req: Request) -> bool:
        return await self.respond(req, 404, f"no endpoint {req.path}\n".encode())

    async def h_echo(self, req: Request) -> bool:
        await self.consume(req)
        assert self.record is not None
        return await self.respond_json(req, {
            "backend": self.opts.name, "method": req.method, "target": req.target,
            "path": req.path, "query": req.query, "version": req.version,
            "headers": [[k, v] for k, v in req.headers], "body_length": req.body_length,
            "body_sha256": req.body_sha256, "framing": req.framing,
            "trailers": [[k, v] for k, v in req.trailers], "remote": self.record.peer,
            "conn": self.record.id, "request": req.seq})

    async def h_size(self, req: Request) -> bool:
        n = req.int_arg("bytes", 1024)
        await self.consume(req)
        keep = self.keep(req)
        await self.write(self.head(req, 200, [("Content-Type", "application/octet-stream"),
                                              ("Content-Length", str(n))], keep))
        if req.method != "HEAD":
            await self.stream(n)
        return keep

    async def stream(self, n: int) -> None:
        """``size_body(n)`` written as the client takes it."""
        big = memoryview(_BIG)
        while n > 0:
            step = min(n, _WRITE_SIZE)
            await self.write(big[:step])
            n -= step

    async def h_chunked(self, req: Request) -> bool:
        count, size = req.int_arg("chunks", 4), req.int_arg("size", 1024)
        delay = req.int_arg("ms", 0) / 1000
        trailers = req.query.get("trailers") == "1"
        ext = b";ext=1" if req.query.get("ext") == "1" else b""
        await self.consume(req)
        keep = self.keep(req)
        hdrs = [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]
        if trailers:
            hdrs.append(("Trailer", "X-Chunks, X-Body-Sha256"))
        await self.write(self.head(req, 200, hdrs, keep))
        if req.method == "HEAD":
            return keep
        h = hashlib.sha256()
        for i in range(count):
            if delay and i:
                await asyncio.sleep(delay)
            piece = size_slice(i * size, size)
            h.update(piece)
            if size:
                await self.write(b"%x%s\r\n" % (size, ext) + piece + b"\r\n")
        end = b"0" + ext + b"\r\n"
        if trailers:
            end += f"X-Chunks: {count}\r\nX-Body-Sha256: {h.hexdigest()}\r\n".encode()
        await self.write(end + b"\r\n")
        return keep

    async def h_slow(self, req: Request) -> bool:
        await self.consume(req)
        await asyncio.sleep(req.int_arg("ms", 500) / 1000)
        return await self.respond(req, 200, f"backend {self.opts.name} (slow)\n".encode())

    async def h_slowbody(self, req: Request) -> bool:
        delay = req.int_arg("ms", 500) / 1000
        size = req.query.get("bytes")
        body = size_body(req.int_arg("bytes", 0)) if size is not None else \
            f"backend {self.opts.name} (slow body)\n".encode()
        await self.consume(req)
        keep = self.keep(req)
        await self.write(self.head(req, 200, [("Content-Type", "text/plain"),
                                              ("Content-Length", str(len(body)))], keep))
        if req.method != "HEAD":
            await asyncio.sleep(delay)
            await self.write(body)
        return keep

    async def h_status(self, req: Request) -> bool:
        code = req.int_arg("code", 200)
        if not 200 <= code <= 999:
            raise BadRequest(400, "code must be 200..999 (1xx: /interim)")
        if code in (204, 304):
            await self.consume(req)
            keep = self.keep(req)
            hdrs: Headers = [("ETag", '"v1"')] if code == 304 else []
            if "cl" in req.query:
                hdrs.append(("Content-Length", str(req.int_arg("cl", 0))))
            await self.write(self.head(req, code, hdrs, keep))
            return keep
        return await self.respond(req, code, f"status {code}\n".encode())

    async def h_interim(self, req: Request) -> bool:
        delay = req.int_arg("ms", 0) / 1000
        codes = [int(c) for c in req.query.get("codes", "103").split(",") if c.strip()]
        if any(not 100 <= c < 200 or c == 101 for c in codes):
            raise BadRequest(400, "codes must be 1xx other than 101")
        await self.consume(req)
        for i, code in enumerate(codes):
            if delay and i:
                await asyncio.sleep(delay)
            await self.write(f"HTTP/1.1 {code} {reason(code)}\r\n"
                             f"Link: </interim-{i}.css>; rel=preload\r\n\r\n".encode())
        if delay:
            await asyncio.sleep(delay)
        return await self.respond(req, 200, f"backend {self.opts.name}\n".encode())

    async def h_upload(self, req: Request) -> bool:
        if req.method not in ("POST", "PUT"):
            return await self.respond(req, 405, b"POST or PUT\n", [("Allow", "POST, PUT")])
        if "reject" in req.query:
            code = req.int_arg("reject", 413)
            body = f"rejected {code}\n".encode()
            req.body_done = True  # not read: the connection closes after
            await self.write(self.head(req, code, [("Content-Type", "text/plain"),
                                                   ("Content-Length", str(len(body)))],
                                       False) + body)
            await self.finish()
            raise _Done()
        expect = req.query.get("expect")
        if req.expects_continue and expect == "417":
            req.body_done = True
            await self.write(self.head(req, 417, [("Content-Length", "0")], False))
            await self.finish()
            raise _Done()
        if expect == "none":
            h = hashlib.sha256()
            n = 0
            async for data in self.body_chunks(req):
                h.update(data)
                n += len(data)
            req.body_length, req.body_sha256 = n, h.hexdigest()
            self.server.stats.bytes_received += n
        else:
            await self.consume(req)
        return await self.respond_json(req, {
            "backend": self.opts.name, "method": req.method, "length": req.body_length,
            "sha256": req.body_sha256, "framing": req.framing,
            "trailers": [[k, v] for k, v in req.trailers], "expect": req.header("expect"),
            "continue_sent": req.continue_sent})

    async def _part_of_an_answer(self, req: Request) -> None:
        """A head announcing ``bytes`` and only the first ``after`` of them."""
        total, after = req.int_arg("bytes", 100000), req.int_arg("after", 1000)
        await self.consume(req)
        await self.write(self.head(req, 200, [("Content-Type", "application/octet-stream"),
                                              ("Content-Length", str(total))], True))
        if req.method != "HEAD":
            await self.write(size_body(min(after, total)))

    async def h_reset(self, req: Request) -> bool:
        await self._part_of_an_answer(req)
        await self.flushed()
        await asyncio.sleep(req.int_arg("ms", 50) / 1000)
        self.reset()
        raise _Done()

    async def h_reset_before(self, req: Request) -> bool:
        await self.consume(req)
        self.reset()
        raise _Done()

    async def h_close_before(self, req: Request) -> bool:
        await self.consume(req)
        await self.finish()
        raise _Done()

    async def h_close_after(self, req: Request) -> bool:
        req.query["close"] = "1"
        return await self.respond(req, 200, f"backend {self.opts.name} (closing)\n".encode())

    async def h_truncate(self, req: Request) -> bool:
        await self._part_of_an_answer(req)
        await self.finish()
        raise _Done()

    async def h_garbage(self, req: Request) -> bool:
        kind = req.query.get("kind", "junk")
        if kind not in GARBAGE:
            raise BadRequest(400, f"kind must be one of {', '.join(sorted(GARBAGE))}")
        await self.consume(req)
        await self.write(GARBAGE[kind])
        await self.finish()
        raise _Done()

    async def h_cl_te(self, req: Request) -> bool:
        await self.consume(req)
        await self.write(CL_TE_RESPONSE)
        return True

    async def h_bigheaders(self, req: Request) -> bool:
        count, size = req.int_arg("count", 10), req.int_arg("size", 100)
        return await self.respond(req, 200, f"backend {self.opts.name}\n".encode(),
                                  [(f"X-Filler-{i}", "f" * size) for i in range(count)])

    async def h_stats(self, req: Request) -> bool:
        snap = self.server.snapshot()
        keep = await self.respond_json(req, snap)
        if req.query.get("reset") == "1":
            self.server.reset_stats()
        return keep

    async def h_health(self, req: Request) -> bool:
        if self.server.healthy:
            return await self.respond(req, 200, b"ok\n")
        return await self.respond(req, 503, b"unhealthy\n")

    async def h_fail(self, req: Request) -> bool:
        self.server.healthy = req.path == "/recover"
        return await self.respond(req, 200, f"healthy={self.server.healthy}\n".encode())

    # -- upgrades --------------------------------------------------------------------------

    async def h_upgrade(self, req: Request) -> bool:
        proto = req.header("upgrade")
        if not proto or "upgrade" not in req.tokens("connection"):
            return await self.respond(req, 426, b"Upgrade required\n",
                                      [("Upgrade", "echo")])
        await self.consume(req)
        self.server.stats.upgrades += 1
        await self.write(self.head(req, 101, [("Upgrade", proto), ("Connection", "Upgrade")],
                                   True))
        try:
            while True:
                await self.write(await self.read_some(65536))
        except _Gone:
            pass
        await self.finish(linger=0)
        raise _Done()

    async def h_ws(self, req: Request) -> bool:
        key = req.header("sec-websocket-key") or ""
        if req.method != "GET" or "websocket" not in req.tokens("upgrade") \
                or "upgrade" not in req.tokens("connection") or not key:
            return await self.respond(req, 400, b"not a WebSocket handshake\n")
        if req.header("sec-websocket-version") != "13":
            return await self.respond(req, 426, b"WebSocket version 13 only\n",
                                      [("Sec-WebSocket-Version", "13")])
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError(key)
        except ValueError:
            return await self.respond(req, 400, b"bad Sec-WebSocket-Key\n")
        await self.consume(req)
        hdrs = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", ws_accept(key))]
        offered = [p.strip() for p in (req.header("sec-websocket-protocol") or "").split(",")
                   if p.strip()]
        if offered:
            hdrs.append(("Sec-WebSocket-Protocol", offered[0]))
        self.server.stats.upgrades += 1
        await self.write(self.head(req, 101, hdrs, True))
        try:
            await self.ws_echo()
        except _Gone:
            self.transport.close()
        raise _Done()

    async def ws_send(self, opcode: int, payload: bytes) -> None:
        await self.write(ws_frame(opcode, payload))

    async def ws_close(self, code: int, why: str = "") -> None:
        await self.ws_send(8, struct.pack("!H", code) + why.encode())
        await self.finish(linger=1.0)

    async def ws_echo(self) -> None:
        """RFC 6455 server side: echo messages, answer pings and the close handshake."""
        message = bytearray()
        message_op = 0
        while True:
            b0, b1 = await self.read_exactly(2)
            fin, rsv, opcode = b0 & 0x80, b0 & 0x70, b0 & 0x0F
            masked, n = b1 & 0x80, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.read_exactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.read_exactly(8))
            if rsv or not masked or opcode in (3, 4, 5, 6, 7) or opcode > 10:
                return await self.ws_close(1002, "protocol error")
            if opcode >= 8 and (not fin or n > 125):
                return await self.ws_close(1002, "bad control frame")
            if n > 64 << 20:
                return await self.ws_close(1009, "too big")
            mask = await self.read_exactly(4)
            payload = unmask(await self.read_exactly(n), mask)
            if opcode == 8:
                if len(payload) == 1:
                    return await self.ws_close(1002, "bad close payload")
                await self.write(ws_frame(8, payload[:2]))
                await self.finish(linger=1.0)
                return
            if opcode == 9:
                await self.ws_send(10, payload)
                continue
            if opcode == 10:
                continue
            if opcode == 0 and not message_op or opcode in (1, 2) and message_op:
                return await self.ws_close(1002, "bad fragmentation")
            if opcode:
                message_op = opcode
            message += payload
            if len(message) > 64 << 20:
                return await self.ws_close(1009, "too big")
            if fin:
                data, op = bytes(message), message_op
                message.clear()
                message_op = 0
                if op == 1:
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        return await self.ws_close(1007, "invalid UTF-8")
                self.server.stats.ws_messages += 1
                await self.ws_send(op, data)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


_FAKE = b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\nContent-Length: 9\r\n\r\nsmuggled!"
_SIZE_LINE = b"%x\r\n" % len(_FAKE)
CL_TE_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                  % len(_SIZE_LINE) + _SIZE_LINE + _FAKE + b"\r\n0\r\n\r\n")

GARBAGE: Dict[str, bytes] = {
    "junk": b"this is not HTTP at all\r\n\r\n",
    "status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "version": b"XTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "header": b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 2\r\n\r\nok",
    "space": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "fold": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "cl": b"HTTP/1.1 200 OK\r\nContent-Length: two\r\n\r\nok",
    "cl2": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "nul": b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok",
}

ROUTES: Dict[str, Callable[[Connection, Request], Awaitable[bool]]] = {
    "/": Connection.h_root, "*": Connection.h_root, "/echo": Connection.h_echo,
    "/size": Connection.h_size, "/chunked": Connection.h_chunked, "/slow": Connection.h_slow,
    "/slowbody": Connection.h_slowbody, "/status": Connection.h_status,
    "/interim": Connection.h_interim, "/upload": Connection.h_upload,
    "/reset": Connection.h_reset, "/reset-before": Connection.h_reset_before,
    "/close-before": Connection.h_close_before, "/close-after": Connection.h_close_after,
    "/truncate": Connection.h_truncate, "/garbage": Connection.h_garbage,
    "/cl-te": Connection.h_cl_te, "/bigheaders": Connection.h_bigheaders,
    "/stats": Connection.h_stats, "/health": Connection.h_health,
    "/fail": Connection.h_fail, "/recover": Connection.h_fail,
    "/upgrade": Connection.h_upgrade, "/ws": Connection.h_ws,
}


# -- in-process ----------------------------------------------------------------------------

class Backend:
    """A backend serving on 127.0.0.1 from an asyncio loop in a daemon thread."""

    def __init__(self, name: Optional[str] = None, port: int = 0, *,
                 idle_close_ms: Optional[int] = None,
                 max_requests: Optional[int] = None) -> None:
        self.host = HOST
        self.port = port
        self.server = Server(Options(name or "", idle_close_ms, max_requests))
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"http-backend-{name}",
                                       daemon=True)

    @property
    def name(self) -> str:
        return self.server.options.name

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.port = self.loop.run_until_complete(self.server.listen(self.port))
            if not self.server.options.name:
                self.server.options.name = str(self.port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self, timeout: float = 10.0) -> "Backend":
        self.thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"backend did not start in {timeout:g}s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    def _call(self, fn: Any, timeout: float = 10.0) -> Any:
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def stats(self) -> Dict[str, Any]:
        """The same JSON ``/stats`` answers, read without a request."""
        return self._call(self.server.snapshot)  # type: ignore[no-any-return]

    def reset_stats(self) -> None:
        self._call(self.server.reset_stats)

    def set_healthy(self, healthy: bool) -> None:
        def set_() -> None:
            self.server.healthy = healthy
        self._call(set_)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and abort every connection; returns when the thread is gone."""
        if not self.thread.is_alive():
            return

        async def shut() -> None:
            tasks = list(self.server.tasks)
            self.server.close()
            for task in tasks:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("backend thread did not stop")

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_backend(name: Optional[str] = None, port: int = 0, *,
                  idle_close_ms: Optional[int] = None,
                  max_requests: Optional[int] = None) -> Backend:
    """Start a backend in this process (its own loop in a thread) on 127.0.0.1:``port``
    (0: a free one); the name defaults to the port. Stop it with ``.stop()`` or ``with``."""
    return Backend(name, port, idle_close_ms=idle_close_ms, max_requests=max_requests).start()


# -- as a process ----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY = re.compile(r"http backend (\S+) listening on 127\.0\.0\.1:(\d+)")


class BackendProcess:
    """A backend in a process of its own (a ``tests.processes.Proc``: own session, output in
    ``log_path``), so a test can SIGKILL or SIGSTOP it alone."""

    def __init__(self, proc: Any, port: int, name: str) -> None:
        self.proc = proc
        self.host = HOST
        self.port = port
        self.name = name

    @property
    def pid(self) -> int:
        return int(self.proc.popen.pid)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    def stats(self, timeout: float = 5.0) -> Dict[str, Any]:
        """GET /stats on a fresh connection (not counted)."""
        import urllib.request
        with urllib.request.urlopen(self.url("/stats"), timeout=timeout) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def rss_kib(self, peak: bool = False) -> int:
        """Resident set size (``peak``: the high-water mark) from /proc, in KiB."""
        key = "VmHWM:" if peak else "VmRSS:"
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
        raise AssertionError(f"no {key} for pid {self.pid}")

    def signal(self, signum: int) -> None:
        self.proc.signal(signum)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        import signal
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        import signal
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        import signal
        self.proc.signal(signal.SIGCONT)

    def stop(self) -> None:
        import signal
        if self.proc.popen.poll() is None:
            self.proc.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.proc.stop()

    def __enter__(self) -> "BackendProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_backend_process(log_path: str, port: int = 0, name: Optional[str] = None, *,
                          idle_close_ms: Optional[int] = None,
                          max_requests: Optional[int] = None,
                          timeout: float = 15.0) -> BackendProcess:
    """``python -m tests.http.backend`` as a child process; returns once it accepts. With
    ``port=0`` the process picks a free port and reports it on its ready line."""
    from tests.processes import Proc, wait_for
    args = [sys.executable, "-m", "tests.http.backend", "--port", str(port)]
    if name:
        args += ["--name", name]
    if idle_close_ms is not None:
        args += ["--idle-close", str(idle_close_ms)]
    if max_requests is not None:
        args += ["--max-requests", str(max_requests)]
    proc = Proc(args, REPO, log_path)
    try:
        def ready() -> Optional["re.Match[str]"]:
            if proc.popen.poll() is not None:
                raise AssertionError(f"backend exited {proc.popen.returncode}: {proc.log()}")
            return READY.search(proc.log())
        match = wait_for(ready, timeout, what="the backend's ready line")
        assert isinstance(match, re.Match)
        return BackendProcess(proc, int(match.group(2)), match.group(1))
    except BaseException:
        proc.stop()
        raise


async def serve(options: Options, port: int) -> None:
    server = Server(options)
    port = await server.listen(port)
    if not options.name:
        options.name = str(port)
    print(f"http backend {options.name} listening on {HOST}:{port}", flush=True)
    await asyncio.Event().wait()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.http.backend",
                                     description="HTTP/1.1 test peer for lb's HTTP mode")
    parser.add_argument("--port", type=int, required=True, help="0: a free port")
    parser.add_argument("--name", default="", help="named in answers (default: the port)")
    parser.add_argument("--idle-close", type=int, metavar="MS", default=None,
                        help="close connections idle for this long")
    parser.add_argument("--max-requests", type=int, metavar="N", default=None,
                        help="close a connection after its N-th answer")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(Options(args.name, args.idle_close, args.max_requests), args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
