"""Peers from Consul: a blocking-query watch per pool, feeding ``Pool.apply("consul", ...)``.

The watch follows Consul's rules for blocking queries: the first request (and every request
after an error) is a plain read; each answer's ``X-Consul-Index`` is sent back with ``wait``
so the next request blocks until the service changes. An index that is not >= 1 resets to
0 (a plain read again); an answer with the index we sent is Consul's wait running out and
changes nothing. An index lower than the highest one applied (kept across errors and in
the snapshot) means Consul lost its state and is still re-filling its catalog: that
answer's peers are added, but none is removed until a re-read SETTLE later.

Only a successful answer changes the Consul-sourced peers: when Consul is unreachable,
times out, answers 5xx/403 or garbage, or lists instances of which none is usable (bad port
or host name), the pool keeps its last good set and the watch retries with jittered, capped
exponential backoff (about once a second at most, whatever poll_interval is). An empty
list, or one whose instances are all unhealthy, is a real answer and empties the pool.
Every change is written to ``state_dir`` and loaded at start, so the balancer serves with
Consul down.

A ``LoopingCall`` (period ``consul.poll_interval``) watches the watch: it re-arms it if a
request ever stalls past its timeout or the chain of requests is lost, so no bug or odd
network failure can stop discovery for good.

Instances map to peers as Consul's own DNS interface does: address ``Service.Address`` (or
``Node.Address`` when empty), port ``Service.Port``, weight ``Service.Weights.Passing``
(``Weights.Warning`` for an instance whose worst check is ``warning``); critical instances
are left out, warning ones too with ``passing_only``. An instance in maintenance mode
(``_service_maintenance:<id>`` or ``_node_maintenance``) stays listed as ``drain``, so
``consul maint -enable`` lets its connections finish while no new ones arrive. Consul's
server-side ``?passing`` filter would hide maintenance instances entirely, so the watch
reads every instance and applies the same filter itself.
"""

from __future__ import annotations

import ipaddress
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol,
                    Sequence, Tuple)
from urllib.parse import quote, urlsplit

import treq
from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.client import _HTTP11ClientFactory

import lb
from lb.config import MAX_WEIGHT, Address, ConsulConfig, PoolConfig, PoolConsulConfig
from lb.config import parse_address
from lb.discovery import snapshot
from lb.peer import DRAIN, READY, PeerSpec
from lb.pool import Pool

SOURCE = "consul"

# Labels of ConsulWatcher.requests (lb_consul_requests_total{result}).
OK = "ok"                  # a successful answer that changed the pool's Consul peers
UNCHANGED = "unchanged"    # a successful answer that changed nothing (wait ran out, same set)
TIMEOUT = "timeout"        # no answer within wait × 17/16 + TIMEOUT_MARGIN (or stalled)
HTTP_ERROR = "http_error"  # an HTTP status other than 200 (404 for KV: an empty prefix)
INVALID = "invalid"        # 200 with a body that is not what Consul sends, or nothing usable
ERROR = "error"            # no HTTP answer: connection refused or reset, DNS, TLS...
RESULTS = (OK, UNCHANGED, TIMEOUT, HTTP_ERROR, INVALID, ERROR)

NODE_MAINTENANCE = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
_SEVERITY = {"passing": 0, "warning": 1, "critical": 2}

TIMEOUT_MARGIN = 10.0   # on top of wait × 17/16 (Consul adds up to wait/16 of jitter)
SETTLE = 0.5            # after Consul's index went back, how long answers remove no peer
RETRY_FIRST = 0.125     # the first retry after an error comes this soon, the next ones...
RETRY_MAX = 1.0         # ...doubling up to this, whatever poll_interval is;
RETRY_JITTER = 0.25     # each pause is lengthened by up to this fraction, at random
BURST = 5               # back-to-back queries allowed when the index churns...
REFILL = 1.0            # ...then at most one query per this many seconds


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
    status: int
    consul_index: Optional[int]  # X-Consul-Index, None when absent or not a number
    body: bytes


