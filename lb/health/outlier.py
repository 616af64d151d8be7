"""Outlier ejection, the passive L7 check of HTTP mode (Envoy's outlier detection): a peer
answering ``consecutive_5xx`` server errors in a row is taken out for ``ejection_time``,
doubling each time it is ejected again, never more than ``max_ejected`` percent of its pool
at once. Like every passive check it only takes a peer out: the ejection ends when its time
is up or, sooner, when an active check of the peer passes.

A policy acting through the pool (``pool.set_ejected``): the pool keeps whether a peer is
ejected; this module decides when.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from lb.config import OutlierConfig
from lb.peer import Peer

MAX_DOUBLINGS = 5  # at most 32 × ejection_time


class EjectingPool(Protocol):
    name: str
    peers: Dict[str, Peer]

    def set_ejected(self, peer: Peer, ejected: bool, reason: str) -> None: ...


class _Track:
    __slots__ = ("errors", "ejections", "successes", "timer")

    def __init__(self) -> None:
        self.errors = 0  # 5xx in a row
        self.ejections = 0  # in a row (reset after `consecutive_5xx` good answers)
        self.successes = 0
        self.timer: Optional[IDelayedCall] = None


class Outlier:
    """Counts each peer's answers and ejects those that keep failing."""

    def __init__(self, pool: EjectingPool, clock: IReactorTime,
                 config: Callable[[], Optional[OutlierConfig]]) -> None:
        self.pool = pool
        self.clock = clock
        self.config = config  # read when used: a reload may change it
        self._tracks: Dict[Peer, _Track] = {}

    def response(self, peer: Peer, status: int) -> None:
        """An answer (or lb's 502/504 for a failed exchange) came from ``peer``."""
        config = self.config()
        if config is None:
            return
        track = self._tracks.get(peer)
        if track is None:
            track = self._tracks[peer] = _Track()
        if status < 500:
            track.errors = 0
            track.successes += 1
            if track.successes >= config.consecutive_5xx:
                track.ejections = 0  # it has behaved since it came back
            return
        track.successes = 0
        track.errors += 1
        if track.errors >= config.consecutive_5xx and not peer.ejected:
            self._eject(peer, track, config)

    def _eject(self, peer: Peer, track: _Track, config: OutlierConfig) -> None:
        peers = self.pool.peers
        ejected = sum(1 for p in peers.values() if p.ejected)
        if (ejected + 1) * 100 > config.max_ejected * len(peers):
            return  # max_ejected: the pool keeps enough peers, however bad
        track.errors = 0
        duration = config.ejection_time * 2 ** min(track.ejections, MAX_DOUBLINGS)
        track.ejections += 1
        peer.ejections += 1
        self.pool.set_ejected(peer, True, f"{config.consecutive_5xx} consecutive 5xx, for "
                                          f"{duration:g}s")
        track.timer = self.clock.callLater(duration, self._return, peer, "ejection time over")

    def probe_passed(self, peer: Peer) -> None:
        """An active check of ``peer`` passed: an ejection ends now."""
        if peer.ejected:
            self._return(peer, "active check passed")

    def _return(self, peer: Peer, why: str) -> None:
        track = self._tracks.get(peer)
        if track is not None and track.timer is not None:
            if track.timer.active():
                track.timer.cancel()
            track.timer = None
        if peer.ejected and self.pool.peers.get(peer.key) is peer:
            self.pool.set_ejected(peer, False, why)

    def forget(self, peer: Peer) -> None:
        """``peer`` left the pool."""
        track = self._tracks.pop(peer, None)
        if track is not None and track.timer is not None and track.timer.active():
            track.timer.cancel()

    def stop(self) -> None:
        for peer in list(self._tracks):
            self.forget(peer)

