"""The proxy over real sockets on 127.0.0.1, with an in-process balancer on the reactor."""

import hashlib
import os
import socket
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from lb.proxy.carriers.pump import HAVE_SPLICE
from lb.service import LBService
from lb.testing import EchoFactory, free_port, make_config, poll_until

pytestmark = pytest.mark.integration


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """Sends a payload, half-closes, and collects everything until the connection ends."""

    def __init__(self, payload: bytes = b"", half_close: bool = True) -> None:
        self.payload = payload
        self.half_close = half_close
        self.received: List[bytes] = []
        self.count = 0
        self.done: defer.Deferred = defer.Deferred()
        self.reason: Any = None

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)
        if self.half_close:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        if not self.done.called:
            self.done.callback(b"".join(self.received))


DATA_PATHS = ["splice", "copy", "twisted"] if HAVE_SPLICE else ["copy", "twisted"]


@pytest.fixture(params=DATA_PATHS)
def data_path(request: Any) -> Any:
    """Runs a test over each data path: the pump with splice(2), the pump with recv/send,
    and Twisted's transports (the path for anything that must see the bytes)."""
    mode = request.param
    if mode == "twisted":
        yield None
        return
    pump = reactor.pump
    pump.splice = mode == "splice"
    yield pump
    pump.splice = HAVE_SPLICE


_data_path: List[Any] = [None]


@pytest.fixture(autouse=True)
def _use_data_path(request: Any) -> Any:
    _data_path[0] = request.getfixturevalue("data_path") if "data_path" in \
        request.fixturenames else "default"
    yield


def start_lb(listeners: Dict[str, Dict[str, Any]], pools: Dict[str, Dict[str, Any]],
             **top: Any) -> LBService:
    service = LBService(make_config(listeners, pools, **top), reactor)
    if _data_path[0] != "default":
        for listener_service in service.listeners.values():
            listener_service.listener.pump = _data_path[0]
    service.startService()
    return service


def lb_port(service: LBService, name: str = "l") -> int:
    return service.listeners[name].port.getHost().port


def listen(factory: protocol.Factory) -> Any:
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def connect(port: int, client: protocol.Protocol) -> defer.Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)


@pytest.fixture
def cleanup() -> Any:
    """Stops every service and port a test registers, even when it fails."""
    items: List[Any] = []
    yield items
    for item in reversed(items):
        if hasattr(item, "stopService"):
            pytest_twisted.blockon(defer.maybeDeferred(item.stopService))
        else:
            pytest_twisted.blockon(defer.maybeDeferred(item.stopListening))


@pytest_twisted.inlineCallbacks
def test_20mb_random_payload_round_trips_identically(cleanup: List[Any], data_path: Any) -> Any:
    """20 MB of random bytes through the proxy to an echo peer come back byte-identical."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [f"127.0.0.1:{echo.getHost().port}"]}})
    cleanup.append(lb)
    payload = os.urandom(20 * 1024 * 1024)
    client = Client(payload)
    yield connect(lb_port(lb), client)
    got = yield client.done
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    peer = lb.pool("p").peers[f"127.0.0.1:{echo.getHost().port}"]
    yield poll_until(reactor, lambda: peer.active_connections == 0, what="session end")
    assert peer.bytes_in == peer.bytes_out == len(payload)


@pytest_twisted.inlineCallbacks
def test_100_concurrent_clients_all_complete(cleanup: List[Any], data_path: Any) -> Any:
    """100 clients at once over three echo peers each get exactly their own bytes back."""
    echoes = [listen(EchoFactory()) for _ in range(3)]
    cleanup.extend(echoes)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [f"127.0.0.1:{e.getHost().port}" for e in echoes]}})
    cleanup.append(lb)
    clients = [Client(os.urandom(4096) + b"client %d" % i) for i in range(100)]
    yield defer.gatherResults([connect(lb_port(lb), c) for c in clients])
    results = yield defer.gatherResults([c.done for c in clients])
    assert [r for r in results] == [c.payload for c in clients]
    served = [p.total_connections for p in lb.pool("p").peers.values()]
    assert sum(served) == 100 and min(served) >= 30


@implementer(IHalfCloseableProtocol)
class ReplyAfterEOF(protocol.Protocol):
    """A server that answers only after the client has finished sending (like a batch job):
    the reply is large so it outlives the client's half-close."""

    def connectionMade(self) -> None:
        self.got = 0

    def dataReceived(self, data: bytes) -> None:
        self.got += len(data)

    def readConnectionLost(self) -> None:
        reply = (b"%d\n" % self.got) * 200_000
        self.transport.write(reply)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_half_closed_client_still_gets_the_whole_reply(cleanup: List[Any], data_path: Any) -> Any:
    """A client that shuts down its sending side still receives the peer's full reply."""
    factory = protocol.Factory.forProtocol(ReplyAfterEOF)
    server = listen(factory)
    cleanup.append(server)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [f"127.0.0.1:{server.getHost().port}"]}})
    cleanup.append(lb)
    client = Client(b"x" * 12345)
    yield connect(lb_port(lb), client)
    got = yield client.done
    assert got == b"12345\n" * 200_000


