"""The HTTP proxy: a client connection's requests, each routed, balanced and answered on its
own (HAProxy's ``mode http``, nginx's ``proxy_pass`` to a keep-alive upstream).

``HTTPSession`` owns one client connection on the pump's epoll loop: it reads bytes, feeds
httptools' llhttp parser (its callbacks land here), and answers requests strictly in order:
while one request is being answered the client is not read (pipelined requests that came in
the same read wait, parsed, in a short queue), so memory per connection stays bounded.

``Exchange`` is one request and its answer: route → pick → connect (an idle keep-alive
connection or a new one, through the connector shared with TCP mode, which retries refused
connects on other peers) → the request head and body streamed to the peer → the answer
streamed back. A reused connection the peer had just closed is retried on a fresh one; other
failures are retried on another peer per ``retry_on`` (idempotent methods, a request whose
body was kept, before any byte of the answer reached the client). Every request ends in one
access-log line and the HTTP metrics.
"""

from __future__ import annotations

import os
import select
import socket
from collections import deque
from typing import Any, Deque, FrozenSet, List, Optional, Protocol, Tuple

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)
from twisted.logger import Logger
from zope.interface import implementer

from lb.http import answers
from lb.http.answers import Answer
from lb.http.messages import BadMessage, ChunkScanner, RequestHead, ResponseHead
from lb.http.sticky import StickyPeers, find_cookie, hash_key
from lb.http.tunnel import Tunnel
from lb.http.upstream import UpstreamConnection, UpstreamPool
from lb.interfaces import NO_CONTEXT, IClosable, PickContext
from lb.net import host_port
from lb.peer import Peer
from lb.pool import Pool
from lb.proxy import proxyprotocol
from lb.proxy.carriers.pump import PIPE_SIZE
from lb.proxy.connector import Attempt

_SPLICE_FLAGS = (os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE) if hasattr(os, "splice") else 0

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
CHUNK = 65536
KEEP_BODY = 65536  # request bodies up to this are kept, so the request can be retried
PAUSE_AT = 262144  # bytes waiting for the client (or the peer) before the other side pauses
SPLICE_AT = 65536  # body bytes still to come from which the rest goes through splice(2)
MAX_ANSWER_HEAD = 65536  # a peer's answer head beyond this is a bad answer (502)
# what the peer's bytes are, in Exchange.body_mode
_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(5)
_ID_PREFIX = os.urandom(6).hex()

# retry_on conditions
CONNECT_FAILURE = "connect-failure"
EMPTY_RESPONSE = "empty-response"
RESET = "reset"
REUSED = "reused-connection"  # lb_http_retries_total: the keep-alive race, on a fresh one


class HTTPHost(Protocol):
    """What an HTTP session needs from its listener."""

    pump: Any
    clock: Any
    config: Any  # the ListenerConfig (name, http settings, accept_proxy)
    access_log: Any
    id_lower: Optional[bytes]  # the request-id header's name, lower case (None: off)
    id_header: bytes  # ... as written

    def route(self, head: RequestHead) -> Tuple[Optional[Any], Optional[Pool], str]: ...

    def upstreams(self, pool: Pool) -> UpstreamPool: ...

    def counted(self, exchange: "Exchange") -> None: ...

    def counted_retry(self, exchange: "Exchange", condition: str) -> None: ...

    def session_ended(self, session: Any, reason: str) -> None: ...


