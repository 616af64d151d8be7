"""Sticky clients in HTTP mode, through real sockets: a pool's ``sticky_cookie`` and
``balance: source`` with ``hash_key`` (client_ip, header:NAME, cookie:NAME, path)."""

from __future__ import annotations

import threading
import urllib.parse
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from tests.http.backend import Backend
from tests.http.clients import keepalive
from tests.http.conftest import LB, simple
from tests.processes import wait_for

pytestmark = pytest.mark.integration

Start = Callable[..., LB]


def start_lb(lb_process: Start, peers: List[Backend], pool_keys: str) -> LB:
    """Pool keys after the first on lines indented by 12, as in the config text."""
    return simple(lb_process, *peers, pool=" " * 4 + pool_keys)


def one(port: int, target: str = "/", headers: Optional[Dict[str, str]] = None,
        status: int = 200) -> Tuple[str, Optional[str]]:
    """A request on a new connection: (backend that answered, Set-Cookie sent, if any)."""
    [r] = keepalive(port, [target], headers=list((headers or {}).items()))
    assert r.status == status, (r.status, r.text)
    return r.header("X-Backend") or "", r.header("Set-Cookie")


def cookie_of(set_cookie: Optional[str]) -> str:
    assert set_cookie is not None
    pair = set_cookie.split(";")[0]
    name, value = pair.split("=", 1)
    assert name == "lb_peer"
    assert "; Path=/" in set_cookie and "HttpOnly" in set_cookie
    return value


def set_state(lb: LB, peer: Backend, state: str) -> None:
    quoted = urllib.parse.quote(peer.address, safe="")
    lb.admin(f"/api/pools/web/peers/{quoted}", "PUT", {"admin_state": state})


def test_sticky_cookie_pins_a_client_to_its_peer_and_moves_it_when_the_peer_drains(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """The first answer sets an opaque cookie naming the peer that served it; requests
    carrying it (on new connections) all go to that peer and get no new cookie; once the
    peer is drained the next request goes to another peer with a new cookie, and sticks
    there even after the first peer is ready again."""
    peers = [backends(n) for n in "abc"]
    lb = start_lb(lb_process, peers, "sticky_cookie: {{name: lb_peer}}")
    port = lb.port("www")
    first, set_cookie = one(port)
    value = cookie_of(set_cookie)
    for peer in peers:  # opaque: the address does not show
        assert str(peer.port) not in value and "127.0.0.1" not in value
    jar = {"Cookie": f"other=1; lb_peer={value}; more=2"}
    for _ in range(12):
        assert one(port, headers=jar) == (first, None)
    [drained] = [p for p in peers if p.name == first]
    set_state(lb, drained, "drain")
    moved, set_cookie = one(port, headers=jar)
    assert moved != first
    new_value = cookie_of(set_cookie)
    assert new_value != value
    set_state(lb, drained, "ready")
    jar = {"Cookie": f"lb_peer={new_value}"}
    for _ in range(6):
        assert one(port, headers=jar) == (moved, None)


def test_sticky_cookie_forged_or_stale_values_are_balanced_and_reissued(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """A cookie naming no peer of the pool (forged, from another pool, a removed peer) is
    ignored: the request is balanced as usual and the answer carries a valid cookie."""
    peers = [backends(n) for n in "ab"]
    lb = start_lb(lb_process, peers, "sticky_cookie: {{name: lb_peer}}")
    port = lb.port("www")
    seen = Counter()
    for forged in ["0123456789abcdef", "", "x" * 3000, "../../etc", "\"quoted\""]:
        backend, set_cookie = one(port, headers={"Cookie": f"lb_peer={forged}"})
        seen[backend] += 1
        value = cookie_of(set_cookie)
        assert one(port, headers={"Cookie": f"lb_peer={value}"}) == (backend, None)
    assert set(seen) == {"a", "b"}  # still balanced


def test_sticky_cookie_holds_under_continuous_load_while_peers_change(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """Six clients, each with its own cookie, send requests continuously (bounded) while
    an operator drains one peer and brings it back: every request is answered 200, a client
    only changes peer when its peer was drained, and then sticks to its new one."""
    peers = [backends(n) for n in "abc"]
    lb = start_lb(lb_process, peers, "sticky_cookie: {{name: lb_peer}}")
    port = lb.port("www")
    stop = threading.Event()
    errors: List[str] = []
    histories: Dict[int, List[str]] = {}

    def client(i: int) -> None:
        backend, set_cookie = one(port)
        value = cookie_of(set_cookie)
        history = histories[i] = [backend]
        for _ in range(400):
            if stop.is_set():
                return
            try:
                got, new = one(port, headers={"Cookie": f"lb_peer={value}"})
            except Exception as e:  # recorded, asserted below
                errors.append(repr(e))
                return
            if new is not None:
                value = cookie_of(new)
            if got != history[-1]:
                history.append(got)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(histories) == 6, what="every client served once")
        victim = next(p for p in peers if p.name == histories[0][0])
        set_state(lb, victim, "drain")
        wait_for(lambda: all(h[-1] != victim.name for h in histories.values()), timeout=20,
                 what="clients of the drained peer moving")
        set_state(lb, victim, "ready")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    for history in histories.values():
        # a client moves at most once: away from the drained peer, never back
        assert len(history) <= 2, history
        if len(history) == 2:
            assert history[0] == victim.name, history


@pytest.mark.parametrize("key,header,values", [
    ("header:X-User", "X-User", ["alice", "bob", "carol", "dave", "erin", "frank"]),
    ("cookie:session", "Cookie", [f"session={v}" for v in "uvwxyz"]),
])
def test_hash_key_from_a_header_or_cookie_sends_each_key_to_one_peer(
        lb_process: Start, backends: Callable[..., Backend], key: str, header: str,
        values: List[str]) -> None:
    """balance: source with hash_key header:/cookie:: requests with the same key go to
    the same peer, on any connection, and different keys spread over the peers."""
    peers = [backends(n) for n in "abcd"]
    lb = start_lb(lb_process, peers, f"balance: source\n            hash_key: \"{key}\"")
    port = lb.port("www")
    owners = {}
    for value in values * 3:
        backend, _ = one(port, headers={header: value})
        assert owners.setdefault(value, backend) == backend, value
    assert len(set(owners.values())) >= 2, owners


def test_hash_key_path_ignores_the_query_and_falls_back_to_the_client_ip(
        lb_process: Start, backends: Callable[..., Backend]) -> None:
    """hash_key: path hashes the path without its query (like a cache-friendly
    ``balance uri``); with hash_key header:X-User a request without the header is hashed by
    its client IP, so it still has one peer."""
    peers = [backends(n) for n in "abcd"]
    lb = start_lb(lb_process, peers, "balance: source\n            hash_key: path")
    port = lb.port("www")
    owners = {}
    for i in range(24):
        path = f"/item/{i % 8}"
        backend, _ = one(port, f"{path}?v={i}", status=404)  # the backends' 404: served
        assert owners.setdefault(path, backend) == backend, path
    assert len(set(owners.values())) >= 2, owners
    lb2 = start_lb(lb_process, peers, "balance: source\n            hash_key: \"header:X-User\"")
    first, _ = one(lb2.port("www"))
    assert all(one(lb2.port("www"))[0] == first for _ in range(8))
