"""Sessions on the transports carrier, in memory: MemoryReactorClock for connects and time,
fake transports (the path for PROXY headers, host-name peers and reactors without a pump)."""

from typing import Any, Dict, List, Tuple

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from lb.pool import Pool
from lb.proxy.listener import Listener
from lb.testing import FakeTCPTransport, make_config

CLIENT = IPv4Address("TCP", "127.0.0.5", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 8080)


def build(listener: Dict[str, Any] = None, pool: Dict[str, Any] = None,
          ) -> Tuple[MemoryReactorClock, Listener, Pool]:
    pool_cfg = {"peers": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]}
    pool_cfg.update(pool or {})
    listener_cfg = {"bind": "127.0.0.1:8080", "pool": "p"}
    listener_cfg.update(listener or {})
    config = make_config({"l": listener_cfg}, {"p": pool_cfg})
    reactor = MemoryReactorClock()
    p = Pool(config.pools["p"], reactor)
    from lb.discovery import static
    static.apply(p, config.pools["p"])
    return reactor, Listener(config.listeners["l"], p, reactor), p  # no pump: transports


def accept(listener: Listener, client: Any = CLIENT) -> Tuple[Any, FakeTCPTransport]:
    frontend = listener.buildProtocol(client)
    assert frontend is not None
    transport = FakeTCPTransport(hostAddress=LOCAL, peerAddress=client)
    frontend.makeConnection(transport)
    return frontend, transport


def finish_connect(reactor: MemoryReactorClock, index: int = -1) -> FakeTCPTransport:
    host, port, factory, timeout, _ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = FakeTCPTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return transport


def fail_connect(reactor: MemoryReactorClock, exc: Exception, index: int = -1) -> None:
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(reactor.connectors[index], Failure(exc))


def connected_pair(**kw: Any) -> Tuple[MemoryReactorClock, Listener, Pool, Any,
                                       FakeTCPTransport, FakeTCPTransport]:
    reactor, listener, pool = build(**kw)
    frontend, client = accept(listener)
    peer_transport = finish_connect(reactor)
    return reactor, listener, pool, frontend, client, peer_transport


def test_client_paused_until_peer_connects() -> None:
    """A new client is not read from until its peer is connected; the connect uses the
    pool's connect_timeout; then reading resumes and producers are registered both ways."""
    reactor, listener, pool = build(pool={"connect_timeout": "750ms"})
    frontend, client = accept(listener)
    assert client.producerState == "paused"
    assert len(reactor.tcpClients) == 1
    host, port, _, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 9001, 0.75)
    peer_transport = finish_connect(reactor)
    assert client.producerState == "producing"
    assert peer_transport.producer is client  # client is throttled by the peer's buffer
    assert client.producer is peer_transport  # and the peer by the client's
    assert client.no_delay and peer_transport.no_delay


