"""The sticky cookie's values, the Cookie header parser and hash keys, in memory."""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
from twisted.internet.task import Clock

from lb.config import HashKey, parse_address
from lb.http.messages import RequestHead
from lb.http.sticky import StickyPeers, cookie_value, find_cookie, hash_key
from lb.peer import PeerSpec
from lb.pool import Pool
from lb.testing import make_config


def head(target: bytes = b"/", headers: Optional[List[Tuple[bytes, bytes]]] = None,
         host: bytes = b"example.com") -> RequestHead:
    h = RequestHead()
    h.target = target
    h.header(b"Host", host, None)
    for name, value in headers or []:
        h.header(name, value, b"x-request-id")
    h.check()
    return h


def pool_with(*addresses: str) -> Pool:
    config = make_config({"l": {"bind": "127.0.0.1:1", "pool": "p"}},
                         {"p": {"sticky_cookie": {"name": "s"}}})
    pool = Pool(config.pools["p"], Clock())
    pool.apply("static", [PeerSpec(parse_address(a)) for a in addresses])
    return pool


@pytest.mark.parametrize("headers,expected", [
    ([(b"Cookie", b"s=abc")], b"abc"),
    ([(b"cookie", b"a=1; s=abc; b=2")], b"abc"),
    ([(b"Cookie", b"a=1"), (b"Cookie", b"s=two")], b"two"),  # several Cookie headers
    ([(b"Cookie", b'a=1;s="q"')], b"q"),  # quoted, no space after ';'
    ([(b"Cookie", b"S=upper; ss=longer; xs=suffix")], None),  # names are exact
    ([(b"Cookie", b"s")], None),  # no '='
    ([(b"X-Cookie", b"s=abc")], None),
    ([], None),
])
def test_find_cookie(headers: List[Tuple[bytes, bytes]], expected: Optional[bytes]) -> None:
    """A cookie is found by its exact name among ';'-separated pairs in any Cookie header."""
    assert find_cookie(head(headers=headers), b"s") == expected


def test_cookie_values_are_stable_opaque_and_per_pool() -> None:
    """A value depends only on pool and peer (every lb instance agrees), shows no address,
    and differs between pools and peers."""
    a = cookie_value("web", "10.0.0.1:80")
    assert a == cookie_value("web", "10.0.0.1:80") and len(a) == 16
    assert b"10.0.0.1" not in a
    assert a != cookie_value("api", "10.0.0.1:80") != cookie_value("web", "10.0.0.2:80")


def test_sticky_peers_follow_the_pool_and_only_name_peers_that_can_serve() -> None:
    """Values map to the pool's peers as they come and go; a peer drained, or down, is not
    returned (the balancer picks and a new cookie is sent)."""
    pool = pool_with("10.0.0.1:80", "10.0.0.2:80")
    sticky = StickyPeers(pool)
    one = pool.peers["10.0.0.1:80"]
    value = sticky.value_for(one)
    assert sticky.peer_for(value) is one
    assert sticky.peer_for(b"0000000000000000") is None and sticky.peer_for(None) is None
    pool.set_admin_state(one.key, "drain")
    assert sticky.peer_for(value) is None
    pool.set_admin_state(one.key, "ready")
    assert sticky.peer_for(value) is one
    pool.apply("static", [PeerSpec(parse_address("10.0.0.3:80"))])  # 1 and 2 drain, then go
    three = pool.peers["10.0.0.3:80"]
    assert sticky.peer_for(sticky.value_for(three)) is three
    assert sticky.peer_for(value) is None
    assert sticky.set_cookie(three, sticky.value_for(three)) == b""
    assert sticky.set_cookie(three, value) == \
        b"Set-Cookie: s=%b; Path=/; HttpOnly\r\n" % sticky.value_for(three)
    sticky.close()


@pytest.mark.parametrize("key,request_head,expected", [
    (HashKey(), head(), None),
    (HashKey("path"), head(b"/a/b?x=1"), "/a/b"),
    (HashKey("header", "x-user"), head(headers=[(b"X-User", b"alice")]), "alice"),
    (HashKey("header", "x-user"), head(), None),  # absent: the client IP
    (HashKey("header", "host"), head(host=b"Shop.example"), "Shop.example"),
    (HashKey("cookie", "sid"), head(headers=[(b"Cookie", b"sid=42")]), "42"),
    (HashKey("cookie", "sid"), head(headers=[(b"Cookie", b"sid=")]), None),
])
def test_hash_key(key: HashKey, request_head: RequestHead, expected: Optional[str]) -> None:
    """What balance: source hashes per hash_key; None means the client's IP."""
    assert hash_key(key, request_head) == expected
