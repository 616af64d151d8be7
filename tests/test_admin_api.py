"""The JSON admin API, driven through treq's StubTreq (no sockets) with a Clock-driven pool."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from lb.admin.api import MAX_BODY
from lb.admin.server import build_resource
from lb.config import MAX_WEIGHT, Address
from lb.service import LBService
from lb.testing import make_config

BASE = "http://127.0.0.1:9901"
SPEC_PEER_FIELDS = {"address", "weight", "sources", "admin_state", "health",
                    "active_connections", "total_connections", "bytes_in", "bytes_out",
                    "last_check"}

LISTENERS = {"front": {"bind": "127.0.0.1:0", "pool": "web"}}


def pools_config(**web: Any) -> Dict[str, Any]:
    pool = {"peers": ["127.0.0.1:9001", {"address": "[::1]:9002", "weight": 3}],
            "drain_timeout": "10s"}
    pool.update(web)
    return {"web": pool, "api": {"balance": "leastconn", "peers": ["10.0.0.1:80"]}}


class Admin:
    """An LBService on a MemoryReactorClock and its admin resource behind StubTreq."""

    def __init__(self, tmp_path: Any = None, token: Optional[str] = None,
                 **web: Any) -> None:
        self.tmp_path = tmp_path
        self.reactor = MemoryReactorClock()
        self.config = self.make_config(token, **web)
        self.root = LBService(self.config, self.reactor)
        self.stub = StubTreq(build_resource(self.root.admin_view, self.reactor))

    def make_config(self, token: Optional[str] = None, **web: Any) -> Any:
        admin: Dict[str, Any] = {"bind": "127.0.0.1:0"}
        if token is not None:
            path = self.tmp_path / "admin.token"
            path.write_text(f"  {token}\n")
            admin["token_file"] = str(path)
        return make_config(LISTENERS, pools_config(**web), admin=admin)

    @property
    def pool(self) -> Any:
        return self.root.pool("web")

    def call(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
             headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any, Any]:
        """One request; returns (status, decoded JSON or text, response headers)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        results: list = []
        d = self.stub.request(method, BASE + path, data=data, headers=headers or {})
        d.addCallback(lambda r: r.content().addCallback(lambda c: results.append((r, c))))
        d.addErrback(results.append)
        self.stub.flush()
        assert results, f"{method} {path}: no response"
        if not isinstance(results[0], tuple):
            results[0].raiseException()
        response, content = results[0]
        ctype = response.headers.getRawHeaders("content-type", [""])[0]
        decoded = json.loads(content) if ctype.startswith("application/json") else content
        return response.code, decoded, response.headers

    def state(self) -> Any:
        """Everything the API shows, to prove a refused request changed nothing."""
        return self.call("GET", "/api/pools")[1]


@pytest.fixture
def admin() -> Admin:
    return Admin()


def peer_by_address(pool_json: Dict[str, Any], address: str) -> Dict[str, Any]:
    for peer in pool_json["peers"]:
        if peer["address"] == address:
            return peer
    raise AssertionError(f"{address} not in {[p['address'] for p in pool_json['peers']]}")


# --- reading ----------------------------------------------------------------------------------


def test_list_pools_shows_every_pool_and_peer_with_every_field(admin: Admin) -> None:
    """GET /api/pools lists all pools in config order, each peer with SPEC's fields and
    the live counters of the Peer object."""
    peer = admin.pool.get("[::1]:9002")
    peer.bytes_in, peer.bytes_out, peer.total_connections = 1234, 5678, 9
    admin.pool.connection_started(peer, object())
    status, body, headers = admin.call("GET", "/api/pools")
    assert status == 200
    assert headers.getRawHeaders("content-type")[0].startswith("application/json")
    assert [p["name"] for p in body["pools"]] == ["web", "api"]
    web = body["pools"][0]
    assert web["balance"] == "roundrobin" and body["pools"][1]["balance"] == "leastconn"
    assert [p["address"] for p in web["peers"]] == ["127.0.0.1:9001", "[::1]:9002"]
    v6 = peer_by_address(web, "[::1]:9002")
    assert SPEC_PEER_FIELDS <= set(v6)
    assert v6 == {**v6, "weight": 3, "sources": ["static"], "admin_state": "ready",
                  "health": "up", "active_connections": 1, "total_connections": 9,
                  "bytes_in": 1234, "bytes_out": 5678, "last_check": None}


