"""Consul discovery against a real agent (``consul agent -dev`` on loopback ports) with an
in-process balancer on the reactor and real backends on 127.0.0.1."""

import os
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from lb.discovery.consul import ConsulWatcher, snapshot
from lb.service import LBService, default_pool_parts
from lb.testing import make_config, poll_until

if TYPE_CHECKING:
    from tests.consul_agent import ConsulAgent, ConsulAPI

pytest_plugins = ["tests.consul_agent"]  # until tests/conftest.py lists it

pytestmark = pytest.mark.integration

FOLLOW = 2.0  # the bound: the balancer follows Consul within this many seconds


class Backend(protocol.Protocol):
    """Says its name, then echoes; stays open until the client closes."""

    def connectionMade(self) -> None:
        self.factory.hits += 1
        self.factory.open.add(self)
        self.transport.write(self.factory.name.encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open.discard(self)


class BackendFactory(protocol.Factory):
    protocol = Backend
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.open: set = set()


class Client(protocol.Protocol):
    """Collects what it receives; ``greeting`` fires with the backend's name (None if the
    balancer closed the connection without one)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.greeting: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.greeting.called:
            self.greeting.callback(self.buffer.split(b"\n")[0].decode())

    def connectionLost(self, reason: Any = None) -> None:
        if not self.greeting.called:
            self.greeting.callback(None)
        self.closed.callback(None)


async def open_client(port: int) -> Client:
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await client.greeting
    return client


async def who(port: int) -> Optional[str]:
    """One connection through the balancer: the name of the backend that served it."""
    client = await open_client(port)
    name = await client.greeting
    client.transport.loseConnection()
    await client.closed
    return name


async def names(port: int, count: int) -> List[Optional[str]]:
    return [await who(port) for _ in range(count)]


class Env:
    """Backends, the agent's API and balancers started by one test; all stopped at the end."""

    def __init__(self, agent: "ConsulAgent", api: "ConsulAPI", tmp_path: Any) -> None:
        self.agent = agent
        self.api = api
        self.tmp_path = tmp_path
        self.backends: Dict[str, BackendFactory] = {}
        self.ports: Dict[str, Any] = {}
        self.services: List[LBService] = []
        self.service_name = "web-" + uuid.uuid4().hex[:8]

    def backend(self, name: str) -> int:
        factory = BackendFactory(name)
        self.backends[name] = factory
        self.ports[name] = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self.ports[name].getHost().port

    def register(self, name: str, **kwargs: Any) -> defer.Deferred:
        return self.api.register(f"{self.service_name}-{name}", self.service_name,
                                 self.ports[name].getHost().port, **kwargs)

    def config(self, pool: Dict[str, Any]) -> Any:
        pool = dict({"consul": {"service": self.service_name}, "drain_timeout": "30s"}, **pool)
        return make_config({"l": {"bind": "127.0.0.1:0", "pool": "web"}}, {"web": pool},
                           consul={"url": self.agent.url, "wait": "2s",
                                   "poll_interval": "200ms"},
                           state_dir=str(self.tmp_path / "state"), shutdown_timeout="1s")

    def start_lb(self, **pool: Any) -> LBService:
        service = LBService(self.config(pool), reactor,
                            pool_parts={"consul": default_pool_parts()["consul"]})
        service.startService()
        self.services.append(service)
        return service

    async def stop_lb(self, service: LBService) -> None:
        self.services.remove(service)
        await defer.maybeDeferred(service.stopService)

    async def close(self) -> None:
        for service in list(self.services):
            await self.stop_lb(service)
        for port in self.ports.values():
            await defer.maybeDeferred(port.stopListening)
        for factory in self.backends.values():
            for proto in list(factory.open):
                proto.transport.abortConnection()


@pytest.fixture
def env(consul_agent: "ConsulAgent", consul_api: "ConsulAPI", tmp_path: Any) -> Any:
    environment = Env(consul_agent, consul_api, tmp_path)
    yield environment
    pytest_twisted.blockon(defer.ensureDeferred(environment.close()))


def lb_port(service: LBService) -> int:
    return service.listeners["l"].port.getHost().port


def consul_peers(service: LBService) -> Dict[str, str]:
    return {key: peer.admin_state for key, peer in service.pool("web").peers.items()
            if "consul" in peer.wants or peer.removing}


def watcher(service: LBService) -> ConsulWatcher:
    part = service.pools["web"].parts["consul"]
    assert isinstance(part, ConsulWatcher)
    return part


def addr(env: Env, name: str) -> str:
    return f"127.0.0.1:{env.ports[name].getHost().port}"


@pytest_twisted.ensureDeferred
async def test_follows_registrations_and_deregistration_keeps_open_connection(
        env: Env) -> None:
    """Three registered instances all get traffic; after one is deregistered no new
    connection reaches it within 2 s, while a connection already open through it keeps
    working; it is removed once that connection closes."""
    for name in ("a", "b", "c"):
        env.backend(name)
        await env.register(name)
    lb = env.start_lb()
    port = lb_port(lb)
    await poll_until(reactor, lambda: len(consul_peers(lb)) == 3, timeout=FOLLOW,
                     what="three Consul peers")
    served = await names(port, 9)
    assert sorted(served) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3

    # hold a connection open through "c"
    held = None
    for _ in range(3):
        client = await open_client(port)
        if await client.greeting == "c":
            held = client
            break
        client.transport.loseConnection()
        await client.closed
    assert held is not None

    await env.api.deregister(f"{env.service_name}-c")
    c = addr(env, "c")
    await poll_until(reactor, lambda: consul_peers(lb).get(c) == "drain", timeout=FOLLOW,
                     what="the deregistered peer to drain")
    hits = env.backends["c"].hits
    assert set(await names(port, 6)) == {"a", "b"}
    assert env.backends["c"].hits == hits

    held.transport.write(b"still there\n")
    await poll_until(reactor, lambda: b"still there" in held.buffer, timeout=FOLLOW,
                     what="the open connection to keep working")
    assert not held.closed.called
    held.transport.loseConnection()
    await held.closed
    await poll_until(reactor, lambda: c not in lb.pool("web").peers, timeout=FOLLOW,
                     what="the drained peer to be removed once idle")
    assert watcher(lb).requests["ok"] >= 2


@pytest_twisted.ensureDeferred
async def test_maintenance_drains_and_restores(env: Env) -> None:
    """consul maintenance on an instance turns its peer to drain (same peer object, no new
    connections); turning it off makes it ready and serving again."""
    for name in ("a", "b"):
        env.backend(name)
        await env.register(name)
    lb = env.start_lb()
    port = lb_port(lb)
    await poll_until(reactor, lambda: len(consul_peers(lb)) == 2, timeout=FOLLOW,
                     what="two Consul peers")
    b = addr(env, "b")
    peer = lb.pool("web").peers[b]

    await env.api.maintenance(f"{env.service_name}-b", True)
    await poll_until(reactor, lambda: peer.admin_state == "drain", timeout=FOLLOW,
                     what="maintenance to drain the peer")
    assert set(await names(port, 4)) == {"a"}

    await env.api.maintenance(f"{env.service_name}-b", False)
    await poll_until(reactor, lambda: peer.admin_state == "ready", timeout=FOLLOW,
                     what="the peer to be ready after maintenance")
    assert lb.pool("web").peers[b] is peer
    assert set(await names(port, 4)) == {"a", "b"}


@pytest_twisted.ensureDeferred
async def test_tags_and_check_status_filter_instances(env: Env) -> None:
    """Only instances carrying every configured tag count; with passing_only a warning
    instance is left out, without it it is kept with its Weights.Warning."""
    for name in ("a", "b", "c"):
        env.backend(name)
    await env.register("a", tags=["v1", "blue"], weights={"Passing": 5, "Warning": 2})
    await env.register("b", tags=["v1"])
    await env.register("c", tags=["v1", "blue"], weights={"Passing": 5, "Warning": 2},
                       status="warning")
    strict = env.start_lb(consul={"service": env.service_name, "tags": ["v1", "blue"]})
    await poll_until(reactor, lambda: watcher(strict).last_success is not None,
                     timeout=FOLLOW, what="a first answer")
    assert {k: p.weight for k, p in strict.pool("web").peers.items()} == {addr(env, "a"): 5}
    await env.stop_lb(strict)

    loose = env.start_lb(consul={"service": env.service_name, "tags": ["blue"],
                                 "passing_only": False})
    await poll_until(reactor, lambda: len(consul_peers(loose)) == 2, timeout=FOLLOW,
                     what="two Consul peers")
    assert {k: p.weight for k, p in loose.pool("web").peers.items()} == {
        addr(env, "a"): 5, addr(env, "c"): 2}
    await env.api.check(f"{env.service_name}-c", "critical")
    await poll_until(reactor, lambda: set(consul_peers(loose)) == {addr(env, "a")} or
                     consul_peers(loose).get(addr(env, "c")) == "drain", timeout=FOLLOW,
                     what="the critical instance to leave")


@pytest_twisted.ensureDeferred
async def test_kv_prefix_pool_follows_puts_and_deletes(env: Env) -> None:
    """A kv_prefix pool (nginx-upsync layout) adds a key's peer, drains it on down: 1,
    ignores keys of a longer sibling prefix, and drops it when the key is deleted."""
    for name in ("a", "b"):
        env.backend(name)
    prefix = "upstreams/" + env.service_name
    lb = env.start_lb(consul={"kv_prefix": prefix})
    port = lb_port(lb)
    a, b = addr(env, "a"), addr(env, "b")
    await poll_until(reactor, lambda: watcher(lb).last_success is not None, timeout=FOLLOW,
                     what="the empty prefix's first answer")
    await env.api.kv_put(f"{prefix}/{a}")
    await env.api.kv_put(f"{prefix}/{b}", {"weight": 3, "max_fails": 2, "fail_timeout": 10})
    await env.api.kv_put(f"{prefix}2/127.0.0.1:1")
    await poll_until(reactor, lambda: consul_peers(lb) == {a: "ready", b: "ready"},
                     timeout=FOLLOW, what="two KV peers")
    assert lb.pool("web").peers[b].weight == 3
    assert set(await names(port, 4)) == {"a", "b"}

    await env.api.kv_put(f"{prefix}/{b}", {"weight": 3, "down": 1})
    await poll_until(reactor, lambda: consul_peers(lb).get(b) == "drain", timeout=FOLLOW,
                     what="down: 1 to drain the peer")
    await env.api.kv_delete(f"{prefix}/{a}")
    await poll_until(reactor, lambda: a not in lb.pool("web").peers, timeout=FOLLOW,
                     what="the deleted key's peer to go")
    await env.api.kv_delete(f"{prefix}/{b}")
    await poll_until(reactor, lambda: lb.pool("web").peers == {}, timeout=FOLLOW,
                     what="the empty prefix (404) to empty the pool")


@pytest_twisted.ensureDeferred
async def test_agent_outage_keeps_serving_and_snapshot_survives_restart(env: Env) -> None:
    """With the agent killed, traffic keeps flowing from the last set; a balancer
    restarted while the agent is still down serves from the snapshot; when the agent is
    back, updates resume."""
    for name in ("a", "b", "c"):
        env.backend(name)
    await env.register("a")
    await env.register("b")
    lb = env.start_lb()
    port = lb_port(lb)
    await poll_until(reactor, lambda: len(consul_peers(lb)) == 2, timeout=FOLLOW,
                     what="two Consul peers")
    path = snapshot.path_for(str(env.tmp_path / "state"), "web")
    assert os.path.exists(path)

    env.agent.stop()
    await poll_until(reactor, lambda: watcher(lb).requests["error"] + watcher(lb).requests[
        "timeout"] >= 2, timeout=10, what="the watch to see the agent down")
    assert consul_peers(lb) == {addr(env, "a"): "ready", addr(env, "b"): "ready"}
    assert sorted(await names(port, 4)) == ["a", "a", "b", "b"]
    await env.stop_lb(lb)

    restarted = env.start_lb()
    assert consul_peers(restarted) == {addr(env, "a"): "ready", addr(env, "b"): "ready"}
    assert sorted(await names(lb_port(restarted), 4)) == ["a", "a", "b", "b"]
    await poll_until(reactor, lambda: watcher(restarted).requests["error"] >= 1, timeout=10,
                     what="the restarted watch to fail against the dead agent")
    assert len(consul_peers(restarted)) == 2

    await env.agent.start_async(reactor)
    await env.register("c")  # a dev agent comes back empty: register the new set
    c = addr(env, "c")
    await poll_until(reactor, lambda: consul_peers(restarted) == {c: "ready"}, timeout=10,
                     what="updates to resume after the agent is back")
    assert set(await names(lb_port(restarted), 3)) == {"c"}