@dataclass(frozen=True)
class Parsed:
    """What an answer says: the desired peers, and why some entries were left out."""

    specs: List[PeerSpec]
    skipped: List[str] = field(default_factory=list)


# --- mapping Consul's answers to peers (pure) -----------------------------------------------


def peer_address(host: Any, port: Any) -> Address:
    """An ``Address`` from Consul's separate host and port fields (IPs normalised)."""
    if host is not None and not isinstance(host, str):
        raise ValueError(f"address {host!r} is not text")
    if not host or not host.strip():
        raise ValueError("no address (Service.Address and Node.Address are empty)")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not 1-65535")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return Address(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    return parse_address(f"{host}:{port}")


def clamp_weight(value: Any, default: int = 1) -> int:
    """A weight in 0..MAX_WEIGHT; anything that is not an integer gets ``default``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return max(0, min(MAX_WEIGHT, value))


def instance_health(checks: Sequence[Any]) -> Tuple[bool, str]:
    """``(in_maintenance, worst status of the other checks)`` for one instance.

    Maintenance is a critical ``_node_maintenance`` or ``_service_maintenance:<id>`` check;
    an unknown status counts as critical, as Consul's own filters do."""
    maintenance = False
    worst = "passing"
    for check in checks:
        if not isinstance(check, dict):
            raise InvalidAnswer(f"a check is {type(check).__name__}, not an object")
        check_id = check.get("CheckID") or ""
        status = check.get("Status")
        if isinstance(check_id, str) and (check_id == NODE_MAINTENANCE or check_id.startswith(
                SERVICE_MAINTENANCE_PREFIX)):
            if status != "passing":
                maintenance = True
            continue
        severity = _SEVERITY.get(status, 2) if isinstance(status, str) else 2
        if severity > _SEVERITY[worst]:
            worst = "critical" if severity == 2 else "warning"
    return maintenance, worst


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


