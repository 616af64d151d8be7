"""Pick a peer, connect, retry the next: the part of a connection's life before any byte has
reached a peer, shared by every data path (and, per request, by HTTP mode).

An ``Attempt`` asks the pool's balancer for a peer (never one already tried for this client),
counts the load on it from pick time, dials it, and on a failed connect reports the failure
to the pool (a failed passive check) and tries the next peer, up to the pool's ``retries``.
It ends in exactly one of ``connected(peer, channel, unsent)`` or ``failed(reason,
failures)``, unless it is cancelled first; either way every peer it picked and did not hand
over has been released in the pool.
"""

from __future__ import annotations

from typing import Any, Callable, FrozenSet, List, Optional, Protocol, Sequence

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from lb.interfaces import PickContext
from lb.net import Address, describe_connect_failure
from lb.peer import Peer
from lb.pool import Pool

NO_PEER = "no_peer"  # no peer could take the client at all
CONNECT_FAILED = "connect_failed"  # every peer tried failed to connect


class Cancellable(Protocol):
    def cancel(self) -> Any: ...


# dial(address, timeout, first bytes, connected(channel, unsent), failed(reason)):
# start a connect that writes ``first`` once connected; exactly one callback runs unless the
# returned handle is cancelled first.
Dial = Callable[[Address, float, bytes, Callable[[Any, bytes], None],
                 Callable[[Any], None]], Cancellable]


class Attempt:
    """Connecting one client (or one request) to some peer of a pool."""

    log = Logger()
    __slots__ = ("pool", "owner", "dial", "context", "first", "connected", "failed", "tried",
                 "failures", "peer", "dialing", "cancelled", "_picked")

    def __init__(self, pool: Pool, owner: Any, dial: Dial, context: PickContext,
                 first: bytes, connected: Callable[[Peer, Any, bytes], None],
                 failed: Callable[[str, Sequence[str]], None],
                 picked: Optional[Peer] = None) -> None:
        """``picked``: a peer the caller already picked for the first try."""
        self.pool = pool
        self.owner = owner  # registered with the peer while picked (maint may abort it)
        self.dial = dial
        self.context = context
        self.first = first
        self.connected = connected
        self.failed = failed
        self.tried: FrozenSet[Peer] = frozenset(context.exclude)  # peers tried for it
        self.failures: List[str] = []
        self.peer: Optional[Peer] = None
        self.dialing: Optional[Cancellable] = None
        self.cancelled = False
        self._picked = picked

    def start(self) -> None:
        self._next()

    def cancel(self) -> None:
        """Give up (the client left, or is being cut): the peer being dialled is released,
        neither callback runs."""
        if self.cancelled or self.peer is None:
            return
        self.cancelled = True
        peer, dialing = self.peer, self.dialing
        self.peer = self.dialing = None
        if dialing is not None:
            dialing.cancel()
        self.pool.connection_ended(peer, self.owner)

    def _next(self) -> None:
        context = self.context
        peer, self._picked = self._picked, None
        if peer is None:
            peer = self.pool.pick(context._replace(exclude=self.tried) if self.tried
                                  else context)
        if peer is None:
            self.failed(CONNECT_FAILED if self.tried else NO_PEER, self.failures)
            return
        self.tried = self.tried | {peer}
        self.peer = peer
        self.pool.connection_started(peer, self.owner)
        timeout = self.pool.config.connect_timeout
        try:
            handle = self.dial(peer.address, timeout, self.first, self._dialled,
                               self._dial_failed)
        except Exception as e:  # a connect that cannot even start fails like a refused one
            self._dial_failed(e)
            return
        if self.peer is peer:  # not already over (a dial may answer at once)
            self.dialing = handle

    def _dialled(self, channel: Any, unsent: bytes) -> None:
        if self.cancelled:
            return
        peer = self.peer
        assert peer is not None
        self.peer = self.dialing = None
        self.connected(peer, channel, unsent)

    def _dial_failed(self, reason: Any) -> None:
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if self.cancelled or failure.check(CancelledError, ConnectingCancelledError):
            return  # cancel() has released the peer
        peer = self.peer
        assert peer is not None
        self.peer = self.dialing = None
        detail = describe_connect_failure(failure, self.pool.config.connect_timeout)
        self.failures.append(f"{peer.key}: {detail}")
        self.pool.connection_failed(peer, self.owner, detail)
        if len(self.tried) <= self.pool.config.retries:
            self._next()
        else:
            self.failed(CONNECT_FAILED, self.failures)
