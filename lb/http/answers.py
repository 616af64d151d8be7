"""The answers lb makes itself (SPEC "Answers lb makes itself"): a status, a short plain-text
body, and whether the client connection closes after it. Each is counted in
``lb_http_errors_total{listener,reason}`` under the reason named here."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

REASONS: Dict[int, bytes] = {
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}

BAD_REQUEST = "bad_request"
HEADER_TIMEOUT = "header_timeout"
TOO_LARGE = "too_large"
NO_ROUTE = "no_route"
NO_PEER = "no_peer"
BAD_GATEWAY = "bad_gateway"
GATEWAY_TIMEOUT = "gateway_timeout"
ERROR_REASONS = (BAD_REQUEST, HEADER_TIMEOUT, TOO_LARGE, NO_ROUTE, NO_PEER, BAD_GATEWAY,
                 GATEWAY_TIMEOUT)


class Answer(NamedTuple):
    status: int
    reason: str  # lb_http_errors_total's label
    body: bytes
    close: bool  # the client connection closes after it (its framing cannot be trusted)


def answer(status: int, reason: str, text: str, close: bool = False) -> Answer:
    return Answer(status, reason, (text.rstrip("\n") + "\n").encode("utf-8", "replace"), close)


def bad_request(why: str) -> Answer:
    return answer(400, BAD_REQUEST, f"bad request: {why}", close=True)


def no_route(host: Optional[bytes], path: bytes) -> Answer:
    where = (host or b"").decode("latin-1") + path.decode("latin-1")
    return answer(404, NO_ROUTE, f"no route for {where[:200]}")


def no_peer(pool: str, up: int, total: int) -> Answer:
    return answer(503, NO_PEER, f"no usable peer in pool {pool} ({up} of {total} peers up)")


def bad_gateway(pool: str, why: str) -> Answer:
    return answer(502, BAD_GATEWAY, f"bad gateway: pool {pool}: {why}")


def gateway_timeout(pool: str, seconds: float) -> Answer:
    return answer(504, GATEWAY_TIMEOUT, f"gateway timeout: pool {pool}: no answer within "
                                        f"{seconds:g}s")


def render(a: Answer, request_id: Optional[bytes] = None, id_header: bytes = b"") -> bytes:
    """The bytes of an answer lb makes (HTTP/1.1, no caching)."""
    parts = [b"HTTP/1.1 ", str(a.status).encode(), b" ", REASONS.get(a.status, b"Error"),
             b"\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n"
             b"Content-Length: ", str(len(a.body)).encode(), b"\r\n"]
    if request_id is not None and id_header:
        parts += [id_header, b": ", request_id, b"\r\n"]
    if a.close:
        parts.append(b"Connection: close\r\n")
    parts += [b"\r\n", a.body]
    return b"".join(parts)
