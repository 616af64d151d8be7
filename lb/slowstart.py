"""Slow start: a peer's weight ramps from 10% to 100% after it comes up, is added, or returns
from maintenance (HAProxy's ``slowstart``, nginx's ``slow_start``), so a cold peer is not
handed its full share of new connections at once.

A policy that acts through the pool: it owns the ramp timers and tells the pool each new ramp
factor; the pool turns it into the peer's effective weight and tells its balancer.
"""

from __future__ import annotations

from typing import Callable, Dict

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from lb.peer import Peer

FLOOR = 0.1
STEPS = 20


class SlowStart:
    """Ramps per peer on an injected clock; ``duration()`` is read at every step, so a
    reload that changes ``slow_start`` applies to ramps under way."""

    def __init__(self, clock: IReactorTime, duration: Callable[[], float],
                 set_ramp: Callable[[Peer, float], None]) -> None:
        self.clock = clock
        self.duration = duration
        self.set_ramp = set_ramp
        self._timers: Dict[Peer, IDelayedCall] = {}

    @property
    def enabled(self) -> bool:
        return self.duration() > 0

    def initial(self) -> float:
        """The ramp factor a new peer starts with (ramped once it is up)."""
        return FLOOR if self.enabled else 1.0

    def start(self, peer: Peer) -> None:
        """Ramp ``peer`` from the floor, from now."""
        self.stop(peer)
        self.set_ramp(peer, FLOOR)
        self._tick(peer, self.clock.seconds())

    def stop(self, peer: Peer) -> None:
        call = self._timers.pop(peer, None)
        if call is not None and call.active():
            call.cancel()

    def stop_all(self) -> None:
        for peer in list(self._timers):
            self.stop(peer)

    def _tick(self, peer: Peer, started: float) -> None:
        self._timers.pop(peer, None)
        duration = self.duration()
        if duration <= 0:
            self.set_ramp(peer, 1.0)
            return
        # Whole steps from the start time, however late a tick fires: every ramping peer
        # takes one of the same 21 ramp values, so balancers indexing peers by weight
        # (roundrobin's weight groups) stay small however many peers ramp at once.
        # A tick counts as on time within a millionth of a step (float sums of delays).
        period = duration / STEPS
        step = int((self.clock.seconds() - started) / period + 1e-6)
        if step >= STEPS:
            self.set_ramp(peer, 1.0)
            return
        self.set_ramp(peer, FLOOR + (1 - FLOOR) * step / STEPS)
        due = started + (step + 1) * period - period * 1e-7
        self._timers[peer] = self.clock.callLater(max(0.0, due - self.clock.seconds()),
                                                  self._tick, peer, started)
