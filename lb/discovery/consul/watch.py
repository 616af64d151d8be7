"""The Consul watch: one blocking-query loop, applied to a pool's peers or to a route list.

``BlockingWatch`` is the loop, written once. ``ConsulWatcher`` applies its answers to a pool
(``Pool.apply("consul", ...)``: a service's instances or a KV folder); ``RoutesWatcher``
hands the routes that catalog tags announce to a callback. Each says only what an answer is
applied to, how it changes, and how it looks on disk.

The watch follows Consul's rules for blocking queries: the first request (and every request
after an error) is a plain read; each answer's ``X-Consul-Index`` is sent back with ``wait``
so the next request blocks until the answer changes. An index that is not >= 1 resets to
0 (a plain read again); an answer with the index we sent is Consul's wait running out and
changes nothing. An index lower than the highest one applied (kept across errors and in
the snapshot) means Consul lost its state and is still re-filling its catalog: that
answer's additions are taken, but nothing is removed until a re-read SETTLE later.

Only a successful answer changes what the watch applied: when Consul is unreachable, times
out, answers 5xx/403 or garbage, or lists instances of which none is usable (bad port or
host name), the last good value stays and the watch retries with jittered, capped
exponential backoff (about once a second at most, whatever poll_interval is). An empty
list, or one whose instances are all unhealthy, is a real answer and empties the pool.
Every change is written to ``state_dir`` and loaded at start, so the balancer serves with
Consul down. Each distinct error is logged once, and one line when Consul answers again;
each distinct problem of an answer (an instance or tag that cannot be used, a route
conflict) is logged once, not on every answer that repeats it.

One loop per watch, a coroutine: pause, ask, handle the answer, again. At any moment it waits
on exactly one Deferred, the request (given up at its timeout by ``addTimeout``) or the
pause before the next one (``deferLater`` on the injected clock), and ``stopService``
cancels that Deferred, which leaves nothing in the reactor. Each pass is guarded: an
exception met while handling an answer (a parser's or an applier's) is logged and counted
as an error, and the loop goes on after the usual backoff, so no bug in one answer stops
discovery for good.

How answers map to peers: ``health`` (services) and ``kv`` (nginx-upsync folders); to
routes: ``routes``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from lb.config import ConsulConfig, PoolConsulConfig
from lb.discovery.consul import routes as consul_routes
from lb.discovery.consul import snapshot
from lb.discovery.consul.api import (
    ConsulAnswer,
    ConsulClient,
    ConsulHTTPError,
    InvalidAnswer,
    Parsed,
    PeersQuery,
    Query,
    describe_failure,
    merge_specs,
    own_http_client,
    request_timeout,
    safe_url,
)
from lb.discovery.consul.backoff import RETRY_MAX, TokenBucket, backoff_delay
from lb.discovery.consul.health import ServiceQuery
from lb.discovery.consul.kv import KVQuery
from lb.discovery.consul.routes import ConsulRoute, ParsedRoutes, RouteConflict
from lb.interfaces import IPoolPart
from lb.peer import DRAIN, PeerSpec
from lb.pool import Pool
from lb.stats import ConsulStats

SOURCE = "consul"

# Labels of a watch's requests counter (lb_consul_requests_total{result}).
OK = "ok"                  # a successful answer that changed what the watch applied
UNCHANGED = "unchanged"    # a successful answer that changed nothing (wait ran out, same set)
TIMEOUT = "timeout"        # no answer within wait × 17/16 + TIMEOUT_MARGIN
HTTP_ERROR = "http_error"  # an HTTP status other than 200 (404 for KV: an empty prefix)
INVALID = "invalid"        # 200 with a body that is not what Consul sends, or nothing usable
ERROR = "error"            # no HTTP answer: connection refused or reset, DNS, TLS...
RESULTS = (OK, UNCHANGED, TIMEOUT, HTTP_ERROR, INVALID, ERROR)

SETTLE = 0.5            # after Consul's index went back, how long answers remove nothing
MAX_CHANGES_LOGGED = 10  # routes named in one change line; the rest are counted

T = TypeVar("T")
A = TypeVar("A")  # what the query parses an answer into (Parsed, ParsedRoutes)
V = TypeVar("V", bound=Sequence[Any])  # what an answer sets: a peer list, a route tuple

Routes = Tuple[ConsulRoute, ...]
OnRoutes = Callable[[Sequence[ConsulRoute], str], None]


def _timed_out(result: Any, timeout: float) -> Any:
    """``addTimeout``'s conversion of whatever the cancelled request failed with."""
    raise defer.TimeoutError(f"no answer within {timeout:g}s")


