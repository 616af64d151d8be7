"""Run the smuggling corpus against an HTTP proxy and judge every case.

``python -m tests.http.run_corpus --proxy-port P --peer-port Q`` starts a recording peer on
127.0.0.1:Q (the proxy under test must forward to it), sends each case of
``tests.http.corpus`` on a fresh connection to 127.0.0.1:P, reads the answer (bounded), waits
for the peer to go quiet, and prints per case: the statuses the client got, how the connection
ended, what reached the peer, and PASS/FAIL against lb's expected outcome. Exit status 0 when
every case passed.

Importable: ``run_corpus(proxy_port, peer)`` returns one ``CaseResult`` per case;
``judge(case, client, traffic)`` lists what went against the expectation. Everything is
blocking sockets and threads, so from a Twisted test run it through ``deferToThread``.

``--llhttp`` instead feeds each case to httptools' strict ``HttpRequestParser`` (no proxy, no
peer) and prints what the parser alone made of it. ``--emit`` prints the outcomes as JSON
``{case id: text}`` instead, which ``python -m tests.http.record FIELD FILE`` writes into
``corpus.py``.

Checking the corpus against other proxies (what ``corpus.py`` records was made this way)::

    # HAProxy 2.6: mode http, option http-buffer-request left off
    global
        maxconn 100
    defaults
        mode http
        timeout connect 2s
        timeout client 5s
        timeout server 5s
        timeout http-request 3s
    frontend fe
        bind 127.0.0.1:18080
        default_backend be
    backend be
        server peer 127.0.0.1:18081

    # nginx 1.22: proxy_pass with proxy_http_version 1.1, header buffers near lb's 16 KiB
    # (run as: nginx -p /tmp/x -c /tmp/x/nginx.conf, with daemon off and pid, error_log,
    # access_log and *_temp_path under /tmp/x)
    events {}
    http {
        large_client_header_buffers 4 16k;
        server {
            listen 127.0.0.1:18090;
            location / {
                proxy_pass http://127.0.0.1:18091;
                proxy_http_version 1.1;
            }
        }
    }
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

from tests.http.corpus import CANARY, CASES, Case
from tests.http.peer import PEER_HEADER, RecordingPeer, Traffic

HEAD_END = re.compile(rb"\r?\n\r?\n")
LINE_END = re.compile(rb"\r?\n")


@dataclass
class Response:
    """One response the client read."""

    status: int
    headers: List[Tuple[bytes, bytes]]
    body: bytes

    @property
    def from_peer(self) -> bool:
        return any(k.lower() == PEER_HEADER.lower() for k, _ in self.headers)

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200 and self.status != 101


@dataclass
class ClientResult:
    """What the client saw on its connection."""

    responses: List[Response]
    end: str                 # "eof" or "reset" when the proxy closed, "open" when we stopped
    received: bytes          # every byte, parsed or not
    send_error: Optional[str] = None
    unparsed: bytes = b""    # bytes after the last whole response

    @property
    def finals(self) -> List[Response]:
        return [r for r in self.responses if not r.interim]

    @property
    def closed(self) -> bool:
        return self.end != "open"


@dataclass
class CaseResult:
    case: Case
    client: ClientResult
    traffic: Traffic
    problems: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


# -- reading responses ----------------------------------------------------------------------
def parse_responses(data: bytes, at_eof: bool) -> Tuple[List[Response], bytes]:
    """Whole responses at the front of ``data``, and what is left. A response without length
    runs to the end of the stream, so it is whole only ``at_eof``."""
    responses: List[Response] = []
    pos = 0
    while pos < len(data):
        end = HEAD_END.search(data, pos)
        if end is None:
            break
        lines = LINE_END.split(data[pos:end.start()])
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            break
        status = int(parts[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        fields = {k.lower(): v for k, v in headers}
        body_start = end.end()
        if 100 <= status < 200 or status in (204, 304):
            body, pos = b"", body_start
        elif b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            decoded = _dechunk(data, body_start)
            if decoded is None:
                break
            body, pos = decoded
        elif fields.get(b"content-length", b"").isdigit():
            size = int(fields[b"content-length"])
            if len(data) < body_start + size:
                break
            body, pos = data[body_start:body_start + size], body_start + size
        elif at_eof:
            body, pos = data[body_start:], len(data)
        else:
            break
        responses.append(Response(status, headers, body))
    return responses, data[pos:]


def _dechunk(data: bytes, pos: int) -> Optional[Tuple[bytes, int]]:
    body = bytearray()
    while True:
        eol = data.find(b"\n", pos)
        if eol < 0:
            return None
        try:
            size = int(data[pos:eol].split(b";")[0].strip(), 16)
        except ValueError:
            return None
        pos = eol + 1
        if size == 0:
            end = data.find(b"\r\n\r\n", pos - 2)
            return (bytes(body), end + 4) if end >= 0 else None
        if len(data) < pos + size + 2:
            return None
        body += data[pos:pos + size]
        pos += size + 2


# -- one exchange ---------------------------------------------------------------------------
def exchange(port: int, raw: bytes, expect_finals: int, timeout: float = 2.0,
             grace: float = 0.15, segment: Optional[int] = None, gap: float = 0.002,
             host: str = "127.0.0.1") -> ClientResult:
    """Send ``raw`` on a new connection and read until the proxy closes, or until
    ``expect_finals`` final responses came and ``grace`` passed without more, or ``timeout``.
    ``segment`` sends the bytes in writes of that size, ``gap`` seconds apart."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_error: Optional[str] = None
    received = bytearray()
    end = "open"
    deadline = time.monotonic() + timeout
    try:
        try:
            if segment is None:
                sock.sendall(raw)
            else:
                for i in range(0, len(raw), segment):
                    sock.sendall(raw[i:i + segment])
                    if i + segment < len(raw):
                        time.sleep(gap)
        except OSError as e:
            send_error = errno.errorcode.get(e.errno or 0, str(e))
        finals_at: Optional[float] = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if finals_at is not None and now >= finals_at + grace:
                break
            wait = deadline - now if finals_at is None else min(deadline, finals_at + grace) - now
            sock.settimeout(max(wait, 0.001))
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                end = "reset"
                break
            if not data:
                end = "eof"
                break
            received += data
            responses, _ = parse_responses(bytes(received), at_eof=False)
            if finals_at is None and sum(not r.interim for r in responses) >= expect_finals:
                finals_at = time.monotonic()
    finally:
        sock.close()
    responses, rest = parse_responses(bytes(received), at_eof=end != "open")
    return ClientResult(responses, end, bytes(received), send_error, rest)


