"""The pool as single source of truth: source diffs, drain and removal, eligibility."""

from typing import Any, List, Tuple

import pytest
from twisted.internet.task import Clock

from lb.config import parse_address
from lb.peer import PeerSpec
from lb.pool import Pool, PoolError
from lb.testing import make_config


def make_pool(**pool: Any) -> Tuple[Pool, Clock, List[Tuple[str, str]]]:
    config = make_config({"l": {"bind": "127.0.0.1:1", "pool": "p"}}, {"p": pool})
    clock = Clock()
    p = Pool(config.pools["p"], clock)
    events: List[Tuple[str, str]] = []
    p.subscribe(lambda pool, peer, event: events.append((event, peer.key)))
    return p, clock, events


def spec(text: str, weight: int = 1, state: str = "ready") -> PeerSpec:
    return PeerSpec(parse_address(text), weight, state)


def eligible(pool: Pool) -> set:
    return {p.key for p in pool._in_balancer}


def picks(pool: Pool, n: int) -> List[str]:
    return [pool.pick().key for _ in range(n)]


def test_apply_adds_and_removes_per_source() -> None:
    """Each source's set is diffed on its own: peers another source still wants stay."""
    pool, clock, events = make_pool()
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    pool.apply("consul", [spec("10.0.0.2:80"), spec("10.0.0.3:80")])
    assert set(pool.peers) == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
    assert pool.peers["10.0.0.2:80"].sources == ["static", "consul"]
    pool.apply("consul", [spec("10.0.0.3:80")])
    assert set(pool.peers) == {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}
    assert pool.peers["10.0.0.2:80"].sources == ["static"]
    pool.apply("static", [])
    assert set(pool.peers) == {"10.0.0.3:80"}
    assert ("removed", "10.0.0.1:80") in events