# --- the loop --------------------------------------------------------------------------------


class BlockingWatch(Service, Generic[A, V]):
    """Keeps one value (a peer set, a route list) equal to what one Consul query answers.

    A subclass says what an answer is applied to: ``owner`` and ``noun`` (for logs),
    ``_read`` (an answer's value and its problems), ``_keeping`` (the value while removals
    are held back), ``_deliver`` (apply a value), ``_change`` (a change in words),
    ``_empty``, and the snapshot's ``_snapshot_path``, ``_document`` and ``_decode``.

    ``stats()`` is the admin server's view of its state, kept in these attributes:
    ``requests`` (Counter by result label, see RESULTS),
    ``last_success`` (``clock.seconds()`` of the last successful answer, or None),
    ``index`` (the X-Consul-Index the next request blocks on; 0 = plain read),
    ``last_error`` (text of the latest error, None once an answer succeeds),
    ``failures`` (consecutive errors), ``current`` (the last good value, None before
    any), ``snapshot_errors`` (snapshot writes that failed)."""

    log = Logger()
    noun = "entry"  # what the value holds, for logs

    def __init__(self, query: Query[A], settings: Callable[[], ConsulConfig], *,
                 reactor: IReactorTime, http: Any = None,
                 state_dir: Optional[Callable[[], Optional[str]]] = None,
                 jitter: Callable[[], float] = random.random) -> None:
        self.query = query
        self.settings = settings
        self.reactor = reactor  # a whole reactor only when no http client is given
        self.clock = reactor
        self._http = http
        self._own_http_pool: Optional[HTTPConnectionPool] = None
        self.client: Optional[ConsulClient] = None
        self._state_dir = state_dir or (lambda: None)
        self._jitter = jitter
        self.requests: Counter[str] = Counter()
        self.last_success: Optional[float] = None
        self.last_error: Optional[str] = None
        self.index = 0
        self.high_index = 0  # highest index applied (kept across errors, from the snapshot)
        self._settle_until = 0.0  # until then, answers add but remove nothing
        self.failures = 0
        self.current: Optional[V] = None  # the last good value
        self.snapshot_errors = 0
        self._saved: Optional[V] = None  # what the snapshot file holds
        self._problems: List[str] = []  # what the last answer could not use, and why
        self._logged_error: Optional[Tuple[str, str]] = None  # last (result, detail) logged
        self._bucket = TokenBucket()
        self._loop: Optional[defer.Deferred[None]] = None  # the running _run()
        self._waiting: Optional[defer.Deferred[Any]] = None  # what the loop awaits now

    # --- what a kind of watch says -----------------------------------------------------------

    @property
    def owner(self) -> str:
        """Who the watch works for, at the start of its log lines: ``pool web``."""
        raise NotImplementedError

    def _read(self, parsed: A) -> Tuple[V, List[str]]:
        """An answer's value, and its problems as log text (each logged once)."""
        raise NotImplementedError

    def _empty(self) -> V:
        raise NotImplementedError

    def _keeping(self, old: V, new: V) -> V:
        """``new`` with nothing of ``old`` removed (while Consul re-fills its catalog)."""
        raise NotImplementedError

    def _deliver(self, value: V, reason: str) -> None:
        """Apply ``value`` (to a pool, to a callback)."""
        raise NotImplementedError

    def _change(self, old: Optional[V], new: V) -> str:
        """What changed, in words, for the log line of an applied answer."""
        raise NotImplementedError

    def _snapshot_path(self) -> Optional[str]:
        """The snapshot file under state_dir (read now: a reload may change it), or None."""
        raise NotImplementedError

    def _document(self, value: V, index: Optional[int]) -> Dict[str, Any]:
        """The snapshot document for ``value``."""
        raise NotImplementedError

    def _decode(self, document: Dict[str, Any]) -> V:
        """The value a snapshot document holds; snapshot.SnapshotError when unusable."""
        raise NotImplementedError

    def _held_already(self) -> Optional[V]:
        """The value already in place when the watch starts (a reload replaced the
        watch), taken instead of the snapshot; None when there is none."""
        return None

    # --- service -----------------------------------------------------------------------------

    def startService(self) -> None:
        """Serve the snapshot (if any) and start the loop."""
        Service.startService(self)
        if self._http is None:
            self._http, self._own_http_pool = own_http_client(self.reactor)
        self.client = ConsulClient(self._http, self.settings)
        self._load_snapshot()
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: self.log.failure(  # _run never raises: a bug here
            "{owner}: consul {what}: the watch ended", f, owner=self.owner,
            what=self.query.describe))

    def stopService(self) -> Optional[defer.Deferred[Any]]:
        """Cancel what the loop waits for (request or pause), so nothing is left in the
        reactor; close our own HTTP connections, if we made any."""
        Service.stopService(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # the loop sees running is false and ends quietly
        self._loop = None
        if self._own_http_pool is not None:
            pool, self._own_http_pool, self._http = self._own_http_pool, None, None
            closing: defer.Deferred[Any]
            closing = pool.closeCachedConnections()
            return closing
        return None

    def stats(self) -> ConsulStats:
        """What the admin server shows of this watch; every result label, zeros included
        (Prometheus' rate() needs a zero before the first increment)."""
        requests = dict.fromkeys(RESULTS, 0)
        requests.update(self.requests)
        return ConsulStats(describe=self.query.describe, service=self.query.service,
                           kv_prefix=self.query.kv_prefix, requests=requests,
                           last_success=self.last_success, failures=self.failures,
                           last_error=self.last_error)

    def release(self) -> None:
        """The watch is no longer configured (config reload): apply an empty value (a
        pool's peers drain, routes go) and forget the snapshot."""
        self._deliver(self._empty(), f"consul {self.query.describe}: no longer configured")
        self.current = self._empty()
        path = self._snapshot_path()
        if path is not None:
            try:
                snapshot.remove(path)
            except OSError as e:
                self.log.warn("{owner}: cannot remove {path}: {error}", owner=self.owner,
                              path=path, error=e.strerror)

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        """Pause, ask, handle the answer, for as long as the service runs. Never raises."""
        # The first request waits for the reactor: during a reload the root applies its new
        # config after building parts.
        delay = 0.0
        while self.running:
            try:
                await self._wait_for(deferLater(self.clock, max(0.0, delay)))
                delay = await self._poll()
            except Exception:
                if not self.running:
                    return  # stopService cancelled what we were waiting for
                delay = self._crashed(Failure())

    async def _wait_for(self, d: defer.Deferred[T]) -> T:
        """Await ``d`` as the one Deferred stopService cancels."""
        if not self.running:
            d.cancel()  # stopped while this pass ran: wait for nothing
        self._waiting = d
        try:
            return await d
        finally:
            self._waiting = None

    async def _poll(self) -> float:
        """One request (blocking when we have an index) and what its answer does; returns
        the pause before the next one."""
        wait = self._bucket.delay(self.clock.seconds())
        if wait > 0:
            return wait
        assert self.client is not None, "started"
        index = self.index
        timeout = request_timeout(index, self.settings().wait)
        request = defer.Deferred.fromCoroutine(self.client.get(self.query.path,
                                                               self.query.params, index))
        # Cancelling an HTTP request fails it with ResponseNeverReceived(CancelledError), not
        # CancelledError, so say "timeout" ourselves rather than rely on the conversion.
        request.addTimeout(timeout, self.clock, onTimeoutCancel=_timed_out)
        try:
            answer = await self._wait_for(request)
        except Exception:
            if not self.running:
                raise
            return self._failed(Failure(), timeout)
        return self._answered(answer, index)

    def _crashed(self, failure: Failure) -> float:
        """A bug met in one pass: log its traceback, count it as an error (the last good
        value stays) and go on after the usual backoff. Never raises."""
        self.log.failure("{owner}: consul {what}: internal error, the watch goes on", failure,
                         owner=self.owner, what=self.query.describe)
        try:
            return self._error(ERROR, "internal error (see the traceback above)")
        except Exception:
            self.log.failure("{owner}: consul {what}: counting an internal error failed",
                             owner=self.owner, what=self.query.describe)
            return RETRY_MAX

    # --- answers -----------------------------------------------------------------------------

    def _failed(self, failure: Failure, timeout: float) -> float:
        """No answer: a timeout or a network error. Returns the pause before a retry."""
        if isinstance(failure.value, (defer.TimeoutError, defer.CancelledError)):
            return self._error(TIMEOUT, f"no answer within {timeout:g}s")
        return self._error(ERROR, describe_failure(failure))

    def _answered(self, answer: ConsulAnswer, sent_index: int) -> float:
        """Apply what an answer says, by Consul's index rules. Returns the next pause."""
        try:
            if sent_index > 0 and answer.status == 200 and answer.consul_index == sent_index:
                self._succeeded(UNCHANGED)  # the wait ran out: same index, same answer
                return 0.0
            parsed = self.query.parse(answer.status, answer.body)
        except ConsulHTTPError as e:
            return self._error(HTTP_ERROR, str(e))
        except InvalidAnswer as e:
            return self._error(INVALID, str(e))
        value, problems = self._read(parsed)
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
            self.log.info("{owner}: consul {what}: index went back from {old} to {new} "
                          "(Consul lost its state): removing nothing for {settle:g}s while "
                          "its agents re-register", owner=self.owner,
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
        self._report(problems)
        if now < self._settle_until and self.current is not None:
            held = self._keeping(self.current, value)
            if held != value:  # something is held back: read again when settled
                self.index = 0
                delay = max(delay, self._settle_until - now)
                value = held
        changed = self._apply(value, new)
        self._succeeded(OK if changed else UNCHANGED)
        return delay

    def _report(self, problems: List[str]) -> None:
        """Log each problem of an answer once: not again while answers repeat it."""
        seen = set(self._problems)
        for problem in problems:
            if problem not in seen:
                self.log.warn("{owner}: consul {what}: {problem}", owner=self.owner,
                              what=self.query.describe, problem=problem)
        self._problems = list(problems)

    def _succeeded(self, result: str) -> None:
        """Count a good answer; the first one after failures ends the outage."""
        self.requests[result] += 1
        self.last_success = self.clock.seconds()  # Unix time on a real reactor
        if self.failures:
            self.log.info("{owner}: consul {what}: answering again after {n} failed "
                          "request(s) (last: {error})", owner=self.owner,
                          what=self.query.describe, n=self.failures, error=self.last_error)
        self.failures = 0
        self.last_error = None
        self._logged_error = None

    def _error(self, result: str, detail: str) -> float:
        """Count a failed request (the last good value stays); returns the backoff."""
        self.requests[result] += 1
        self.failures += 1
        self.last_error = detail
        self.index = 0  # Consul may have restarted: start again with a plain read
        settings = self.settings()
        delay = backoff_delay(self.failures, self._jitter())
        if (result, detail) != self._logged_error:
            # Once per distinct problem: retries come about once a second.
            self._logged_error = (result, detail)
            kept = len(self.current) if self.current is not None else 0
            self.log.error("{owner}: consul {what} at {url}: {result}: {detail}; "
                           "keeping the last good set of {kept} {noun}(s); retry in "
                           "{delay:.2f}s (failure {n}; the same error again is not logged)",
                           owner=self.owner, what=self.query.describe,
                           url=safe_url(settings.url), result=result, detail=detail,
                           delay=delay, n=self.failures, kept=kept, noun=self.noun)
        return delay

    def _apply(self, value: V, index: Optional[int]) -> bool:
        """Deliver a successful answer's value; False when nothing changed."""
        old = self.current
        if old is not None and old == value:
            self._save(value, index)  # e.g. the first answer equals the loaded snapshot
            return False
        self._deliver(value, f"consul {self.query.describe}")
        self.current = value
        self.log.info("{owner}: consul {what} (index {index}): {total} {noun}(s): {change}",
                      owner=self.owner, what=self.query.describe, index=index,
                      total=len(value), noun=self.noun, change=self._change(old, value))
        self._save(value, index)
        return True

    # --- snapshot ----------------------------------------------------------------------------

    def _save(self, value: V, index: Optional[int]) -> None:
        """Write the value unless the file holds it already; a failure is logged, counted
        and changes nothing else."""
        path = self._snapshot_path()
        if path is None or self._saved == value:
            return
        try:
            snapshot.save(path, self._document(value, index))
        except OSError as e:
            self.snapshot_errors += 1
            self.log.error("{owner}: cannot write the Consul snapshot {path}: {error}",
                           owner=self.owner, path=path, error=e.strerror or e)
            return
        self._saved = value

    def _load_snapshot(self) -> None:
        """At start: the value already in place (after a reload), or the snapshot's for the
        same query, becomes the last good value until Consul answers."""
        current = self._held_already()
        if current is not None:
            self.current = current
            return
        path = self._snapshot_path()
        if path is None:
            return
        try:
            document = snapshot.load(path)
            if document is None:
                self.log.info("{owner}: no Consul snapshot at {path} yet; no Consul {noun}s "
                              "until Consul answers", owner=self.owner, path=path,
                              noun=self.noun)
                return
            if document.get("query") != self.query.identity(self.settings()):
                self.log.info("{owner}: Consul snapshot {path} is for another query "
                              "({query}), not used", owner=self.owner, path=path,
                              query=document.get("query"))
                return
            value = self._decode(document)
        except snapshot.SnapshotError as e:
            self.log.error("{owner}: Consul snapshot not used: {error}", owner=self.owner,
                           error=e)
            return
        try:
            self._deliver(value, "consul snapshot, until Consul answers")
        except Exception:
            self.log.failure("{owner}: applying the Consul snapshot {path} failed; not "
                             "used", owner=self.owner, path=path)
            return
        self.current = value
        self._saved = value
        index = document.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and index > 0:
            self.high_index = index  # so a Consul that lost its state meanwhile is seen
        self.log.info("{owner}: loaded {n} Consul {noun}(s) from {path} (saved at "
                      "{saved_at}), serving them until Consul answers", owner=self.owner,
                      n=len(value), noun=self.noun, path=path,
                      saved_at=_iso(document.get("saved_at")))


def _iso(value: Any) -> str:
    """A snapshot's ``saved_at`` for logs."""
    if not isinstance(value, (int, float)):
        return "unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))


# --- a pool's peers --------------------------------------------------------------------------


@implementer(IPoolPart)
class ConsulWatcher(BlockingWatch[Parsed, List[PeerSpec]]):
    """Keeps one pool's Consul-sourced peers equal to what one Consul query answers (a
    service's instances or a KV folder); ``peers`` is the last good set."""

    noun = "peer"

    def __init__(self, pool: Pool, query: PeersQuery, settings: Callable[[], ConsulConfig],
                 *, reactor: IReactorTime, http: Any = None,
                 state_dir: Optional[Callable[[], Optional[str]]] = None,
                 jitter: Callable[[], float] = random.random) -> None:
        super().__init__(query, settings, reactor=reactor, http=http, state_dir=state_dir,
                         jitter=jitter)
        self.pool = pool

    @property
    def peers(self) -> Optional[List[PeerSpec]]:
        """The last good set (None before any answer or snapshot)."""
        return self.current

    @peers.setter
    def peers(self, value: Optional[List[PeerSpec]]) -> None:
        self.current = value

    @property
    def owner(self) -> str:
        return f"pool {self.pool.name}"

    def _read(self, parsed: Parsed) -> Tuple[List[PeerSpec], List[str]]:
        return parsed.specs, [f"ignored {why}" for why in parsed.skipped]

    def _empty(self) -> List[PeerSpec]:
        return []

    def _keeping(self, old: List[PeerSpec], new: List[PeerSpec]) -> List[PeerSpec]:
        """``new`` plus the peers of ``old`` it does not list (as they were)."""
        merged = {s.address: s for s in old}
        merged.update((s.address, s) for s in new)
        return [merged[a] for a in sorted(merged, key=lambda a: (a.host, a.port))]

    def _deliver(self, value: List[PeerSpec], reason: str) -> None:
        self.pool.apply(SOURCE, value, reason=reason)

    def _change(self, old: Optional[List[PeerSpec]], new: List[PeerSpec]) -> str:
        before = {s.address: s for s in old or []}
        added = draining = updated = 0
        for spec in new:
            was = before.pop(spec.address, None)
            if was is None:
                added += 1
            if spec.state == DRAIN and (was is None or was.state != DRAIN):
                draining += 1
            elif was is not None and was != spec:
                updated += 1
        return (f"{added} added, {len(before)} removed, {draining} draining, {updated} "
                "updated")

    def _held_already(self) -> Optional[List[PeerSpec]]:
        current = self.pool.wanted_by(SOURCE)
        return merge_specs(current) if current else None

    def _snapshot_path(self) -> Optional[str]:
        state_dir = self._state_dir()
        return snapshot.path_for(state_dir, self.pool.name) if state_dir else None

    def _document(self, value: List[PeerSpec], index: Optional[int]) -> Dict[str, Any]:
        return snapshot.make_document(self.pool.name, self.query.identity(self.settings()),
                                      index, value, saved_at=time.time())

    def _decode(self, document: Dict[str, Any]) -> List[PeerSpec]:
        return merge_specs(snapshot.decode_peers(document.get("peers")))


# --- routes from catalog tags ----------------------------------------------------------------


class RoutesWatcher(BlockingWatch[ParsedRoutes, Routes]):
    """Keeps a route list equal to what Consul's catalog tags announce (see ``routes``) and
    hands every change to ``on_routes(routes, reason)``: the whole list in match order,
    the first time with Consul's first answer (or the snapshot, at start).

    ``routes`` is the last good list; ``skipped`` and ``conflicts`` are the last answer's
    (each also logged once). ``name`` (kept as ``watch_name``: ``Service.name`` is what a
    parent service names its children by) names the watch in logs and its snapshot,
    ``<state_dir>/<name>.routes.json``. An exception raised by ``on_routes`` is logged
    with its traceback and counted as an error; the watch reads again after the backoff
    and offers the same routes again."""

    noun = "route"

    def __init__(self, name: str, query: Query[ParsedRoutes],
                 settings: Callable[[], ConsulConfig], on_routes: OnRoutes, *,
                 reactor: IReactorTime, http: Any = None,
                 state_dir: Optional[Callable[[], Optional[str]]] = None,
                 jitter: Callable[[], float] = random.random) -> None:
        super().__init__(query, settings, reactor=reactor, http=http, state_dir=state_dir,
                         jitter=jitter)
        self.watch_name = name  # not Service.name: a parent may name its children
        self.on_routes = on_routes
        self.skipped: Tuple[str, ...] = ()
        self.conflicts: Tuple[RouteConflict, ...] = ()

    @property
    def routes(self) -> Optional[Routes]:
        """The last good route list (None before any answer or snapshot)."""
        return self.current

    @property
    def owner(self) -> str:
        return f"routes {self.watch_name}"

    def _read(self, parsed: ParsedRoutes) -> Tuple[Routes, List[str]]:
        self.skipped, self.conflicts = parsed.skipped, parsed.conflicts
        return parsed.routes, ([f"ignored {why}" for why in parsed.skipped]
                               + [conflict.describe() for conflict in parsed.conflicts])

    def _empty(self) -> Routes:
        return ()

    def _keeping(self, old: Routes, new: Routes) -> Routes:
        return consul_routes.keeping(old, new)

    def _deliver(self, value: Routes, reason: str) -> None:
        self.on_routes(value, reason)

    def _change(self, old: Optional[Routes], new: Routes) -> str:
        before, after = set(old or ()), set(new)
        added = [r for r in new if r not in before]
        removed = [r for r in old or () if r not in after]
        return "; ".join(f"{what} {_some(routes)}" for what, routes in
                         (("added", added), ("removed", removed)) if routes) or "same routes"

    def _snapshot_path(self) -> Optional[str]:
        state_dir = self._state_dir()
        return (snapshot.path_for(state_dir, self.watch_name, snapshot.ROUTES_SUFFIX)
                if state_dir else None)

    def _document(self, value: Routes, index: Optional[int]) -> Dict[str, Any]:
        return snapshot.make_routes_document(
            self.watch_name, self.query.identity(self.settings()), index, value,
            saved_at=time.time())

    def _decode(self, document: Dict[str, Any]) -> Routes:
        return snapshot.decode_routes(document.get("routes"))


def _some(routes: Sequence[ConsulRoute]) -> str:
    """Routes for a log line: the first MAX_CHANGES_LOGGED, then how many more."""
    shown = ", ".join(r.describe() for r in routes[:MAX_CHANGES_LOGGED])
    more = len(routes) - MAX_CHANGES_LOGGED
    return f"{shown} and {more} more" if more > 0 else shown


# --- composition -----------------------------------------------------------------------------


def make_query(config: PoolConsulConfig) -> PeersQuery:
    """What a pool's ``consul`` section asks for: a KV folder or a service's instances."""
    if config.kv_prefix is not None:
        return KVQuery(config.kv_prefix)
    return ServiceQuery(config)