def test_bytes_flow_both_ways_and_are_counted() -> None:
    """Bytes pass unchanged in both directions and land in the peer's and the session's
    counters (bytes_in = client → peer)."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.dataReceived(b"hello ")
    frontend.dataReceived(b"peer")
    assert peer_t.value() == b"hello peer"
    frontend.join.peer.dataReceived(b"hi client")
    assert client.value() == b"hi client"
    peer = pool.peers["127.0.0.1:9001"]
    assert (peer.bytes_in, peer.bytes_out) == (10, 9)
    assert (frontend.session.bytes_in, frontend.session.bytes_out) == (10, 9)


def test_connect_failure_retries_next_peer_then_gives_up() -> None:
    """A refused connect is retried on another peer (retries: 2 → three peers tried), each
    failure counts as a passive check failure, and then the client is closed."""
    reactor, listener, pool = build()
    frontend, client = accept(listener)
    for i in range(3):
        assert len(reactor.tcpClients) == i + 1
        fail_connect(reactor, error.ConnectionRefusedError())
    tried = {(h, p) for h, p, *_ in reactor.tcpClients}
    assert tried == {("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003)}
    assert client.disconnecting
    assert frontend.session.end_reason == "connect_failed"
    assert all(p.connect_failures == 1 for p in pool.peers.values())
    assert all(p.active_connections == 0 for p in pool.peers.values())


def test_retry_succeeds_on_second_peer() -> None:
    """After one refused connect the client is served by the next peer without error."""
    reactor, listener, pool = build()
    frontend, client = accept(listener)
    fail_connect(reactor, error.ConnectionRefusedError())
    peer_t = finish_connect(reactor)
    frontend.dataReceived(b"x")
    assert peer_t.value() == b"x"
    assert not client.disconnecting
    assert frontend.session.peer.key == "127.0.0.1:9002"


def test_retries_zero_means_one_attempt() -> None:
    """retries: 0 gives up after the first failed connect."""
    reactor, listener, pool = build(pool={"retries": 0})
    frontend, client = accept(listener)
    fail_connect(reactor, error.TimeoutError())
    assert len(reactor.tcpClients) == 1
    assert client.disconnecting
    assert "connect timeout after 2s" in frontend.session.failures[0]


def test_no_peer_closes_client_at_once_and_counts() -> None:
    """With no eligible peer the client is closed immediately and lb_no_peer is counted."""
    reactor, listener, pool = build(pool={"peers": []})
    frontend, client = accept(listener)
    assert client.disconnecting
    assert reactor.tcpClients == []
    assert listener.no_peer == 1
    assert frontend.session.end_reason == "no_peer"


def test_half_close_from_client_is_forwarded() -> None:
    """The client's FIN becomes a write shutdown towards the peer, and the peer's reply
    still reaches the client."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.dataReceived(b"request")
    frontend.readConnectionLost()
    assert peer_t.write_closed
    assert not peer_t.disconnecting
    frontend.join.peer.dataReceived(b"reply")
    assert client.value() == b"reply"
    frontend.join.peer.readConnectionLost()
    assert client.write_closed


def test_half_close_from_peer_is_forwarded() -> None:
    """The peer's FIN becomes a write shutdown towards the client while the client may
    still send."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.join.peer.readConnectionLost()
    assert client.write_closed and not client.disconnecting
    frontend.dataReceived(b"more")
    assert peer_t.value() == b"more"


def test_both_halves_closed_closes_both_sockets() -> None:
    """Once each side has both sent and received FIN its socket is closed."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.readConnectionLost()
    frontend.join.peer.writeConnectionLost()
    frontend.join.peer.readConnectionLost()
    frontend.writeConnectionLost()
    assert client.disconnecting and peer_t.disconnecting


