"""The small interfaces the parts of lb meet at."""

from __future__ import annotations

from typing import AbstractSet, NamedTuple, Optional

from twisted.application.service import IService
from zope.interface import Attribute, Interface

from lb.peer import Peer
from lb.stats import PartStats


class PickContext(NamedTuple):
    """What a balancer may know about the request it picks a peer for (Envoy's
    ``LoadBalancerContext``). Every field is optional: a pick works without a context."""

    client: Optional[str] = None  # the client's IP (behind accept_proxy, the PROXY header's)
    hash_key: Optional[str] = None  # what `source` hashes; None: the client's IP
    exclude: AbstractSet[Peer] = frozenset()  # peers already tried (connect retries)


NO_CONTEXT = PickContext()


class IBalancer(Interface):
    """A load-balancing algorithm, told about changes instead of rescanning the pool.

    Like HAProxy's ``lb_ops``: the pool adds a peer when it becomes eligible for new
    connections, removes it when it stops being eligible, and reports weight changes and
    load (connections in TCP mode, requests in flight in HTTP mode) added and removed.
    """

    def add(peer: Peer) -> None:
        """``peer`` may now be picked (its ``effective_weight`` is set)."""

    def remove(peer: Peer) -> None:
        """``peer`` must not be picked any more."""

    def reweight(peer: Peer) -> None:
        """``peer.effective_weight`` changed."""

    def pick(context: PickContext) -> Optional[Peer]:
        """Return a peer for a ``PickContext`` (``NO_CONTEXT`` when there is none), skipping
        ``context.exclude``; None when no eligible peer is left."""

    def load_added(peer: Peer) -> None:
        """``peer.load`` went up by one (a connection or request started; counted from pick
        time so a burst spreads by least load)."""

    def load_removed(peer: Peer) -> None:
        """``peer.load`` went down by one."""

    def __len__() -> int:
        """How many peers are eligible."""


class IClosable(Interface):
    """An open proxied connection the pool may need to cut (``maint``)."""

    peer = Attribute("The Peer it is connected to.")

    def abort(reason: str) -> None:
        """Close both sides now."""


class IPoolPart(IService):
    """A service that keeps one pool current (its health monitor, its Consul watch). The
    root builds one per kind from the pool's config; the pool's service runs it."""

    def stats() -> PartStats:
        """What the admin server shows of it (built now, no I/O)."""

    def release() -> None:
        """A reload removed the config this part came from: give back what it put into the
        pool (a discovery source lets go of its peers, which drain). Called once stopped."""