def test_last_check_shows_the_latest_probe_with_unix_time(tmp_path: Any) -> None:
    """last_check is null before any check, then {ok, detail, at} with the clock's time;
    a pool with checks shows its peers as unknown until the first verdict."""
    admin = Admin(health={"type": "tcp", "interval": "2s", "timeout": "1s"})
    first = admin.call("GET", "/api/pools/web")[1]
    assert peer_by_address(first, "127.0.0.1:9001")["health"] == "unknown"
    assert peer_by_address(first, "127.0.0.1:9001")["last_check"] is None
    admin.reactor.advance(1700000000)
    admin.pool.report_check(admin.pool.get("127.0.0.1:9001"), False, "connection refused")
    peer = peer_by_address(admin.call("GET", "/api/pools/web")[1], "127.0.0.1:9001")
    assert peer["last_check"] == {"ok": False, "detail": "connection refused",
                                  "at": 1700000000.0}
    assert first["health_check"]["type"] == "tcp"


def test_get_one_pool_peers_and_peer(admin: Admin) -> None:
    """GET on a pool, its peer list and one peer (IPv6 percent-encoded) answer the same
    peer objects as the full listing."""
    status, pool, _ = admin.call("GET", "/api/pools/web")
    assert status == 200 and pool["name"] == "web"
    status, peers, _ = admin.call("GET", "/api/pools/web/peers")
    assert status == 200 and peers["peers"] == pool["peers"]
    status, peer, _ = admin.call("GET", "/api/pools/web/peers/%5B%3A%3A1%5D%3A9002")
    assert status == 200 and peer == peer_by_address(pool, "[::1]:9002")


def test_listeners_endpoint_shows_counters(admin: Admin) -> None:
    """GET /api/listeners shows each listener's pool and counters, refusals by reason."""
    listener = admin.root.listeners["front"].listener
    listener.total, listener.ended["no_peer"] = 7, 2
    listener.refused["max_connections"] += 3
    listener.ended["closed"] += 5
    status, body, _ = admin.call("GET", "/api/listeners")
    assert status == 200
    (front,) = body["listeners"]
    assert front["name"] == "front" and front["pool"] == "web"
    assert (front["total_connections"], front["no_peer"], front["active_connections"]) == (
        7, 2, 0)
    assert front["refused"] == {"allow": 0, "max_connections": 3}
    assert front["ended"] == {"closed": 5, "no_peer": 2}  # no_peer: the clients that ended so


# --- adding -----------------------------------------------------------------------------------


def test_post_adds_an_admin_peer_shown_in_the_next_get(admin: Admin) -> None:
    """POST adds a peer with source admin: 201, the peer, a Location; the pool can pick it."""
    status, peer, headers = admin.call("POST", "/api/pools/web/peers",
                                       {"address": "[::1]:9003", "weight": 4})
    assert status == 201
    assert (peer["address"], peer["weight"], peer["sources"]) == ("[::1]:9003", 4, ["admin"])
    assert headers.getRawHeaders("location") == ["/api/pools/web/peers/%5B%3A%3A1%5D%3A9003"]
    listed = peer_by_address(admin.call("GET", "/api/pools/web")[1], "[::1]:9003")
    assert listed == peer
    picked = {admin.pool.pick().key for _ in range(16)}
    assert "[::1]:9003" in picked


def test_post_weight_defaults_to_one_and_addresses_are_normalised(admin: Admin) -> None:
    """Without weight the peer gets 1; an IP is stored in its canonical spelling."""
    status, peer, _ = admin.call("POST", "/api/pools/web/peers",
                                 {"address": "[0:0::0:5]:80"})
    assert status == 201 and (peer["address"], peer["weight"]) == ("[::5]:80", 1)


