"""Consul's HTTP API as the watch uses it: one GET through an injected treq client, the answer
(status, ``X-Consul-Index``, body), and the errors that make the watch keep its last good set.

Also what every query's parser shares: the ``Parsed`` result, JSON decoding, and merging
entries that name the same address. No watch logic here, so the parsers (``health``, ``kv``)
import this module and nothing else of the package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
)
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)

import lb
from lb.config import Address, ConsulConfig
from lb.peer import READY, PeerSpec

TIMEOUT_MARGIN = 10.0  # on top of wait × 17/16 (Consul adds up to wait/16 of jitter)


class InvalidAnswer(ValueError):
    """Consul answered 200 with a body that cannot be a Consul answer: keep the last set."""


class ConsulHTTPError(Exception):
    """Consul answered with a status the watch cannot use."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        text = body[:200].decode("utf-8", "replace").strip()
        hint = " (check the ACL token)" if status == 403 else ""
        super().__init__(f"HTTP {status}{hint}: {text}" if text else f"HTTP {status}{hint}")


class ConsulAnswer(NamedTuple):
    """One HTTP answer, read whole; parsing it is the query's business."""

    status: int
    consul_index: Optional[int]  # X-Consul-Index, None when absent or not a number
    body: bytes


@dataclass(frozen=True)
class Parsed:
    """What an answer says: the desired peers, and why some entries were left out."""

    specs: List[PeerSpec]
    skipped: List[str] = field(default_factory=list)


A_co = TypeVar("A_co", covariant=True)  # what a query's parse() makes of an answer


class Query(Protocol[A_co]):
    """What a watcher needs from a query: ``health.ServiceQuery`` and ``kv.KVQuery`` parse
    answers into peers (``Parsed``), ``routes.CatalogRoutesQuery`` into routes."""

    describe: str  # for logs: "service 'web'"
    service: Optional[str]  # the Consul service watched, or None
    kv_prefix: Optional[str]  # the KV folder watched, or None
    path: str  # the API path, query string not included
    params: List[Tuple[str, str]]  # fixed query parameters (tags, recurse)

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        """What makes two answers comparable (a snapshot is only used for the same)."""

    def parse(self, status: int, body: bytes) -> A_co:
        """What an answer asks for; ConsulHTTPError / InvalidAnswer when unusable."""


PeersQuery = Query[Parsed]  # a pool's query: its answers are peers


# --- answers ---------------------------------------------------------------------------------


def merge_specs(specs: Iterable[PeerSpec]) -> List[PeerSpec]:
    """One spec per address (two instances may share one): ready beats drain, then the
    higher weight wins. Sorted, so equal sets compare equal."""
    best: Dict[Address, PeerSpec] = {}
    for spec in specs:
        have = best.get(spec.address)
        if have is None or (spec.state == READY, spec.weight) > (have.state == READY,
                                                                 have.weight):
            best[spec.address] = spec
    return [best[a] for a in sorted(best, key=lambda a: (a.host, a.port))]


def nothing_usable(skipped: Sequence[str], noun: str) -> InvalidAnswer:
    """An answer that lists entries of which none maps to a peer is broken, not empty:
    applied, one bad registration template would empty the pool."""
    shown = "; ".join(skipped[:3]) + (f"; {len(skipped) - 3} more" if len(skipped) > 3
                                      else "")
    return InvalidAnswer(f"none of the {len(skipped)} {noun}(s) is usable: {shown}")


def decode_json(body: bytes) -> Any:
    """The body as JSON; InvalidAnswer (with the start of the body) when it is not."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        snippet = body[:60].decode("utf-8", "replace")
        raise InvalidAnswer(f"body is not JSON: {snippet!r}") from None


def parse_index(headers: Any) -> Optional[int]:
    """``X-Consul-Index`` as an int (Twisted's Headers match names case-insensitively)."""
    values = headers.getRawHeaders(b"x-consul-index") or []
    if not values:
        return None
    text = values[0].strip()
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return int(text) if text.isdigit() else None


# --- the HTTP client -------------------------------------------------------------------------


class ConsulClient:
    """Consul's HTTP API through an injected treq client (``treq.client.HTTPClient`` or
    ``treq.testing.StubTreq``). Settings are read on every request, so a reload that
    changes the URL, token or consistency takes effect with the next request."""

    def __init__(self, http: Any, settings: Callable[[], ConsulConfig]) -> None:
        self.http = http
        self.settings = settings

    def request_params(self, params: Sequence[Tuple[str, str]], index: int,
                       settings: ConsulConfig) -> List[Tuple[str, str]]:
        """The query string: the query's own parameters, dc, consistency, index and wait."""
        out = list(params)
        if settings.datacenter:
            out.append(("dc", settings.datacenter))
        if settings.consistency in ("stale", "consistent"):
            out.append((settings.consistency, ""))
        if index > 0:
            # Go's ParseDuration needs a unit; whole milliseconds keep sub-second waits exact
            out += [("index", str(index)), ("wait", f"{max(1, round(settings.wait * 1000))}ms")]
        return out

    async def get(self, path: str, params: Sequence[Tuple[str, str]], index: int,
                  ) -> ConsulAnswer:
        """One GET (blocking on ``index`` when it is > 0), the whole body read."""
        settings = self.settings()
        headers = {"User-Agent": [f"lb/{lb.__version__}"]}
        if settings.token:
            headers["X-Consul-Token"] = [settings.token]
        response = await self.http.get(settings.url + path,
                                       params=self.request_params(params, index, settings),
                                       headers=headers)
        body: bytes = await treq.content(response)
        return ConsulAnswer(response.code, parse_index(response.headers), body)


def request_timeout(index: int, wait: float) -> float:
    """How long to give one request: a blocking one may legitimately take wait × 17/16."""
    return (wait * 17 / 16 if index > 0 else 0.0) + TIMEOUT_MARGIN


class _QuietHTTPFactory(_HTTP11ClientFactory):
    noisy = False


def own_http_client(reactor: IReactorTime) -> Tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client for a watcher that was given none, and its connection pool (to close
    on stop): persistent connections, and no log line per connection."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    pool._factory = _QuietHTTPFactory
    agent = Agent(reactor, pool=pool)
    return HTTPClient(agent), pool


def describe_failure(failure: Failure) -> str:
    """A failed request in one line: the reason inside Twisted's wrappers, with its type."""
    error = failure.value
    if isinstance(error, (ResponseNeverReceived, ResponseFailed)) and error.reasons:
        reason = error.reasons[0]
        return f"{type(error).__name__}: {reason.getErrorMessage()}"
    message = failure.getErrorMessage()
    name = type(error).__name__
    return message if message.startswith(name) else f"{name}: {message}"


def safe_url(url: str) -> str:
    """The agent URL without any user:password part, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
