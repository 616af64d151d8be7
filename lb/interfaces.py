"""The small interfaces the parts of lb meet at."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IBalancer(Interface):
    """A load-balancing algorithm, told about changes instead of rescanning the pool.

    Like HAProxy's ``lb_ops``: the pool adds a peer when it becomes eligible for new
    connections, removes it when it stops being eligible, and reports weight changes and
    connections opening and closing. ``pick`` must work without a client address.
    """

    def add(peer):
        """``peer`` may now be picked (its ``effective_weight`` is set)."""

    def remove(peer):
        """``peer`` must not be picked any more."""

    def reweight(peer):
        """``peer.effective_weight`` changed."""

    def pick(client, exclude):
        """Return a peer for a client address string (or None), skipping ``exclude``; None
        when no eligible peer is left."""

    def connection_opened(peer):
        """A connection to ``peer`` started (counted from pick time)."""

    def connection_closed(peer):
        """A connection to ``peer`` ended."""

    def __len__():
        """How many peers are eligible."""


class IPeerObserver(Interface):
    """Hears about a pool's peers: added, changed (state, health, weight), removed."""

    def peer_event(pool, peer, event):
        """``event`` is ``"added"``, ``"changed"`` or ``"removed"``."""


class IClosable(Interface):
    """An open proxied connection the pool may need to cut (``maint``)."""

    peer = Attribute("The Peer it is connected to.")

    def abort(reason):
        """Close both sides now."""
