"""HTTP/1.1 message heads as lb reads and rewrites them (RFC 9110, RFC 9112).

A ``RequestHead`` is filled from the client's parser callbacks, a ``ResponseHead`` from the
peer's; each turns into the bytes sent on with the hop-by-hop headers removed and lb's own
framing and forwarding headers set. Pure: no sockets, no Twisted.
"""

from __future__ import annotations

import re
from typing import List, Optional, Set, Tuple

Header = Tuple[bytes, bytes]

# What a header means to lb, by lower-case name. Anything else is passed on unchanged.
CONNECTION, KEEP_ALIVE, TE, TRAILER, UPGRADE, TRANSFER_ENCODING, CONTENT_LENGTH, HOST, \
    EXPECT, XFF, XF_OTHER = range(11)
KINDS = {
    b"connection": CONNECTION, b"keep-alive": KEEP_ALIVE, b"proxy-connection": KEEP_ALIVE,
    b"te": TE, b"trailer": TRAILER, b"upgrade": UPGRADE,
    b"transfer-encoding": TRANSFER_ENCODING, b"content-length": CONTENT_LENGTH,
    b"host": HOST, b"expect": EXPECT, b"x-forwarded-for": XFF,
    b"x-forwarded-proto": XF_OTHER, b"x-forwarded-host": XF_OTHER,
    b"x-forwarded-port": XF_OTHER,
}
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class BadMessage(Exception):
    """A message lb refuses (a request: 400; a response: 502); the text says why."""


class RequestHead:
    """One request as the client sent it, reduced to what lb needs and what it passes on."""

    __slots__ = ("method", "target", "version", "headers", "host", "hosts", "length",
                 "chunked", "keep_alive", "upgrade", "expect_continue", "tokens", "xff",
                 "forwarded", "request_id", "te_trailers", "trailers", "size")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: List[Header] = []  # passed on as they are
        self.host: Optional[bytes] = None
        self.hosts = 0
        self.length: Optional[int] = None  # Content-Length
        self.chunked = False
        self.keep_alive = True
        self.upgrade: Optional[bytes] = None
        self.expect_continue = False
        self.tokens: Optional[Set[bytes]] = None  # Connection's tokens beyond the usual
        self.xff: Optional[bytes] = None
        self.forwarded: List[Header] = []  # X-Forwarded-Proto/Host/Port as the client sent
        self.request_id: Optional[bytes] = None
        self.te_trailers = False
        self.trailers: Optional[List[Header]] = None
        self.size = 0  # bytes of the head so far (431)

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    def header(self, name: bytes, value: bytes, id_name: Optional[bytes]) -> None:
        """One header from the parser (``id_name``: the request-id header, lower case)."""
        lname = name.lower()
        kind = KINDS.get(lname)
        if kind is None:
            if lname == id_name:
                self.request_id = value
            else:
                self.headers.append((name, value))
            return
        if kind == HOST:
            self.hosts += 1
            self.host = value.strip(b" \t")
        elif kind == CONTENT_LENGTH:
            length = _content_length(value)
            if self.length is not None and self.length != length:
                raise BadMessage("differing Content-Length headers")
            self.length = length
        elif kind == TRANSFER_ENCODING:
            if self.chunked or value.strip().lower() != b"chunked":
                # only a single, final "chunked" frames a request unambiguously (RFC 9112 6.1)
                raise BadMessage("Transfer-Encoding other than a single chunked")
            self.chunked = True
        elif kind == CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"close":
                    self.keep_alive = False
                elif token not in (b"keep-alive", b"upgrade", b""):
                    if self.tokens is None:
                        self.tokens = set()
                    self.tokens.add(token)
        elif kind == UPGRADE:
            self.upgrade = value
        elif kind == EXPECT:
            if value.lower() == b"100-continue":
                self.expect_continue = True
            else:
                self.headers.append((name, value))
        elif kind == XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif kind == XF_OTHER:
            self.forwarded.append((name, value))
        elif kind == TE:
            if b"trailers" in value.lower():
                self.te_trailers = True
        # KEEP_ALIVE, TRAILER: hop-by-hop, dropped

    def get(self, lname: bytes) -> Optional[bytes]:
        """The first value of header ``lname`` (lower case) as the client sent it, for routes
        and hash keys; hop-by-hop and framing headers are lb's, not matched (None)."""
        kind = KINDS.get(lname)
        if kind is None:
            for name, value in self.headers:
                if len(name) == len(lname) and name.lower() == lname:
                    return value
            return None
        if kind == HOST:
            return self.host
        if kind == XFF:
            return self.xff
        if kind == XF_OTHER:
            for name, value in self.forwarded:
                if name.lower() == lname:
                    return value
            return None
        if kind == UPGRADE:
            return self.upgrade
        return None

    def check(self) -> None:
        """What the parser does not refuse but lb must (RFC 9112 3.2, 6.1; RFC 9110 7.2)."""
        if self.length is not None and self.chunked:
            raise BadMessage("Content-Length with Transfer-Encoding")
        if self.chunked and self.version != b"1.1":
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 request")
        if self.version == b"1.1" and self.hosts != 1:
            raise BadMessage("no Host header" if not self.hosts else "more than one Host")
        if self.hosts > 1:
            raise BadMessage("more than one Host")
        if self.host is not None and not _HOST.fullmatch(self.host):
            raise BadMessage("invalid Host header")
        if self.tokens:
            # headers the Connection header names are hop-by-hop too
            self.headers = [h for h in self.headers if h[0].lower() not in self.tokens]

    def serialize(self, extra: bytes, upgrading: bool) -> bytes:
        """The head sent to the peer: HTTP/1.1, the client's end-to-end headers, lb's
        forwarding header lines (``extra``) and lb's own framing."""
        parts = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        if self.host is not None:
            parts += [b"Host: ", self.host, b"\r\n"]
        for name, value in self.headers:
            parts += [name, b": ", value, b"\r\n"]
        parts.append(extra)
        if self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif self.length is not None:
            parts += [b"Content-Length: ", str(self.length).encode(), b"\r\n"]
        if self.expect_continue:
            parts.append(b"Expect: 100-continue\r\n")
        if self.te_trailers:
            parts.append(b"TE: trailers\r\n")
        if upgrading and self.upgrade is not None:
            parts += [b"Upgrade: ", self.upgrade, b"\r\nConnection: upgrade\r\n"]
        parts.append(b"\r\n")
        return b"".join(parts)