class Firehose(protocol.Protocol):
    """Sends ``total`` bytes as fast as its transport lets it (a pull producer)."""

    total = 200 * 1024 * 1024
    chunk = b"\xab" * (256 * 1024)

    def connectionMade(self) -> None:
        self.sent = 0
        self.factory.instances.append(self)
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent >= self.total:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        self.transport.write(self.chunk)
        self.sent += len(self.chunk)

    def stopProducing(self) -> None:
        pass


class SlowReader(protocol.Protocol):
    """Reads in bursts: after each ``burst`` bytes it stops reading for ``pause`` seconds."""

    burst = 4 * 1024 * 1024
    pause = 0.02

    def __init__(self) -> None:
        self.count = 0
        self._since_pause = 0
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self._since_pause += len(data)
        if self._since_pause >= self.burst:
            self._since_pause = 0
            self.transport.pauseProducing()
            reactor.callLater(self.pause, self._resume)

    def _resume(self) -> None:
        if self.transport.connected:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.count)


def buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in user space (its write buffer)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.inlineCallbacks
def test_slow_reader_keeps_proxy_buffers_bounded(cleanup: List[Any], data_path: Any) -> Any:
    """A peer pushing 200 MB to a client that reads slowly: the proxy throttles the peer,
    so what it buffers stays under a small bound the whole time and every byte arrives."""
    factory = protocol.Factory.forProtocol(Firehose)
    factory.instances = []
    server = listen(factory)
    cleanup.append(server)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [f"127.0.0.1:{server.getHost().port}"]}})
    cleanup.append(lb)
    listener = lb.listeners["l"].listener
    samples: List[int] = []

    def sample() -> None:
        for session in list(listener.sessions):
            samples.append(session.buffered())

    sampler = task.LoopingCall(sample)
    sampler.start(0.005)
    try:
        reader = SlowReader()
        yield connect(lb_port(lb), reader)
        # the client reads nothing at first: wait until the proxy has stopped reading
        # from the peer, i.e. the peer's own socket buffer is backing up
        yield poll_until(reactor, lambda: factory.instances and buffered(
            factory.instances[0].transport) > 0, what="peer throttled")
        sample()
        stalled_max = max(samples)
        reader.transport.resumeProducing()
        total = yield reader.done
    finally:
        sampler.stop()
    assert total == Firehose.total
    assert stalled_max < 1024 * 1024
    assert max(samples) < 2 * 1024 * 1024, f"proxy buffered {max(samples)} bytes"


@pytest_twisted.inlineCallbacks
def test_connect_failure_is_retried_on_next_peer(cleanup: List[Any]) -> Any:
    """With one dead peer in the pool, every client is still served (by the live one)."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    dead = f"127.0.0.1:{free_port()}"
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [dead, f"127.0.0.1:{echo.getHost().port}"], "retries": 1}})
    cleanup.append(lb)
    for i in range(6):
        client = Client(b"ping %d" % i)
        yield connect(lb_port(lb), client)
        got = yield client.done
        assert got == b"ping %d" % i
    assert lb.pool("p").peers[dead].connect_failures >= 1


@pytest_twisted.inlineCallbacks
def test_bytes_sent_with_the_connect_reach_the_retried_peer_once(cleanup: List[Any],
                                                                 data_path: Any) -> Any:
    """Bytes a client sends before lb even accepts it (read at accept, written as the
    connect's first write) reach the live peer exactly once when a dead peer is tried first,
    and are counted once."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    dead = f"127.0.0.1:{free_port()}"
    live = f"127.0.0.1:{echo.getHost().port}"
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [dead, live], "retries": 1}})
    cleanup.append(lb)
    payloads = [b"early %d " % i * (i + 1) for i in range(6)]
    for payload in payloads:
        # connect and send before the reactor runs again: the bytes wait in the socket
        sock = socket.create_connection(("127.0.0.1", lb_port(lb)))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        received: List[bytes] = []

        def answered(sock: socket.socket = sock, received: List[bytes] = received) -> bool:
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return True
                    received.append(chunk)
            except BlockingIOError:
                return False
        try:
            yield poll_until(reactor, answered, what="the echo through lb")
        finally:
            sock.close()
        assert b"".join(received) == payload
    pool = lb.pool("p")
    yield poll_until(reactor, lambda: pool.peers[live].active_connections == 0,
                     what="sessions to end")
    assert pool.peers[dead].connect_failures >= 1
    assert pool.peers[dead].bytes_in == 0
    assert pool.peers[live].bytes_in == pool.peers[live].bytes_out == sum(map(len, payloads))