def test_post_an_existing_admin_peer_is_a_conflict(admin: Admin) -> None:
    """Adding the same admin peer twice answers 409 and leaves the first one as it was."""
    admin.call("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9010", "weight": 2})
    before = admin.state()
    status, body, _ = admin.call("POST", "/api/pools/web/peers",
                                 {"address": "127.0.0.1:9010", "weight": 9})
    assert status == 409 and "already" in body["error"]
    assert admin.state() == before


@pytest.mark.parametrize("raw, problem", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "JSON object"),
    (b'{"weight": 1}', "missing 'address'"),
    (b'{"address": "127.0.0.1"}', "invalid address"),
    (b'{"address": "127.0.0.1:99999"}', "invalid address"),
    (b'{"address": "::1:80"}', "invalid address"),
    (b'{"address": 17}', "invalid address"),
    (b'{"address": "127.0.0.1:9011", "weight": "3"}', "weight"),
    (b'{"address": "127.0.0.1:9011", "weight": 2.5}', "weight"),
    (b'{"address": "127.0.0.1:9011", "weight": true}', "weight"),
    (b'{"address": "127.0.0.1:9011", "weight": -1}', "out of range"),
    (b'{"address": "127.0.0.1:9011", "weight": %d}' % (MAX_WEIGHT + 1), "out of range"),
    (b'{"address": "127.0.0.1:9011", "wieght": 2}', "unknown field"),
])
def test_post_bad_input_is_400_naming_the_problem_and_changes_nothing(
        admin: Admin, raw: bytes, problem: str) -> None:
    """Each malformed add is refused with 400 and an error naming what is wrong."""
    before = admin.state()
    status, body, _ = admin.call("POST", "/api/pools/web/peers", raw=raw)
    assert status == 400, body
    assert problem in body["error"]
    assert admin.state() == before


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/pools/web/peers"), ("PUT", "/api/pools/web/peers/127.0.0.1:9001")])
@pytest.mark.parametrize("raw", [b"[" * 2000, b'{"a":' * 2000])
def test_json_nested_too_deeply_is_400_not_500(admin: Admin, method: str, path: str,
                                               raw: bytes) -> None:
    """A body nested deeper than the JSON parser can follow (found by fuzzing: Python's
    RecursionError made it a 500) is a 400 saying so, and changes nothing."""
    before = admin.state()
    status, body, _ = admin.call(method, path, raw=raw)
    assert status == 400 and "nested too deeply" in body["error"], body
    assert admin.state() == before


def test_post_to_an_unknown_pool_is_404(admin: Admin) -> None:
    """An unknown pool answers 404 naming it and the pools that exist."""
    status, body, _ = admin.call("POST", "/api/pools/nope/peers",
                                 {"address": "127.0.0.1:9011"})
    assert status == 404 and "'nope'" in body["error"] and "web" in body["error"]


# --- changing ---------------------------------------------------------------------------------


def test_put_drain_then_ready_is_a_smooth_release(admin: Admin) -> None:
    """Mark down, deploy, bring up: drain keeps the open connection but takes no new ones;
    ready puts the peer back in rotation. Each change shows in the next GET."""
    pool = admin.pool
    conn = object()
    pool.connection_started(pool.get("127.0.0.1:9001"), conn)
    status, peer, _ = admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001",
                                 {"admin_state": "drain"})
    assert status == 200 and peer["admin_state"] == "drain"
    assert peer["active_connections"] == 1
    assert {pool.pick().key for _ in range(10)} == {"[::1]:9002"}
    listed = peer_by_address(admin.call("GET", "/api/pools/web")[1], "127.0.0.1:9001")
    assert listed["admin_state"] == "drain"
    status, peer, _ = admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001",
                                 {"admin_state": "ready"})
    assert status == 200 and peer["admin_state"] == "ready"
    assert "127.0.0.1:9001" in {pool.pick().key for _ in range(10)}


