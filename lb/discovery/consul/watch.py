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

One loop per watch, a coroutine: pause, ask, handle the answer, again. At any moment it waits
on exactly one Deferred, the request (given up at its timeout by ``addTimeout``) or the
pause before the next one (``deferLater`` on the injected clock), and ``stopService``
cancels that Deferred, which leaves nothing in the reactor. Each pass is guarded: an
exception met while handling an answer is logged and counted as an error, and the loop goes
on after the usual backoff, so no bug in one answer stops discovery for good.

How answers map to peers: ``health`` (services) and ``kv`` (nginx-upsync folders).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from lb.config import ConsulConfig, PoolConsulConfig
from lb.discovery.consul import snapshot
from lb.discovery.consul.api import (
    ConsulAnswer,
    ConsulClient,
    ConsulHTTPError,
    InvalidAnswer,
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
from lb.interfaces import IPoolPart
from lb.peer import DRAIN, PeerSpec
from lb.pool import Pool
from lb.stats import ConsulStats

SOURCE = "consul"

# Labels of ConsulWatcher.requests (lb_consul_requests_total{result}).
OK = "ok"                  # a successful answer that changed the pool's Consul peers
UNCHANGED = "unchanged"    # a successful answer that changed nothing (wait ran out, same set)
TIMEOUT = "timeout"        # no answer within wait × 17/16 + TIMEOUT_MARGIN
HTTP_ERROR = "http_error"  # an HTTP status other than 200 (404 for KV: an empty prefix)
INVALID = "invalid"        # 200 with a body that is not what Consul sends, or nothing usable
ERROR = "error"            # no HTTP answer: connection refused or reset, DNS, TLS...
RESULTS = (OK, UNCHANGED, TIMEOUT, HTTP_ERROR, INVALID, ERROR)

SETTLE = 0.5            # after Consul's index went back, how long answers remove no peer

T = TypeVar("T")


def _timed_out(result: Any, timeout: float) -> Any:
    """``addTimeout``'s conversion of whatever the cancelled request failed with."""
    raise defer.TimeoutError(f"no answer within {timeout:g}s")


# --- the watcher -----------------------------------------------------------------------------


@implementer(IPoolPart)
class ConsulWatcher(Service):
    """Keeps one pool's Consul-sourced peers equal to what one Consul query answers.

    ``stats()`` is the admin server's view of its state, kept in these attributes:
    ``requests`` (Counter by result label, see RESULTS),
    ``last_success`` (``clock.seconds()`` of the last successful answer, or None),
    ``index`` (the X-Consul-Index the next request blocks on; 0 = plain read),
    ``last_error`` (text of the latest error, None once an answer succeeds),
    ``failures`` (consecutive errors), ``peers`` (the last good set)."""

    log = Logger()

    def __init__(self, pool: Pool, query: Query, settings: Callable[[], ConsulConfig], *,
                 reactor: IReactorTime, http: Any = None,
                 state_dir: Optional[Callable[[], Optional[str]]] = None,
                 jitter: Callable[[], float] = random.random) -> None:
        self.pool = pool
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
        self._settle_until = 0.0  # until then, answers add peers but remove none
        self.failures = 0
        self.peers: Optional[List[PeerSpec]] = None  # the last good set
        self.snapshot_errors = 0
        self._saved: Optional[List[PeerSpec]] = None  # what the snapshot file holds
        self._skipped: List[str] = []  # entries the last answer could not use, and why
        self._logged_error: Optional[Tuple[str, str]] = None  # last (result, detail) logged
        self._bucket = TokenBucket()
        self._loop: Optional[defer.Deferred[None]] = None  # the running _run()
        self._waiting: Optional[defer.Deferred[Any]] = None  # what the loop awaits now

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
            "pool {pool}: consul {what}: the watch ended", f, pool=self.pool.name,
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
        """A bug met in one pass: log its traceback, count it as an error (the last good set
        stays) and go on after the usual backoff. Never raises."""
        self.log.failure("pool {pool}: consul {what}: internal error, the watch goes on", failure,
                         pool=self.pool.name, what=self.query.describe)
        try:
            return self._error(ERROR, "internal error (see the traceback above)")
        except Exception:
            self.log.failure("pool {pool}: consul {what}: counting an internal error failed",
                             pool=self.pool.name, what=self.query.describe)
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
        return delay

    def _succeeded(self, result: str) -> None:
        """Count a good answer; the first one after failures ends the outage."""
        self.requests[result] += 1
        self.last_success = self.clock.seconds()  # Unix time on a real reactor
        if self.failures:
            self.log.info("pool {pool}: consul {what}: answering again after {n} failed "
                          "request(s) (last: {error})", pool=self.pool.name,
                          what=self.query.describe, n=self.failures, error=self.last_error)
        self.failures = 0
        self.last_error = None
        self._logged_error = None

    def _error(self, result: str, detail: str) -> float:
        """Count a failed request (the last good set stays); returns the backoff."""
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
                           url=safe_url(settings.url), result=result, detail=detail,
                           delay=delay, n=self.failures, kept=kept)
        return delay

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
        """This pool's file under state_dir (read now: a reload may change it), or None."""
        state_dir = self._state_dir()
        return snapshot.path_for(state_dir, self.pool.name) if state_dir else None

    def _save(self, specs: List[PeerSpec], index: Optional[int]) -> None:
        """Write the set unless the file holds it already; a failure is logged, counted
        and changes nothing else."""
        path = self._snapshot_path()
        if path is None or self._saved == specs:
            return
        document = snapshot.make_document(self.pool.name, self.query.identity(self.settings()),
                                          index, specs, saved_at=time.time())
        try:
            snapshot.save(path, document)
        except OSError as e:
            self.snapshot_errors += 1
            self.log.error("pool {pool}: cannot write the Consul snapshot {path}: {error}",
                           pool=self.pool.name, path=path, error=e.strerror or e)
            return
        self._saved = list(specs)

    def _load_snapshot(self) -> None:
        """At start: the pool's Consul peers (after a reload), or the snapshot's for the
        same query, become the last good set until Consul answers."""
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
    """A snapshot's ``saved_at`` for logs."""
    if not isinstance(value, (int, float)):
        return "unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))


# --- composition -----------------------------------------------------------------------------


def make_query(config: PoolConsulConfig) -> Query:
    """What a pool's ``consul`` section asks for: a KV folder or a service's instances."""
    if config.kv_prefix is not None:
        return KVQuery(config.kv_prefix)
    return ServiceQuery(config)
