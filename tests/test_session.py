"""A session's life in memory, with a fake front, dial and carrier and a real pool on a Clock:
pick → connect/retry → join → end, the counters and pool reports it makes once, and the end
reason it decides from its carrier's raw facts (the same for every carrier)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from lb.discovery import static
from lb.pool import Pool
from lb.proxy.session import Session
from lb.testing import FakeFront, FakeListener, make_config

CLIENT = IPv4Address("TCP", "192.0.2.7", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 8080)


def setup(**pool: Any) -> Tuple[Session, FakeListener, Pool, Clock]:
    pool_cfg: Dict[str, Any] = {"peers": ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]}
    pool_cfg.update(pool)
    config = make_config({"l": {"bind": "127.0.0.1:8080", "pool": "p"}}, {"p": pool_cfg})
    clock = Clock()
    p = Pool(config.pools["p"], clock)
    static.apply(p, config.pools["p"])
    listener = FakeListener(p, clock)
    session = Session(listener, FakeFront(), CLIENT, LOCAL, clock.seconds())
    return session, listener, p, clock


def loads(pool: Pool) -> Dict[str, Tuple[int, int]]:
    return {k: (p.active_connections, p.load) for k, p in pool.peers.items()}


def test_connects_the_first_peer_and_counts_the_opening_once() -> None:
    """The first pick is dialled with the opening (what the client sent so far); once
    connected those bytes count as client → peer bytes for the session and the peer, the
    pool and listener hear of the connection, and a carrier joins the two sides."""
    session, listener, pool, clock = setup()
    session.start(b"hello")
    assert [(str(a), first) for a, _, first in listener.dial.dials] == [("10.0.0.1:80",
                                                                         b"hello")]
    assert loads(pool)["10.0.0.1:80"] == (1, 1)  # counted from pick time
    listener.dial.connect("sock", b"")
    peer = pool.peers["10.0.0.1:80"]
    assert session.peer is peer and (session.bytes_in, peer.bytes_in) == (5, 5)
    assert peer.total_connections == 1 and listener.connected == [peer]
    assert listener.carriers[0].channel == "sock"


def test_send_proxy_header_goes_before_the_clients_bytes() -> None:
    """With send_proxy the opening starts with a PROXY header carrying the client's
    address; only the client's bytes are counted."""
    session, listener, pool, clock = setup(send_proxy="v1")
    session.start(b"data")
    assert listener.dial.dials[0][2] == b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8080\r\ndata"
    listener.dial.connect()
    assert session.bytes_in == 4


def test_a_failed_connect_is_reported_and_the_next_peer_tried() -> None:
    """A refused connect is a failed passive check of that peer and releases it; the next
    pick never repeats a peer already tried."""
    session, listener, pool, clock = setup()
    session.start()
    listener.dial.fail(error.ConnectionRefusedError())
    first = pool.peers["10.0.0.1:80"]
    assert first.connect_failures == 1 and loads(pool)["10.0.0.1:80"] == (0, 0)
    assert [str(a) for a, _, _ in listener.dial.dials] == ["10.0.0.1:80", "10.0.0.2:80"]
    listener.dial.connect()
    assert session.peer is pool.peers["10.0.0.2:80"]


def test_every_peer_failing_ends_connect_failed_with_the_reasons() -> None:
    """retries: 2 → three peers tried; then the client is closed, the session ends once as
    connect_failed, and the log's failures name each peer and why."""
    session, listener, pool, clock = setup(retries=2, connect_timeout="750ms")
    session.start()
    listener.dial.fail(error.ConnectionRefusedError())
    listener.dial.fail(error.TimeoutError())
    listener.dial.fail(error.ConnectionRefusedError())
    assert session.front.closed
    assert listener.ended == [(session, "connect_failed")]
    assert session.failures == ("10.0.0.1:80: connection refused",
                                "10.0.0.2:80: connect timeout after 750ms",
                                "10.0.0.3:80: connection refused")
    assert all(v == (0, 0) for v in loads(pool).values())


def test_no_peer_closes_the_client_at_once() -> None:
    """With no peer that can take it the client is closed and the session ends as no_peer."""
    session, listener, pool, clock = setup(peers=[])
    session.start()
    assert session.front.closed and listener.dial.dials == []
    assert listener.ended == [(session, "no_peer")]