def test_idle_timeout_cuts_both_sides() -> None:
    """No bytes either way for idle_timeout closes both sides; traffic resets the timer."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair(
        listener={"idle_timeout": "10s"})
    reactor.advance(8)
    frontend.dataReceived(b"x")  # activity at t=8
    reactor.advance(8)
    assert not client.disconnected
    reactor.advance(2.5)
    assert client.disconnected and peer_t.disconnected
    assert frontend.session.end_reason == "idle_timeout"


def test_idle_sweep_is_one_timer_that_stops_with_the_last_connection() -> None:
    """Idle connections are found by one sweep per listener (every tenth of the timeout, at
    most 1 s), not a timer per connection; it stops once no connection is open, so nothing
    is left in the reactor."""
    reactor, listener, pool, first, client1, peer1 = connected_pair(
        listener={"idle_timeout": "2s"})
    second, client2 = accept(listener)
    finish_connect(reactor)
    assert len(reactor.getDelayedCalls()) == 1
    assert reactor.getDelayedCalls()[0].getTime() == pytest.approx(0.2)
    reactor.advance(1.0)
    second.dataReceived(b"x")  # activity at t=1
    reactor.pump([0.2] * 6)  # t=2.2: the first has been idle for 2 s, the second has not
    assert client1.disconnected and not client2.disconnected
    reactor.pump([0.2] * 5)  # t=3.2
    assert client2.disconnected
    assert first.session.end_reason == second.session.end_reason == "idle_timeout"
    for frontend in (first, second):  # both transports report the close
        frontend.connectionLost(Failure(error.ConnectionDone()))
        frontend.join.peer.connectionLost(Failure(error.ConnectionDone()))
    assert not listener.sessions
    reactor.advance(0.2)
    assert reactor.getDelayedCalls() == []


def test_max_connections_refuses_excess_and_counts() -> None:
    """Beyond max_connections new clients are refused at once and counted by reason."""
    reactor, listener, pool = build(listener={"max_connections": 2})
    accept(listener)
    accept(listener)
    assert listener.buildProtocol(CLIENT) is None
    assert listener.refused["max_connections"] == 1


def test_allow_list_refuses_other_sources() -> None:
    """Clients outside the allow CIDRs are refused and counted; inside are served."""
    reactor, listener, pool = build(listener={"allow": ["10.0.0.0/8", "127.0.0.0/24"]})
    assert listener.buildProtocol(IPv4Address("TCP", "192.168.3.4", 1000)) is None
    assert listener.refused["allow"] == 1
    assert listener.buildProtocol(IPv4Address("TCP", "10.1.2.3", 1000)) is not None


def test_session_end_updates_counters_and_logs_once() -> None:
    """When both sockets are gone the session ends once: active counts drop, the pool's
    per-peer active counter returns to zero, and one log line says client, listener, peer,
    bytes each way, duration and how it ended (emitted with the next batch)."""
    from twisted.logger import globalLogPublisher
    events: List[Any] = []
    globalLogPublisher.addObserver(events.append)
    self_cleanup = lambda: globalLogPublisher.removeObserver(events.append)  # noqa: E731
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.dataReceived(b"12345")
    frontend.join.peer.dataReceived(b"123")
    peer = frontend.session.peer
    assert peer.active_connections == 1 and len(listener.sessions) == 1
    frontend.join.peer.connectionLost(Failure(error.ConnectionDone()))
    frontend.connectionLost(Failure(error.ConnectionDone()))
    assert peer.active_connections == 0
    assert listener.sessions == set()
    assert listener.ended["closed"] == 1
    assert peer.total_connections == 1
    frontend.connectionLost(Failure(error.ConnectionDone()))  # a second report changes nothing
    assert listener.ended["closed"] == 1
    reactor.advance(1)
    self_cleanup()
    lines = [e["lines"] for e in events if e.get("log_namespace") == "lb.connection"]
    assert len(lines) == 1 and lines[0].count("\n") == 0
    assert lines[0].startswith("127.0.0.5:40000 -> l -> 127.0.0.1:9001: in=5 out=3 duration=")
    assert lines[0].endswith(" end=closed")


def test_peer_reset_closes_client_and_is_counted() -> None:
    """A peer that resets mid-stream: the client is closed after what was received is
    flushed, and the end is counted as peer_reset."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.join.peer.dataReceived(b"partial")
    frontend.join.peer.connectionLost(Failure(error.ConnectionLost()))
    assert client.disconnecting and client.value() == b"partial"
    frontend.connectionLost(Failure(error.ConnectionDone()))
    assert listener.ended["peer_reset"] == 1


def test_client_reset_aborts_peer() -> None:
    """A client that resets: the peer connection is aborted, not left open."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    frontend.connectionLost(Failure(error.ConnectionLost()))
    assert peer_t.disconnected
    frontend.join.peer.connectionLost(Failure(error.ConnectionAborted()))
    assert listener.ended["client_reset"] == 1


def test_client_gone_while_connecting_cancels_connect() -> None:
    """A client that leaves before the peer answers cancels the connect attempt and frees
    the peer's slot."""
    reactor, listener, pool = build()
    frontend, client = accept(listener)
    peer = frontend.session.attempt.peer  # being dialled
    frontend.connectionLost(Failure(error.ConnectionLost()))
    assert reactor.connectors[0].stoppedConnecting
    assert peer.active_connections == 0
    assert listener.sessions == set()


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8080\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 127, 0, 0, 1])
    + (51000).to_bytes(2, "big") + (8080).to_bytes(2, "big"),
])
def test_accept_proxy_reads_header_split_across_reads(header: bytes) -> None:
    """With accept_proxy the PROXY v1/v2 header may arrive in pieces; the client address
    comes from it and bytes after it go to the peer."""
    reactor, listener, pool = build(listener={"accept_proxy": True})
    frontend, client = accept(listener)
    assert reactor.tcpClients == []
    for i in range(0, len(header), 3):
        frontend.dataReceived(header[i:i + 3])
    frontend.dataReceived(b"payload")
    assert client.producerState == "paused"
    peer_t = finish_connect(reactor)
    assert frontend.session.client.host == "203.0.113.7" and frontend.session.client.port == 51000
    assert peer_t.value() == b"payload"