_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|upgrade|transfer-encoding"
    rb"|content-length):[ \t]*([^\r\n]*)", re.IGNORECASE)


class ResponseHead:
    """A peer's answer head, kept as the bytes it came in: what lb changes (the version,
    the hop-by-hop headers, its own Connection header) is spliced, the rest passed on as
    it is, so an answer costs one scan of its head, not a callback per header."""

    __slots__ = ("status", "raw", "status_end", "drop", "length", "chunked", "framed",
                 "keep_alive", "upgrade")

    def __init__(self, raw: bytes, status: int, keep_alive: bool) -> None:
        """``raw``: the head up to (not including) its final CRLF CRLF, as llhttp accepted
        it (so its syntax is valid, Content-Length numeric and not doubled)."""
        self.raw = raw
        self.status = status
        self.keep_alive = keep_alive
        self.status_end = raw.find(b"\r\n")
        if self.status_end < 0:
            self.status_end = len(raw)
        self.drop: List[Tuple[int, int]] = []  # spans of hop-by-hop header lines
        self.length: Optional[int] = None
        self.chunked = False
        self.framed = False  # Transfer-Encoding given (chunked or not)
        self.upgrade: Optional[bytes] = None
        tokens: Optional[Set[bytes]] = None
        for match in _RESPONSE_SPECIAL.finditer(raw):
            name = match.group(1).lower()
            value = match.group(2).strip()
            if name == b"content-length":
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.framed = True
                self.chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            else:
                self.drop.append(match.span())
                if name == b"upgrade":
                    self.upgrade = value
                elif name == b"connection":
                    for token in value.lower().split(b","):
                        token = token.strip()
                        if token not in (b"close", b"keep-alive", b"upgrade", b""):
                            if tokens is None:
                                tokens = set()
                            tokens.add(token)
        if self.framed:
            if self.length is not None:
                raise BadMessage("Content-Length with Transfer-Encoding")
        if tokens:  # headers the Connection header names are hop-by-hop too (rare)
            for match in re.finditer(rb"\r\n([^:\r\n]+):[^\r\n]*", raw):
                if match.group(1).lower() in tokens:
                    self.drop.append(match.span())
            self.drop.sort()

    def serialize(self, extra: bytes, close: bool, keep_alive_header: bool) -> bytes:
        """The head sent to the client: HTTP/1.1, the peer's end-to-end headers as they
        came, ``extra`` lines (framing lb adds), and lb's Connection header."""
        raw = self.raw
        parts = [b"HTTP/1.1", raw[8:self.status_end]]
        at = self.status_end
        for start, end in self.drop:
            parts.append(raw[at:start])
            at = end
        parts.append(raw[at:])
        parts.append(b"\r\n")
        if extra:
            parts.append(extra)
        if self.status == 101 and self.upgrade is not None:
            parts += [b"Upgrade: ", self.upgrade, b"\r\nConnection: upgrade\r\n"]
        elif close:
            parts.append(b"Connection: close\r\n")
        elif keep_alive_header:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