def test_abort_while_connecting_cancels_the_dial_and_releases_the_peer() -> None:
    """Cut while connecting (idle sweep, shutdown): the dial is cancelled, the peer's load
    is released, the client reset, and the session ends once with the reason given."""
    session, listener, pool, clock = setup()
    session.start()
    session.abort("shutdown")
    assert listener.dial.cancelled and session.front.aborted
    assert all(v == (0, 0) for v in loads(pool).values())
    assert listener.ended == [(session, "shutdown")]
    session.abort("shutdown")
    assert len(listener.ended) == 1


def test_a_client_gone_while_connecting_cancels_the_dial() -> None:
    """The front reports the client gone before the join: the dial is cancelled and the
    session ends as client_reset."""
    session, listener, pool, clock = setup()
    session.start()
    session.front_closed(reset=True)
    assert listener.dial.cancelled
    assert listener.ended == [(session, "client_reset")]
    assert all(v == (0, 0) for v in loads(pool).values())


@pytest.mark.parametrize("fact,reason", [
    (("done", None, True, False), "closed"),
    (("reset", "client", True, False), "closed"),  # reset after its whole answer: normal
    (("reset", "client", True, True), "client_reset"),  # its own bytes still undelivered
    (("reset", "client", False, False), "client_reset"),
    (("error", "client", False, False), "client_error"),
    (("reset", "peer", False, False), "peer_reset"),
    (("reset", "peer", True, False), "peer_reset"),
    (("error", "peer", False, False), "peer_error"),
    (("error", None, False, False), "error"),
])
def test_the_carriers_facts_decide_the_end_reason(fact: tuple, reason: str) -> None:
    """Every carrier reports raw facts; the session alone turns them into the end reason
    (the pump and the transports once disagreed on a client reset after its answer)."""
    session, listener, pool, clock = setup()
    session.start()
    listener.dial.connect()
    session.carrier_closed(*fact)
    assert listener.ended == [(session, reason)]


def test_an_abort_keeps_its_reason_and_the_pool_hears_the_end_once() -> None:
    """abort(reason) asks the carrier to cut both sides; the carrier's "aborted" fact ends
    the session with that reason, and the peer's counters drop back exactly once."""
    session, listener, pool, clock = setup()
    session.start()
    listener.dial.connect()
    peer = session.peer
    session.moved_in(10)
    session.moved_out(20)
    session.abort("idle_timeout")
    assert listener.carriers[0].aborted
    assert listener.ended == [(session, "idle_timeout")]
    assert (peer.active_connections, peer.load, peer.bytes_in, peer.bytes_out) == (0, 0, 10, 20)
    session.carrier_closed("reset", "peer", False, False)  # a late second report
    assert len(listener.ended) == 1 and peer.active_connections == 0


def test_a_fin_makes_the_session_half_closed() -> None:
    """A FIN from either side (reported by the carrier) puts the session under fin_timeout."""
    session, listener, pool, clock = setup()
    session.start()
    listener.dial.connect()
    assert not session.half_closed
    session.fin_received()
    assert session.half_closed


def test_a_bug_while_starting_ends_this_client_as_error() -> None:
    """An exception while a session starts (here the balancer breaks) closes that client
    and ends it as error; nothing is left counted."""
    session, listener, pool, clock = setup()

    def broken(*args: Any) -> Any:
        raise RuntimeError("balancer bug")
    pool.pick = broken  # type: ignore[method-assign]
    session.start()
    assert session.front.aborted and listener.ended == [(session, "error")]


def test_the_log_line_fields() -> None:
    """describe() gives what the connection log line shows: client, listener, pool, peer,
    bytes each way, duration, end and failures."""
    session, listener, pool, clock = setup()
    session.start()
    listener.dial.fail(error.ConnectionRefusedError())
    listener.dial.connect()
    clock.advance(1.5)
    session.moved_in(3)
    info = session.describe("closed")
    assert info == {"client": "192.0.2.7:40000", "listener": "l", "pool": "p",
                    "peer": "10.0.0.2:80", "bytes_in": 3, "bytes_out": 0, "duration": 1.5,
                    "end": "closed", "failures": "10.0.0.1:80: connection refused"}