# -- judging --------------------------------------------------------------------------------
def judge(case: Case, client: ClientResult, traffic: Traffic, trickled: bool = False) -> List[str]:
    """What went against the case's expectation (empty: as expected). With ``trickled``, a
    ``body_error`` case may leave part of its request on a peer connection the proxy cut."""
    problems: List[str] = []
    finals = client.finals
    statuses = " ".join(str(r.status) for r in finals) or "nothing"
    # Trickled, a body error may leave part of its request on a peer connection the proxy
    # then cuts: allowed, as long as no whole request more was framed there.
    partial_ok = trickled and case.body_error and len(traffic.requests) <= case.before
    canary = canary_seen(traffic)
    if canary == "request":
        problems.append(f"the smuggled request {CANARY.decode()} reached the peer as a request")
    elif canary and not partial_ok:
        problems.append(f"the smuggled request {CANARY.decode()} reached the peer in a body")
    if b"HTTP/1.0" in case.raw.split(b"\n", 1)[0] and any(r.interim for r in client.responses):
        problems.append("a 1xx answer to an HTTP/1.0 client (RFC 9110 §15.2)")
    stray = {i: b for i, b in traffic.leftover.items()}
    if case.control:
        if len(finals) != case.requests or any(r.status != 200 or not r.from_peer
                                               for r in finals):
            problems.append(f"client got {statuses}, expected {case.requests} x 200 from the peer")
        if len(traffic.requests) != case.requests:
            problems.append(f"peer got {len(traffic.requests)} requests, expected {case.requests}")
        elif case.bodies is not None and tuple(r.body for r in traffic.requests) != case.bodies:
            got = tuple(r.body for r in traffic.requests)
            problems.append(f"peer got bodies {got!r}, expected {case.bodies!r}")
        if stray:
            problems.append(f"peer got {traffic.leftover_bytes} bytes it could not frame")
        if case.closes and not client.closed:
            problems.append("connection left open after the answer")
        return problems
    status = case.status
    if not finals or finals[-1].status != status:
        problems.append(f"client got {statuses}, expected {status} last")
    elif finals[-1].from_peer:
        problems.append(f"the {status} came from the peer, not from the proxy")
    early = finals[:-1]
    if len(early) != case.before or any(r.status != 200 or not r.from_peer for r in early):
        # RFC 9112 §9.3.2: the valid requests ahead of the bad one are answered, in order
        problems.append(f"client got {statuses}: expected {case.before} x 200 from the peer "
                        f"before the {status}")
    if not client.closed:
        problems.append(f"connection left open after the {status}")
    if len(traffic.requests) > case.before:
        extra = traffic.requests[case.before:]
        problems.append(f"peer got {len(extra)} request(s) more than the {case.before} valid: "
                        + ", ".join(repr(r.method + b" " + r.target[:40]) for r in extra))
    if case.before == 0 and traffic.data and not partial_ok:
        problems.append(f"peer got {len(traffic.data)} bytes of a refused request")
    elif stray:
        cut = all(traffic.ended.get(i) for i in stray)
        if not (partial_ok and cut):
            problems.append(f"peer got {traffic.leftover_bytes} bytes past the valid requests"
                            + ("" if cut else " on a connection left open"))
    return problems


def canary_seen(traffic: Traffic) -> str:
    """``request`` when the peer framed (or began) a request for the canary target, ``body``
    when the canary reached it only inside a body, else empty."""
    if (any(CANARY in r.target for r in traffic.requests)
            or any(b.split(b"\n", 1)[0].find(CANARY) >= 0 for b in traffic.leftover.values())):
        return "request"
    return "body" if CANARY in traffic.data else ""