def test_put_maint_closes_connections_after_drain_timeout(admin: Admin) -> None:
    """maint through the API is the pool's maint: open connections are closed once the
    pool's drain_timeout passes."""
    closed = []

    class Conn:
        def abort(self, reason: str) -> None:
            closed.append(reason)

    admin.pool.connection_started(admin.pool.get("127.0.0.1:9001"), Conn())
    status, peer, _ = admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001",
                                 {"admin_state": "maint"})
    assert status == 200 and peer["admin_state"] == "maint"
    admin.reactor.advance(9.9)
    assert closed == []
    admin.reactor.advance(0.2)
    assert closed == ["maint"]


def test_put_weight_and_state_together(admin: Admin) -> None:
    """One PUT may set weight and admin_state; both show in the answer and the next GET."""
    status, peer, _ = admin.call("PUT", "/api/pools/web/peers/%5B%3A%3A1%5D%3A9002",
                                 {"weight": 7, "admin_state": "drain"})
    assert status == 200 and (peer["weight"], peer["admin_state"]) == (7, "drain")
    listed = peer_by_address(admin.call("GET", "/api/pools/web")[1], "[::1]:9002")
    assert (listed["weight"], listed["admin_state"]) == (7, "drain")
    status, peer, _ = admin.call("PUT", "/api/pools/web/peers/[::1]:9002", {"weight": 0})
    assert status == 200 and peer["weight"] == 0
    assert {admin.pool.pick().key for _ in range(5)} == {"127.0.0.1:9001"}


@pytest.mark.parametrize("path, raw, status, problem", [
    ("/api/pools/web/peers/127.0.0.1:9001", b'{"admin_state": "down"}', 400,
     "unknown admin_state 'down'"),
    ("/api/pools/web/peers/127.0.0.1:9001", b'{"admin_state": "drain", "weight": 1000}', 400,
     "out of range"),
    ("/api/pools/web/peers/127.0.0.1:9001", b'{"weight": 5, "admin_state": null}', 400,
     "admin_state"),
    ("/api/pools/web/peers/127.0.0.1:9001", b"{}", 400, "admin_state' and/or 'weight"),
    ("/api/pools/web/peers/127.0.0.1:9001", b'{"state": "drain"}', 400, "unknown field"),
    ("/api/pools/web/peers/127.0.0.1:9001", b'{"admin_state": "drain"', 400,
     "malformed JSON"),
    ("/api/pools/web/peers/127.0.0.1:9999", b'{"admin_state": "drain"}', 404,
     "no peer 127.0.0.1:9999"),
    ("/api/pools/web/peers/not-an-address", b'{"admin_state": "drain"}', 400,
     "invalid peer address"),
    ("/api/pools/nope/peers/127.0.0.1:9001", b'{"admin_state": "drain"}', 404,
     "no pool named 'nope'"),
])
def test_put_bad_input_changes_nothing(admin: Admin, path: str, raw: bytes, status: int,
                                       problem: str) -> None:
    """A PUT with any invalid part is refused as a whole: the valid parts are not applied."""
    before = admin.state()
    code, body, _ = admin.call("PUT", path, raw=raw)
    assert code == status, body
    assert problem in body["error"]
    assert admin.state() == before


# --- deleting ---------------------------------------------------------------------------------


def test_delete_an_idle_admin_peer_removes_it(admin: Admin) -> None:
    """DELETE answers 202 with the draining peer; an idle peer is gone from the next GET."""
    admin.call("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9020"})
    status, peer, _ = admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:9020")
    assert status == 202 and peer["admin_state"] == "drain" and peer["removing"] is True
    addresses = [p["address"] for p in admin.call("GET", "/api/pools/web")[1]["peers"]]
    assert "127.0.0.1:9020" not in addresses
    status, body, _ = admin.call("GET", "/api/pools/web/peers/127.0.0.1:9020")
    assert status == 404