# ChunkScanner states
_SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)
MAX_CHUNK_LINE = 4096


class ChunkScanner:
    """Finds where a chunked body ends, checking its framing, without decoding it: the bytes
    are passed on as they came (RFC 9112 7.1). An invalid size line or a missing CRLF is a
    ``BadMessage``; bytes after the end belong to no answer."""

    __slots__ = ("state", "left", "line")

    def __init__(self) -> None:
        self.state = _SIZE
        self.left = 0  # data bytes of the current chunk still to come (or CRLF bytes)
        self.line = b""  # a size or trailer line split across reads

    def feed(self, data: bytes) -> Tuple[int, bool]:
        """How many bytes of ``data`` belong to the body, and whether it ended there."""
        i, n = 0, len(data)
        while i < n:
            state = self.state
            if state == _DATA:
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self.state, self.left = _DATA_CRLF, 2
                continue
            if state == _DATA_CRLF:
                while self.left and i < n:
                    if data[i] != (13 if self.left == 2 else 10):
                        raise BadMessage("chunk data not followed by CRLF")
                    i += 1
                    self.left -= 1
                if not self.left:
                    self.state = _SIZE
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise BadMessage("chunk size or trailer line too long")
                return n, False
            line = self.line + data[i:j + 1]
            self.line = b""
            i = j + 1
            if len(line) > MAX_CHUNK_LINE or line[-2:] != b"\r\n":
                raise BadMessage("bad chunk size or trailer line")
            if state == _SIZE:
                size = line[:-2].split(b";", 1)[0]
                if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BadMessage("invalid chunk size")
                self.left = int(size, 16)
                self.state = _DATA if self.left else _TRAILER
            elif line == b"\r\n":  # the empty line after the last chunk and trailers
                return i, True
            elif b":" not in line or line[:1] in b" \t":
                raise BadMessage("invalid trailer line")
        return i, False


def _content_length(value: bytes) -> int:
    """A Content-Length value: ASCII digits only (no sign, no list, no spaces inside, not
    beyond 18 digits once leading zeros are gone)."""
    value = value.strip()
    if not value.isdigit() or len(value.lstrip(b"0")) > 18:
        raise BadMessage("invalid Content-Length")
    return int(value)


# RFC 9110 7.2: uri-host [":" port]; uri-host an IP-literal in brackets or a reg-name
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(:[0-9]{0,5})?")


def is_token(value: bytes) -> bool:
    return bool(value) and all(ch in _TOKEN_CHARS for ch in value)
