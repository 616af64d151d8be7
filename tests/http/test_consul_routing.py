"""Routes from Consul tags through a real Consul 1.8.7 agent and lb as a process: services
registered with ``urlprefix-`` tags get a route and a pool ``consul:<service>`` without a
reload, within a second; tag changes and deregistration follow; an announcing service whose
instances all fail answers 503 naming its pool; routes keep serving through a Consul outage
and from the snapshot after a restart with Consul down; canaries by Consul tag."""

from __future__ import annotations

import json
import textwrap
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional

import pytest

from tests.consul_agent import ConsulAgent
from tests.http.backend import Backend
from tests.http.clients import RawClient
from tests.http.conftest import LB
from tests.processes import wait_for

pytestmark = pytest.mark.integration

Start = Callable[..., LB]


def put(agent: ConsulAgent, path: str, body: Any = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(agent.url + path, data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as r:
        r.read()


def register(agent: ConsulAgent, service_id: str, name: str, backend: Backend,
             tags: List[str], status: str = "passing") -> None:
    """An instance on ``backend`` with a TTL check already in ``status``."""
    put(agent, "/v1/agent/service/register", {
        "ID": service_id, "Name": name, "Address": "127.0.0.1", "Port": backend.port,
        "Tags": tags, "Check": {"CheckID": f"{service_id}-ttl", "TTL": "10m",
                                "Status": status}})


def deregister(agent: ConsulAgent, service_id: str) -> None:
    put(agent, f"/v1/agent/service/deregister/{service_id}")


def start_lb(lb_process: Start, agent: ConsulAgent, state_dir: str, extra: str = "",
             listener: str = "") -> LB:
    """lb with an http listener ``www`` routing from Consul tags; ``listener``: more keys of
    it (YAML indented by 4), ``extra``: more top-level YAML (pools)."""
    return lb_process(
        f'consul:\n  url: "{agent.url}"\n  wait: 10s\n'
        f'state_dir: "{state_dir}"\n'
        'listeners:\n'
        '  www:\n'
        '    bind: "127.0.0.1:{www}"\n'
        '    mode: http\n'
        + textwrap.indent(textwrap.dedent(listener).strip("\n") + "\n", "    ") +
        '    consul_routes:\n'
        '      tag_prefix: urlprefix-\n'
        '      pool_defaults:\n'
        '        balance: leastconn\n'
        '        keepalive: 4\n'
        + textwrap.dedent(extra).strip("\n") + "\n", www=0)


def who(port: int, target: str, headers: Optional[Dict[str, str]] = None) -> "tuple[str, int, str]":
    """(backend that answered or '', status, lb's or the peer's body)."""
    with RawClient(port=port) as c:
        r = c.request("GET", target, headers=list((headers or {}).items()))
    return r.header("X-Backend") or "", r.status, r.text


def pools(lb: LB) -> List[str]:
    return [p["name"] for p in lb.admin("/api/pools")["pools"]]


def test_a_registered_service_is_routed_within_a_second_and_follows_consul(
        lb_process: Start, backends: Callable[..., Backend], consul_agent: ConsulAgent,
        tmp_path: Any) -> None:
    """Registration → the service's route and pool ``consul:api`` (from pool_defaults)
    exist and serve within 1 s, strip applied; a second instance joins the pool; a tag
    change moves the route; deregistration removes route and pool, and a request in flight
    to it still gets its answer (the pool drains). A client on a config
    route sees no failure meanwhile (continuous, bounded load)."""
    a, b, web = backends("a"), backends("b"), backends("web")
    lb = start_lb(lb_process, consul_agent, str(tmp_path / "state"), listener="""\
            routes:
              - path_prefix: /web
                pool: web""", extra=f"""\
        pools:
          web:
            peers: ["{web.address}"]""")
    port = lb.port("www")
    assert who(port, "/api/echo")[1] == 404
    errors: List[str] = []
    stop = threading.Event()

    def load() -> None:
        with RawClient(port=port) as c:
            for _ in range(5000):
                if stop.is_set():
                    return
                r = c.request("GET", "/web")
                if r.header("X-Backend") != "web":
                    errors.append(f"{r.status} {r.text!r}")

    loader = threading.Thread(target=load)
    loader.start()
    try:
        register(consul_agent, "api-1", "api", a, ["urlprefix-/api strip=/api", "v1"])
        registered = time.monotonic()
        wait_for(lambda: who(port, "/api/echo")[0] == "a", timeout=5, interval=0.01,
                 what="the route to api")
        elapsed = time.monotonic() - registered
        print(f"\nregistration -> first routed request: {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0, elapsed
        with RawClient(port=port) as c:
            assert c.request("GET", "/api/echo?q=1").json()["target"] == "/echo?q=1"
        pool = lb.admin("/api/pools/consul:api")
        assert pool["balance"] == "leastconn"
        routes = [r for r in lb.admin("/api/routes")["routes"] if r["source"] == "consul:api"]
        assert routes == [{"listener": "www", "host": None, "path_prefix": "/api",
                           "headers": {}, "pool": "consul:api", "strip_prefix": "/api",
                           "source": "consul:api"}]

        register(consul_agent, "api-2", "api", b, ["urlprefix-/api strip=/api"])
        wait_for(lambda: {who(port, "/api/")[0] for _ in range(6)} == {"a", "b"},
                 timeout=5, what="the second instance serving")

        for sid, backend in (("api-1", a), ("api-2", b)):
            register(consul_agent, sid, "api", backend, ["urlprefix-/v2 strip=/v2"])
        wait_for(lambda: who(port, "/api/")[1] == 404 and who(port, "/v2/")[0] in "ab",
                 timeout=5, what="the route moving to /v2")

        slow: List[str] = []  # a request in flight when its pool goes: it finishes
        in_flight = threading.Thread(target=lambda: slow.append(
            "%s %s" % who(port, "/v2/slow?ms=1500")[:2]))
        in_flight.start()
        wait_for(lambda: a.stats()["in_flight"] + b.stats()["in_flight"] == 1, timeout=5,
                 what="the slow request at a peer")
        deregister(consul_agent, "api-1")
        deregister(consul_agent, "api-2")
        wait_for(lambda: who(port, "/v2/")[1] == 404 and "consul:api" not in pools(lb),
                 timeout=5, what="route and pool removed")
        in_flight.join(10)
        assert slow in (["a 200"], ["b 200"]), slow
    finally:
        stop.set()
        loader.join(30)
    assert not errors, errors[:3]
    log = lb.log()
    assert "pool consul:api created" in log and "pool consul:api removed" in log


def test_an_announcing_service_without_a_passing_instance_answers_503(
        lb_process: Start, backends: Callable[..., Backend], consul_agent: ConsulAgent,
        tmp_path: Any) -> None:
    """A service whose only instance fails its check keeps its route: requests for it get
    503 naming the pool consul:api, never the default pool; once it passes it serves."""
    a, web = backends("a"), backends("web")
    lb = start_lb(lb_process, consul_agent, str(tmp_path / "state"), listener="""\
            pool: web""", extra=f"""\
        pools:
          web:
            peers: ["{web.address}"]""")
    port = lb.port("www")
    register(consul_agent, "api-1", "api", a, ["urlprefix-/api"], status="critical")
    wait_for(lambda: who(port, "/api/x")[1] == 503, timeout=5, what="the route")
    # polls made before Consul told lb of the route went to the default pool, as they should
    before = web.stats()["by_path"].get("/api/x", 0)
    for _ in range(20):
        backend, status, text = who(port, "/api/x")
        assert (backend, status) == ("", 503) and "pool consul:api (0 of 0 peers up)" in text, \
            text
    put(consul_agent, "/v1/agent/check/pass/api-1-ttl")
    wait_for(lambda: who(port, "/api/x")[0] == "a", timeout=5, what="the passing instance")
    assert who(port, "/other")[0] == "web"
    assert web.stats()["by_path"].get("/api/x", 0) == before


def test_routes_survive_a_consul_outage_and_a_restart_with_consul_down(
        lb_process: Start, backends: Callable[..., Backend], consul_agent: ConsulAgent,
        tmp_path: Any) -> None:
    """Consul killed: the routes and their peers keep serving. lb restarted while Consul is
    still down: it serves the routes (and peers) of its snapshot in state_dir."""
    a = backends("a")
    state = str(tmp_path / "state")
    lb = start_lb(lb_process, consul_agent, state)
    port = lb.port("www")
    register(consul_agent, "api-1", "api", a, ["urlprefix-/api"])
    wait_for(lambda: who(port, "/api/x")[0] == "a", timeout=5, what="the route")
    consul_agent.stop()
    for _ in range(30):
        assert who(port, "/api/x")[0] == "a"
    wait_for(lambda: 'lb_consul_consecutive_failures{pool="routes:www"}' in lb.admin(
        "/metrics") and "failure(s) in a row" in lb.admin("/"), timeout=10,
        what="the outage seen")
    lb.stop()
    again = start_lb(lb_process, consul_agent, state)
    assert who(again.port("www"), "/api/x")[0] == "a"
    assert "loaded" in again.log()


def test_canary_instances_by_consul_tag_and_header(
        lb_process: Start, backends: Callable[..., Backend], consul_agent: ConsulAgent,
        tmp_path: Any) -> None:
    """A gray release steered by tags: pool web takes every instance of service web, pool
    web-canary only those tagged canary; requests with X-Canary: 1 go to the canary, the
    others to the whole service."""
    stable, canary = backends("stable"), backends("canary")
    lb = start_lb(lb_process, consul_agent, str(tmp_path / "state"), listener="""\
            pool: web
            routes:
              - headers:
                  X-Canary: "1"
                pool: web-canary""", extra="""\
        pools:
          web:
            consul:
              service: web
          web-canary:
            consul:
              service: web
              tags: [canary]""")
    port = lb.port("www")
    register(consul_agent, "web-1", "web", stable, [])
    register(consul_agent, "web-2", "web", canary, ["canary"])
    wait_for(lambda: {who(port, "/")[0] for _ in range(6)} == {"stable", "canary"},
             timeout=5, what="both instances in pool web")
    assert {who(port, "/", {"X-Canary": "1"})[0] for _ in range(10)} == {"canary"}
