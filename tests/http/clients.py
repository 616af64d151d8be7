"""Clients for HTTP-mode tests: a raw-socket HTTP/1.1 client that shows exactly what came back
(status, headers as sent, Content-Length / chunked / close-delimited bodies, trailers, 1xx
answers, whether the server closed or reset), keep-alive and pipelining helpers on it, and
wrappers around curl, ``http.client`` and the ``websockets`` sync client.

Every read is bounded: a response must be complete within ``timeout`` seconds (a
``TimeoutError`` otherwise). Only 127.0.0.1 is ever dialled by the helpers' defaults.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

Headers = List[Tuple[str, str]]
HeadersIn = Union[Headers, Dict[str, str], None]
HOST = "127.0.0.1"


class BadResponse(Exception):
    """The server's bytes are not a parseable HTTP/1.1 response."""

    def __init__(self, why: str, raw: bytes) -> None:
        super().__init__(f"{why}: {raw[:200]!r}")
        self.raw = raw


class ConnectionEnded(Exception):
    """The server closed (FIN) or reset (RST) the connection before the response was complete.
    ``reset`` tells which; ``partial`` is the response so far when its head had arrived (its
    body holds what came of the body), ``raw`` the bytes received of this response (at most
    the head and the first 64 KiB)."""

    def __init__(self, reset: bool, partial: Optional["Response"], raw: bytes) -> None:
        what = "reset (RST)" if reset else "closed (FIN)"
        where = "mid-body" if partial is not None else "before a complete head"
        super().__init__(f"connection {what} {where} after {len(raw)} bytes")
        self.reset = reset
        self.partial = partial
        self.raw = raw


@dataclass
class Response:
    status: int
    reason: str
    version: str = "HTTP/1.1"
    headers: Headers = field(default_factory=list)
    body: bytes = b""  # empty when read with keep_body=False
    body_length: int = 0
    body_sha256: str = hashlib.sha256().hexdigest()
    framing: str = "none"  # none | length | chunked | close
    trailers: Headers = field(default_factory=list)
    interim: List["Response"] = field(default_factory=list)  # 1xx answers before this one
    closed: bool = False  # the server had closed the connection when this was read
    raw_head: bytes = b""
    chunk_extensions: List[bytes] = field(default_factory=list)

    def header(self, name: str) -> Optional[str]:
        """The header's values joined with ``, `` (None when absent)."""
        values = self.headers_all(name)
        return ", ".join(values) if values else None

    def headers_all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def trailer(self, name: str) -> Optional[str]:
        values = [v for k, v in self.trailers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def _headers(headers: HeadersIn) -> Headers:
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)


def _has(headers: Headers, name: str) -> bool:
    return any(k.lower() == name.lower() for k, _ in headers)


def chunk_encode(body: bytes, chunk_size: int = 65536, trailers: HeadersIn = None) -> bytes:
    """``body`` as chunked transfer coding, in chunks of ``chunk_size``, then the trailers."""
    out = bytearray()
    for i in range(0, len(body), chunk_size):
        piece = body[i:i + chunk_size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    out += b"0\r\n"
    for k, v in _headers(trailers):
        out += f"{k}: {v}\r\n".encode("latin-1")
    return bytes(out + b"\r\n")


def build_request(method: str = "GET", target: str = "/", headers: HeadersIn = None,
                  body: Optional[bytes] = None, *, chunked: bool = False,
                  chunk_size: int = 65536, trailers: HeadersIn = None,
                  host: Optional[str] = "test", version: str = "HTTP/1.1") -> bytes:
    """Bytes of one request. ``Host`` is added (unless given or ``host`` is None); a body gets
    ``Content-Length`` or, with ``chunked``, ``Transfer-Encoding: chunked`` — unless the
    headers already frame it (then they are sent as given, for crafted requests)."""
    hdrs = _headers(headers)
    if host is not None and not _has(hdrs, "host"):
        hdrs.insert(0, ("Host", host))
    framed = _has(hdrs, "content-length") or _has(hdrs, "transfer-encoding")
    payload = b""
    if body is not None or chunked:
        if chunked:
            if not framed:
                hdrs.append(("Transfer-Encoding", "chunked"))
            payload = chunk_encode(body or b"", chunk_size, trailers)
        else:
            if not framed:
                hdrs.append(("Content-Length", str(len(body or b""))))
            payload = body or b""
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs)
    return head.encode("latin-1") + b"\r\n" + payload