@pytest_twisted.inlineCallbacks
def test_accept_proxy_garbage_closes_only_that_connection(cleanup: List[Any]) -> Any:
    """Random bytes to an accept_proxy listener close that connection; the next client with
    a valid header is served."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "accept_proxy": True}},
                  {"p": {"peers": [f"127.0.0.1:{echo.getHost().port}"]}})
    cleanup.append(lb)
    bad = Client(os.urandom(300), half_close=False)
    yield connect(lb_port(lb), bad)
    got = yield bad.done
    assert got == b""
    good = Client(b"PROXY TCP4 192.0.2.10 127.0.0.1 4000 80\r\nhello")
    yield connect(lb_port(lb), good)
    got = yield good.done
    assert got == b"hello"
    assert lb.listeners["l"].listener.ended["bad_proxy_header"] == 1


@pytest.mark.parametrize("accept_proxy", [False, True])
@pytest_twisted.inlineCallbacks
def test_an_error_handling_one_client_never_stops_the_listener(
        cleanup: List[Any], data_path: Any, accept_proxy: bool) -> Any:
    """A client whose handling raises (here: routed to a peer whose host name IDNA cannot
    encode, which once closed the listening port for good) loses only its own connection;
    the listener keeps accepting and the next client is served."""
    from lb.config import Address
    from lb.peer import PeerSpec

    echo = listen(EchoFactory())
    cleanup.append(echo)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "accept_proxy": accept_proxy}},
                  {"p": {"retries": 0}})
    cleanup.append(lb)
    pool = lb.pool("p")
    header = b"PROXY TCP4 192.0.2.10 127.0.0.1 4000 80\r\n" if accept_proxy else b""
    pool.apply("admin", [PeerSpec(Address("a..b", 80))])  # bypasses parse_address
    for _ in range(3):
        bad = Client(header + b"hello")
        yield connect(lb_port(lb), bad)
        got = yield bad.done.addTimeout(5, reactor)
        assert got == b""
    assert lb.listeners["l"].accepting
    pool.apply("admin", [PeerSpec(Address("127.0.0.1", echo.getHost().port))])
    good = Client(header + b"hello")
    yield connect(lb_port(lb), good).addTimeout(5, reactor)
    got = yield good.done.addTimeout(5, reactor)
    assert got == b"hello"
    assert lb.listeners["l"].listener.ended["connect_failed"] == 3


@pytest.mark.parametrize("accept_proxy", [False, True])
@pytest_twisted.inlineCallbacks
def test_a_bug_while_handling_one_client_ends_that_client_only(
        cleanup: List[Any], data_path: Any, accept_proxy: bool) -> Any:
    """Any exception while one client is handled (here: the balancer breaks) closes that
    client, counts it as ended by `error`, and leaves the listener accepting."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "accept_proxy": accept_proxy}},
                  {"p": {"peers": [f"127.0.0.1:{echo.getHost().port}"]}})
    cleanup.append(lb)
    pool = lb.pool("p")
    header = b"PROXY TCP4 192.0.2.10 127.0.0.1 4000 80\r\n" if accept_proxy else b""
    real_pick = pool.pick
    listener = lb.listeners["l"].listener

    def broken_pick(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("balancer bug")
    pool.pick = broken_pick  # type: ignore[method-assign]
    bad = Client(header + b"hello")
    try:
        yield connect(lb_port(lb), bad)
    except ConnectError:
        pass  # lb's reset can beat the client's view of its own connect
    else:
        got = yield bad.done.addTimeout(5, reactor)
        assert got == b""
    yield poll_until(reactor, lambda: listener.ended["error"] == 1, timeout=5,
                     what="the broken client to end")
    pool.pick = real_pick  # type: ignore[method-assign]
    good = Client(header + b"hello")
    yield connect(lb_port(lb), good).addTimeout(5, reactor)
    got = yield good.done.addTimeout(5, reactor)
    assert got == b"hello"
    assert lb.listeners["l"].accepting
    assert listener.ended["error"] == 1 and not listener.sessions


class ResetAfter(protocol.Protocol):
    """Sends some bytes, then resets the connection (RST)."""

    def connectionMade(self) -> None:
        self.transport.write(b"partial answer")
        reactor.callLater(0.05, self.transport.abortConnection)


@pytest_twisted.inlineCallbacks
def test_peer_reset_mid_stream_closes_that_client_only(cleanup: List[Any], data_path: Any) -> Any:
    """A peer that resets mid-stream: its client is closed after receiving what was sent,
    the end is counted as peer_reset, and another client's connection keeps working."""
    resetter = listen(protocol.Factory.forProtocol(ResetAfter))
    echo = listen(EchoFactory())
    cleanup.extend([resetter, echo])
    lb = start_lb({"bad": {"bind": "127.0.0.1:0", "pool": "bad"},
                   "ok": {"bind": "127.0.0.1:0", "pool": "ok"}},
                  {"bad": {"peers": [f"127.0.0.1:{resetter.getHost().port}"]},
                   "ok": {"peers": [f"127.0.0.1:{echo.getHost().port}"]}})
    cleanup.append(lb)
    survivor = Client(half_close=False)
    yield connect(lb_port(lb, "ok"), survivor)
    victim = Client(half_close=False)
    yield connect(lb_port(lb, "bad"), victim)
    got = yield victim.done
    assert got == b"partial answer"
    ended = lb.listeners["bad"].listener.ended
    yield poll_until(reactor, lambda: ended["peer_reset"] == 1, what="peer_reset counted")
    survivor.transport.write(b"still here")
    yield poll_until(reactor, lambda: b"".join(survivor.received) == b"still here",
                     what="echo on the other connection")
    survivor.transport.loseConnection()
    yield survivor.done


@pytest_twisted.inlineCallbacks
def test_max_connections_refuses_excess_over_real_sockets(cleanup: List[Any]) -> Any:
    """The client past max_connections is closed at once while the others stay served."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "max_connections": 2}},
                  {"p": {"peers": [f"127.0.0.1:{echo.getHost().port}"]}})
    cleanup.append(lb)
    held = [Client(half_close=False) for _ in range(2)]
    for c in held:
        yield connect(lb_port(lb), c)
    yield poll_until(reactor, lambda: len(lb.listeners["l"].listener.sessions) == 2,
                     what="two sessions")
    extra = Client(b"hello", half_close=False)
    yield connect(lb_port(lb), extra)
    got = yield extra.done
    assert got == b""
    assert lb.listeners["l"].listener.refused["max_connections"] == 1
    held[0].transport.write(b"ok")
    yield poll_until(reactor, lambda: b"".join(held[0].received) == b"ok", what="echo")
    for c in held:
        c.transport.loseConnection()
        yield c.done


class Recorder(protocol.Protocol):
    """Keeps what it receives; answers nothing."""

    def connectionMade(self) -> None:
        self.factory.instances.append(self)
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@pytest_twisted.inlineCallbacks
def test_idle_timeout_and_send_proxy_on_every_path(cleanup: List[Any], data_path: Any) -> Any:
    """On each data path the peer first gets a PROXY v1 header with the real client
    address, byte counters move, and a connection idle for idle_timeout is closed."""
    factory = protocol.Factory.forProtocol(Recorder)
    factory.instances = []
    server = listen(factory)
    cleanup.append(server)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "idle_timeout": "300ms"}},
                  {"p": {"peers": [f"127.0.0.1:{server.getHost().port}"],
                         "send_proxy": "v1"}})
    cleanup.append(lb)
    client = Client(half_close=False)
    yield connect(lb_port(lb), client)
    client.transport.write(b"abc")
    yield poll_until(reactor, lambda: factory.instances and factory.instances[0].data.endswith(
        b"abc"), what="bytes at the peer")
    local = client.transport.getHost()
    assert factory.instances[0].data == (
        f"PROXY TCP4 127.0.0.1 127.0.0.1 {local.port} {lb_port(lb)}\r\nabc".encode())
    started = reactor.seconds()
    yield client.done
    assert reactor.seconds() - started >= 0.2
    listener = lb.listeners["l"].listener
    yield poll_until(reactor, lambda: listener.ended["idle_timeout"] == 1, what="idle end")
    peer = lb.pool("p").peers[f"127.0.0.1:{server.getHost().port}"]
    assert peer.bytes_in == 3 and peer.active_connections == 0


@pytest_twisted.inlineCallbacks
def test_maint_cuts_open_connections_on_every_path(cleanup: List[Any], data_path: Any) -> Any:
    """maint closes a peer's open connections after drain_timeout, on every data path."""
    echo = listen(EchoFactory())
    cleanup.append(echo)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p"}},
                  {"p": {"peers": [f"127.0.0.1:{echo.getHost().port}"],
                         "drain_timeout": "100ms"}})
    cleanup.append(lb)
    client = Client(half_close=False)
    yield connect(lb_port(lb), client)
    client.transport.write(b"x")
    yield poll_until(reactor, lambda: client.count == 1, what="echo")
    lb.pool("p").set_admin_state(f"127.0.0.1:{echo.getHost().port}", "maint")
    yield client.done
    assert lb.listeners["l"].listener.ended["maint"] == 1


