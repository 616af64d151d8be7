"""Raw HTTP/1.1 on 127.0.0.1 for admin server tests: send bytes as they are (malformed ones
too), read back every answer the server wrote before it closed."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


@dataclass
class Answer:
    """One HTTP response as it came over the wire."""

    status: int
    headers: Dict[str, List[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower(), [])
        return values[0] if values else ""

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answers(data: bytes, head_first: bool = False) -> List[Answer]:
    """Every final response in ``data`` (pipelined answers follow each other; interim 1xx
    ones are skipped); ``head_first``: the first answers a HEAD, so it has no body whatever
    its Content-Length says. Fails on anything that is not a complete response with a
    Content-Length."""
    answers: List[Answer] = []
    rest = data
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        lines = head.split(b"\r\n")
        version, _, status_text = lines[0].partition(b" ")
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), f"not a status line: {lines[0]!r}"
        answer = Answer(int(status_text.split(b" ", 1)[0]))
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            assert colon, f"bad header line {line!r}"
            answer.headers.setdefault(name.decode("latin-1").strip().lower(), []).append(
                value.decode("latin-1").strip())
        if 100 <= answer.status < 200:
            continue  # an interim answer (100 Continue): no body, the real one follows
        length = answer.header("content-length")
        assert length.isdigit(), f"no Content-Length in {head!r}"
        size = 0 if head_first and not answers else int(length)
        assert len(rest) >= size, f"body cut short: {len(rest)} of {size} bytes"
        answer.body, rest = rest[:size], rest[size:]
        answers.append(answer)
    return answers


class _Collect(Protocol):
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def exchange(reactor: Any, port: int, payload: bytes, timeout: float = 5.0) -> Any:
    """Send ``payload`` to 127.0.0.1:port without closing our side (Twisted's HTTP server
    would take a FIN as the end of the connection) and return all bytes received until the
    server closes; fails if it has not closed within ``timeout`` seconds."""
    proto = _Collect(payload)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)
    timer = reactor.callLater(timeout, proto.transport.abortConnection)
    data = yield proto.done
    if not timer.active():
        raise AssertionError(f"the server did not close within {timeout:g}s; got {data!r}")
    timer.cancel()
    return data


def blocking_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """``exchange`` for a thread other than the reactor's: plain blocking sockets. Sends
    what the server takes (it may answer and close before reading a large body) and
    returns all bytes received until it closes; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early: read what it said
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise AssertionError(f"the server did not close within {timeout:g}s; "
                                     f"got {data[:300]!r}") from None
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def assert_json_error(answer: Answer, status: int) -> str:
    """``answer`` is the JSON error shape of the admin server with ``status``; returns the
    message."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.header("content-type").startswith("application/json"), answer.headers
    body = answer.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])