def parse_health_service(entries: Any, passing_only: bool = True) -> Parsed:
    """Peers from a ``/v1/health/service/<name>`` body (already decoded from JSON)."""
    if not isinstance(entries, list):
        raise InvalidAnswer(f"expected a JSON list of instances, got {type(entries).__name__}")
    specs: List[PeerSpec] = []
    skipped: List[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Service"), dict):
            raise InvalidAnswer(f"instance #{i} has no Service object")
        service = entry["Service"]
        node = entry.get("Node")
        node = {} if node is None else node
        checks = entry.get("Checks")
        checks = [] if checks is None else checks
        if not isinstance(node, dict) or not isinstance(checks, list):
            raise InvalidAnswer(f"instance #{i} has a malformed Node or Checks")
        name = service.get("ID") or service.get("Service") or f"#{i}"
        maintenance, worst = instance_health(checks)
        if not maintenance and (worst == "critical" or (passing_only and worst != "passing")):
            continue  # not healthy enough: Consul's ?passing (or DNS) would leave it out too
        try:
            address = peer_address(service.get("Address") or node.get("Address"),
                                   service.get("Port"))
        except ValueError as e:
            skipped.append(f"instance {name}: {e}")
            continue
        weights = service.get("Weights")
        weights = weights if isinstance(weights, dict) else {}
        weight = clamp_weight(weights.get("Warning" if worst == "warning" else "Passing"))
        specs.append(PeerSpec(address, weight, DRAIN if maintenance else READY))
    if skipped and not specs:
        raise nothing_usable(skipped, "instance")
    return Parsed(merge_specs(specs), skipped)


def parse_index(headers: Any) -> Optional[int]:
    """``X-Consul-Index`` as an int (Twisted's Headers match names case-insensitively)."""
    values = headers.getRawHeaders(b"x-consul-index") or []
    if not values:
        return None
    text = values[0].strip()
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return int(text) if text.isdigit() else None


def decode_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        snippet = body[:60].decode("utf-8", "replace")
        raise InvalidAnswer(f"body is not JSON: {snippet!r}") from None


# --- queries: what to ask and how to read the answer ----------------------------------------


class ServiceQuery:
    """Healthy instances of one service: ``GET /v1/health/service/<service>``."""

    def __init__(self, config: PoolConsulConfig) -> None:
        assert config.service is not None
        self.config = config
        self.describe = f"service {config.service!r}"
        self.path = "/v1/health/service/" + quote(config.service, safe="")
        self.params: List[Tuple[str, str]] = [("tag", tag) for tag in config.tags]

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        return {"service": self.config.service, "tags": list(self.config.tags),
                "passing_only": self.config.passing_only, "datacenter": settings.datacenter}

    def parse(self, status: int, body: bytes) -> Parsed:
        if status != 200:
            raise ConsulHTTPError(status, body)
        return parse_health_service(decode_json(body), self.config.passing_only)


class Query(Protocol):
    """What a watcher needs from a query (ServiceQuery, consul_kv.KVQuery)."""

    describe: str  # for logs: "service 'web'"
    path: str  # the API path, query string not included
    params: List[Tuple[str, str]]  # fixed query parameters (tags, recurse)

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        """What makes two answers comparable (a snapshot is only used for the same)."""

    def parse(self, status: int, body: bytes) -> Parsed:
        """The peers an answer asks for; ConsulHTTPError / InvalidAnswer when unusable."""


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
        settings = self.settings()
        headers = {"User-Agent": [f"lb/{lb.__version__}"]}
        if settings.token:
            headers["X-Consul-Token"] = [settings.token]
        response = await self.http.get(settings.url + path,
                                       params=self.request_params(params, index, settings),
                                       headers=headers)
        body = await treq.content(response)
        return ConsulAnswer(response.code, parse_index(response.headers), body)


def request_timeout(index: int, wait: float) -> float:
    """How long to give one request: a blocking one may legitimately take wait × 17/16."""
    return (wait * 17 / 16 if index > 0 else 0.0) + TIMEOUT_MARGIN


def backoff_delay(attempt: int, jitter: float) -> float:
    """Pause before retry number ``attempt`` (1 after the first error); ``jitter`` in [0, 1).

    RETRY_FIRST doubling up to RETRY_MAX, lengthened by up to RETRY_JITTER so balancers do
    not retry in step. Not tied to poll_interval: an outage costs Consul at most one request
    a second per watch (after three quick retries that catch a restart or a leader
    election), and once Consul answers again the pool is current within
    RETRY_MAX × (1 + RETRY_JITTER) = 1.25 s (plus SETTLE if Consul lost its state)."""
    base = min(RETRY_MAX, RETRY_FIRST * 2 ** min(max(attempt - 1, 0), 16))
    return base * (1 + RETRY_JITTER * jitter)


class TokenBucket:
    """Consul's advice for churning indexes: a burst, then a steady rate."""

    def __init__(self, clock: Any, burst: int = BURST, refill: float = REFILL) -> None:
        self.clock = clock
        self.burst = burst
        self.refill = refill
        self.tokens = float(burst)
        self.at = clock.seconds()

    def delay(self) -> float:
        """0 (and a token is taken) when a query may go now, else seconds to wait."""
        now = self.clock.seconds()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) / self.refill)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * self.refill


class _QuietHTTPFactory(_HTTP11ClientFactory):
    noisy = False


def _timed_out(result: Any, timeout: float) -> Any:
    """``addTimeout``'s conversion of whatever the cancelled request failed with."""
    raise defer.TimeoutError(f"no answer within {timeout:g}s")