class HTTPSession:
    """One client connection in HTTP mode."""

    log = Logger()
    __slots__ = ("listener", "sock", "fd", "client", "destination", "parser", "head",
                 "current", "queue", "out", "reading", "closing", "closed", "mask",
                 "last_active", "head_started", "head_bytes", "in_url", "in_head",
                 "header_reader",
                 "started", "requests", "tunnel", "half_closed", "end_reason", "clock", "drained",
                 "client_ip", "client_text", "pick_context", "now", "forwarded",
                 "__weakref__")

    def __init__(self, listener: HTTPHost, sock: socket.socket, client: Any, destination: Any,
                 now: float) -> None:
        self.listener = listener
        self.clock = listener.clock
        self.sock = sock
        self.fd = sock.fileno()
        self.destination = destination
        self.client = client  # see _client_known: a PROXY header may change it
        self.client_ip: Optional[str] = None
        self.client_text = ""
        self.pick_context = NO_CONTEXT
        self._client_known()
        self.parser = HttpRequestParser(self)
        self.head: Optional[RequestHead] = None  # being read
        self.current: Optional[Exchange] = None  # being answered
        self.queue: Deque[Exchange] = deque()  # pipelined, read, waiting their turn
        self.out: Optional[memoryview] = None  # bytes the client has not taken
        self.reading = True
        self.closing = False  # close once the current answer is sent
        self.drained = False  # shutdown came while a request was on its way: answer, close
        self.closed = False
        self.mask = _IN
        self.started = self.last_active = self.now = now  # now: the event being handled
        self.head_started = 0.0  # when the request head being read began (408)
        self.head_bytes = 0
        self.in_url = False
        self.in_head = False  # between a request's first byte and the end of its head
        self.header_reader = proxyprotocol.HeaderReader() if listener.config.accept_proxy \
            else None
        self.requests = 0
        self.tunnel: Any = None
        self.half_closed = False
        self.end_reason = "closed"
        listener.pump.watch(self.fd, self, _IN)

    # --- the pump's side ---------------------------------------------------------------------

    def on_event(self, fd: int, events: int) -> None:
        if events & _OUT:
            if self.out is not None:
                self._flush()
            elif self.current is not None and self.current.piped:
                self.current.flush_pipe()
        if events & (_IN | _ERR) and not self.closed:
            if self.reading:
                self._read()
            else:
                self._update()  # not reading now: stop being woken for it

    def on_bug(self) -> None:
        self.end_reason = "error"
        self.abort()

    def _read(self) -> None:
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self.end_reason = "client_reset"
            self.abort()
            return
        if not data:
            self._client_eof()
            return
        self.last_active = self.now = self.clock.seconds()
        if self.header_reader is not None:
            try:
                info, data = self.header_reader.feed(data)
            except proxyprotocol.InvalidProxyHeader:
                self.end_reason = "bad_proxy_header"
                self.abort()
                return
            if info is None:
                return
            self.header_reader = None
            self.client = proxyprotocol.address_of(info) or self.client
            if info.destination is not None:
                self.destination = info.destination
            self._client_known()
            if not data:
                return
        self._feed(data)

    def _client_known(self) -> None:
        """What every request of this client uses: its address as text, as a pick context
        for the balancer, and (when it is not a trusted proxy) the X-Forwarded headers lb
        sets on each of its requests, but for X-Forwarded-Host."""
        self.client_ip = getattr(self.client, "host", None)
        self.client_text = host_port(self.client)
        self.pick_context = PickContext(self.client_ip)
        http = self.listener.config.http
        self.forwarded = b""
        if http.forwarded != "off" and not (
                http.forwarded == "append" and _trusted(self.client_ip or "",
                                                        http.trusted_proxies)):
            port = getattr(self.destination, "port", "")
            self.forwarded = (b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: http\r\n"
                              b"X-Forwarded-Port: %b\r\n" % (
                                  (self.client_ip or "").encode(), str(port).encode()))

    def _feed(self, data: bytes) -> None:
        if self.in_head or self.head is None:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            # the parser stops after an Upgrade request: what follows is the tunnel's (or,
            # if the peer refuses, HTTP again, read by a new parser)
            exchange = self.queue[-1] if self.queue else self.current
            if exchange is not None:
                exchange.early = data[e.args[0]:]
            self.reading = False
            self._update()
        except (HttpParserCallbackError, HttpParserError) as e:
            cause = e.__context__
            if self.closing and self.head is None and not isinstance(cause, _TooLarge):
                # bytes after a request that asked to close: never a request of their own
                self.reading = False
                self._update()
                self._next()
                return
            if isinstance(cause, _TooLarge):
                self._refuse(cause.answer)
            else:
                why = str(cause) if isinstance(cause, BadMessage) else _parser_error(e)
                self._refuse(answers.bad_request(why))
            return
        limit = self.listener.config.http.max_header_size
        if self.in_head and self.head_bytes > limit + CHUNK:
            self._refuse(self._too_large())  # a head that never ends: bounded memory
            return
        self._next()

    # --- parser callbacks (llhttp, through httptools) ------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Closing()  # a request after one that asked to close is not read
        self.head = RequestHead()
        self.head_started = self.now
        self.in_url = self.in_head = True

    def on_url(self, url: bytes) -> None:
        head = self.head
        assert head is not None
        head.target += url
        head.size += len(url)
        if head.size > self.listener.config.http.max_header_size:
            raise _TooLarge(answers.answer(414, answers.TOO_LARGE, "request line too long",
                                           close=True))

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self.head
        if head is None:
            return
        if self.current is not None and self.current.head is head or (
                self.queue and self.queue[-1].head is head):
            # a trailer field after a chunked body: passed on at its end
            if head.trailers is None:
                head.trailers = []
            head.trailers.append((name, value))
            return
        self.in_url = False
        head.size += len(name) + len(value) + 4
        if head.size > self.listener.config.http.max_header_size:
            raise _TooLarge(self._too_large())
        head.header(name, value, self.listener.id_lower)

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        parser = self.parser
        head.method = parser.get_method()
        head.version = parser.get_http_version().encode()
        if head.version not in (b"1.1", b"1.0"):
            raise BadMessage(f"HTTP/{head.version.decode()} is not supported")
        head.keep_alive = head.keep_alive and parser.should_keep_alive()
        if not parser.should_upgrade():
            head.upgrade = None
        head.check()
        _check_target(head)
        self.head_bytes = 0
        self.in_head = False
        self.requests += 1
        exchange = Exchange(self, head, self.now)
        self.queue.append(exchange)
        if not head.keep_alive or self.listener.config.http.client_keepalive_timeout <= 0 \
                or self.drained:
            self.closing = True  # answered with Connection: close, nothing after it read

    def on_body(self, data: bytes) -> None:
        exchange = self.queue[-1] if self.queue else self.current
        if exchange is not None:
            exchange.request_body(data)

    def on_message_complete(self) -> None:
        exchange = self.queue[-1] if self.queue else self.current
        self.head = None
        if exchange is not None:
            exchange.request_done()
        # One request at a time: read no more until it is answered (what came with it
        # waits). The epoll interest stays until the client actually sends more: a client
        # waiting for its answer costs no epoll_ctl call.
        self.reading = False

    # --- answering in order ----------------------------------------------------------------

    def _next(self) -> None:
        """Start the next request read, if none is being answered."""
        while self.current is None and self.queue and not self.closed:
            exchange = self.current = self.queue.popleft()
            exchange.start()

    def exchange_done(self, exchange: "Exchange") -> None:
        """``exchange`` has been answered (its bytes may still be on their way)."""
        if self.current is not exchange:
            return
        self.current = None
        self.last_active = self.now  # client_keepalive_timeout runs from here
        self.listener.counted(exchange)
        if exchange.tunnel is not None:
            return
        early = b""
        if exchange.head.upgrade is not None:
            # the peer refused the upgrade: the connection stays HTTP (RFC 9110 7.8), read
            # from where the Upgrade request ended by a parser of its own
            self.parser = HttpRequestParser(self)
            early, exchange.early = exchange.early, b""
        if exchange.close_client or (self.closing and not self.queue):
            self.closing = True
            if self.out is None:
                self.close()
            return
        if self.queue:  # pipelined requests read before a close was asked are answered
            self._next()
            return
        self.reading = True
        if not self.mask & _IN:
            self._update()
        if early:
            self._feed(early)

    def write(self, data: bytes) -> None:
        """Send to the client now what it takes; keep the rest and read the peer no more
        while it is over PAUSE_AT."""
        if self.closed or not data:
            return
        if self.out is not None:
            self.out = memoryview(bytes(self.out) + data)
        else:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.end_reason = "client_reset"
                self.abort()
                return
            if sent == len(data):
                return
            self.out = memoryview(data)[sent:]
            self._update()
        if len(self.out) > PAUSE_AT and self.current is not None:
            self.current.pause_answer()

    def _flush(self) -> None:
        out = self.out
        assert out is not None
        try:
            sent = self.sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self.end_reason = "client_reset"
            self.abort()
            return
        if sent < len(out):
            self.out = out[sent:]
            if len(self.out) <= PAUSE_AT and self.current is not None:
                self.current.resume_answer()
            return
        self.out = None
        self._update()
        if self.current is not None:
            self.current.resume_answer()
        elif self.closing:
            self.close()

    def _update(self) -> None:
        if self.closed:
            return
        current = self.current
        writing = self.out is not None or (current is not None and current.piped)
        mask = (_IN if self.reading else 0) | (_OUT if writing else 0)
        if mask != self.mask:
            self.mask = mask
            self.listener.pump.interest(self.fd, mask)

    def pause_reading(self) -> None:
        """The peer is not taking the request body: stop reading the client."""
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading and self.current is not None and not self.current.body_done:
            self.reading = True
            if not self.mask & _IN:
                self._update()

    # --- answers lb makes, and the end ---------------------------------------------------------

    def _too_large(self) -> Answer:
        if self.in_url:
            return answers.answer(414, answers.TOO_LARGE, "request line too long", close=True)
        return answers.answer(431, answers.TOO_LARGE, "request header fields too large",
                              close=True)

    def _refuse(self, answer: Answer) -> None:
        """A request lb will not pass on (malformed, too large, too slow): answered in its
        turn, after the valid requests read before it (RFC 9112 §9.3.2), and then the
        connection is closed; nothing of it reaches a peer."""
        head = self.head or RequestHead()
        refusal = Exchange(self, head, self.head_started if self.head is not None
                           else self.now)
        refusal.refusal = answer
        self.head = None
        # A request whose body was being read when the bytes went bad is the bad one: not
        # started if it waits its turn, given up (with its peer connection) if it is current.
        queue = self.queue
        if queue and not queue[-1].body_done:
            queue.pop()
        elif self.current is not None and not self.current.body_done:
            self.current.abort("bad_request")
        queue.append(refusal)
        self.closing = True
        self.reading = False
        self._update()
        self._next()

    def _client_eof(self) -> None:
        self.half_closed = True
        if self.current is None and not self.queue:
            self.close()  # between requests (or mid-head): a normal end
            return
        exchange = self.current
        if exchange is not None and not exchange.body_done:
            self.end_reason = "client_reset"
            self.abort()  # the request is incomplete: nothing more will come
            return
        self.closing = True  # answer what was asked, then close
        self.reading = False
        self._update()

    def expire(self, now: float) -> None:
        """Timeouts, from the listener's sweep: a head too slow to arrive (408), no answer
        from the peer (504), an idle keep-alive connection (closed)."""
        if self.tunnel is not None:
            self.tunnel.expire(now)
            return
        self.now = now
        http = self.listener.config.http
        if self.current is not None:
            self.current.expire(now)
        elif self.in_head or (self.head is None and self.head_bytes):
            if now - self.head_started > http.client_header_timeout:
                self._refuse(answers.answer(408, answers.HEADER_TIMEOUT,
                                            "request head not received in time", close=True))
        elif not self.queue and now - self.last_active > (
                http.client_header_timeout if self.drained else http.client_keepalive_timeout):
            self.close()

    def drain(self) -> None:
        """Shutdown: an idle keep-alive connection closes now; one being answered closes
        after it (and the requests pipelined behind it); a tunnel runs on until the
        listener's ``shutdown_timeout`` (like a TCP connection). A client that has not sent
        its first request yet (just accepted: it is surely sending one) or is sending a head
        gets that request answered, with Connection: close, if it comes within
        ``client_header_timeout``: closing it now would reset a request on the wire."""
        if self.tunnel is not None:
            return
        if self.current is None and not self.queue and (
                not self.requests or self.in_head or self.head_bytes):
            self.drained = True
            return
        self.closing = True
        if self.current is None and not self.queue and self.out is None:
            self.close()
        elif self.current is None and self.queue:
            self._next()

    def abort(self, reason: str = "") -> None:
        """Close the client now, with a reset; an answer in progress is given up."""
        if reason:
            self.end_reason = reason
        current, self.current = self.current, None
        self.queue.clear()
        if current is not None:
            current.abort(self.end_reason)
        self.close(reset=True)

    def tunnel_closed(self) -> None:
        """The pump closed both sockets of the tunnel this connection became."""
        if not self.closed:
            self.closed = True
            self.listener.session_ended(self, self.end_reason)

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        if self.tunnel is not None:
            self.tunnel.abort()
            return
        self.closed = True
        if self.current is not None:
            current, self.current = self.current, None
            current.abort("client_closed")
        self.listener.pump.forget(self.fd)
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            except OSError:
                pass
        self.sock.close()
        self.listener.session_ended(self, self.end_reason)