@implementer(IHalfCloseableProtocol)
class HungPeer(Recorder):
    """Reads the request, never answers, and keeps its socket open after the client's FIN
    (a peer that hangs mid-request)."""

    def readConnectionLost(self) -> None:
        self.factory.fins += 1

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_fin_timeout_closes_a_half_closed_pair_to_a_hung_peer(cleanup: List[Any],
                                                              data_path: Any) -> Any:
    """A client that sends its request and a FIN to a peer that never answers: once no byte
    moves for fin_timeout, both sides are closed (not only after idle_timeout)."""
    factory = protocol.Factory.forProtocol(HungPeer)
    factory.instances = []
    factory.fins = 0
    server = listen(factory)
    cleanup.append(server)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "idle_timeout": "60s",
                         "fin_timeout": "300ms"}},
                  {"p": {"peers": [f"127.0.0.1:{server.getHost().port}"]}})
    cleanup.append(lb)
    client = Client(b"GET / HTTP/1.0\r\n\r\n", half_close=True)
    yield connect(lb_port(lb), client)
    yield poll_until(reactor, lambda: factory.fins == 1, what="the FIN at the peer")
    started = reactor.seconds()
    got = yield client.done.addTimeout(5, reactor)
    assert got == b"" and reactor.seconds() - started >= 0.2
    listener = lb.listeners["l"].listener
    yield poll_until(reactor, lambda: listener.ended["fin_timeout"] == 1, what="fin end")
    assert not listener.sessions