def _describe_failure(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, (ResponseNeverReceived, ResponseFailed)) and error.reasons:
        reason = error.reasons[0]
        return f"{type(error).__name__}: {reason.getErrorMessage()}"
    message = failure.getErrorMessage()
    name = type(error).__name__
    return message if message.startswith(name) else f"{name}: {message}"


def _safe_url(url: str) -> str:
    """The agent URL without any user:password part, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


# --- the watcher -----------------------------------------------------------------------------


class ConsulWatcher(Service):
    """Keeps one pool's Consul-sourced peers equal to what one Consul query answers.

    Read by the admin/metrics parts: ``requests`` (Counter by result label, see RESULTS),
    ``last_success`` (``clock.seconds()`` of the last successful answer, or None),
    ``index`` (the X-Consul-Index the next request blocks on; 0 = plain read),
    ``last_error`` (text of the latest error, None once an answer succeeds),
    ``failures`` (consecutive errors), ``peers`` (the last good set)."""

    log = Logger()

    def __init__(self, pool: Pool, query: Query, settings: Callable[[], ConsulConfig], *,
                 reactor: Any, http: Any = None,
                 state_dir: Optional[Callable[[], Optional[str]]] = None,
                 jitter: Callable[[], float] = random.random) -> None:
        self.pool = pool
        self.query = query
        self.settings = settings
        self.reactor = reactor
        self.clock = reactor
        self._http = http
        self._own_http_pool: Optional[HTTPConnectionPool] = None
        self.client: Optional[ConsulClient] = None
        self._state_dir = state_dir or (lambda: None)
        self._jitter = jitter
        self.requests: Counter = Counter()
        self.last_success: Optional[float] = None
        self.last_error: Optional[str] = None
        self.index = 0
        self.high_index = 0  # highest index applied (kept across errors, from the snapshot)
        self._settle_until = 0.0  # until then, answers add peers but remove none
        self.failures = 0
        self.peers: Optional[List[PeerSpec]] = None  # the last good set
        self.snapshot_errors = 0
        self._saved: Optional[List[PeerSpec]] = None  # what the snapshot file holds
        self._inflight: Optional[defer.Deferred] = None
        self._inflight_since = 0.0
        self._inflight_timeout = 0.0
        self._stalled = False  # the watchdog cancelled the request in flight
        self._skipped: List[str] = []  # entries the last answer could not use, and why
        self._logged_error: Optional[Tuple[str, str]] = None  # last (result, detail) logged
        self._next: Optional[IDelayedCall] = None
        self._loop: Optional[LoopingCall] = None
        self._loop_interval = 0.0
        self._bucket = TokenBucket(reactor)

    # --- service -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._http is None:
            self._own_http_pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._own_http_pool.maxPersistentPerHost = 2
            self._own_http_pool._factory = _QuietHTTPFactory  # no log line per connection
            self._http = treq.client.HTTPClient(Agent(self.reactor, pool=self._own_http_pool))
        self.client = ConsulClient(self._http, self.settings)
        self._load_snapshot()
        self._start_loop(self.settings().poll_interval)
        # Not at once: during a reload the root applies its new config after building parts.
        self._schedule(0)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._inflight is not None:
            self._inflight.cancel()  # _done sees running is false and stays quiet
        self._inflight = None
        if self._own_http_pool is not None:
            pool, self._own_http_pool, self._http = self._own_http_pool, None, None
            return pool.closeCachedConnections()
        return None

    def release(self) -> None:
        """The pool stops using Consul (config reload): let go of its Consul peers, which
        drain, and forget the snapshot."""
        self.pool.apply(SOURCE, [], reason=f"consul {self.query.describe}: no longer configured")
        self.peers = []
        path = self._snapshot_path()
        if path is not None:
            try:
                snapshot.remove(path)
            except OSError as e:
                self.log.warn("pool {pool}: cannot remove {path}: {error}",
                              pool=self.pool.name, path=path, error=e.strerror)

    # --- scheduling --------------------------------------------------------------------------

    def _start_loop(self, interval: float) -> None:
        self._loop = LoopingCall(self._watchdog)
        self._loop.clock = self.clock
        self._loop_interval = interval
        self._loop.start(interval, now=False)

    def _schedule(self, delay: float) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = self.clock.callLater(max(0.0, delay), self._poll)

    def _watchdog(self) -> None:
        """The LoopingCall: re-arm a stalled or lost watch. Never raises (an error would
        stop the LoopingCall for good)."""
        try:
            settings = self.settings()
            now = self.clock.seconds()
            if self._inflight is not None:
                if now - self._inflight_since > self._inflight_timeout + settings.poll_interval:
                    self.log.warn("pool {pool}: consul {what}: request stalled for {age:.0f}s, "
                                  "re-arming", pool=self.pool.name, what=self.query.describe,
                                  age=now - self._inflight_since)
                    self._stalled = True
                    self._inflight.cancel()
            elif self._next is None or not self._next.active():
                self.log.warn("pool {pool}: consul {what}: watch was not armed, re-arming",
                              pool=self.pool.name, what=self.query.describe)
                self._schedule(0)
            if settings.poll_interval != self._loop_interval and self._loop is not None:
                self._loop.stop()
                self._start_loop(settings.poll_interval)
        except Exception:
            self.log.failure("pool {pool}: consul watchdog failed", pool=self.pool.name)

    def _poll(self) -> None:
        """Send one request (blocking when we have an index)."""
        self._next = None
        if not self.running or self._inflight is not None or self.client is None:
            return
        wait = self._bucket.delay()
        if wait > 0:
            self._schedule(wait)
            return
        index = self.index
        timeout = request_timeout(index, self.settings().wait)
        d = defer.Deferred.fromCoroutine(self.client.get(self.query.path, self.query.params,
                                                         index))
        self._inflight = d
        self._inflight_since = self.clock.seconds()
        self._inflight_timeout = timeout
        # Cancelling an HTTP request fails it with ResponseNeverReceived(CancelledError), not
        # CancelledError, so say "timeout" ourselves rather than rely on the conversion.
        d.addTimeout(timeout, self.clock, onTimeoutCancel=_timed_out)
        d.addBoth(self._done, index, timeout)

    # --- answers -----------------------------------------------------------------------------

    def _done(self, result: Any, sent_index: int, timeout: float) -> None:
        self._inflight = None
        stalled, self._stalled = self._stalled, False
        if not self.running:
            return None  # stopped: the cancellation was ours
        try:
            if isinstance(result, Failure):
                if stalled:
                    self._error(TIMEOUT, f"stalled: no answer within {timeout:g}s + "
                                         "poll_interval")
                else:
                    self._failed(result, timeout)
            else:
                self._answered(result, sent_index)
        except Exception:
            self.log.failure("pool {pool}: consul {what}: handling an answer failed",
                             pool=self.pool.name, what=self.query.describe)
            self._error(ERROR, "internal error (see the traceback above)")
        return None

    def _failed(self, failure: Failure, timeout: float) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            self._error(TIMEOUT, f"no answer within {timeout:g}s")
        else:
            self._error(ERROR, _describe_failure(failure))

    def _answered(self, answer: ConsulAnswer, sent_index: int) -> None:
        try:
            if sent_index > 0 and answer.status == 200 and answer.consul_index == sent_index:
                self._succeeded(UNCHANGED)  # the wait ran out: same index, same answer
                self._schedule(0)
                return
            parsed = self.query.parse(answer.status, answer.body)
        except ConsulHTTPError as e:
            self._error(HTTP_ERROR, str(e))
            return
        except InvalidAnswer as e:
            self._error(INVALID, str(e))
            return
        new = answer.consul_index
        now = self.clock.seconds()
        if new is None or new < 1:
            # Cannot block without an index: poll every poll_interval instead.
            self.index = 0
            delay = self.settings().poll_interval
        elif new < self.high_index:
            # Consul lost its state (restarted dev agent or server on fresh data, new
            # cluster, snapshot restore) and answers before its agents have re-registered
            # their services: Consul 1.8.7 sends 200, KnownLeader true, LastContact 0 and []
            # for ~150 ms. The lower index is the only sign, so take additions now and
            # removals only from a re-read after SETTLE.
            self.log.info("pool {pool}: consul {what}: index went back from {old} to {new} "
                          "(Consul lost its state): removing nothing for {settle:g}s while "
                          "its agents re-register", pool=self.pool.name,
                          what=self.query.describe, old=self.high_index, new=new,
                          settle=SETTLE)
            self._settle_until = now + SETTLE
            self.index = 0
            delay = 0.0
        else:
            self.index = new
            delay = 0.0
        if new is not None and new >= 1:
            self.high_index = new
        if parsed.skipped != self._skipped:  # once per distinct problem, not per poll
            self._skipped = parsed.skipped
            for why in parsed.skipped:
                self.log.warn("pool {pool}: consul {what}: ignored {why}",
                              pool=self.pool.name, what=self.query.describe, why=why)
        specs = parsed.specs
        if now < self._settle_until:
            specs = _keeping(self.peers or [], specs)
            if specs != parsed.specs:  # something is held back: read again when settled
                self.index = 0
                delay = max(delay, self._settle_until - now)
        changed = self._apply(specs, new)
        self._succeeded(OK if changed else UNCHANGED)
        self._schedule(delay)

    def _succeeded(self, result: str) -> None:
        self.requests[result] += 1
        self.last_success = self.clock.seconds()  # Unix time on a real reactor
        if self.failures:
            self.log.info("pool {pool}: consul {what}: answering again after {n} failed "
                          "request(s) (last: {error})", pool=self.pool.name,
                          what=self.query.describe, n=self.failures, error=self.last_error)
        self.failures = 0
        self.last_error = None
        self._logged_error = None

    def _error(self, result: str, detail: str) -> None:
        self.requests[result] += 1
        self.failures += 1
        self.last_error = detail
        self.index = 0  # Consul may have restarted: start again with a plain read
        settings = self.settings()
        delay = backoff_delay(self.failures, self._jitter())
        if (result, detail) != self._logged_error:
            # Once per distinct problem: retries come about once a second.
            self._logged_error = (result, detail)
            kept = len(self.peers) if self.peers is not None else 0
            self.log.error("pool {pool}: consul {what} at {url}: {result}: {detail}; "
                           "keeping the last good set of {kept} peer(s); retry in "
                           "{delay:.2f}s (failure {n}; the same error again is not logged)",
                           pool=self.pool.name, what=self.query.describe,
                           url=_safe_url(settings.url), result=result, detail=detail,
                           delay=delay, n=self.failures, kept=kept)
        self._schedule(delay)

    def _apply(self, specs: List[PeerSpec], index: Optional[int]) -> bool:
        """Hand a successful answer's set to the pool; False when nothing changed."""
        old = self.peers
        if old is not None and old == specs:
            self._save(specs, index)  # e.g. the first answer equals the loaded snapshot
            return False
        before = {s.address: s for s in old or []}
        added = removed = draining = updated = 0
        for address, spec in ((s.address, s) for s in specs):
            was = before.pop(address, None)
            if was is None:
                added += 1
            if spec.state == DRAIN and (was is None or was.state != DRAIN):
                draining += 1
            elif was is not None and was != spec:
                updated += 1
        removed = len(before)
        self.pool.apply(SOURCE, specs, reason=f"consul {self.query.describe}")
        self.peers = list(specs)
        self.log.info("pool {pool}: consul {what} (index {index}): {total} peer(s): "
                      "{added} added, {removed} removed, {draining} draining, {updated} "
                      "updated", pool=self.pool.name, what=self.query.describe,
                      index=index, total=len(specs), added=added, removed=removed,
                      draining=draining, updated=updated)
        self._save(specs, index)
        return True

    # --- snapshot ----------------------------------------------------------------------------

    def _snapshot_path(self) -> Optional[str]:
        state_dir = self._state_dir()
        return snapshot.path_for(state_dir, self.pool.name) if state_dir else None

    def _save(self, specs: List[PeerSpec], index: Optional[int]) -> None:
        path = self._snapshot_path()
        if path is None or self._saved == specs:
            return
        document = {"version": snapshot.FORMAT_VERSION, "pool": self.pool.name,
                    "query": self.query.identity(self.settings()),
                    "index": index, "saved_at": time.time(),
                    "peers": snapshot.encode_peers(specs)}
        try:
            snapshot.save(path, document)
        except OSError as e:
            self.snapshot_errors += 1
            self.log.error("pool {pool}: cannot write the Consul snapshot {path}: {error}",
                           pool=self.pool.name, path=path, error=e.strerror or e)
            return
        self._saved = list(specs)

    def _load_snapshot(self) -> None:
        current = self.pool.wanted_by(SOURCE)
        if current:
            # A reload replaced the watcher: the pool already holds Consul's peers.
            self.peers = merge_specs(current)
            return
        path = self._snapshot_path()
        if path is None:
            return
        try:
            document = snapshot.load(path)
            if document is None:
                self.log.info("pool {pool}: no Consul snapshot at {path} yet; the pool has "
                              "no Consul peers until Consul answers", pool=self.pool.name,
                              path=path)
                return
            if document.get("query") != self.query.identity(self.settings()):
                self.log.info("pool {pool}: Consul snapshot {path} is for another query "
                              "({query}), not used", pool=self.pool.name, path=path,
                              query=document.get("query"))
                return
            specs = merge_specs(snapshot.decode_peers(document.get("peers")))
        except snapshot.SnapshotError as e:
            self.log.error("pool {pool}: Consul snapshot not used: {error}",
                           pool=self.pool.name, error=e)
            return
        self.pool.apply(SOURCE, specs, reason="consul snapshot, until Consul answers")
        self.peers = specs
        self._saved = list(specs)
        index = document.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and index > 0:
            self.high_index = index  # so a Consul that lost its state meanwhile is seen
        self.log.info("pool {pool}: loaded {n} Consul peer(s) from {path} (saved at "
                      "{saved_at}), serving them until Consul answers", pool=self.pool.name,
                      n=len(specs), path=path, saved_at=_iso(document.get("saved_at")))