class _Closing(Exception):
    """Raised by the parser's callback for bytes after a request that closes the
    connection."""


class _TooLarge(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.body.decode().strip())
        self.answer = answer


def _parser_error(e: Exception) -> str:
    return (str(e) or type(e).__name__)[:200]


def _check_target(head: RequestHead) -> None:
    """Origin-form (``/path``), ``*`` for OPTIONS, or absolute-form (``http://host/path``),
    which is passed on in origin form with its authority as Host (RFC 9112 3.2.2)."""
    target = head.target
    if target[:1] == b"/":
        return
    if target == b"*" and head.method == b"OPTIONS":
        return
    lower = target[:8].lower()
    if lower.startswith(b"http://") or lower.startswith(b"https://"):
        rest = target.split(b"//", 1)[1]
        authority, slash, path = rest.partition(b"/")
        if not authority or b"@" in authority:
            raise BadMessage("invalid absolute-form target")
        if head.host is not None and head.host.lower() != authority.lower():
            # lb routes by Host: a target naming another host is ambiguous, refused
            raise BadMessage("absolute-form target and Host disagree")
        head.host = authority
        head.target = slash + path if slash else b"/"
        return
    raise BadMessage("invalid request target")


@implementer(IClosable)
class Exchange:
    """One request and its answer."""

    log = Logger()
    __slots__ = ("session", "head", "pool", "peer", "conn", "attempt", "started", "picked",
                 "connected_at", "sent_at", "first_at", "status", "bytes_in", "bytes_out",
                 "body", "body_kept", "body_done", "response", "body_mode", "resp_buf",
                 "unsent", "unsent_size", "sent_any",
                 "left", "chunks", "retries", "tried", "fresh_retry", "close_client",
                 "chunked_out", "answered", "head_sent", "out", "finished", "early", "tunnel",
                 "route", "request_id", "no_body", "error", "upstreams", "resp_bytes",
                 "peer_key", "splicing", "pipe", "piped", "hash_key", "sticky",
                 "sticky_peer", "cookie", "refusal", "__weakref__")

    def __init__(self, session: HTTPSession, head: RequestHead, now: float) -> None:
        self.session = session
        self.head = head
        self.pool: Optional[Pool] = None
        self.route = ""
        self.peer: Optional[Peer] = None
        self.conn: Optional[UpstreamConnection] = None
        self.upstreams: Optional[UpstreamPool] = None
        self.attempt: Optional[Attempt] = None
        self.started = now  # head received
        self.picked = self.connected_at = self.sent_at = self.first_at = 0.0
        self.status = 0
        self.bytes_in = 0  # request body bytes from the client
        self.bytes_out = 0  # answer bytes to the client
        self.body: Optional[List[bytes]] = []  # kept for retries while small enough
        self.body_kept = 0
        self.body_done = False  # the whole request body has been read
        self.unsent: List[bytes] = []  # body bytes read that no peer connection has had
        self.unsent_size = 0
        self.sent_any = False  # some of the request went out on a peer connection
        self.response: Optional[ResponseHead] = None
        self.body_mode = _HEAD  # what the peer's bytes are: head, body by length, ...
        self.resp_buf = b""  # an answer head split across reads
        self.left = 0  # body bytes still to come (_LENGTH)
        self.chunks: Optional[ChunkScanner] = None
        self.retries = 0
        self.tried: FrozenSet[Peer] = frozenset()
        self.fresh_retry = False
        self.close_client = False
        self.chunked_out = False
        self.answered = False  # the answer is complete
        self.head_sent = False  # a byte of the answer reached the client
        self.out: List[bytes] = []  # answer bytes gathered while a read is parsed
        self.finished = False
        self.early = b""  # client bytes after an Upgrade request's head
        self.tunnel: Any = None
        self.request_id: Optional[bytes] = head.request_id
        self.no_body = head.method == b"HEAD"
        self.error = ""  # lb_http_errors_total's reason, when lb answered itself
        self.resp_bytes = 0
        self.peer_key = ""  # the last peer that served it (for the access log)
        self.splicing = False  # the rest of a long body goes through splice(2)
        self.pipe: Optional[Tuple[int, int]] = None
        self.piped = 0  # bytes in the pipe the client has not taken
        self.hash_key: Optional[str] = None  # what balance: source hashes, if not the IP
        self.sticky: Optional[StickyPeers] = None  # the pool's sticky cookie, if it has one
        self.sticky_peer: Optional[Peer] = None  # the peer the client's cookie names
        self.cookie: Optional[bytes] = None  # the sticky cookie's value the client sent
        self.refusal: Optional[Answer] = None  # lb's answer to a bad request, in its turn

    # --- the request ---------------------------------------------------------------------------

    def start(self) -> None:
        """Route, pick and connect (the session calls this when it is this request's turn)."""
        if self.refusal is not None:
            self.answer(self.refusal)
            return
        session = self.session
        listener = session.listener
        if listener.id_lower is not None and self.request_id is None:
            self.request_id = _new_request_id()
        try:
            route, pool, name = listener.route(self.head)
        except Exception:
            self.log.failure("http: routing failed")
            route, pool, name = None, None, ""
        if route is None:
            self.answer(answers.no_route(self.head.host, self.head.target))
            return
        self.route = name
        if pool is None:  # a pool on its way out (Consul removed its service): no peer
            self.answer(answers.no_peer(name, 0, 0))
            return
        self.pool = pool
        if route.strip is not None:
            self.head.target = route.rewrite(self.head.target.decode("latin-1")).encode(
                "latin-1")
        upstreams = self.upstreams = listener.upstreams(pool)
        config = pool.config
        if config.sticky_cookie is not None:
            self.sticky = upstreams.sticky_peers()
            self.cookie = find_cookie(self.head, config.sticky_cookie.name.encode("latin-1"))
            self.sticky_peer = self.sticky.peer_for(self.cookie)
        if config.balance == "source" and config.hash_key.kind != "client_ip":
            self.hash_key = hash_key(config.hash_key, self.head)
        self._connect(fresh=False)

    def _connect(self, fresh: bool) -> None:
        pool = self.pool
        upstreams = self.upstreams
        assert pool is not None and upstreams is not None
        session = self.session
        first = self.head.serialize(self._forwarding(), upgrading=self.head.upgrade is not None)
        # Nothing has left yet: what was read goes with the head. After a peer failed
        # mid-request (a retry), the whole body again: only a kept body is retried.
        payload = self.body if self.sent_any else self.unsent
        if payload:
            first += b"".join(payload)
        self.unsent = []
        self.unsent_size = 0
        self.picked = session.now
        if self.tried or self.hash_key is not None:
            context = PickContext(session.client_ip, self.hash_key, self.tried)
        else:
            context = session.pick_context
        peer = self.sticky_peer
        if peer is not None and peer in self.tried:
            peer = None
        if not fresh:
            if peer is None:
                peer = pool.pick(context)
            if peer is not None:
                conn = upstreams.take(peer.key, first, check=not self.head.idempotent)
                if conn is not None:  # the common case: a kept-alive connection
                    pool.connection_started(peer, self)
                    self._connected(peer, conn, b"")
                    return
        dial = upstreams.dial if not fresh else _fresh(upstreams)
        self.attempt = Attempt(pool, self, dial, context, first, self._connected,
                               self._failed, picked=peer)
        self.attempt.start()

    def _forwarding(self) -> bytes:
        """X-Forwarded-* and the request id, per the listener's ``forwarded`` setting."""
        session = self.session
        http = session.listener.config.http
        head = self.head
        if session.forwarded and not head.xff and not head.forwarded:
            # the common case: headers fixed per client connection, and this request's Host
            out = [session.forwarded]
            if head.host is not None:
                out += [b"X-Forwarded-Host: ", head.host, b"\r\n"]
            if self.request_id is not None:
                out += [session.listener.id_header, b": ", self.request_id, b"\r\n"]
            return b"".join(out)
        pairs: List[Tuple[bytes, bytes]] = []
        if http.forwarded != "off":
            client = getattr(session.client, "host", "") or ""
            client_b = client.encode()
            trusted = http.forwarded == "append" and _trusted(client, http.trusted_proxies)
            if trusted and head.xff:
                pairs.append((b"X-Forwarded-For", head.xff + b", " + client_b))
            else:
                pairs.append((b"X-Forwarded-For", client_b))
            if trusted and head.forwarded:
                pairs += head.forwarded
            else:
                port = getattr(session.destination, "port", "")
                pairs.append((b"X-Forwarded-Proto", b"http"))
                if head.host is not None:
                    pairs.append((b"X-Forwarded-Host", head.host))
                pairs.append((b"X-Forwarded-Port", str(port).encode()))
        else:
            if head.xff is not None:
                pairs.append((b"X-Forwarded-For", head.xff))
            pairs += head.forwarded
        if self.request_id is not None:
            pairs.append((session.listener.id_header, self.request_id))
        return b"".join(b"%b: %b\r\n" % pair for pair in pairs)

    def _connected(self, peer: Peer, conn: UpstreamConnection, unsent: bytes) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None and attempt.failures:  # connected after failed connects
            self._connect_retries(len(attempt.failures))
        self.peer = peer
        self.peer_key = peer.key
        self.conn = conn
        conn.user = self
        if attempt is not None:  # a new connection: the connect took its time
            self.session.now = self.session.clock.seconds()
        now = self.session.now
        self.connected_at = now
        self.response = None
        self.body_mode = _HEAD
        self.resp_buf = b""
        self.resp_bytes = 0
        self.sent_any = True
        if self.unsent:  # read while connecting
            conn.send(b"".join(self.unsent))
            self.unsent = []
            self.unsent_size = 0
        if conn.blocked:
            self.session.pause_reading()
        elif self.body_done:
            self.sent_at = now
        else:
            self.session.resume_reading()

    def _connect_retries(self, n: int) -> None:
        self.retries += n
        for _ in range(n):
            self.session.listener.counted_retry(self, CONNECT_FAILURE)

    def _failed(self, reason: str, failures: Any) -> None:
        self.attempt = None
        if len(failures) > 1:  # the connects after the first failed one were retries
            self._connect_retries(len(failures) - 1)
        pool = self.pool
        assert pool is not None
        if reason == "no_peer" and not self.tried:
            up = sum(1 for p in pool.peers.values() if p.is_up)
            self.answer(answers.no_peer(pool.name, up, len(pool.peers)))
        else:
            why = "; ".join(failures) if failures else "no peer left to try"
            self.answer(answers.bad_gateway(pool.name, why))

    def request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._body_bytes(data)

    def _body_bytes(self, data: bytes) -> None:
        """Request body bytes (as they go to the peer): kept while small enough for a retry,
        sent when connected, held (reading paused past KEEP_BODY) while connecting."""
        body = self.body
        if body is not None:
            self.body_kept += len(data)
            if self.body_kept <= KEEP_BODY:
                body.append(data)
            else:
                self.body = None  # too large to keep: this request is not retried
        conn = self.conn
        if conn is not None:
            conn.send(data)
            if conn.blocked:
                self.session.pause_reading()
        elif not self.answered:
            self.unsent.append(data)
            self.unsent_size += len(data)
            if self.unsent_size > KEEP_BODY:
                self.session.pause_reading()  # connecting: read no more until connected
        # else: lb answered already (an error): the body is read and dropped

    def request_done(self) -> None:
        self.body_done = True
        if self.head.chunked:
            trailers = b"".join(b"%b: %b\r\n" % t for t in self.head.trailers or ())
            self._body_bytes(b"0\r\n" + trailers + b"\r\n")
        if self.conn is not None and not self.conn.blocked:
            self.sent_at = self.session.now
        if self.answered and self.session.current is self:
            self._finish()

    def upstream_drained(self) -> None:
        """The peer took what was waiting: read the client again."""
        if self.body_done:
            if not self.sent_at:
                self.sent_at = self.session.now
        else:
            self.session.resume_reading()

    # --- the answer ------------------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        """Bytes of the answer: the head is read whole, then the body passed on as it comes
        (never decoded), its end found by its framing."""
        session = self.session
        session.now = now = session.clock.seconds()
        if not self.first_at:
            self.first_at = now
        self.resp_bytes += len(data)
        mode = self.body_mode
        try:
            if mode == _LENGTH:
                self._length_body(data)
            elif mode == _CHUNKED:
                self._chunked_body(data)
            elif mode == _UNTIL_CLOSE:
                self._close_body(data)
            elif mode == _HEAD:
                self._answer_head(data)
            # _DONE: bytes after the answer (the connection is not reused)
        except BadMessage as e:
            self._upstream_failed(f"invalid answer ({e})", retry=None)

    def _answer_head(self, data: bytes) -> None:
        buf = self.resp_buf + data if self.resp_buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_ANSWER_HEAD:
                raise BadMessage("answer head too large")
            self.resp_buf = buf
            return
        self.resp_buf = b""
        parser = HttpResponseParser(_HEAD_ONLY)
        try:
            parser.feed_data(buf[:end + 4])
        except HttpParserUpgrade:
            pass  # a 101: checked below
        except HttpParserError as e:
            raise BadMessage(_parser_error(e)) from None
        status = parser.get_status_code()
        response = ResponseHead(buf[:end], status, parser.should_keep_alive())
        rest = buf[end + 4:]
        session = self.session
        head = self.head
        if 100 <= status < 200 and status != 101:  # interim: passed on, the answer follows
            if head.version == b"1.1":
                self.out.append(response.serialize(b"", False, False))
            if rest:
                self._answer_head(rest)
            else:
                self._send_out()
            return
        pool = self.pool
        assert pool is not None and self.peer is not None
        pool.report_response(self.peer, status)
        if status in (502, 503, 504) and self._retry_allowed(str(status)):
            self._retry(str(status))
            return
        self.response = response
        self.status = status
        if status == 101:
            if head.upgrade is None or response.upgrade is None:
                raise BadMessage("an upgrade nobody asked for")
            self.out.append(response.serialize(b"", False, False))
            self.head_sent = True
            self._upgraded(rest)
            return
        close = (session.closing and not session.queue) or not self.body_done
        extra = b""
        if self.no_body or status in (204, 304):
            mode = _DONE
        elif response.chunked:
            mode = _CHUNKED
            self.chunks = ChunkScanner()
        elif response.length is not None and not response.framed:
            mode = _LENGTH
            self.left = response.length
        else:  # delimited by the peer closing: lb frames it (or closes) for the client
            mode = _UNTIL_CLOSE
            if head.version == b"1.1" and not response.framed:
                extra = b"Transfer-Encoding: chunked\r\n"
                self.chunked_out = True
            else:
                close = True
        self.close_client = close
        self.body_mode = mode
        sticky = self.sticky
        if sticky is not None:
            extra += sticky.set_cookie(self.peer, self.cookie)
        self.out.append(response.serialize(extra, close, head.version == b"1.0"))
        self.head_sent = True
        if mode == _DONE:
            self._answer_done(reusable=not rest)
        elif rest:
            self.upstream_data_body(rest)
        else:
            self._send_out()

    def upstream_data_body(self, data: bytes) -> None:
        mode = self.body_mode
        if mode == _LENGTH:
            self._length_body(data)
        elif mode == _CHUNKED:
            self._chunked_body(data)
        else:
            self._close_body(data)

    def _length_body(self, data: bytes) -> None:
        left = self.left
        if len(data) <= left:
            self.left = left - len(data)
            self.bytes_out += len(data)
            self.out.append(data)
            if self.left:
                self._send_out()
                if (self.left >= SPLICE_AT and self.session.out is None
                        and self.session.listener.pump.splice):
                    self._start_splice()
            else:
                self._answer_done(reusable=True)
            return
        self.left = 0  # bytes beyond the answer's length: the connection is not reused
        self.bytes_out += left
        self.out.append(data[:left])
        self._answer_done(reusable=False)

    # --- a long body through the kernel: socket → pipe → socket, never into Python ---------

    def _start_splice(self) -> None:
        self.splicing = True
        self.pipe = self.session.listener.pump.take_pipe()

    def _end_splice(self) -> None:
        pipe, self.pipe = self.pipe, None
        self.splicing = False
        if pipe is not None:
            self.session.listener.pump.give_pipe(pipe, empty=not self.piped)
        self.piped = 0

    def splice_body(self) -> None:
        """The peer's socket is readable: move what it has to the client."""
        conn = self.conn
        pipe = self.pipe
        assert conn is not None and pipe is not None
        if self.piped:  # the client has not taken the last part: wait for it
            conn.pause()
            return
        try:
            n = os.splice(conn.fd, pipe[1], min(self.left, PIPE_SIZE), flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            conn.lost(reset=True)
            return
        if not n:
            conn.lost(reset=False)  # closed in the middle of the body
            return
        self.session.now = self.session.clock.seconds()
        self.left -= n
        self.bytes_out += n
        self.resp_bytes += n
        self.piped = n
        self.flush_pipe()

    def flush_pipe(self) -> None:
        """Move what the pipe holds to the client (also when the client is writable)."""
        session = self.session
        pipe = self.pipe
        assert pipe is not None
        try:
            sent = os.splice(pipe[0], session.fd, self.piped, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError:
            session.end_reason = "client_reset"
            session.abort()
            return
        self.piped -= sent
        conn = self.conn
        if self.piped:
            if conn is not None:
                conn.pause()
            session._update()  # woken when the client can take more
            return
        session._update()
        if self.left:
            if conn is not None:
                conn.resume()
            return
        self._end_splice()
        self._answer_done(reusable=True)

    def _chunked_body(self, data: bytes) -> None:
        used, done = self.chunks.feed(data)  # type: ignore[union-attr]
        self.bytes_out += used
        self.out.append(data if used == len(data) else data[:used])
        if done:
            self._answer_done(reusable=used == len(data))
        else:
            self._send_out()

    def _close_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)
        self._send_out()

    def _answer_done(self, reusable: bool) -> None:
        """The peer's answer is complete: its connection may serve again."""
        self.body_mode = _DONE
        self.answered = True
        conn, self.conn = self.conn, None
        response = self.response
        if conn is not None and self.upstreams is not None:
            self.upstreams.release(conn, reusable and self.body_done and response is not None
                                   and response.keep_alive)
        if self.body_done:
            self._finish()
        else:
            # the client is still sending a body the peer did not wait for (a 417, an early
            # error): it is read and dropped, then the connection closes (close_client)
            self._send_out()

    def _send_out(self) -> None:
        if self.out:
            data = b"".join(self.out)
            self.out = []
            self.session.write(data)

    def pause_answer(self) -> None:
        if self.conn is not None:
            self.conn.pause()

    def resume_answer(self) -> None:
        if self.conn is not None:
            self.conn.resume()

    # --- failures and retries --------------------------------------------------------------

    def upstream_closed(self, reset: bool) -> None:
        """The peer closed or reset the connection before the answer was complete."""
        if self.splicing:
            self._end_splice()
        conn, self.conn = self.conn, None
        if conn is not None and self.upstreams is not None:
            self.upstreams.lost(conn)
        if not reset and self.body_mode == _UNTIL_CLOSE:
            # an answer delimited by the close: that was its end
            if self.chunked_out:
                self.out.append(b"0\r\n\r\n")
            self._send_out()
            self._answered_by_close()
            return
        if self.resp_bytes == 0 and conn is not None and conn.reused and not self.fresh_retry \
                and self.body is not None and self.head.idempotent:
            # The keep-alive race: the peer closed a connection we just reused, most likely
            # before reading the request. Sent again on a fresh one, but only when repeating
            # it is harmless: a POST might have been acted on (nginx and HAProxy do not
            # repeat it either); for those, take() checked the connection was still open.
            self.fresh_retry = True
            self.retries += 1
            self.session.listener.counted_retry(self, REUSED)
            self._release_peer()
            self._connect(fresh=True)
            return
        condition = RESET if reset else EMPTY_RESPONSE
        why = "connection reset" if reset else "closed without answering"
        if self.resp_bytes:
            why = ("connection reset" if reset else "closed") + " in the middle of the answer"
        self._upstream_failed(why, retry=condition if self.resp_bytes == 0 else None)

    def _answered_by_close(self) -> None:
        self.answered = True
        self._release_peer()
        if self.body_done:
            self._finish()

    def _drop_connection(self, reset: bool = True) -> None:
        """The peer connection is given up: closed, and its pool told it is gone."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close(reset=reset)
            if self.upstreams is not None:
                self.upstreams.lost(conn)

    def _upstream_failed(self, why: str, retry: Optional[str]) -> None:
        self._drop_connection()
        pool = self.pool
        assert pool is not None
        if self.peer is not None:
            pool.report_response(self.peer, 502)
        if retry is not None and self._retry_allowed(retry):
            self._retry(retry)
            return
        if self.head_sent:  # part of the answer went out: the client must see it broke
            self._release_peer()
            self.session.end_reason = "peer_reset"
            self.status = self.status or 502
            self.session.abort()
            return
        self.answer(answers.bad_gateway(pool.name, why))

    def _retry_allowed(self, condition: str) -> bool:
        pool = self.pool
        assert pool is not None
        tried = len(self.tried) + 1  # with the one that just failed
        return (not self.head_sent and self.body is not None and self.head.idempotent
                and condition in pool.config.retry_on and self.head.upgrade is None
                and tried <= pool.config.retries
                and tried < len(pool.balancer))  # another peer is there to try

    def _retry(self, condition: str) -> None:
        self._drop_connection(reset=False)
        self.retries += 1
        self.session.listener.counted_retry(self, condition)
        if self.peer is not None:
            self.tried = self.tried | {self.peer}
        self._release_peer()
        self.response = None
        self.body_mode = _HEAD
        self.out = []
        self._connect(fresh=False)

    def _release_peer(self) -> None:
        peer, self.peer = self.peer, None
        if peer is not None and self.pool is not None:
            self.pool.connection_ended(peer, self)

    # --- answers lb makes, timeouts, the end -----------------------------------------------------

    def answer(self, answer: Answer) -> None:
        """Answer the client ourselves (an error); nothing more goes to a peer."""
        self.error = answer.reason
        self.status = answer.status
        self.answered = True
        if answer.close:
            self.close_client = True
            self.session.closing = True
        self.bytes_out += len(answer.body)
        id_header = self.session.listener.config.http.request_id
        last = self.session.closing and not self.session.queue  # nothing will follow it
        self.session.write(answers.render(
            answer if not (last and not answer.close) else answer._replace(close=True),
            self.request_id, id_header.encode() if id_header else b""))
        self.head_sent = True
        if self.body_done or answer.close or not self.head.has_body:
            self.body_done = True
            self._finish()
        else:
            self.close_client = True  # the rest of the body is read and dropped

    def expire(self, now: float) -> None:
        http = self.session.listener.config.http
        if self.sent_at and not self.first_at and now - self.sent_at > http.response_timeout:
            self._drop_connection()
            pool = self.pool
            assert pool is not None
            if self.peer is not None:
                pool.report_response(self.peer, 504)
            self._release_peer()
            self.answer(answers.gateway_timeout(pool.name, http.response_timeout))

    def abort(self, reason: str = "") -> None:
        """Cut (maint, shutdown timeout, the client left): the peer connection is closed."""
        if self.splicing:
            self._end_splice()
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
        self._drop_connection()
        if self.tunnel is not None:
            self.tunnel.abort()
            return
        self._release_peer()
        if not self.finished:
            self.finished = True
            if not self.status:
                self.status = 0
            if self.session.current is self:
                self.session.current = None
            self.session.listener.counted(self)
        if reason == "maint" and not self.session.closed:
            self.session.abort("maint")

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._release_peer()
        self._send_out()
        self.session.exchange_done(self)

    # --- Upgrade ---------------------------------------------------------------------------

    def _upgraded(self, rest: bytes) -> None:
        """The peer answered 101: the two sockets become a byte tunnel (TCP mode's pump)."""
        self._send_out()
        session = self.session
        conn, self.conn = self.conn, None
        if conn is None or session.out is not None:
            self._upstream_failed("upgrade with the client not ready", retry=None)
            return
        self.upstreams.lost(conn)  # type: ignore[union-attr]
        self.status = 101
        self.answered = True
        self.tunnel = Tunnel(self, session, conn.detach(), rest)
        session.exchange_done(self)


class _HeadOnly:
    """llhttp reads an answer head: nothing to hear but that it is valid and complete."""

    __slots__ = ()


_HEAD_ONLY = _HeadOnly()


def _fresh(upstreams: UpstreamPool) -> Any:
    """A dial that never reuses an idle connection (after a reused one failed)."""
    def dial(address: Any, timeout: float, first: bytes, connected: Any, failed: Any) -> Any:
        idle = upstreams.idle.pop(str(address), None)
        try:
            return upstreams.dial(address, timeout, first, connected, failed)
        finally:
            if idle:
                upstreams.idle.setdefault(str(address), []).extend(idle)
    return dial


_counter = [0]


def _new_request_id() -> bytes:
    """Unique per process run: a random prefix chosen at start and a counter."""
    _counter[0] += 1
    return f"{_ID_PREFIX}-{_counter[0]:x}".encode()


def _trusted(client: str, networks: Any) -> bool:
    if not networks:
        return False
    import ipaddress
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def describe_client(session: HTTPSession) -> str:
    return host_port(session.client)