def test_delete_a_busy_peer_drains_until_drain_timeout(admin: Admin) -> None:
    """A peer with open connections stays (drain, removing) until drain_timeout passes;
    a second DELETE does not extend its deadline."""
    admin.call("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9021"})
    admin.pool.connection_started(admin.pool.get("127.0.0.1:9021"), object())
    status, peer, _ = admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:9021")
    assert status == 202 and peer["removing"] and peer["active_connections"] == 1
    assert "127.0.0.1:9021" not in {admin.pool.pick().key for _ in range(10)}
    admin.reactor.advance(6)
    assert admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:9021")[0] == 202
    admin.reactor.advance(4.1)
    assert admin.call("GET", "/api/pools/web/peers/127.0.0.1:9021")[0] == 404


def test_delete_a_static_peer_drains_and_removes_it(admin: Admin) -> None:
    """DELETE of a peer from the config file is 202 with the peer draining; once its
    connection ends it is gone from the next GET."""
    pool = admin.pool
    conn = object()
    pool.connection_started(pool.get("127.0.0.1:9001"), conn)
    status, peer, _ = admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:9001")
    assert status == 202 and (peer["admin_state"], peer["removing"]) == ("drain", True)
    assert peer["active_connections"] == 1
    assert {pool.pick().key for _ in range(10)} == {"[::1]:9002"}
    pool.connection_ended(pool.get("127.0.0.1:9001"), conn)
    assert admin.call("GET", "/api/pools/web/peers/127.0.0.1:9001")[0] == 404
    addresses = [p["address"] for p in admin.call("GET", "/api/pools/web")[1]["peers"]]
    assert addresses == ["[::1]:9002"]


def test_delete_a_peer_consul_announces_is_409_naming_the_way_out(admin: Admin) -> None:
    """A peer Consul announces would be back with Consul's next answer: DELETE is a 409
    that names what works (deregister, Consul maintenance, or PUT drain) and changes
    nothing, even when the config lists the peer too."""
    from lb.peer import PeerSpec

    admin.pool.apply("consul", [PeerSpec(Address("127.0.0.1", 9001)),
                                PeerSpec(Address("127.0.0.1", 9060))])
    before = admin.state()
    for address in ("127.0.0.1:9001", "127.0.0.1:9060"):
        status, body, _ = admin.call("DELETE", f"/api/pools/web/peers/{address}")
        assert status == 409, body
        for way_out in ("deregister", "consul maint -enable -service", "admin_state",
                        "drain"):
            assert way_out in body["error"]
    assert admin.state() == before


def test_delete_unknown_peer_or_pool_is_404(admin: Admin) -> None:
    """Deleting what does not exist is 404 with the name in the error."""
    status, body, _ = admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:1")
    assert status == 404 and "127.0.0.1:1" in body["error"]
    status, body, _ = admin.call("DELETE", "/api/pools/zzz/peers/127.0.0.1:1")
    assert status == 404 and "zzz" in body["error"]


# --- reloads ----------------------------------------------------------------------------------


def test_admin_peers_survive_a_reload_but_not_a_restart(admin: Admin) -> None:
    """Peers added and states set through the API are runtime state: LBService.apply of a
    new config (a SIGHUP) keeps them; a new LBService from the same config (a restart)
    does not have them."""
    admin.call("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9030", "weight": 5})
    admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001", {"admin_state": "drain"})
    reloaded = make_config(LISTENERS, pools_config(peers=["127.0.0.1:9001", "127.0.0.1:9004"]))
    admin.root.apply(reloaded)
    pool = admin.call("GET", "/api/pools/web")[1]
    assert [p["address"] for p in pool["peers"]] == [
        "127.0.0.1:9001", "127.0.0.1:9030", "127.0.0.1:9004"]
    added = peer_by_address(pool, "127.0.0.1:9030")
    assert (added["sources"], added["weight"]) == (["admin"], 5)
    assert peer_by_address(pool, "127.0.0.1:9001")["admin_state"] == "drain"
    restarted = LBService(reloaded, MemoryReactorClock())
    assert "127.0.0.1:9030" not in restarted.pool("web").peers