def summarize(client: ClientResult, traffic: Traffic) -> str:
    """A short account, e.g. ``400 closed; peer 0`` or ``200 200 open; peer 2 +31B``."""
    statuses = " ".join(str(r.status) + ("p" if r.from_peer else "")
                        for r in client.responses) or "no answer"
    end = {"eof": "closed", "reset": "reset", "open": "open"}[client.end]
    peer = f"peer {len(traffic.requests)}"
    if traffic.leftover_bytes:
        peer += f" +{traffic.leftover_bytes}B"
    if not traffic.requests and not traffic.leftover_bytes and traffic.data:
        peer += f" ({len(traffic.data)}B)"
    canary = canary_seen(traffic)
    if canary:
        peer += f", {CANARY.decode()} " + ("as a request" if canary == "request" else "in a body")
    return f"{statuses} {end}; {peer}"


# -- the run --------------------------------------------------------------------------------
def run_case(case: Case, proxy_port: int, peer: RecordingPeer, timeout: float = 2.0,
             grace: float = 0.15, settle: float = 0.1, trickle: bool = False,
             host: str = "127.0.0.1") -> CaseResult:
    """One case on a fresh connection; the peer's traffic from the send until it is quiet
    (the previous case already waited for quiet, so its bytes are not counted here)."""
    mark = peer.mark()
    expect_finals = case.requests if case.control else case.before + 1
    segment = None if not trickle else (5 if len(case.raw) <= 4096 else 1024)
    client = exchange(proxy_port, case.raw, expect_finals, timeout, grace, segment, host=host)
    time.sleep(settle)
    peer.wait_quiet(settle, 10 * settle)
    traffic = peer.traffic_since(mark)
    return CaseResult(case, client, traffic, judge(case, client, traffic, trickled=trickle))


def run_corpus(proxy_port: int, peer: RecordingPeer, cases: Iterable[Case] = CASES,
               **options: object) -> List[CaseResult]:
    """Every case in turn (``options`` go to ``run_case``)."""
    return [run_case(case, proxy_port, peer, **options) for case in cases]  # type: ignore[arg-type]


def describe(result: CaseResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    line = (f"{verdict} {result.case.id:40} want {result.case.expect:4} got "
            f"{summarize(result.client, result.traffic)}")
    return line + "".join(f"\n       - {p}" for p in result.problems)


# -- llhttp alone ---------------------------------------------------------------------------
def llhttp_verdict(raw: bytes) -> str:
    """What httptools' strict request parser makes of ``raw``: ``accepts N`` (N messages
    complete, ``+ partial`` if one was begun), or ``refuses after N: <error>``."""
    import httptools  # only this tool needs it

    class Count:
        begun = 0
        done = 0

        def on_message_begin(self) -> None:
            self.begun += 1

        def on_message_complete(self) -> None:
            self.done += 1

    count = Count()
    parser = httptools.HttpRequestParser(count)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        return f"accepts {count.done} (then upgrade)"
    except httptools.HttpParserError as e:
        return f"refuses after {count.done}: {e}"
    partial = " + partial" if count.begun > count.done else ""
    return f"accepts {count.done}{partial}"


# -- command line ---------------------------------------------------------------------------
def select(cases: Sequence[Case], only: Optional[str]) -> List[Case]:
    if not only:
        return list(cases)
    pattern = re.compile(only)
    return [c for c in cases if pattern.search(c.id) or pattern.search(c.cls)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.http.run_corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy-port", type=int, help="the proxy under test, on --host")
    parser.add_argument("--peer-port", type=int, default=0,
                        help="where the recording peer listens (the proxy forwards there)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--only", help="regular expression on case ids or classes")
    parser.add_argument("--timeout", type=float, default=2.0, help="per case, seconds")
    parser.add_argument("--trickle", action="store_true",
                        help="send each case in small writes instead of one")
    parser.add_argument("--emit", action="store_true",
                        help="print the outcomes as JSON {id: text} (for tests.http.record)")
    parser.add_argument("--llhttp", action="store_true",
                        help="only feed the cases to httptools' parser (no proxy)")
    args = parser.parse_args(argv)
    cases = select(CASES, args.only)
    if args.llhttp:
        verdicts = {c.id: llhttp_verdict(c.raw) for c in cases}
        if args.emit:
            print(json.dumps(verdicts, indent=1))
        else:
            for c in cases:
                print(f"{c.id:40} want {c.expect:4} llhttp {verdicts[c.id]}")
        return 0
    if args.proxy_port is None:
        parser.error("--proxy-port is required (or --llhttp)")
    peer = RecordingPeer(port=args.peer_port)
    peer.start()
    try:
        results = []
        for case in cases:
            result = run_case(case, args.proxy_port, peer, timeout=args.timeout,
                              trickle=args.trickle, host=args.host)
            results.append(result)
            if not args.emit:
                print(describe(result), flush=True)
    finally:
        peer.stop()
    if args.emit:
        print(json.dumps({r.case.id: ("same: " if r.passed else "differs: ")
                          + summarize(r.client, r.traffic) for r in results}, indent=1))
    failed = [r.case.id for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