def _keeping(old: Sequence[PeerSpec], new: Sequence[PeerSpec]) -> List[PeerSpec]:
    """``new`` plus the peers of ``old`` it does not list (as they were)."""
    merged = {s.address: s for s in old}
    merged.update((s.address, s) for s in new)
    return [merged[a] for a in sorted(merged, key=lambda a: (a.host, a.port))]


def _iso(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))


# --- composition -----------------------------------------------------------------------------


def make_query(config: PoolConsulConfig) -> Query:
    if config.kv_prefix is not None:
        from lb.discovery.consul_kv import KVQuery  # consul_kv builds on this module
        return KVQuery(config.kv_prefix)
    return ServiceQuery(config)


def build_part(root: Any, pool: Pool, config: PoolConfig) -> Optional[IService]:
    """The ``consul`` pool part: a watcher for pools with a ``consul`` section.

    Settings (``root.config.consul``) and ``state_dir`` are read when used, not now: on a
    reload the root builds parts before it switches to the new config."""
    if config.consul is None:
        return None

    def settings() -> ConsulConfig:
        return root.config.consul or ConsulConfig()

    return ConsulWatcher(pool, make_query(config.consul), settings, reactor=root.reactor,
                         http=getattr(root, "http_client", None),
                         state_dir=lambda: root.config.state_dir)