def test_a_reload_brings_back_a_deleted_static_peer(admin: Admin) -> None:
    """DELETE removes a static peer until the next reload (HAProxy's ``del server``): a
    reload of a config that still lists it brings it back (ready, source static), even
    when nothing in the pool's section changed; one that no longer lists it leaves it
    out."""
    assert admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:9001")[0] == 202
    assert admin.call("DELETE", "/api/pools/web/peers/%5B%3A%3A1%5D%3A9002")[0] == 202
    assert admin.call("GET", "/api/pools/web")[1]["peers"] == []
    admin.root.apply(admin.make_config())
    pool = admin.call("GET", "/api/pools/web")[1]
    assert [(p["address"], p["sources"], p["admin_state"]) for p in pool["peers"]] == [
        ("127.0.0.1:9001", ["static"], "ready"), ("[::1]:9002", ["static"], "ready")]
    assert admin.call("DELETE", "/api/pools/web/peers/127.0.0.1:9001")[0] == 202
    admin.root.apply(make_config(LISTENERS, pools_config(peers=["[::1]:9002"])))
    addresses = [p["address"] for p in admin.call("GET", "/api/pools/web")[1]["peers"]]
    assert addresses == ["[::1]:9002"]


# --- protection -------------------------------------------------------------------------------


@pytest.fixture
def secured(tmp_path: Any) -> Admin:
    return Admin(tmp_path, token="s3cret-token")


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9040"}),
    ("PUT", "/api/pools/web/peers/127.0.0.1:9001", {"admin_state": "drain"}),
    ("DELETE", "/api/pools/web/peers/127.0.0.1:9001", None),
])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer s3cret-toke",
                                           "Basic s3cret-token", "s3cret-token"])
def test_changes_need_the_bearer_token(secured: Admin, method: str, path: str, body: Any,
                                       authorization: Optional[str]) -> None:
    """With admin.token_file set, a change without the exact bearer token is 401 with a
    WWW-Authenticate challenge, and nothing changes."""
    before = secured.state()
    headers = {"Authorization": authorization} if authorization else {}
    status, answer, response_headers = secured.call(method, path, body, headers=headers)
    assert status == 401 and "token" in answer["error"]
    assert response_headers.getRawHeaders("www-authenticate")[0].startswith("Bearer")
    assert secured.state() == before


def test_token_allows_changes_and_reads_stay_open(secured: Admin) -> None:
    """The right token (whitespace in the file stripped) lets changes through; GETs need
    no token."""
    assert secured.call("GET", "/api/pools")[0] == 200
    assert secured.call("GET", "/api/pools/web/peers/127.0.0.1:9001")[0] == 200
    status, peer, _ = secured.call("PUT", "/api/pools/web/peers/127.0.0.1:9001",
                                   {"admin_state": "drain"},
                                   headers={"Authorization": "Bearer s3cret-token"})
    assert status == 200 and peer["admin_state"] == "drain"


def test_a_reloaded_token_applies_at_once(secured: Admin, tmp_path: Any) -> None:
    """After a reload that changes admin.token_file, the old token stops working and the
    new one works; a reload that drops the token opens changes again."""
    secured.root.apply(secured.make_config("n3w-token"))
    old = {"Authorization": "Bearer s3cret-token"}
    new = {"Authorization": "Bearer n3w-token"}
    path, body = "/api/pools/web/peers/127.0.0.1:9001", {"admin_state": "drain"}
    assert secured.call("PUT", path, body, headers=old)[0] == 401
    assert secured.call("PUT", path, body, headers=new)[0] == 200
    secured.root.apply(secured.make_config(None))
    assert secured.call("PUT", path, {"admin_state": "ready"})[0] == 200


def test_cross_site_changes_are_refused(admin: Admin) -> None:
    """A browser request from another origin (CSRF) is 403; one from this page passes."""
    before = admin.state()
    status, body, _ = admin.call("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9050"},
                                 headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in body["error"]
    assert admin.state() == before
    status, _, _ = admin.call("POST", "/api/pools/web/peers", {"address": "127.0.0.1:9050"},
                              headers={"Origin": BASE})
    assert status == 201