def _no_body(method: str, status: int) -> bool:
    return method.upper() == "HEAD" or 100 <= status < 200 or status in (204, 304)


class RawClient:
    """One TCP connection to an HTTP server, read with a buffer so that keep-alive and
    pipelined responses are taken apart exactly."""

    def __init__(self, host: str = HOST, port: int = 0, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.reset_seen = False

    # -- sending ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_request(self, method: str = "GET", target: str = "/", headers: HeadersIn = None,
                     body: Optional[bytes] = None, **kw: Any) -> None:
        self.send(build_request(method, target, headers, body, **kw))

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    # -- receiving -------------------------------------------------------------------------

    def _fill(self, deadline: float, most: int = 262144) -> bool:
        """Receive more into the buffer; False at EOF or RST (``reset_seen`` tells)."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete response within {self.timeout:g}s")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(most)
        except socket.timeout:
            raise TimeoutError(f"no complete response within {self.timeout:g}s") from None
        except ConnectionResetError:
            self.eof = self.reset_seen = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _line(self, deadline: float, raw: bytearray, partial: Optional[Response],
              limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = self._take(i + 2)
                raw += line
                return line[:-2]
            if len(self.buf) > limit:
                raise BadResponse("line too long", bytes(self.buf[:200]))
            if not self._fill(deadline):
                raise ConnectionEnded(self.reset_seen, partial, bytes(raw + self.buf))

    def _read_head(self, deadline: float) -> Response:
        raw = bytearray()
        while self.buf[:2] == b"\r\n":
            del self.buf[:2]
        status_line = self._line(deadline, raw, None)
        m = re.fullmatch(rb"(HTTP/\d\.\d) (\d{3})(?: (.*))?", status_line)
        if not m:
            raise BadResponse("bad status line", bytes(raw + self.buf))
        resp = Response(int(m.group(2)), (m.group(3) or b"").decode("latin-1"),
                        m.group(1).decode())
        while True:
            line = self._line(deadline, raw, None)
            if not line:
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                raise BadResponse(f"bad header line {line!r}", bytes(raw))
            resp.headers.append((name, value.strip(" \t")))
        resp.raw_head = bytes(raw)
        return resp

    def read_response(self, method: str = "GET", *, keep_body: bool = True,
                      timeout: Optional[float] = None) -> Response:
        """The next response (1xx answers before it land in ``interim``; a 101 is returned as
        the response). Raises ``ConnectionEnded`` when the server closes or resets first,
        ``BadResponse`` on bytes that are not HTTP, ``TimeoutError`` past the deadline."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        interim: List[Response] = []
        while True:
            resp = self._read_head(deadline)
            if 100 <= resp.status < 200 and resp.status != 101:
                interim.append(resp)
                continue
            break
        resp.interim = interim
        self._read_body(resp, method, deadline, keep_body)
        resp.closed = self._closed_after(resp, deadline)
        return resp

    def read_interim_or_final(self, method: str = "GET", *, keep_body: bool = True,
                              timeout: Optional[float] = None) -> Response:
        """One response head — a 1xx is returned as is (no body) — or a whole final one."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        resp = self._read_head(deadline)
        if not 100 <= resp.status < 200:
            self._read_body(resp, method, deadline, keep_body)
            resp.closed = self._closed_after(resp, deadline)
        return resp

    def _read_body(self, resp: Response, method: str, deadline: float,
                   keep_body: bool) -> None:
        h = hashlib.sha256()
        body = bytearray()
        n = 0

        def take(data: bytes) -> None:
            nonlocal n
            h.update(data)
            n += len(data)
            if keep_body:
                body.extend(data)

        def settle() -> None:
            resp.body_length, resp.body_sha256, resp.body = n, h.hexdigest(), bytes(body)

        def ended() -> ConnectionEnded:
            settle()
            return ConnectionEnded(self.reset_seen, resp, resp.raw_head + bytes(body[:65536]))

        te = resp.header("transfer-encoding")
        cl = resp.headers_all("content-length")
        if _no_body(method, resp.status):
            resp.framing = "none"
        elif te is not None:
            if te.split(",")[-1].strip().lower() == "chunked":
                resp.framing = "chunked"
                raw = bytearray()
                while True:
                    line = self._line(deadline, raw, resp)
                    size_text, _, ext = line.partition(b";")
                    if ext:
                        resp.chunk_extensions.append(ext)
                    if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text.strip(b" \t")):
                        raise BadResponse(f"bad chunk size line {line!r}", bytes(raw))
                    size = int(size_text, 16)
                    if size == 0:
                        break
                    while size:
                        if not self.buf and not self._fill(deadline):
                            raise ended()
                        piece = self._take(min(size, len(self.buf)))
                        size -= len(piece)
                        take(piece)
                    if self._line(deadline, raw, resp) != b"":
                        raise BadResponse("chunk data not followed by CRLF", bytes(raw))
                while True:
                    line = self._line(deadline, raw, resp)
                    if not line:
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    resp.trailers.append((name, value.strip(" \t")))
            else:
                resp.framing = "close"
        elif cl:
            values = {v.strip() for c in cl for v in c.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise BadResponse(f"bad Content-Length {cl!r}", resp.raw_head)
            resp.framing = "length"
            left = int(values.pop())
            while left:
                if not self.buf and not self._fill(deadline, min(left, 1 << 20)):
                    raise ended()
                piece = self._take(min(left, len(self.buf)))
                left -= len(piece)
                take(piece)
        else:
            resp.framing = "close"
        if resp.framing == "close":
            while True:
                if self.buf:
                    take(self._take(len(self.buf)))
                if not self._fill(deadline):
                    break
        settle()

    def _closed_after(self, resp: Response, deadline: float) -> bool:
        """Whether the server closed: waited for (until the deadline, at most 5 s) when the
        response announced it, otherwise only what has already arrived."""
        if self.buf:
            return False
        announced = resp.framing == "close" or "close" in (resp.header("connection") or
                                                           "").lower()
        wait = min(max(0.0, deadline - time.monotonic()), 5.0) if announced else 0.0
        return self.peer_closed(wait)

    def peer_closed(self, timeout: float = 1.0) -> bool:
        """True if the server closes (FIN or RST) within ``timeout`` with nothing more to read;
        False if it stays open that long or sends bytes (kept in the buffer)."""
        if self.buf:
            return False
        if self.eof:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return False
        self._fill(time.monotonic() + 1.0)
        return self.eof and not self.buf

    def read_to_close(self, timeout: Optional[float] = None) -> bytes:
        """Every byte until the server closes (buffered bytes first)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while self._fill(deadline):
            pass
        return self._take(len(self.buf))

    def read_until(self, needle: bytes, timeout: Optional[float] = None) -> bytes:
        """Bytes up to and including the first ``needle`` (the rest stays buffered);
        ``ConnectionEnded`` if the server closes first."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            i = self.buf.find(needle)
            if i >= 0:
                return self._take(i + len(needle))
            if not self._fill(deadline):
                raise ConnectionEnded(self.reset_seen, None, bytes(self.buf))

    def recv_some(self, timeout: Optional[float] = None) -> bytes:
        """Whatever is buffered or arrives next (b"" at EOF)."""
        if not self.buf:
            deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
            self._fill(deadline)
        return self._take(len(self.buf))

    # -- both ------------------------------------------------------------------------------

    def request(self, method: str = "GET", target: str = "/", headers: HeadersIn = None,
                body: Union[bytes, Iterable[bytes], None] = None, *, chunked: bool = False,
                trailers: HeadersIn = None, expect_continue: bool = False,
                keep_body: bool = True, host: Optional[str] = "test",
                version: str = "HTTP/1.1", timeout: Optional[float] = None) -> Response:
        """Send one request and read its response. ``body`` may be an iterable of parts (sent
        as chunks with ``chunked``, otherwise the headers must carry a Content-Length). With
        ``expect_continue`` the head goes with ``Expect: 100-continue`` and the body only after
        a ``100 Continue`` (which then is ``interim[0]``); a final answer instead is returned
        with the body unsent."""
        hdrs = _headers(headers)
        if expect_continue and not _has(hdrs, "expect"):
            hdrs.append(("Expect", "100-continue"))
        if isinstance(body, (bytes, bytearray)) or body is None:
            data = None if body is None else bytes(body)
            full = build_request(method, target, hdrs, data, chunked=chunked,
                                 trailers=trailers, host=host, version=version)
            if not expect_continue:
                self.send(full)
                return self.read_response(method, keep_body=keep_body, timeout=timeout)
            split = full.index(b"\r\n\r\n") + 4
            head, payload = full[:split], full[split:]
            parts: Iterable[bytes] = [payload]
            raw_parts = True
        else:
            if chunked and not _has(hdrs, "transfer-encoding"):
                hdrs.append(("Transfer-Encoding", "chunked"))
            head = build_request(method, target, hdrs, None, host=host, version=version)
            parts, raw_parts = body, False
        self.send(head)
        got_continue: List[Response] = []
        if expect_continue:
            first = self.read_interim_or_final(method, keep_body=keep_body, timeout=timeout)
            if first.status != 100:
                return first
            got_continue.append(first)
        for part in parts:
            if not part:
                continue
            self.send(part if raw_parts or not chunked
                      else b"%x\r\n" % len(part) + part + b"\r\n")
        if chunked and not raw_parts:
            self.send(chunk_encode(b"", trailers=trailers))
        resp = self.read_response(method, keep_body=keep_body, timeout=timeout)
        resp.interim[:0] = got_continue
        return resp

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(port: int, host: str = HOST, timeout: float = 10.0) -> RawClient:
    return RawClient(host, port, timeout)


def keepalive(port: int, targets: Sequence[str], *, method: str = "GET",
              headers: HeadersIn = None, host: str = HOST,
              timeout: float = 10.0) -> List[Response]:
    """``len(targets)`` requests one after another on one connection; their responses."""
    with RawClient(host, port, timeout) as c:
        return [c.request(method, t, headers) for t in targets]


def pipeline(port: int, targets: Sequence[str], *, methods: Optional[Sequence[str]] = None,
             headers: HeadersIn = None, host: str = HOST,
             timeout: float = 10.0) -> List[Response]:
    """All requests written at once (one ``sendall``), then their responses read in order."""
    methods = list(methods) if methods is not None else ["GET"] * len(targets)
    with RawClient(host, port, timeout) as c:
        c.send(b"".join(build_request(m, t, headers) for m, t in zip(methods, targets)))
        return [c.read_response(m) for m in methods]


# -- curl --------------------------------------------------------------------------------------

_MARK = "@@curl"
_WRITE_OUT = f"\\n{_MARK} %{{http_code}} %{{num_connects}} %{{size_download}} %{{size_upload}}\\n"


@dataclass
class Transfer:
    status: int
    connects: int  # new connections this transfer opened (0: it reused one)
    size_download: int
    size_upload: int
    body: bytes


@dataclass
class CurlResult:
    returncode: int
    stdout: bytes
    stderr: str
    transfers: List[Transfer] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        """curl said it re-used a connection (``-v``)."""
        return "Re-using existing connection" in self.stderr

    @property
    def status(self) -> int:
        return self.transfers[-1].status if self.transfers else 0

    @property
    def body(self) -> bytes:
        return self.transfers[-1].body if self.transfers else self.stdout

    def sent_headers(self) -> List[str]:
        """The request header lines curl printed with ``-v`` (``> `` lines)."""
        return [line[2:] for line in self.stderr.splitlines() if line.startswith("> ")]

    def received_headers(self) -> List[str]:
        return [line[2:] for line in self.stderr.splitlines() if line.startswith("< ")]


def curl(args: Sequence[str], *, timeout: float = 30.0, stdin: Optional[bytes] = None,
         write_out: bool = True) -> CurlResult:
    """``curl -sS -v --max-time T ARGS`` (no proxy from the environment). With ``write_out``
    each transfer's status, connects and sizes are parsed into ``transfers``."""
    cmd = ["curl", "-sS", "-v", "--noproxy", "*", "--max-time", f"{timeout:g}"]
    if write_out:
        cmd += ["-w", _WRITE_OUT]
    cmd += list(args)
    p = subprocess.run(cmd, input=stdin if stdin is not None else b"",
                       capture_output=True, timeout=timeout + 10)
    result = CurlResult(p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"))
    if write_out:
        pieces = re.split(rb"\n" + _MARK.encode() + rb" (\d+) (\d+) (\d+) (\d+)\n", p.stdout)
        for i in range(0, len(pieces) - 1, 5):
            result.transfers.append(Transfer(int(pieces[i + 1]), int(pieces[i + 2]),
                                             int(pieces[i + 3]), int(pieces[i + 4]),
                                             pieces[i]))
    return result


def curl_keepalive(url1: str, url2: str, *args: str, timeout: float = 30.0) -> CurlResult:
    """Two URLs in one invocation: curl keeps the connection for the second. ``reused`` and
    ``transfers[1].connects == 0`` tell it did."""
    return curl([*args, url1, url2], timeout=timeout)


def curl_upload_chunked(url: str, data: bytes, *args: str,
                        timeout: float = 30.0) -> CurlResult:
    """``curl -T - URL`` with ``data`` on stdin: a PUT whose body is chunked (size unknown)."""
    return curl(["-T", "-", *args, url], stdin=data, timeout=timeout)


def curl_expect_upload(url: str, path: str, *args: str, timeout: float = 60.0,
                       expect_timeout: float = 10.0) -> CurlResult:
    """``curl --data-binary @PATH`` with ``Expect: 100-continue`` (a POST that waits up to
    ``expect_timeout`` for the 100 before sending the body)."""
    return curl(["--data-binary", f"@{path}", "-H", "Expect: 100-continue",
                 "-H", "Content-Type: application/octet-stream",
                 "--expect100-timeout", f"{expect_timeout:g}", *args, url], timeout=timeout)


def curl_head(url: str, *args: str, timeout: float = 30.0) -> CurlResult:
    """``curl -I URL``: a HEAD; the head is on stdout (``body``)."""
    return curl(["-I", *args, url], timeout=timeout)


# -- http.client -------------------------------------------------------------------------------

def _from_http_client(r: http.client.HTTPResponse, keep_body: bool) -> Response:
    h = hashlib.sha256()
    body = bytearray()
    n = 0
    while True:
        data = r.read(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
        if keep_body:
            body += data
    return Response(r.status, r.reason, "HTTP/1.1" if r.version == 11 else "HTTP/1.0",
                    list(r.getheaders()), bytes(body), n, h.hexdigest(),
                    "chunked" if r.chunked else "length" if r.length is not None else "none")


def http_client_requests(port: int, requests: Sequence[Tuple[str, str]], *,
                         body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
                         host: str = HOST, timeout: float = 10.0,
                         keep_body: bool = True) -> List[Response]:
    """``(method, path)`` requests in turn on one ``http.client.HTTPConnection`` (which keeps
    the connection alive between them); each gets ``body`` and ``headers``."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        out = []
        for method, path in requests:
            conn.request(method, path, body=body, headers=headers or {})
            out.append(_from_http_client(conn.getresponse(), keep_body))
        return out
    finally:
        conn.close()


def http_client_request(port: int, method: str = "GET", path: str = "/", *,
                        body: Union[bytes, Iterable[bytes], None] = None,
                        headers: Optional[Dict[str, str]] = None, encode_chunked: bool = False,
                        host: str = HOST, timeout: float = 10.0,
                        keep_body: bool = True) -> Response:
    """One request with ``http.client`` (``encode_chunked`` with an iterable body sends it
    chunked)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {},
                     encode_chunked=encode_chunked)
        return _from_http_client(conn.getresponse(), keep_body)
    finally:
        conn.close()


# -- WebSocket ---------------------------------------------------------------------------------

def ws_connect(url: str, *, timeout: float = 10.0, **kw: Any) -> Any:
    """A ``websockets.sync.client.ClientConnection`` to ``url`` (``ws://127.0.0.1:P/ws``),
    opening and closing within ``timeout``. Use it as a context manager."""
    import inspect

    from websockets.sync.client import connect as ws_open
    if "proxy" in inspect.signature(ws_open).parameters:
        kw.setdefault("proxy", None)  # never a proxy from the environment
    return ws_open(url, open_timeout=timeout, close_timeout=timeout, **kw)
