"""Consul faults under client load, with lb as a real ``twistd -n lb`` process.

1. A fake Consul (a scripted HTTP server in this process, on 127.0.0.1) first answers a good
   set of two demo backends, then in turn garbage JSON, wrong types, an index going back
   with an empty list, instances of which none is usable, 500s, a slow answer and a hung
   request, and finally a changed set: no client request may fail, and the change is taken.
2. A real Consul agent is killed and restarted (with a changed set) under load: no client
   request may fail, and the pool is current within 2 s of the agent answering again.

Each test prints its figures (requests, failures, times) for ``pytest -s``.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from lb.testing import free_port
from tests.faults.conftest import Cluster, lb_log
from tests.faults.load import Load
from tests.processes import wait_for

pytestmark = pytest.mark.integration

FOLLOW = 2.0  # the pool is current within this long of Consul answering (again)
PHASE_TIMEOUT = 10.0  # bound on each fake-Consul phase


def instance(port: int, address: str = "127.0.0.1", sid: str = "") -> Dict[str, Any]:
    """A passing /v1/health/service entry as Consul 1.8.7 shapes it (trimmed)."""
    sid = sid or f"web-{port}"
    return {"Node": {"Node": "fake", "Address": "127.0.0.1"},
            "Service": {"ID": sid, "Service": "web", "Address": address, "Port": port,
                        "Weights": {"Passing": 1, "Warning": 1}, "Tags": []},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing", "ServiceID": ""}]}


WRONG_TYPES = [
    {"Service": "web"},                                          # an object, not a list
    [["127.0.0.1", 9001]],                                       # lists, not instances
    [{"Service": {"Address": "127.0.0.1", "Port": "9001"}}],     # port as a string
    [{"Service": {"Address": 127001, "Port": 9001}, "Node": None}],  # address as a number
    [{"Service": {"Address": "127.0.0.1", "Port": 9001}, "Checks": {"a": 1}}],
]


class FakeConsul:
    """Consul's ``/v1/health/service/web`` scripted by mode, in a thread of the test.

    In ``good`` mode it behaves as a blocking query: a request carrying the current index
    is held until the set changes or its ``wait`` runs out. A mode change releases held
    requests, which then answer as the new mode says."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.mode = "good"
        self.index = 100
        self.entries: List[Dict[str, Any]] = []
        self.received: Counter = Counter()  # requests per mode
        self.finished: Counter = Counter()
        self.version = 0
        self.stopping = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def start(self) -> "FakeConsul":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def set(self, mode: str, entries: Optional[List[Dict[str, Any]]] = None) -> None:
        """Switch mode (and the good set); release held requests."""
        with self.cond:
            self.mode = mode
            if entries is not None:
                self.entries = entries
                self.index += 1
            self.version += 1
            self.cond.notify_all()

    def _hold(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + seconds
        with self.cond:
            while not self.stopping and not until() and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path != "/v1/health/service/web":
            return self._send(h, 404, b"not found", None)
        sent = int(query.get("index", ["0"])[0])
        wait = float(query.get("wait", ["0ms"])[0].rstrip("ms") or 0) / 1000
        with self.cond:
            version = self.version
            blocks = sent == self.index and (self.mode in ("good", "changed") or (
                self.mode in ("slow", "hung") and self.received[self.mode] > 0))
        if blocks:
            self._hold(min(wait, 10.0), lambda: self.version != version)
        with self.cond:  # a request released by a mode change answers as the new mode
            mode = self.mode
            self.received[mode] += 1
            n = self.received[mode]
        try:
            self._answer(h, mode, n)
        finally:
            with self.cond:
                self.finished[mode] += 1

    def _answer(self, h: BaseHTTPRequestHandler, mode: str, n: int) -> None:
        good = json.dumps(self.entries).encode()
        if mode in ("good", "changed"):
            self._send(h, 200, good, self.index)
        elif mode == "garbage":  # with a new index, or lb rightly takes it for a wait-out
            self._send(h, 200, good[:len(good) // 2], self._bump())
        elif mode == "wrong_types":
            self._send(h, 200, json.dumps(WRONG_TYPES[(n - 1) % len(WRONG_TYPES)]).encode(),
                       self._bump())
        elif mode == "index_back":
            # A Consul that lost its state: [] at a low index before its agent synced,
            # then the set again (from the new, low index on).
            with self.cond:
                if n == 1:
                    self.index = 3
                    body = b"[]"
                else:
                    self.index = max(self.index, 4)
                    body = good
            self._send(h, 200, body, self.index)
        elif mode == "unusable":
            index = self._bump()
            body = [instance(9, "bad..example.com", "a"), instance(0, sid="b"),
                    instance(80, "a" * 64 + ".example.com", "c"),
                    instance(80, "xn--a.example.com", "d")]
            self._send(h, 200, json.dumps(body).encode(), index)
        elif mode == "http500":
            self._send(h, 500, b"No cluster leader", None)
        elif mode == "slow" and n == 1:
            self._hold(1.5)
            self._send(h, 200, good, self.index)
        elif mode == "hung" and n == 1:
            self._hold(4.0)  # then drop the connection without a word
            h.close_connection = True
        elif mode in ("slow", "hung"):  # recovered: answer as usual
            self._send(h, 200, good, self.index)
        else:
            raise AssertionError(mode)

    def _bump(self) -> int:
        with self.cond:
            self.index += 1
            return self.index

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes,
              index: Optional[int]) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            if index is not None:
                h.send_header("X-Consul-Index", str(index))
                h.send_header("X-Consul-KnownLeader", "true")
            h.end_headers()
            h.wfile.write(body)
        except OSError:
            pass  # lb gave up on this request


@pytest.fixture
def fake_consul() -> Any:
    fake = FakeConsul().start()
    try:
        yield fake
    finally:
        fake.stop()


def consul_peers(c: Cluster) -> Dict[str, str]:
    """address → admin_state of the peers Consul gave the pool (draining ones included)."""
    return {p["address"]: p["admin_state"] for p in c.admin("/api/pools/web")["peers"]
            if "consul" in p["sources"] or p["removing"]}


def metric(c: Cluster, name: str, **labels: str) -> float:
    text = c.admin("/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def start_lb(c: Cluster, url: str, extra: str = "") -> int:
    port = free_port()
    c.start_lb(f"""
        consul: {{url: "{url}"{extra}}}
        shutdown_timeout: 1s
        listeners:
          web: {{bind: "127.0.0.1:{port}", pool: web}}
        pools:
          web:
            consul: {{service: web}}
            drain_timeout: 5s
        """, port)
    return port


def test_poisoned_consul_answers_never_cost_a_request(cluster: Cluster,
                                                      fake_consul: FakeConsul) -> None:
    """Whatever a (fake) Consul answers after a good set — garbage JSON, wrong types, an
    index going back with [], instances of which none is usable, 500s, a slow answer, a
    hung request — lb keeps serving the last good set with 0 failed client requests, and
    takes a good changed set within 2 s."""
    fake = fake_consul
    (_, a), (_, b), (_, c3) = cluster.backend(), cluster.backend(), cluster.backend()
    fake.set("good", [instance(a), instance(b)])
    port = start_lb(cluster, fake.url, ", poll_interval: 1s, wait: 1s")
    good = {f"127.0.0.1:{a}": "ready", f"127.0.0.1:{b}": "ready"}
    wait_for(lambda: consul_peers(cluster) == good, what="the good set")

    phases: List[Tuple[str, int, float, int, int]] = []
    with Load(port, workers=3, max_seconds=50) as load:
        load.wait_for_requests(30)
        began = time.monotonic()
        for mode, needed in (("garbage", 2), ("wrong_types", len(WRONG_TYPES)),
                             ("index_back", 2), ("unusable", 2), ("http500", 2),
                             ("slow", 1), ("hung", 1)):
            t0 = time.monotonic()
            fake.set(mode)
            wait_for(lambda mode=mode, needed=needed: fake.finished[mode] >= needed,
                     timeout=PHASE_TIMEOUT,
                     what=f"lb to get {needed} {mode} answer(s)")
            assert consul_peers(cluster) == good, f"the pool changed during {mode}"
            phases.append((mode, fake.finished[mode], time.monotonic() - t0,
                           len(load.since(t0)), len(load.failures(t0))))
        t0 = time.monotonic()
        fake.set("changed", [instance(a), instance(c3)])
        changed = {f"127.0.0.1:{a}": "ready", f"127.0.0.1:{c3}": "ready"}
        wait_for(lambda: {k: v for k, v in consul_peers(cluster).items() if v == "ready"}
                 == changed, timeout=FOLLOW + 3, interval=0.01, what="the changed set")
        took = time.monotonic() - t0
        wait_for(lambda: any(r.answer.endswith(f" {c3}") for r in load.since(t0)),
                 what="a request served by the new backend")
        load.wait_for_requests(30)
    records = load.since(began)
    print(f"\npoisoned Consul: {len(records)} client requests over "
          f"{time.monotonic() - began:.1f}s, {len(load.failures(began))} failed; changed set "
          f"taken in {took:.3f}s")
    for mode, asked, seconds, requests, failed in phases:
        print(f"  {mode:12} {asked} answer(s) in {seconds:.2f}s; {requests} client requests, "
              f"{failed} failed")
    assert load.failures() == [], load.summary()
    assert took <= FOLLOW, f"changed set taken after {took:.2f}s"
    invalid = metric(cluster, "lb_consul_requests_total", pool="web", result="invalid")
    assert invalid >= 2 + len(WRONG_TYPES) + 2
    assert metric(cluster, "lb_consul_requests_total", pool="web", result="http_error") >= 2
    log = lb_log(cluster)
    assert log.count("none of the 4 instance(s) is usable") == 1, "logged once, not per poll"
    assert "index went back" in log and "body is not JSON" in log


# --- a real agent killed and restarted -------------------------------------------------------


def put(url: str, body: Any) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200


def answers(url: str) -> bool:
    """The agent answers the service query (200), as lb will see it."""
    try:
        with urllib.request.urlopen(url + "/v1/health/service/web", timeout=1) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def test_consul_agent_killed_and_restarted_under_load(cluster: Cluster, consul_agent: Any,
                                                      tmp_path: Any) -> None:
    """A Consul agent killed under load costs no client request and the pool keeps its set;
    restarted with a changed set (service definitions in -config-dir, as a real agent
    reloads them), the pool is current within 2 s of the agent answering, with default
    poll_interval and wait, and still no request fails."""
    agent = consul_agent
    (_, a), (_, b), (_, c3) = cluster.backend(), cluster.backend(), cluster.backend()
    for p in (a, b):
        put(agent.url + "/v1/agent/service/register",
            {"ID": f"web-{p}", "Name": "web", "Address": "127.0.0.1", "Port": p})
    port = start_lb(cluster, agent.url)
    first = {f"127.0.0.1:{a}": "ready", f"127.0.0.1:{b}": "ready"}
    wait_for(lambda: consul_peers(cluster) == first, what="the registered set")

    with Load(port, workers=3, max_seconds=45) as load:
        load.wait_for_requests(30)
        killed = time.monotonic()
        agent.stop()
        wait_for(lambda: metric(cluster, "lb_consul_requests_total", pool="web",
                                result="error") >= 6, what="lb to retry the agent 6 times")
        load.wait_for_requests(100)
        assert consul_peers(cluster) == first, "the pool kept its set"
        down_for = time.monotonic() - killed

        config_dir = tmp_path / "consul.d"
        config_dir.mkdir()
        (config_dir / "web.json").write_text(json.dumps({"services": [
            {"id": f"web-{p}", "name": "web", "address": "127.0.0.1", "port": p}
            for p in (a, c3)]}))
        agent.config_dir = str(config_dir)
        agent.spawn()
        wait_for(lambda: answers(agent.url), timeout=30, interval=0.01,
                 what="the restarted agent to answer")
        answered = time.monotonic()
        changed = {f"127.0.0.1:{a}": "ready", f"127.0.0.1:{c3}": "ready"}
        wait_for(lambda: {k: v for k, v in consul_peers(cluster).items() if v == "ready"}
                 == changed, timeout=FOLLOW + 5, interval=0.01, what="the changed set")
        took = time.monotonic() - answered
        wait_for(lambda: any(r.answer.endswith(f" {c3}") for r in load.since(answered)),
                 what="a request served by the new backend")
        load.wait_for_requests(50)
    errors = metric(cluster, "lb_consul_requests_total", pool="web", result="error")
    print(f"\nagent restart: {load.count()} client requests, {len(load.failures())} failed; "
          f"{len(load.since(killed)) - len(load.since(answered))} requests during the "
          f"{answered - killed:.1f}s outage (agent down {down_for:.1f}s before restart); "
          f"pool current {took:.3f}s after the agent answered; {errors:.0f} failed Consul "
          f"requests; index went back: {'index went back' in lb_log(cluster)}")
    assert load.failures() == [], load.summary()
    assert took <= FOLLOW, f"pool current {took:.2f}s after the agent answered again"
