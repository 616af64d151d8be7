"""A pool of peers: the single source of truth for their state.

Discovery sources (static config, Consul, the admin API) hand the pool the set each of
them wants; the pool diffs it, keeps each peer's health and counters across updates, and
tells its balancer which peers may take new connections. Health checks and the data path
report results here; observers (health monitor, snapshots, status page) are told of changes.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lb import balancer as balancers
from lb.config import HealthConfig, PoolConfig
from lb.health import passive, risefall
from lb.health.outlier import Outlier
from lb.interfaces import NO_CONTEXT, IBalancer, PickContext
from lb.net import Address
from lb.peer import ADMIN_STATES, MAINT, READY, LastCheck, Peer, PeerSpec
from lb.slowstart import SlowStart
from lb.stats import CheckStats, ConsulStats, HealthCheckStats, PeerStats, PoolStats

Observer = Callable[["Pool", Peer, str], None]
# The sources an operator may remove a peer from (DELETE): their own runtime adds, and the
# config file's peers until the next reload. Discovery would announce a peer again.
REMOVABLE_SOURCES = ("admin", "static")


class PoolError(Exception):
    """A request the pool refuses; ``status`` is the HTTP status an API should answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Pool:
    log = Logger()

    def __init__(self, config: PoolConfig, clock: IReactorTime,
                 rng: Optional[random.Random] = None) -> None:
        self.name = config.name
        self.config = config
        self.clock = clock
        self._rng = rng or random.Random()
        self.peers: Dict[str, Peer] = {}
        self.balancer: IBalancer = self._new_balancer()
        self._observers: List[Observer] = []
        self._timers: Dict[Tuple[str, str], IDelayedCall] = {}  # (peer key, kind) → timer
        self._up_serving: Set[Peer] = set()  # serving and up; when empty, unknown peers get traffic
        self._in_balancer: Set[Peer] = set()
        self.slow_start = SlowStart(clock, lambda: self.config.slow_start, self._set_ramp)
        self.outlier = Outlier(self, clock, lambda: self.config.outlier)

    # --- configuration ---------------------------------------------------------------------

    @property
    def thresholds(self) -> HealthConfig:
        return self.config.health or passive.THRESHOLDS_WITHOUT_CHECKS

    def _new_balancer(self) -> IBalancer:
        return balancers.create(self.config.balance, rng=self._rng,
                                hash_balance_factor=self.config.hash_balance_factor)

    def reconfigure(self, config: PoolConfig) -> None:
        """Take a reloaded pool section; peers keep their health and counters."""
        old = self.config
        self.config = config
        if (old.balance, old.hash_balance_factor) != (config.balance,
                                                      config.hash_balance_factor):
            self.balancer = self._new_balancer()
            for peer in self._in_balancer:
                self.balancer.add(peer)
        if config.slow_start <= 0 < old.slow_start:
            self.slow_start.stop_all()
            for peer in self.peers.values():
                self._set_ramp(peer, 1.0)

    def subscribe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def unsubscribe(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self, peer: Peer, event: str) -> None:
        for observer in list(self._observers):
            try:
                observer(self, peer, event)
            except Exception:
                self.log.failure("pool {pool}: observer failed", pool=self.name)

    # --- desired sets from sources ---------------------------------------------------------

    def apply(self, source: str, desired: Iterable[PeerSpec], reason: str = "") -> None:
        """Make ``source``'s wanted set exactly ``desired``: add, update, or let go."""
        wanted: Dict[str, PeerSpec] = {str(spec.address): spec for spec in desired}
        reason = reason or source
        for key, spec in wanted.items():
            peer = self.peers.get(key)
            if peer is None:
                peer = self._create(spec.address)
                peer.wants[source] = spec
                self._added(peer, reason)
                continue
            before = self._describe(peer)
            peer.wants[source] = spec
            if peer.removing:
                peer.removing = False
                self._cancel((peer.key, "remove"))
            self._changed(peer, before, reason)
        for peer in list(self.peers.values()):
            if source in peer.wants and peer.key not in wanted:
                before = self._describe(peer)
                del peer.wants[source]
                peer.removing = not peer.wants
                self._changed(peer, before, f"{reason}: no longer listed")
                if peer.removing:
                    self._schedule_removal(peer)

    def wanted_by(self, source: str) -> List[PeerSpec]:
        return [p.wants[source] for p in self.peers.values() if source in p.wants]

    def add_peer(self, address: Address, weight: int = 1, source: str = "admin") -> Peer:
        """An operator adds a peer at runtime (it survives reloads, not restarts)."""
        existing = self.peers.get(str(address))
        if existing is not None and source in existing.wants and not existing.removing:
            raise PoolError(f"peer {address} is already in pool {self.name}", 409)
        specs = self.wanted_by(source)
        specs = [s for s in specs if s.address != address] + [PeerSpec(address, weight)]
        self.apply(source, specs, reason=f"{source} call")
        return self.peers[str(address)]

    def remove_peer(self, key: str, reason: str = "admin call") -> Peer:
        """An operator removes a peer (HAProxy's ``del server``): drain it, then remove it
        once idle or after ``drain_timeout``. Its admin and static wants both go, the
        static one until the next reload applies the config again. A peer that discovery
        announces is refused (409): its next answer would bring it straight back."""
        peer = self.get(key)
        if peer.removing:
            return peer  # already on its way out: keep its deadline
        held = [s for s in peer.sources if s not in REMOVABLE_SOURCES]
        if held:
            raise PoolError(self._cannot_remove(peer, held), 409)
        before = self._describe(peer)
        sources = ", ".join(peer.sources)
        peer.wants.clear()
        peer.removing = True
        self.log.info("pool {pool}: peer {peer} to be removed ({reason}; was wanted by "
                      "{sources}), draining {n} connection(s)", pool=self.name,
                      peer=peer.key, reason=reason, sources=sources,
                      n=peer.active_connections)
        self._changed(peer, before, f"{reason}: remove", log=False)
        self._schedule_removal(peer)
        return peer

    def _cannot_remove(self, peer: Peer, held: List[str]) -> str:
        drain = 'or PUT {"admin_state": "drain"} to stop new connections to it here'
        if held != ["consul"]:
            return (f"peer {peer.key} is also wanted by {', '.join(held)}: remove it "
                    f"there, {drain}")
        consul = self.config.consul
        service = f" (service {consul.service})" if consul and consul.service else ""
        return (f"peer {peer.key} is announced by Consul{service} and would be back with "
                f"its next answer: deregister the instance or put it in maintenance in "
                f"Consul (consul maint -enable -service <service-id>), {drain}")

    def get(self, key: str) -> Peer:
        peer = self.peers.get(key)
        if peer is None:
            raise PoolError(f"no peer {key} in pool {self.name}", 404)
        return peer

    # --- operator changes ------------------------------------------------------------------

    def set_admin_state(self, key: str, state: str, reason: str = "admin call") -> Peer:
        if state not in ADMIN_STATES:
            raise PoolError(f"unknown admin_state {state!r} (ready, drain or maint)")
        peer = self.get(key)
        before = self._describe(peer)
        peer.operator_state = state
        self._changed(peer, before, reason)
        return peer

    def set_weight(self, key: str, weight: int, reason: str = "admin call") -> Peer:
        peer = self.get(key)
        before = self._describe(peer)
        peer.operator_weight = weight
        self._changed(peer, before, reason)
        return peer

    # --- health ----------------------------------------------------------------------------

    def report_check(self, peer: Peer, ok: bool, detail: str) -> None:
        """One active probe's verdict."""
        if self.peers.get(peer.key) is not peer:
            return  # removed meanwhile
        peer.last_check = LastCheck(ok, detail, self.clock.seconds())
        self._count_check(peer, ok, detail)
        if ok:
            self.outlier.probe_passed(peer)

    def report_traffic(self, peer: Peer, ok: bool, detail: str) -> None:
        """What client traffic to ``peer`` showed; lb.health.passive decides what it counts
        for (a failure is a failed check, a success nothing)."""
        verdict = passive.traffic_verdict(ok, detail)
        if verdict is not None and self.peers.get(peer.key) is peer:
            self._count_check(peer, *verdict)

    def _count_check(self, peer: Peer, ok: bool, detail: str) -> None:
        t = self.thresholds
        new_state = risefall.step(peer.health_state, ok, t.rise, t.fall)
        if new_state == peer.health_state:
            return
        before = self._describe(peer)
        old_status = peer.health
        peer.health_state = new_state
        if new_state.status != old_status:
            self.log.info("pool {pool}: peer {peer} health {old} -> {new} ({detail})",
                          pool=self.name, peer=peer.key, old=old_status,
                          new=new_state.status, detail=detail)
            if new_state.status == risefall.UP and self.slow_start.enabled:
                self.slow_start.start(peer)
        self._changed(peer, before, detail, log=False)

    # --- the data path ---------------------------------------------------------------------

    def pick(self, context: PickContext = NO_CONTEXT) -> Optional[Peer]:
        return self.balancer.pick(context)

    def eligible(self, peer: Peer) -> bool:
        """Whether ``peer`` may take new traffic now (what the balancer picks from): a
        sticky client goes back to its peer only then."""
        return peer in self._in_balancer and peer.effective_weight > 0

    def load_added(self, peer: Peer) -> None:
        """A connection or request to ``peer`` started (counted from pick time, so a burst
        spreads by least load)."""
        peer.load += 1
        self.balancer.load_added(peer)

    def load_removed(self, peer: Peer) -> None:
        peer.load -= 1
        if peer in self._in_balancer:
            self.balancer.load_removed(peer)

    def report_response(self, peer: Peer, status: int) -> None:
        """An answer's status from ``peer`` (HTTP mode): the passive L7 check hears it."""
        if self.config.outlier is not None and self.peers.get(peer.key) is peer:
            self.outlier.response(peer, status)

    def set_ejected(self, peer: Peer, ejected: bool, reason: str) -> None:
        """Outlier detection takes ``peer`` out (or lets it back)."""
        if peer.ejected == ejected or self.peers.get(peer.key) is not peer:
            return
        peer.ejected = ejected
        self.log.info("pool {pool}: peer {peer} {what} ({reason})", pool=self.name,
                      peer=peer.key, what="ejected" if ejected else "back from ejection",
                      reason=reason)
        self._refresh(peer)
        self._notify(peer, "changed")

    def connection_started(self, peer: Peer, conn: object) -> None:
        peer.active_connections += 1
        peer.connections.add(conn)
        self.load_added(peer)

    def connection_established(self, peer: Peer) -> None:
        """Counted only: client traffic never counts as a pass of the active check (it
        would reset the fall count of a busy peer whose probes fail)."""
        peer.total_connections += 1

    def connection_failed(self, peer: Peer, conn: object, detail: str) -> None:
        """A connect on a client's behalf failed: a failed passive check."""
        peer.connect_failures += 1
        self.connection_ended(peer, conn)
        self.report_traffic(peer, False, detail)

    def connection_ended(self, peer: Peer, conn: object) -> None:
        if conn not in peer.connections:
            return
        peer.connections.discard(conn)
        peer.active_connections -= 1
        self.load_removed(peer)
        if peer.removing and peer.active_connections == 0 and self.peers.get(
                peer.key) is peer:
            self._remove(peer, "drained")

    # --- internals -------------------------------------------------------------------------

    def _create(self, address: Address) -> Peer:
        checked = self.config.health is not None
        t = self.thresholds
        peer = Peer(address, risefall.initial(checked, t.rise, t.fall))
        peer.ramp = self.slow_start.initial()
        return peer

    def _added(self, peer: Peer, reason: str) -> None:
        self.peers[peer.key] = peer
        self.log.info("pool {pool}: peer {peer} added ({reason}), {state}/{health} weight "
                      "{weight}", pool=self.name, peer=peer.key, reason=reason,
                      state=peer.admin_state, health=peer.health, weight=peer.weight)
        if self.slow_start.enabled and not peer.is_unknown:
            self.slow_start.start(peer)
        self._refresh(peer)
        self._notify(peer, "added")

    @staticmethod
    def _describe(peer: Peer) -> Tuple[str, str, int]:
        return (peer.admin_state, peer.health, peer.weight)

    def _changed(self, peer: Peer, before: Tuple[str, str, int], reason: str,
                 log: bool = True) -> None:
        after = self._describe(peer)
        if after == before:
            return
        if log:
            changes = ", ".join(f"{name} {a} -> {b}" for name, a, b in zip(
                ("admin_state", "health", "weight"), before, after) if a != b)
            self.log.info("pool {pool}: peer {peer} {changes} ({reason})", pool=self.name,
                          peer=peer.key, changes=changes, reason=reason)
        if (before[0] == MAINT and after[0] == READY and self.slow_start.enabled
                and peer.is_up):
            self.slow_start.start(peer)  # back from maintenance: ramp up like HAProxy
        if before[0] != MAINT and after[0] == MAINT:
            self._schedule((peer.key, "maint"), self.config.drain_timeout,
                           self._close_connections, peer)
        elif after[0] != MAINT:
            self._cancel((peer.key, "maint"))
        self._refresh(peer)
        self._notify(peer, "changed")

    def _schedule_removal(self, peer: Peer) -> None:
        if peer.active_connections == 0:
            self._remove(peer, "no connections")
        else:
            self._schedule((peer.key, "remove"), self.config.drain_timeout, self._remove,
                           peer, "drain_timeout")

    def _remove(self, peer: Peer, why: str) -> None:
        if self.peers.get(peer.key) is not peer or not peer.removing:
            return
        for kind in ("remove", "maint"):
            self._cancel((peer.key, kind))
        self.slow_start.stop(peer)
        self.outlier.forget(peer)
        del self.peers[peer.key]
        self._refresh(peer)
        self.log.info("pool {pool}: peer {peer} removed ({why})", pool=self.name,
                      peer=peer.key, why=why)
        self._notify(peer, "removed")

    def _close_connections(self, peer: Peer) -> None:
        for conn in list(peer.connections):
            conn.abort("maint")

    # eligibility: who the balancer may pick

    def _wants_traffic(self, peer: Peer) -> bool:
        if not peer.serving or peer.ejected:
            return False
        if peer.is_up:
            return True
        return peer.is_unknown and not self._up_serving

    def _refresh(self, peer: Peer) -> None:
        had_up = bool(self._up_serving)
        if (self.peers.get(peer.key) is peer and peer.serving and peer.is_up
                and not peer.ejected):
            self._up_serving.add(peer)
        else:
            self._up_serving.discard(peer)
        self._update(peer)
        if had_up != bool(self._up_serving):
            for other in self.peers.values():  # the unknown peers' fallback switched
                self._update(other)

    def _update(self, peer: Peer) -> None:
        eligible = self.peers.get(peer.key) is peer and self._wants_traffic(peer)
        weight = peer.weight * peer.ramp
        if eligible and peer in self._in_balancer and weight != peer.effective_weight:
            peer.effective_weight = weight
            self.balancer.reweight(peer)
        peer.effective_weight = weight
        self._set_eligible(peer, eligible)

    def _set_eligible(self, peer: Peer, eligible: bool) -> None:
        if eligible and peer not in self._in_balancer:
            self._in_balancer.add(peer)
            self.balancer.add(peer)
        elif not eligible and peer in self._in_balancer:
            self._in_balancer.discard(peer)
            self.balancer.remove(peer)

    def _set_ramp(self, peer: Peer, ramp: float) -> None:
        if peer.ramp != ramp:
            peer.ramp = ramp
            self._update(peer)

    def _schedule(self, key: Tuple[str, str], delay: float, f: Callable[..., object],
                  *args: object) -> None:
        self._cancel(key)

        def fire() -> None:
            self._timers.pop(key, None)
            f(*args)
        self._timers[key] = self.clock.callLater(delay, fire)

    def _cancel(self, key: Tuple[str, str]) -> None:
        call = self._timers.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self) -> None:
        """Cancel every timer (the service is stopping)."""
        for key in list(self._timers):
            self._cancel(key)
        self.slow_start.stop_all()
        self.outlier.stop()

    def snapshot(self) -> Mapping[str, Peer]:
        return dict(self.peers)

    # --- views -----------------------------------------------------------------------------

    def stats(self, health: Optional[HealthCheckStats] = None,
              consul: Optional[ConsulStats] = None) -> PoolStats:
        """The admin server's view of the pool now. The pool does not know its parts
        (health monitor, Consul watch): its service hands in their views."""
        return PoolStats(name=self.name, balance=self.config.balance,
                         slow_start=self.config.slow_start,
                         peers=tuple(self.peer_stats(peer) for peer in self.peers.values()),
                         health_check=health, consul=consul)

    def peer_stats(self, peer: Peer) -> PeerStats:
        """One peer's view; also of a peer just removed (the answer to its DELETE)."""
        last = peer.last_check
        return PeerStats(
            address=peer.key, weight=peer.weight, sources=tuple(peer.sources),
            admin_state=peer.admin_state, operator_state=peer.operator_state,
            source_states={source: spec.state for source, spec in sorted(peer.wants.items())},
            removing=peer.removing,
            removable=not peer.removing and all(s in REMOVABLE_SOURCES for s in peer.wants),
            health=peer.health, ramp=peer.ramp,
            active_connections=peer.active_connections,
            total_connections=peer.total_connections, bytes_in=peer.bytes_in,
            bytes_out=peer.bytes_out, connect_failures=peer.connect_failures,
            last_check=None if last is None else CheckStats(last.ok, last.detail, last.at),
            ejected=peer.ejected, ejections=peer.ejections)
