"""AdminService: the admin site on a real socket next to a running balancer, reloads that
move it, and its behaviour on stop. Rebinding edge cases run on a fake reactor."""

from __future__ import annotations

import gzip
from typing import Any, List, Set, Tuple

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from lb.admin.api import MAX_BODY
from lb.admin.server import AdminService, LimitedRequest, build_resource
from lb.service import LBService
from lb.testing import EchoFactory, NamedFactory, free_port, make_config, poll_until

# --- helpers ----------------------------------------------------------------------------------


def http_client(persistent: bool = False) -> Tuple[HTTPClient, HTTPConnectionPool]:
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    return HTTPClient(Agent(reactor, pool=pool)), pool


class Collect(Protocol):
    """Sends a payload, collects the answer until the server closes."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.payload and len(self.data) >= len(self.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def talk(port: int, payload: bytes = b"") -> Any:
    """One TCP conversation with 127.0.0.1:port; returns everything received."""
    proto = Collect(payload)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), proto)
    data = yield proto.done
    return data


class Running:
    """A started LBService with an AdminService child, and backends it proxies to."""

    def __init__(self, backends: List[Any], **top: Any) -> None:
        self.backends = backends
        peers = [f"127.0.0.1:{b.getHost().port}" for b in backends]
        self.peers = peers
        self.config = make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                                  {"web": {"peers": peers, "drain_timeout": "1s"}}, **top)
        self.root = LBService(self.config, reactor)
        self.admin = self.root.admin  # LBService builds its own admin server
        self.root.startService()
        self.client, self.pool = http_client()

    @property
    def url(self) -> str:
        return f"http://{self.admin.address()}"

    @property
    def front_port(self) -> int:
        return self.root.listeners["front"].port.getHost().port

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.pool.closeCachedConnections()
        yield self.root.stopService()
        for backend in self.backends:
            yield backend.stopListening()

    @defer.inlineCallbacks
    def get_json(self, path: str) -> Any:
        response = yield self.client.get(self.url + path)
        body = yield response.json()
        return response.code, body


def running(*factories: Any, **top: Any) -> Running:
    backends = [reactor.listenTCP(0, f, interface="127.0.0.1") for f in factories]
    return Running(backends, **top)


pytestmark = pytest.mark.integration


# --- over real sockets ------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_every_endpoint_answers_on_the_admin_port() -> Any:
    """The service binds admin.bind (port 0 → an ephemeral port it exposes) and serves the
    status page, the JSON API, /metrics and /healthz; traffic through a listener shows in
    the API and the metrics."""
    lb = running(EchoFactory())
    try:
        assert lb.admin.port is not None and lb.admin.port.getHost().port > 0
        echoed = yield talk(lb.front_port, b"hello admin")
        assert echoed == b"hello admin"

        def counted() -> Any:
            peer = lb.root.pool("web").get(lb.peers[0])
            return peer.total_connections == 1 and peer.active_connections == 0 and \
                peer.bytes_out == len(b"hello admin")
        yield poll_until(reactor, counted, timeout=5, what="the connection to be counted")

        status, body = yield lb.get_json("/api/pools/web")
        assert status == 200
        (peer,) = body["peers"]
        assert (peer["address"], peer["total_connections"], peer["bytes_in"],
                peer["bytes_out"]) == (lb.peers[0], 1, 11, 11)

        response = yield lb.client.get(lb.url + "/metrics")
        text = yield response.text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        key = ("lb_connections_total", (("listener", "front"), ("peer", lb.peers[0]),
                                        ("pool", "web")))
        assert samples[key] == 1

        response = yield lb.client.get(lb.url + "/")
        page = yield response.text()
        assert response.code == 200 and lb.peers[0] in page

        response = yield lb.client.get(lb.url + "/healthz")
        assert response.code == 200 and (yield response.text()) == "ok\n"
    finally:
        yield lb.stop()


@pytest_twisted.inlineCallbacks
def test_smooth_release_over_http_moves_traffic() -> Any:
    """Draining a peer over HTTP sends every new client to the other peer; ready brings it
    back into rotation."""
    lb = running(NamedFactory("a"), NamedFactory("b"))
    try:
        a = lb.peers[0].replace(":", "%3A")
        response = yield lb.client.put(lb.url + f"/api/pools/web/peers/{a}",
                                       json={"admin_state": "drain"})
        assert response.code == 200
        answers = []
        for _ in range(4):
            answers.append((yield talk(lb.front_port)))
        assert set(answers) == {b"b\n"}
        response = yield lb.client.put(lb.url + f"/api/pools/web/peers/{a}",
                                       json={"admin_state": "ready"})
        assert response.code == 200
        answers = []
        for _ in range(4):
            answers.append((yield talk(lb.front_port)))
        assert set(answers) == {b"a\n", b"b\n"}
    finally:
        yield lb.stop()


@implementer(IBodyProducer)
class Chunks:
    """A body of unknown length (sent chunked, with no Content-Length)."""

    length = UNKNOWN_LENGTH

    def __init__(self, size: int) -> None:
        self.size = size

    def startProducing(self, consumer: Any) -> defer.Deferred:
        sent = 0
        while sent < self.size:
            chunk = b" " * min(8192, self.size - sent)
            consumer.write(chunk)
            sent += len(chunk)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_large_bodies_are_refused_on_the_wire() -> Any:
    """Bodies over 64 KiB are 413 whether announced by Content-Length or sent chunked; the
    server stops buffering them (the request keeps no more than the limit)."""
    lb = running(EchoFactory())
    kept: List[int] = []

    class Spy(LimitedRequest):
        def handleContentChunk(self, data: bytes) -> None:
            super().handleContentChunk(data)
            kept.append(self.content.tell())
    lb.admin.site.requestFactory = Spy
    try:
        url = lb.url + "/api/pools/web/peers"
        response = yield lb.client.post(url, data=b"{" + b" " * (MAX_BODY * 3) + b"}")
        body = yield response.json()
        assert response.code == 413 and "larger than" in body["error"]
        agent = Agent(reactor, pool=lb.pool)
        response = yield agent.request(b"POST", url.encode(), Headers({}),
                                       Chunks(MAX_BODY * 2))
        body = yield treq.json_content(response)
        assert response.code == 413 and "larger than" in body["error"]
        assert kept and max(kept) <= MAX_BODY
        assert lb.root.pool("web").peers.keys() == {lb.peers[0]}
    finally:
        yield lb.stop()


@pytest_twisted.inlineCallbacks
def test_metrics_are_gzipped_when_asked() -> Any:
    """A scraper sending Accept-Encoding: gzip gets a gzip body that still parses."""
    lb = running(EchoFactory())
    try:
        agent = Agent(reactor, pool=lb.pool)  # no decoder: see the raw encoding
        response = yield agent.request(b"GET", (lb.url + "/metrics").encode(),
                                       Headers({b"accept-encoding": [b"gzip"]}))
        raw = yield treq.content(response)
        assert response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
        names = {f.name for f in text_string_to_metric_families(gzip.decompress(raw).decode())}
        assert "lb_peer_up" in names
    finally:
        yield lb.stop()


@pytest_twisted.inlineCallbacks
def test_a_reload_moves_the_admin_server() -> Any:
    """A reload with a new admin.bind (LBService.apply reconfigures the admin server)
    listens on the new address and lets go of the old; once stopped, a reload does not
    bring it back."""
    lb = running(EchoFactory())

    def reload(port: int) -> None:
        lb.root.apply(make_config({"front": {"bind": "127.0.0.1:0", "pool": "web"}},
                                  {"web": {"peers": lb.peers}},
                                  admin={"bind": f"127.0.0.1:{port}"}))
    try:
        old_port = lb.admin.port.getHost().port
        new_port = free_port()
        reload(new_port)
        yield poll_until(reactor, lambda: lb.admin.port is not None and
                         lb.admin.port.getHost().port == new_port, timeout=5,
                         what="the admin server to move")
        response = yield lb.client.get(f"http://127.0.0.1:{new_port}/healthz")
        assert response.code == 200
        yield response.text()
        with pytest.raises(error.ConnectionRefusedError):  # the old port is closed
            yield lb.client.get(f"http://127.0.0.1:{old_port}/healthz", timeout=5)
        yield lb.admin.stopService()
        assert lb.admin.port is None
        reload(free_port())
        assert lb.admin.port is None
    finally:
        yield lb.stop()


@pytest_twisted.inlineCallbacks
def test_stop_closes_kept_alive_connections() -> Any:
    """Browsers keep admin connections open; stopping the service closes them too, so
    nothing of it stays in the reactor."""
    lb = running(EchoFactory())
    client, pool = http_client(persistent=True)
    try:
        response = yield client.get(lb.url + "/healthz")
        yield response.text()
        assert len(lb.admin.connections.protocols) == 1
        yield lb.admin.stopService()
        yield poll_until(reactor, lambda: not lb.admin.connections.protocols, timeout=5,
                         what="the kept-alive connection to close")
    finally:
        yield pool.closeCachedConnections()
        yield lb.stop()


# --- on a fake reactor ------------------------------------------------------------------------


class BusyReactor(MemoryReactorClock):
    """A MemoryReactorClock whose listenTCP refuses an address in use (a wildcard address
    takes its port on every address) and addresses listed in ``blocked``."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: Set[Tuple[str, int]] = set()
        self.blocked: Set[Tuple[str, int]] = set()

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        for host, used in self.bound | self.blocked:
            if used == port and (host == interface or "0.0.0.0" in (host, interface)):
                raise CannotListenError(interface, port, OSError(98, "Address in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        self.bound.add((interface, port))
        stop = listening.stopListening

        def stop_listening() -> Any:
            self.bound.discard((interface, port))
            return stop()
        listening.stopListening = stop_listening
        return listening


def fake_lb(bind: str = "127.0.0.1:9901") -> Tuple[BusyReactor, LBService, AdminService]:
    fake = BusyReactor()
    config = make_config({"front": {"bind": "127.0.0.1:8080", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"]}}, admin={"bind": bind})
    root = LBService(config, fake)
    admin = root.admin
    root.startService()
    return fake, root, admin


def with_admin(root: LBService, bind: str) -> Any:
    return make_config({"front": {"bind": "127.0.0.1:8080", "pool": "web"}},
                       {"web": {"peers": ["127.0.0.1:9001"]}}, admin={"bind": bind})


def test_rebind_to_the_same_port_on_another_address_lets_go_first() -> None:
    """127.0.0.1:9901 → 0.0.0.0:9901 conflicts with itself: the old socket is closed first,
    then the new one bound."""
    fake, root, admin = fake_lb()
    root.apply(with_admin(root, "0.0.0.0:9901"))
    assert (admin.address(), str(admin.bind)) == ("0.0.0.0:9901", "0.0.0.0:9901")
    assert ("127.0.0.1", 9901) not in fake.bound and ("0.0.0.0", 9901) in fake.bound


def test_a_busy_new_address_keeps_the_old_one() -> None:
    """A new admin.bind that cannot be bound is logged and the server stays where it was;
    a later reload to a free address still works."""
    fake, root, admin = fake_lb()
    fake.blocked.add(("127.0.0.1", 9999))
    root.apply(with_admin(root, "127.0.0.1:9999"))
    assert str(admin.bind) == "127.0.0.1:9901" and ("127.0.0.1", 9901) in fake.bound
    fake.blocked.add(("0.0.0.0", 9902))
    root.apply(with_admin(root, "127.0.0.1:9902"))
    assert str(admin.bind) == "127.0.0.1:9901" and ("127.0.0.1", 9901) in fake.bound
    fake.blocked.add(("127.0.0.2", 9901))
    root.apply(with_admin(root, "127.0.0.2:9901"))  # same port: let go, fail, come back
    assert str(admin.bind) == "127.0.0.1:9901" and ("127.0.0.1", 9901) in fake.bound
    root.apply(with_admin(root, "127.0.0.1:9903"))
    assert fake.bound >= {("127.0.0.1", 9903)} and ("127.0.0.1", 9901) not in fake.bound


def test_a_reload_that_keeps_the_address_keeps_the_socket() -> None:
    """Reloads with the same admin.bind leave the listening socket alone."""
    fake, root, admin = fake_lb()
    port = admin.port
    root.apply(with_admin(root, "127.0.0.1:9901"))
    assert admin.port is port


class FakePort:
    """A listening port as ``ListenerService.accepting`` reads it: open or lost."""

    def __init__(self, port: int, connected: bool = True) -> None:
        self.port = port
        self.connected = connected

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


def healthz_of(root: LBService) -> Tuple[int, str]:
    """GET /healthz through StubTreq: (status, body)."""
    stub = StubTreq(build_resource(root.admin_view, root.reactor))
    out: list = []
    d = stub.get("http://127.0.0.1/healthz")
    d.addCallback(lambda r: r.text().addCallback(lambda t: out.append((r.code, t))))
    stub.flush()
    return out[0]


def test_healthz_turns_503_while_stopping() -> None:
    """/healthz is 200 while running (every listener accepting) and 503 once the balancer
    is shutting down, whatever the listeners do then."""
    config = make_config({"front": {"bind": "127.0.0.1:8080", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"]}})
    root = LBService(config, MemoryReactorClock())
    root.listeners["front"].port = FakePort(8080)
    assert healthz_of(root) == (200, "ok\n")
    root.stopping = True  # what LBService.stopService sets first
    assert healthz_of(root) == (503, "stopping\n")
    root.listeners["front"].port = None
    assert healthz_of(root) == (503, "stopping\n")


def test_healthz_names_the_listeners_that_do_not_accept() -> None:
    """While any listener is not accepting (its socket lost, or never bound) /healthz is
    503 and names each such listener with its address; back to 200 once all accept."""
    config = make_config({"web": {"bind": "127.0.0.1:8080", "pool": "web"},
                          "api": {"bind": "127.0.0.1:8081", "pool": "web"},
                          "db": {"bind": "127.0.0.1:8082", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"]}})
    root = LBService(config, MemoryReactorClock())
    root.listeners["web"].port = FakePort(8080, connected=False)
    root.listeners["api"].port = FakePort(8081)
    assert healthz_of(root) == (503, "listener web (127.0.0.1:8080) is not accepting\n"
                                     "listener db (127.0.0.1:8082) is not accepting\n")
    root.listeners["web"].port = FakePort(8080)
    root.listeners["db"].port = FakePort(8082)
    assert healthz_of(root) == (200, "ok\n")


@pytest_twisted.inlineCallbacks
def test_a_listener_closed_behind_lbs_back_shows_in_healthz_and_metrics() -> Any:
    """A listening socket that goes away under a running balancer (here: stopListening or
    connectionLost called on it directly, on both kinds of port) turns /healthz 503 naming
    it and its ``lb_listener_up`` 0, while the others stay 1; the status page and
    /api/listeners still answer (a closed Twisted port cannot tell its address)."""
    backends = [reactor.listenTCP(0, EchoFactory(), interface="127.0.0.1")]
    peers = [f"127.0.0.1:{backends[0].getHost().port}"]
    config = make_config({"raw": {"bind": "127.0.0.1:0", "pool": "web"},
                          # a closed Twisted port cannot tell its address: the admin
                          # shows the configured one, so give it a real port
                          "proxied": {"bind": f"127.0.0.1:{free_port()}", "pool": "web",
                                      "accept_proxy": True},
                          "other": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": peers}})
    root = LBService(config, reactor)
    root.startService()
    client, pool = http_client()
    url = f"http://{root.admin.address()}"

    @defer.inlineCallbacks
    def check() -> Any:
        response = yield client.get(url + "/healthz")
        health = (response.code, (yield response.text()))
        response = yield client.get(url + "/metrics")
        up = {s.labels["listener"]: s.value
              for f in text_string_to_metric_families((yield response.text()))
              if f.name == "lb_listener_up" for s in f.samples}
        return health, up

    try:
        assert (yield check()) == ((200, "ok\n"), {"raw": 1, "proxied": 1, "other": 1})
        raw, proxied = root.listeners["raw"], root.listeners["proxied"]
        raw_address, proxied_address = raw.address(), proxied.address()
        raw.port.connectionLost(None)
        yield proxied.port.stopListening()
        health, up = yield check()
        assert health == (503, f"listener raw ({raw_address}) is not accepting\n"
                               f"listener proxied ({proxied_address}) is not accepting\n")
        assert up == {"raw": 0, "proxied": 0, "other": 1}
        response = yield client.get(url + "/api/listeners")
        listed = {entry["name"]: (entry["address"], entry["accepting"])
                  for entry in (yield response.json())["listeners"]}
        assert listed == {"raw": (raw_address, False), "proxied": (proxied_address, False),
                          "other": (root.listeners["other"].address(), True)}
        response = yield client.get(url + "/")
        assert response.code == 200 and proxied_address in (yield response.text())
    finally:
        yield pool.closeCachedConnections()
        yield root.stopService()
        yield backends[0].stopListening()