def test_bodies_over_64_kib_are_refused(admin: Admin) -> None:
    """A body above 64 KiB is 413 even when it is valid JSON; just under passes on to
    validation."""
    before = admin.state()
    padding = " " * (MAX_BODY + 1 - len(b'{"admin_state": "drain"}'))
    big = ('{"admin_state": "drain"}' + padding).encode()
    assert len(big) == MAX_BODY + 1
    status, body, _ = admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001", raw=big)
    assert status == 413 and "65536" in body["error"]
    assert admin.state() == before
    status, _, _ = admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001", raw=big[:-1])
    assert status == 200


def test_bodies_without_a_length_are_measured() -> None:
    """A body of unknown length (chunked: no Content-Length) over 64 KiB is refused by its
    size, without reading it."""
    import io

    from twisted.web.test.requesthelper import DummyRequest

    from lb.admin.api import ApiError, read_json

    class Unread(io.BytesIO):
        def read(self, size: Any = -1) -> bytes:
            raise AssertionError("a body over the limit was read")

    request = DummyRequest([b""])
    request.content = Unread(b'{"admin_state": "drain"}' + b" " * MAX_BODY)
    with pytest.raises(ApiError) as refused:
        read_json(request)
    assert refused.value.status == 413
    request.content = io.BytesIO(b'{"admin_state": "drain"}')
    assert read_json(request) == {"admin_state": "drain"}


def test_wrong_method_is_405_with_allow(admin: Admin) -> None:
    """A route with the wrong method answers 405 JSON listing the allowed methods."""
    status, body, headers = admin.call("DELETE", "/api/pools/web")
    assert status == 405 and "DELETE" in body["error"]
    assert headers.getRawHeaders("allow") == ["GET, HEAD"]
    status, _, headers = admin.call("PATCH", "/api/pools/web/peers/127.0.0.1:9001", {})
    assert status == 405 and headers.getRawHeaders("allow") == ["GET, HEAD, PUT, DELETE"]


@pytest.mark.parametrize("path", ["/api/pool", "/api/pools/web/peerz",
                                  "/api/pools/web/peers/127.0.0.1:9001/x", "/nothing"])
def test_unknown_paths_are_404_json(admin: Admin, path: str) -> None:
    """Unknown paths answer a JSON 404 like every other error."""
    status, body, _ = admin.call("GET", path)
    assert status == 404 and "no such" in body["error"]


def test_index_and_pretty_output(admin: Admin) -> None:
    """GET /api names the endpoints; ?pretty=1 indents the JSON for people with curl."""
    status, body, _ = admin.call("GET", "/api")
    assert status == 200 and body["pools"] == "/api/pools"
    assert body["auth_required_for_changes"] is False
    results: list = []
    d = admin.stub.get(BASE + "/api/pools/api?pretty=1")
    d.addCallback(lambda r: r.text()).addCallback(results.append)
    admin.stub.flush()
    assert results[0].startswith('{\n  "name": "api"')


def test_address_is_used_as_given_by_the_pool(admin: Admin) -> None:
    """The peer added through the API is the Address the pool keys by (host and port)."""
    admin.call("POST", "/api/pools/api/peers", {"address": "backend.internal:8080"})
    assert admin.root.pool("api").get("backend.internal:8080").address == Address(
        "backend.internal", 8080)


def test_an_internal_error_is_a_logged_json_500(admin: Admin, monkeypatch: Any) -> None:
    """A bug behind an endpoint answers a JSON 500 (not Twisted's HTML page) and is logged."""
    from twisted.logger import globalLogPublisher

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(admin.pool, "set_weight", broken)
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        status, body, _ = admin.call("PUT", "/api/pools/web/peers/127.0.0.1:9001",
                                     {"weight": 2})
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert status == 500 and "internal error" in body["error"]
    assert any(e.get("log_failure") is not None and "boom" in str(e["log_failure"].value)
               for e in logged)
