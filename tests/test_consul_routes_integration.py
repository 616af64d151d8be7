"""The routes watch against a real Consul 1.8.7 agent (``consul agent -dev`` on loopback
ports): services registered with ``urlprefix-`` tags through the agent's HTTP API reach
on_routes, follow tag changes and deregistration, and survive the agent going away."""

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from lb.config import ConsulConfig
from lb.discovery.consul import CatalogRoutesQuery, ConsulRoute, RoutesWatcher
from lb.testing import poll_until

if TYPE_CHECKING:
    from tests.consul_agent import ConsulAgent, ConsulAPI

pytest_plugins = ["tests.consul_agent"]

pytestmark = pytest.mark.integration

REACH = 1.0  # the bound: a registration reaches on_routes within this many seconds
FOLLOW = 2.0  # bound on waiting for other changes to arrive


class Routes:
    """A RoutesWatcher on the reactor against the test's agent; records every on_routes
    call with the reactor time it came."""

    def __init__(self, agent: "ConsulAgent", state_dir: str) -> None:
        self.settings = ConsulConfig(url=agent.url, wait=2.0, poll_interval=0.2)
        self.state_dir = state_dir
        self.calls: List[Tuple[Tuple[ConsulRoute, ...], str, float]] = []
        self.watcher: Optional[RoutesWatcher] = None

    def on_routes(self, routes: Sequence[ConsulRoute], reason: str) -> None:
        self.calls.append((tuple(routes), reason, reactor.seconds()))

    def start(self) -> RoutesWatcher:
        self.watcher = RoutesWatcher("www", CatalogRoutesQuery(), lambda: self.settings,
                                     self.on_routes, reactor=reactor,
                                     state_dir=lambda: self.state_dir)
        self.watcher.startService()
        return self.watcher

    async def stop(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None and watcher.running:
            await defer.maybeDeferred(watcher.stopService)

    def current(self) -> Tuple[ConsulRoute, ...]:
        return self.calls[-1][0] if self.calls else ()

    def has(self, route: ConsulRoute) -> bool:
        return route in self.current()


@pytest.fixture
def routes(consul_agent: "ConsulAgent", tmp_path: Any) -> Any:
    watch = Routes(consul_agent, str(tmp_path / "state"))
    yield watch
    pytest_twisted.blockon(defer.ensureDeferred(watch.stop()))


def route(service: str, path: str, host: Optional[str] = None,
          strip: Optional[str] = None) -> ConsulRoute:
    return ConsulRoute(service, host, path, strip)


async def first_answer(routes: Routes) -> None:
    await poll_until(reactor, lambda: routes.calls, timeout=FOLLOW, what="Consul's first "
                     "answer")


@pytest_twisted.ensureDeferred
async def test_a_registration_reaches_on_routes_within_a_second(routes: Routes,
                                                                consul_api: "ConsulAPI",
                                                                ) -> None:
    """The blocking query on the catalog wakes on a registration: measured from the
    register call to the on_routes call, a new service's routes arrive within 1 s, with
    its host, path and strip as tagged; its other tags and options lb cannot honour do
    not make routes."""
    routes.start()
    await first_answer(routes)
    assert routes.current() == ()
    sent = reactor.seconds()
    await consul_api.register("shop-1", "shop", 8081, tags=[
        "v2", "urlprefix-shop.example.com/", "urlprefix-/shop strip=/shop",
        "urlprefix-/admin allow=ip:10.0.0.0/8"])
    wanted = (route("shop", "/", "shop.example.com"), route("shop", "/shop", None, "/shop"))
    await poll_until(reactor, lambda: routes.current() == wanted, timeout=REACH,
                     what="the registration's routes")
    took = routes.calls[-1][2] - sent
    print(f"registration -> on_routes: {took * 1000:.0f} ms")
    assert took <= REACH, f"on_routes came {took:.3f}s after the registration"
    assert routes.calls[-1][1] == "consul catalog services tagged 'urlprefix-'"
    assert routes.watcher is not None and len(routes.watcher.skipped) == 1


@pytest_twisted.ensureDeferred
async def test_tag_changes_and_deregistration_follow(routes: Routes,
                                                     consul_api: "ConsulAPI") -> None:
    """Re-registering an instance with other tags replaces its routes; two services on one
    path resolve to the lower name; deregistering the last instance takes the service's
    routes away."""
    await consul_api.register("api-1", "api", 8082, tags=["urlprefix-/api"])
    routes.start()
    await poll_until(reactor, lambda: routes.has(route("api", "/api")), timeout=FOLLOW,
                     what="the api route")
    await consul_api.register("api-1", "api", 8082, tags=["urlprefix-/v2/api"])
    await poll_until(reactor, lambda: routes.current() == (route("api", "/v2/api"),),
                     timeout=FOLLOW, what="the changed tag")
    await consul_api.register("zeta-1", "zeta", 8083, tags=["urlprefix-/v2/api/"])
    await consul_api.register("web-1", "web", 8084, tags=["urlprefix-/"])
    await poll_until(reactor, lambda: routes.has(route("web", "/")), timeout=FOLLOW,
                     what="the web route")
    assert routes.current() == (route("api", "/v2/api"), route("web", "/"))
    assert routes.watcher is not None
    assert [c.dropped for c in routes.watcher.conflicts] == [(route("zeta", "/v2/api/"),)]
    await consul_api.deregister("api-1")
    await poll_until(reactor, lambda: routes.current() == (route("zeta", "/v2/api/"),
                                                           route("web", "/")),
                     timeout=FOLLOW, what="the deregistered service's route to go")
    assert routes.watcher.conflicts == ()


@pytest_twisted.ensureDeferred
async def test_a_service_whose_instances_all_fail_keeps_its_route(
        routes: Routes, consul_api: "ConsulAPI") -> None:
    """Unlike Fabio, a service whose only instance turns critical keeps its route (its
    pool answers 503, the request never falls through to another route): the catalog
    lists it all the same, later changes included."""
    await consul_api.register("api-1", "api", 8082, tags=["urlprefix-/api"])
    routes.start()
    await poll_until(reactor, lambda: routes.has(route("api", "/api")), timeout=FOLLOW,
                     what="the api route")
    await consul_api.check("api-1", "critical")
    await consul_api.register("web-1", "web", 8084, tags=["urlprefix-/"])
    await poll_until(reactor, lambda: routes.has(route("web", "/")), timeout=FOLLOW,
                     what="a later change")
    assert routes.current() == (route("api", "/api"), route("web", "/"))


@pytest_twisted.ensureDeferred
async def test_agent_down_keeps_the_routes_and_a_restart_serves_the_snapshot(
        routes: Routes, consul_agent: "ConsulAgent", consul_api: "ConsulAPI") -> None:
    """With the agent killed the watch fails and keeps its last routes (no on_routes
    call); a watch started while the agent is still down serves the snapshot's routes at
    once; when the agent is back (empty, as a dev agent is), its answer applies."""
    await consul_api.register("api-1", "api", 8082, tags=["urlprefix-/api"])
    watcher = routes.start()
    await poll_until(reactor, lambda: routes.has(route("api", "/api")), timeout=FOLLOW,
                     what="the api route")
    calls = len(routes.calls)
    consul_agent.stop()
    await poll_until(reactor, lambda: watcher.requests["error"] + watcher.requests[
        "timeout"] >= 2, timeout=10, what="the watch to see the agent down")
    assert len(routes.calls) == calls and watcher.routes == (route("api", "/api"),)
    await routes.stop()

    routes.calls.clear()
    restarted = routes.start()
    assert routes.calls[0][:2] == ((route("api", "/api"),),
                                   "consul snapshot, until Consul answers")
    await poll_until(reactor, lambda: restarted.requests["error"] >= 1, timeout=10,
                     what="the restarted watch to fail against the dead agent")
    assert routes.current() == (route("api", "/api"),)

    await consul_agent.start_async(reactor)
    await consul_api.register("web-1", "web", 8084, tags=["urlprefix-/"])
    await poll_until(reactor, lambda: routes.current() == (route("web", "/"),),
                     timeout=10, what="the agent's answer after it came back")