@implementer(IHalfCloseableProtocol)
class SlowAnswer(protocol.Protocol):
    """Answers a byte every 100 ms for a second, then closes (a client's FIN does not stop
    it)."""

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        pass

    def connectionMade(self) -> None:
        self.sent = 0
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = reactor
        self.loop.start(0.1)

    def tick(self) -> None:
        self.sent += 1
        self.transport.write(b"x")
        if self.sent == 10:
            self.loop.stop()
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()


@pytest_twisted.inlineCallbacks
def test_fin_timeout_spares_a_half_closed_pair_that_still_moves_bytes(
        cleanup: List[Any], data_path: Any) -> Any:
    """fin_timeout counts from the last byte, not from the FIN: a half-closed client still
    receiving its answer is served to the end."""
    server = listen(protocol.Factory.forProtocol(SlowAnswer))
    cleanup.append(server)
    lb = start_lb({"l": {"bind": "127.0.0.1:0", "pool": "p", "fin_timeout": "300ms"}},
                  {"p": {"peers": [f"127.0.0.1:{server.getHost().port}"]}})
    cleanup.append(lb)
    client = Client(b"request", half_close=True)
    yield connect(lb_port(lb), client)
    got = yield client.done.addTimeout(5, reactor)
    assert got == b"x" * 10
    listener = lb.listeners["l"].listener
    yield poll_until(reactor, lambda: listener.ended["closed"] == 1, what="a clean end")
