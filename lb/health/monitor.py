"""The per-pool health monitor: schedules probes and hands their verdicts to the pool.

One monitor per pool, on an injected clock. A peer's next probe starts ``interval`` after
its last one ended (HAProxy's ``inter``, Envoy's ``interval``): one peer never has two probes
in flight, and a ``timeout`` longer than the interval is fine. Each peer has its own phase:
on start (or a reload, which builds a new monitor) the peers' phases are spread evenly over
one interval, so a pool of many peers is never probed in bursts. A peer without a verdict
yet (``unknown``) is probed at once and settles into its phase after that. At most
``concurrency`` probes run at a time, the rest wait in line; each probe is cancelled when it
reaches ``timeout``; ``stopService`` cancels every timer and probe.

Health state lives on the peers, not here: a new monitor picks up where the old one left
off, and a peer that is re-announced keeps its counters. The monitor follows the pool's
events, so peers added at runtime are probed at once and removed ones stop being probed.

Without a ``health`` section the monitor still exists: passive checks (failed client
connects) can mark a peer down, and only a probe brings it back, so it watches the peers
that are not up with a TCP probe at the default interval.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from zope.interface import implementer

from lb.config import HealthConfig
from lb.health.passive import THRESHOLDS_WITHOUT_CHECKS
from lb.health.probes import (
    HTTPProbe,
    Probe,
    ProbeResult,
    QuietHTTPConnectionPool,
    TCPProbe,
    unexpected,
)
from lb.interfaces import IPoolPart
from lb.net import endpoint_for, format_seconds
from lb.peer import Peer
from lb.pool import Pool
from lb.stats import HealthCheckStats

PASS = "pass"
FAIL = "fail"
_GOLDEN = 0.6180339887498949  # phases k·φ mod 1 spread any run of additions evenly


class _Slot:
    """One watched peer: its next-due timer or its place in line or its running probe."""

    __slots__ = ("peer", "timer", "queued", "in_flight", "anchor", "dropped")

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.timer: Optional[IDelayedCall] = None
        self.queued = False
        self.in_flight: Optional[defer.Deferred[ProbeResult]] = None
        self.anchor = 0.0  # an early first probe counts as run here, for the next one's time
        self.dropped = False


@implementer(IPoolPart)
class HealthMonitor(Service):
    """Probes a pool's peers and reports each verdict with ``pool.report_check``.

    ``all_peers``: probe every peer (the pool has a ``health`` section); otherwise probe
    only peers that are not up, to bring back peers that passive checks took out.
    """

    log = Logger()

    def __init__(self, pool: Pool, clock: IReactorTime, probe: Probe,
                 settings: HealthConfig, *, all_peers: bool = True,
                 on_stop: Optional[Callable[[], Any]] = None) -> None:
        self.pool = pool
        self.clock = clock
        self.probe = probe
        self.settings = settings
        self.interval = settings.interval
        self.timeout = settings.timeout
        self.concurrency = settings.concurrency
        self.all_peers = all_peers
        self._on_stop = on_stop
        self._slots: Dict[str, _Slot] = {}
        self._queue: Deque[_Slot] = deque()
        self._running = 0
        self._stopping = False
        self._starting_next = False
        self._added = 0
        self.checks: Counter[Tuple[str, str]] = Counter()  # (peer key, pass|fail) → probes run

    # --- what tests and the admin server (through stats) may read -------------------------

    @property
    def in_flight(self) -> int:
        """Probes running now."""
        return self._running

    @property
    def waiting(self) -> int:
        """Probes due but held back by ``concurrency``."""
        return sum(1 for slot in self._queue if not slot.dropped)

    def watched(self) -> List[str]:
        """Keys of the peers this monitor probes."""
        return list(self._slots)

    def stats(self) -> HealthCheckStats:
        """What the admin server shows: the checks and, for every peer of the pool, the
        probes run by result (zeros included: Prometheus' rate() needs a zero)."""
        s = self.settings
        return HealthCheckStats(
            configured=self.all_peers, type=s.type, path=s.path if s.type == "http" else None,
            interval=s.interval, timeout=s.timeout, rise=s.rise, fall=s.fall,
            results={key: {PASS: self.checks[(key, PASS)], FAIL: self.checks[(key, FAIL)]}
                     for key in self.pool.peers})

    def release(self) -> None:
        """Nothing to give back: health state lives on the peers."""

    # --- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._stopping = False
        self.pool.subscribe(self._peer_event)
        peers = [peer for peer in self.pool.peers.values() if self._wants(peer)]
        for i, peer in enumerate(peers):
            # phases spread over one interval: no burst of probes after a start or reload
            self._watch(peer, self.interval * i / len(peers))
        self.log.info("pool {pool}: health monitor started ({what}, every {interval}, timeout "
                      "{timeout}, {concurrency} at a time, {n} peer(s) watched)",
                      pool=self.pool.name,
                      what="all peers" if self.all_peers else "peers not up (passive checks)",
                      interval=format_seconds(self.interval),
                      timeout=format_seconds(self.timeout), concurrency=self.concurrency,
                      n=len(peers))

    def stopService(self) -> Any:
        self._stopping = True
        self.pool.unsubscribe(self._peer_event)
        for slot in list(self._slots.values()):
            self._unwatch(slot)
        self._queue.clear()
        if self._on_stop is not None:
            try:
                self._on_stop()
            except Exception:
                self.log.failure("pool {pool}: health monitor cleanup failed",
                                 pool=self.pool.name)
        return Service.stopService(self)

    # --- which peers -----------------------------------------------------------------------

    def _wants(self, peer: Peer) -> bool:
        return self.all_peers or not peer.is_up

    def _peer_event(self, pool: Pool, peer: Peer, event: str) -> None:
        if self._stopping:
            return
        slot = self._slots.get(peer.key)
        if slot is not None and (event == "removed" or slot.peer is not peer):
            self._unwatch(slot)
            slot = None
        if event == "removed":
            for result in (PASS, FAIL):  # metric labels of gone peers go too
                self.checks.pop((peer.key, result), None)
            return
        wants = self._wants(peer)
        if wants and slot is None:
            if peer.is_unknown:
                self._added += 1
                self._watch(peer, self.interval * ((self._added * _GOLDEN) % 1.0))
            else:  # just went down by passive checks: it was just seen failing
                self._watch(peer, self.interval)
        elif not wants and slot is not None:
            self._unwatch(slot)

    def _watch(self, peer: Peer, phase: float) -> None:
        """Probe ``peer`` at ``phase`` from now, then every interval; a peer without a
        verdict is probed at once and its next probe keeps the phase."""
        slot = self._slots[peer.key] = _Slot(peer)
        slot.anchor = self.clock.seconds() + phase
        self._schedule(slot, 0.0 if peer.is_unknown else phase)

    def _unwatch(self, slot: _Slot) -> None:
        slot.dropped = True
        if self._slots.get(slot.peer.key) is slot:
            del self._slots[slot.peer.key]
        if slot.timer is not None and slot.timer.active():
            slot.timer.cancel()
        slot.timer = None
        if slot.queued:
            slot.queued = False
            try:
                self._queue.remove(slot)
            except ValueError:
                pass
        if slot.in_flight is not None:
            slot.in_flight.cancel()  # _finished sees ``dropped`` and reports nothing

    # --- running probes --------------------------------------------------------------------

    def _schedule(self, slot: _Slot, delay: float) -> None:
        slot.timer = self.clock.callLater(max(0.0, delay), self._due, slot)

    def _due(self, slot: _Slot) -> None:
        slot.timer = None
        if slot.dropped or self._stopping:
            return
        if self._running < self.concurrency:
            self._start(slot)
        else:
            slot.queued = True
            self._queue.append(slot)

    def _start(self, slot: _Slot) -> None:
        self._running += 1
        try:
            d = defer.maybeDeferred(self.probe, slot.peer.address)
        except Exception:  # maybeDeferred does not raise; belt and braces
            d = defer.fail(Failure())
        d.addTimeout(self.timeout, self.clock)
        slot.in_flight = d
        d.addBoth(self._finished, slot)

    def _finished(self, result: Any, slot: _Slot) -> None:
        """Every probe ends here, whatever happened: report, plan the next, free a slot."""
        self._running -= 1
        slot.in_flight = None
        try:
            if not slot.dropped and not self._stopping:
                self._report(slot, self._verdict(result, slot))
                if self._slots.get(slot.peer.key) is slot:
                    # `interval` after this probe ended (so never two in flight, and a
                    # timeout longer than the interval works), or after the phase an early
                    # first probe stood in for
                    next_due = max(self.clock.seconds(), slot.anchor) + self.interval
                    self._schedule(slot, next_due - self.clock.seconds())
        except Exception:
            self.log.failure("pool {pool}: health check bookkeeping failed for {peer}",
                             pool=self.pool.name, peer=slot.peer.key)
        self._next_in_line()
        return None  # the result is consumed here, never left unhandled

    def _verdict(self, result: Any, slot: _Slot) -> ProbeResult:
        if isinstance(result, ProbeResult):
            return result
        if isinstance(result, Failure):
            if result.check(defer.TimeoutError, defer.CancelledError):
                return ProbeResult(False, f"timeout after {format_seconds(self.timeout)}")
            self.log.failure("pool {pool}: health probe of {peer} broke", failure=result,
                             pool=self.pool.name, peer=slot.peer.key)
            return unexpected(result)
        self.log.error("pool {pool}: health probe of {peer} answered {result!r}",
                       pool=self.pool.name, peer=slot.peer.key, result=result)
        return ProbeResult(False, "check error: no verdict")

    def _report(self, slot: _Slot, verdict: ProbeResult) -> None:
        self.checks[(slot.peer.key, PASS if verdict.ok else FAIL)] += 1
        self.pool.report_check(slot.peer, verdict.ok, verdict.detail)

    def _next_in_line(self) -> None:
        if self._starting_next:
            return  # a probe that answered at once: the loop below carries on
        self._starting_next = True
        try:
            while self._queue and self._running < self.concurrency and not self._stopping:
                slot = self._queue.popleft()
                slot.queued = False
                if not slot.dropped:
                    self._start(slot)
        finally:
            self._starting_next = False


def monitor_for(pool: Pool, health: Optional[HealthConfig], *, reactor: Any,
                http: Optional[HTTPClient] = None) -> HealthMonitor:
    """A pool's monitor for its ``health`` section (or its absence: see the module
    docstring). HTTP checks go through ``http``, or a client of its own (closed on stop)."""
    settings = health or THRESHOLDS_WITHOUT_CHECKS
    on_stop: Optional[Callable[[], Any]] = None
    probe: Probe
    if health is not None and health.type == "http":
        client = http
        if client is None:
            connections = QuietHTTPConnectionPool(  # type: ignore[no-untyped-call]
                reactor, persistent=False)
            client = HTTPClient(Agent(reactor, pool=connections,
                                      connectTimeout=settings.timeout))
            on_stop = connections.closeCachedConnections
        probe = HTTPProbe(client, health)
    else:
        probe = TCPProbe(lambda address, timeout: endpoint_for(reactor, address, timeout),
                         settings.timeout)
    return HealthMonitor(pool, reactor, probe, settings, all_peers=health is not None,
                         on_stop=on_stop)