def test_accept_proxy_garbage_closes_connection() -> None:
    """Bytes that are not a PROXY header end that connection and nothing else."""
    reactor, listener, pool = build(listener={"accept_proxy": True})
    frontend, client = accept(listener)
    frontend.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert client.disconnected and frontend.session.end_reason == "bad_proxy_header"
    assert reactor.tcpClients == []
    other, other_t = accept(listener)
    other.dataReceived(b"PROXY TCP4 1.2.3.4 127.0.0.1 1 2\r\n")
    assert len(reactor.tcpClients) == 1


def test_accept_proxy_oversized_header_is_refused() -> None:
    """A v1 header that never ends is cut once it exceeds the size bound."""
    reactor, listener, pool = build(listener={"accept_proxy": True})
    frontend, client = accept(listener)
    for _ in range(20):
        frontend.dataReceived(b"PROXY TCP4 " + b"1" * 60)
        if client.disconnected:
            break
    assert client.disconnected


@pytest.mark.parametrize("version,expected", [
    ("v1", b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 8080\r\n"),
    ("v2", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([127, 0, 0, 5, 127, 0, 0, 1])
     + (40000).to_bytes(2, "big") + (8080).to_bytes(2, "big")),
])
def test_send_proxy_header_precedes_client_bytes(version: str, expected: bytes) -> None:
    """send_proxy writes a PROXY header with the real client address before any byte."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair(
        pool={"send_proxy": version})
    frontend.dataReceived(b"data")
    assert peer_t.value() == expected + b"data"


def test_send_proxy_carries_address_from_accepted_header() -> None:
    """Behind accept_proxy, the header sent to the peer carries the original client."""
    reactor, listener, pool = build(listener={"accept_proxy": True}, pool={"send_proxy": "v1"})
    frontend, client = accept(listener)
    frontend.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 443\r\n")
    peer_t = finish_connect(reactor)
    assert peer_t.value() == b"PROXY TCP4 198.51.100.9 192.0.2.1 5555 443\r\n"


def test_maint_cuts_connections_after_drain_timeout() -> None:
    """maint takes a peer out and closes its open connections once drain_timeout passes;
    drain keeps them."""
    reactor, listener, pool, frontend, client, peer_t = connected_pair(
        pool={"drain_timeout": "5s"})
    key = frontend.session.peer.key
    pool.set_admin_state(key, "drain")
    reactor.advance(10)
    assert not client.disconnected
    pool.set_admin_state(key, "maint")
    reactor.advance(4)
    assert not client.disconnected
    reactor.advance(1.5)
    assert client.disconnected and peer_t.disconnected
    assert frontend.session.end_reason == "maint"


def test_shutdown_drain_waits_then_cuts() -> None:
    """Stopping a listener lets open connections finish within shutdown_timeout and cuts
    the rest after it."""
    from lb.proxy.listener import ListenerService
    reactor, listener, pool, frontend, client, peer_t = connected_pair()
    service = ListenerService(listener, shutdown_timeout=3)
    d = service.drain(3)
    fired: List[Any] = []
    d.addBoth(fired.append)
    reactor.advance(2.9)
    assert not fired and not client.disconnected
    reactor.advance(0.2)
    assert client.disconnected
    frontend.join.peer.connectionLost(Failure(error.ConnectionAborted()))
    frontend.connectionLost(Failure(error.ConnectionAborted()))
    assert fired == [None]
    assert listener.ended["shutdown"] == 1
