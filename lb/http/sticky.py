"""What pins a request to a peer beyond the balancer: a pool's ``sticky_cookie`` and the key
``balance: source`` hashes (``hash_key``).

The cookie's value names a peer without showing its address: the first 16 hex digits of
SHA-256 over the pool's name and the peer's ``host:port``. It is the same on every lb
instance and across restarts (HAProxy's ``cookie SRV insert`` with server names, but opaque),
so clients keep their peer when DNS sends them to another lb, and a client that forges a
value can at most choose a peer of that pool, which the balancer could give it anyway.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Optional

from lb.config import HashKey
from lb.http.messages import RequestHead
from lb.peer import Peer
from lb.pool import Pool

VALUE_LENGTH = 16


def cookie_value(pool: str, peer: str) -> bytes:
    """The sticky cookie's value for ``peer`` (``host:port``) of ``pool``."""
    digest = hashlib.sha256(b"lb-sticky\0%b\0%b" % (pool.encode(), peer.encode()))
    return digest.hexdigest()[:VALUE_LENGTH].encode()


def find_cookie(head: RequestHead, name: bytes) -> Optional[bytes]:
    """The value of cookie ``name`` in the request's Cookie header(s) (RFC 6265 5.4: pairs
    separated by ``;``), or None. Names are compared as written (cookie names are
    case-sensitive)."""
    for header, value in head.headers:
        if len(header) != 6 or header.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            key, sep, found = pair.partition(b"=")
            if sep and key.strip(b" \t") == name:
                return found.strip(b" \t").strip(b'"')
    return None


class StickyPeers:
    """A pool's cookie values and the peers they name. Kept in step with the pool through
    its observer events, so a lookup is one dict access whatever value a client sends."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.peers: Dict[bytes, Peer] = {}
        self.values: Dict[str, bytes] = {}  # peer key → value
        for peer in pool.peers.values():
            self._add(peer)
        pool.subscribe(self._peer_event)

    def _add(self, peer: Peer) -> None:
        value = cookie_value(self.pool.name, peer.key)
        self.values[peer.key] = value
        self.peers[value] = peer

    def _peer_event(self, pool: Pool, peer: Peer, event: str) -> None:
        if event == "added":
            self._add(peer)
        elif event == "removed":
            value = self.values.pop(peer.key, None)
            if value is not None and self.peers.get(value) is peer:
                del self.peers[value]

    def value_for(self, peer: Peer) -> bytes:
        value = self.values.get(peer.key)
        return value if value is not None else cookie_value(self.pool.name, peer.key)

    def set_cookie(self, peer: Peer, sent: Optional[bytes]) -> bytes:
        """The ``Set-Cookie`` line for an answer from ``peer`` when the client's cookie
        (``sent``) does not name it already (none, or a peer that could not serve)."""
        config = self.pool.config.sticky_cookie
        value = self.value_for(peer)
        if config is None or value == sent:
            return b""
        return b"Set-Cookie: %b=%b; Path=/; HttpOnly\r\n" % (config.name.encode("latin-1"),
                                                            value)

    def peer_for(self, value: Optional[bytes]) -> Optional[Peer]:
        """The peer ``value`` names while it can take new requests (ready, up, not ejected,
        weight above zero), else None: the balancer picks and a new cookie is sent."""
        if value is None:
            return None
        peer = self.peers.get(value)
        if peer is None or not self.pool.eligible(peer):
            return None
        return peer

    def close(self) -> None:
        self.pool.unsubscribe(self._peer_event)


def hash_key(key: HashKey, head: RequestHead) -> Optional[str]:
    """What ``balance: source`` hashes for this request; None: the client's IP (also when
    the header or cookie is absent, so such requests still spread by client)."""
    kind = key.kind
    if kind == "client_ip":
        return None
    if kind == "path":
        return head.target.split(b"?", 1)[0].decode("latin-1")
    assert key.name is not None
    if kind == "header":
        value = head.get(key.name.encode("latin-1"))
    else:
        value = find_cookie(head, key.name.encode("latin-1"))
    return value.decode("latin-1") if value else None