def test_disappearing_peer_with_connections_drains_until_idle() -> None:
    """A peer no source wants takes no new connections, keeps its open ones, and is removed
    when the last one ends."""
    pool, clock, events = make_pool()
    pool.apply("consul", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    peer = pool.peers["10.0.0.1:80"]
    conn = object()
    pool.connection_started(peer, conn)
    pool.apply("consul", [spec("10.0.0.2:80")])
    assert peer.admin_state == "drain" and "10.0.0.1:80" in pool.peers
    assert eligible(pool) == {"10.0.0.2:80"}
    pool.connection_ended(peer, conn)
    assert "10.0.0.1:80" not in pool.peers
    assert ("removed", "10.0.0.1:80") in events


def test_draining_peer_is_removed_after_drain_timeout_without_cutting() -> None:
    """After drain_timeout a still-busy removed peer leaves the pool; its connections are
    not cut by discovery."""
    pool, clock, events = make_pool(drain_timeout="10s")
    pool.apply("consul", [spec("10.0.0.1:80")])
    peer = pool.peers["10.0.0.1:80"]

    class Conn:
        aborted = False

        def abort(self, reason: str) -> None:
            self.aborted = True
    conn = Conn()
    pool.connection_started(peer, conn)
    pool.apply("consul", [])
    clock.advance(9.9)
    assert "10.0.0.1:80" in pool.peers
    clock.advance(0.2)
    assert "10.0.0.1:80" not in pool.peers
    assert not conn.aborted


def test_reannounced_peer_keeps_health_and_counters() -> None:
    """A peer that comes back before it is removed is the same peer: health, counters and
    its rise progress are kept."""
    pool, clock, events = make_pool(health={"rise": 3, "fall": 2})
    pool.apply("consul", [spec("10.0.0.1:80")])
    peer = pool.peers["10.0.0.1:80"]
    pool.report_check(peer, True, "HTTP 200")
    peer.total_connections = 7
    conn = object()
    pool.connection_started(peer, conn)
    pool.apply("consul", [])
    pool.apply("consul", [spec("10.0.0.1:80", weight=4)])
    assert pool.peers["10.0.0.1:80"] is peer
    assert peer.health == "up" and peer.total_connections == 7 and peer.weight == 4
    assert peer.admin_state == "ready" and not peer.removing


def test_source_drain_state_and_operator_state_combine() -> None:
    """The most restrictive of the operator's and every source's wish wins."""
    pool, clock, events = make_pool()
    pool.apply("consul", [spec("10.0.0.1:80", state="drain")])
    peer = pool.peers["10.0.0.1:80"]
    assert peer.admin_state == "drain" and eligible(pool) == set()
    pool.apply("consul", [spec("10.0.0.1:80")])
    assert peer.admin_state == "ready" and eligible(pool) == {"10.0.0.1:80"}
    pool.set_admin_state(peer.key, "maint")
    pool.apply("consul", [spec("10.0.0.1:80")])
    assert peer.admin_state == "maint"


def test_weight_zero_takes_no_new_connections() -> None:
    """Weight 0 behaves like drain for new connections."""
    pool, clock, events = make_pool()
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    pool.set_weight("10.0.0.1:80", 0)
    assert set(picks(pool, 10)) == {"10.0.0.2:80"}


def test_weight_priority_operator_then_static_then_consul() -> None:
    """When several sources give a weight, an operator's beats the config's beats Consul's."""
    pool, clock, events = make_pool()
    pool.apply("consul", [spec("10.0.0.1:80", weight=5)])
    peer = pool.peers["10.0.0.1:80"]
    assert peer.weight == 5
    pool.apply("static", [spec("10.0.0.1:80", weight=2)])
    assert peer.weight == 2
    pool.set_weight(peer.key, 9)
    assert peer.weight == 9


def test_unknown_peers_get_traffic_only_when_none_is_up() -> None:
    """With checks on, new peers are unknown; they take traffic only while no peer is up."""
    pool, clock, events = make_pool(health={})
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    assert {p.health for p in pool.peers.values()} == {"unknown"}
    assert eligible(pool) == {"10.0.0.1:80", "10.0.0.2:80"}
    pool.report_check(pool.peers["10.0.0.2:80"], True, "HTTP 200")
    assert eligible(pool) == {"10.0.0.2:80"}
    for _ in range(3):
        pool.report_check(pool.peers["10.0.0.2:80"], False, "HTTP 503")
    assert pool.peers["10.0.0.2:80"].health == "down"
    assert eligible(pool) == {"10.0.0.1:80"}


def test_passive_failures_mark_down_and_only_probes_bring_back() -> None:
    """fall consecutive failed client connects take a peer out; a successful connect
    neither brings a down peer back (only a probe does) nor resets an up peer's count."""
    pool, clock, events = make_pool()
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    peer = pool.peers["10.0.0.1:80"]
    for _ in range(2):
        pool.connection_started(peer, "c")
        pool.connection_failed(peer, "c", "connection refused")
    pool.connection_started(peer, "c")
    pool.connection_established(peer)  # client traffic never counts as a pass
    pool.connection_ended(peer, "c")
    assert peer.health == "up"
    pool.connection_started(peer, "c")
    pool.connection_failed(peer, "c", "connection refused")
    assert peer.health == "down" and eligible(pool) == {"10.0.0.2:80"}
    assert peer.last_check is None  # passive results are not probe results
    pool.connection_started(peer, "c")
    pool.connection_established(peer)
    assert peer.health == "down"
    pool.report_check(peer, True, "connected")
    pool.report_check(peer, True, "connected")
    assert peer.health == "up"


def test_client_traffic_never_undoes_active_check_failures() -> None:
    """A busy peer whose active check fails `fall` times in a row goes down, however many
    clients connected to it successfully between the probes (the defect: every client
    connect was counted as a passing check and reset the fall count)."""
    pool, clock, events = make_pool(health={"type": "http", "fall": 2, "rise": 2})
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    peer = pool.peers["10.0.0.1:80"]
    pool.report_check(peer, True, "HTTP 200")
    assert peer.health == "up"
    for probe in range(2):
        pool.report_check(peer, False, "HTTP 503")
        for i in range(50):  # steady client load between two probes
            conn = (probe, i)
            pool.connection_started(peer, conn)
            pool.connection_established(peer)
            pool.connection_ended(peer, conn)
    assert peer.health == "down"
    assert eligible(pool) == {"10.0.0.2:80"}  # unknown, so eligible once none is up
    assert peer.total_connections == 100


def test_admin_add_and_remove() -> None:
    """Admin adds are their own source; adding one twice is a 409; removing an idle one
    takes it out at once."""
    pool, clock, events = make_pool()
    pool.apply("static", [spec("10.0.0.1:80")])
    added = pool.add_peer(parse_address("10.0.0.9:80"), 3)
    assert added.sources == ["admin"] and added.weight == 3
    with pytest.raises(PoolError) as info:
        pool.add_peer(parse_address("10.0.0.9:80"))
    assert info.value.status == 409
    pool.remove_peer("10.0.0.9:80")
    assert "10.0.0.9:80" not in pool.peers
    with pytest.raises(PoolError) as info:
        pool.get("10.0.0.9:80")
    assert info.value.status == 404


def test_remove_peer_drains_a_static_peer_until_the_next_apply() -> None:
    """Removing a static peer (HAProxy's ``del server``) drains it: no new connections,
    the open one keeps going, and it leaves after drain_timeout; the static source's set
    no longer has it until the config is applied again, which brings it back."""
    pool, clock, events = make_pool(drain_timeout="10s")
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    peer = pool.peers["10.0.0.1:80"]
    pool.connection_started(peer, object())
    assert pool.remove_peer("10.0.0.1:80") is peer
    assert (peer.removing, peer.admin_state, peer.sources) == (True, "drain", [])
    assert eligible(pool) == {"10.0.0.2:80"}
    assert [str(s.address) for s in pool.wanted_by("static")] == ["10.0.0.2:80"]
    clock.advance(9.9)
    assert "10.0.0.1:80" in pool.peers
    clock.advance(0.2)
    assert "10.0.0.1:80" not in pool.peers and ("removed", "10.0.0.1:80") in events
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    assert pool.peers["10.0.0.1:80"].sources == ["static"]
    assert eligible(pool) == {"10.0.0.1:80", "10.0.0.2:80"}


def test_remove_peer_drops_the_static_and_admin_wants_together() -> None:
    """A peer both the config and an operator want loses both wants: nothing is left
    that keeps it, so it goes (at once when idle) and no source lists it any more."""
    pool, clock, events = make_pool()
    pool.apply("static", [spec("10.0.0.1:80", weight=2)])
    pool.add_peer(parse_address("10.0.0.1:80"), 5)
    assert pool.peers["10.0.0.1:80"].sources == ["admin", "static"]
    pool.remove_peer("10.0.0.1:80")
    assert "10.0.0.1:80" not in pool.peers
    assert pool.wanted_by("static") == [] and pool.wanted_by("admin") == []


def test_a_removed_peer_brought_back_before_it_left_stays() -> None:
    """A reload listing a draining removed static peer again keeps it: ready, its
    counters kept, and the pending removal cancelled."""
    pool, clock, events = make_pool(drain_timeout="10s")
    pool.apply("static", [spec("10.0.0.1:80")])
    peer = pool.peers["10.0.0.1:80"]
    peer.total_connections = 3
    pool.connection_started(peer, object())
    pool.remove_peer("10.0.0.1:80")
    pool.apply("static", [spec("10.0.0.1:80")])
    clock.advance(11)
    assert pool.peers["10.0.0.1:80"] is peer
    assert (peer.removing, peer.admin_state, peer.total_connections) == (False, "ready", 3)


@pytest.mark.parametrize("sources", [["consul"], ["static", "consul"],
                                     ["static", "consul", "admin"]])
def test_remove_peer_of_a_consul_peer_is_409_naming_the_way_out(sources: List[str]) -> None:
    """A peer Consul announces would come back with Consul's next answer: removing it is
    a 409 that says what works (deregister or maintenance in Consul, or drain here), and
    nothing changes, not even the other sources' wants."""
    pool, clock, events = make_pool()
    for source in sources:
        pool.apply(source, [spec("10.0.0.1:80")])
    peer = pool.peers["10.0.0.1:80"]
    events.clear()
    with pytest.raises(PoolError) as info:
        pool.remove_peer("10.0.0.1:80")
    message = str(info.value)
    assert info.value.status == 409
    for way_out in ("Consul", "deregister", "consul maint -enable -service",
                    '"admin_state": "drain"'):
        assert way_out in message, message
    assert sorted(peer.sources) == sorted(sources) and not peer.removing
    assert peer.admin_state == "ready" and eligible(pool) == {"10.0.0.1:80"}
    assert events == []


def test_removing_a_removed_peer_keeps_its_deadline() -> None:
    """A second removal of a peer already on its way out changes nothing: it still
    leaves when the first drain_timeout ends."""
    pool, clock, events = make_pool(drain_timeout="10s")
    pool.apply("static", [spec("10.0.0.1:80")])
    peer = pool.peers["10.0.0.1:80"]
    pool.connection_started(peer, object())
    pool.remove_peer("10.0.0.1:80")
    clock.advance(6)
    assert pool.remove_peer("10.0.0.1:80") is peer
    clock.advance(4.1)
    assert "10.0.0.1:80" not in pool.peers


def test_reconfigure_balance_keeps_eligible_peers() -> None:
    """Changing the algorithm on reload rebuilds the balancer with the same peers."""
    pool, clock, events = make_pool(balance="roundrobin")
    pool.apply("static", [spec("10.0.0.1:80"), spec("10.0.0.2:80")])
    new = make_config({"l": {"bind": "127.0.0.1:1", "pool": "p"}},
                      {"p": {"balance": "leastconn"}}).pools["p"]
    pool.reconfigure(new)
    assert type(pool.balancer).__module__ == "lb.balancer.leastconn"
    assert set(picks(pool, 4)) == {"10.0.0.1:80", "10.0.0.2:80"}


def test_stop_cancels_timers() -> None:
    """Stopping the pool leaves nothing scheduled on its clock."""
    pool, clock, events = make_pool(slow_start="10s", drain_timeout="30s")
    pool.apply("static", [spec("10.0.0.1:80")])
    peer = pool.peers["10.0.0.1:80"]
    pool.connection_started(peer, "c")
    pool.apply("static", [])
    assert clock.getDelayedCalls()
    pool.stop()
    assert clock.getDelayedCalls() == []
