"""A real Consul agent for integration tests: ``consul agent -dev`` on free loopback ports.

A pytest plugin (``pytest_plugins = ["tests.consul_agent"]``). The ``consul_agent`` fixture
starts a private dev agent per test (about 0.3 s to a leader), with every port on a free
127.0.0.1 port and its own data dir, and kills it at the end. Outage tests call
``stop()`` (SIGKILL, like a crash) and ``start()`` / ``start_async()`` (same ports, fresh
empty state, as a dev agent has no persistence; services defined in ``config_dir`` come
back with it). ``ConsulAPI`` is a small async helper to
register services, toggle maintenance and write KV through the agent's HTTP API with treq.

The binary comes from ``$LB_CONSUL_BIN`` or ``scripts/install-consul`` (Consul 1.8.7 from
Debian bullseye, cached in ``.cache/consul``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional

import pytest
import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool

from lb.testing import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SCRIPT = os.path.join(REPO, "scripts", "install-consul")
START_TIMEOUT = 30.0  # bound on waiting for the agent to elect itself leader
START_ATTEMPTS = 3  # a free port can be taken by someone else before consul binds it


def find_consul_binary() -> str:
    """``$LB_CONSUL_BIN``, or whatever ``scripts/install-consul`` installs (idempotent)."""
    env = os.environ.get("LB_CONSUL_BIN")
    if env:
        return env
    try:
        out = subprocess.run([INSTALL_SCRIPT], check=True, capture_output=True, text=True,
                             timeout=600)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"scripts/install-consul failed:\n{e.stderr}") from None
    return out.stdout.strip().splitlines()[-1]


class ConsulAgent:
    """One ``consul agent -dev`` subprocess bound to 127.0.0.1 only."""

    def __init__(self, binary: str, workdir: str, node: str = "lb-test") -> None:
        self.binary = binary
        self.workdir = workdir
        self.node = node
        self.process: Optional[subprocess.Popen] = None
        self.ports: Dict[str, int] = {}
        self.log_path = os.path.join(workdir, "consul.log")
        self.starts = 0
        # Service definitions loaded at start (``-config-dir``): they come back with a
        # restarted dev agent, which keeps nothing else.
        self.config_dir: Optional[str] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    def _pick_ports(self) -> None:
        ports: List[int] = []
        while len(ports) < 5:
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.ports = dict(zip(("http", "dns", "server", "serf_lan", "serf_wan"), ports))

    def command(self) -> List[str]:
        p = self.ports
        data_dir = os.path.join(self.workdir, f"data-{self.starts}")
        return [self.binary, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                "-node", self.node, "-data-dir", data_dir, "-log-level", "warn",
                f"-http-port={p['http']}", f"-dns-port={p['dns']}",
                f"-server-port={p['server']}", f"-serf-lan-port={p['serf_lan']}",
                f"-serf-wan-port={p['serf_wan']}", "-grpc-port=-1"] + (
                    ["-config-dir", self.config_dir] if self.config_dir else [])

    def spawn(self) -> None:
        """Start the process (ports picked on the first start, kept on restarts)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the agent is already running")
        if not self.ports:
            self._pick_ports()
        self.starts += 1
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command(), stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.workdir)
        finally:
            log.close()

    def leader(self) -> Optional[str]:
        """The Raft leader, or None (not answering, or no leader yet)."""
        try:
            with urllib.request.urlopen(self.url + "/v1/status/leader", timeout=2) as r:
                value = json.loads(r.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None
        return value or None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait (bounded) for a leader; used in fixture setup, where blocking is
        fine. On a port clash on the first start, retry with new ports."""
        for _attempt in range(START_ATTEMPTS):
            self.spawn()
            if self._wait_leader_blocking(timeout):
                return
            first = self.starts == 1
            self.stop()
            if not first:
                break
            self.ports = {}
            self.starts = 0
        raise RuntimeError(f"consul agent did not become leader within {timeout:g}s; "
                           f"log:\n{self.log_tail()}")

    def _wait_leader_blocking(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False  # exited: typically a port already in use
            if self.leader():
                return True
            time.sleep(0.05)
        return False

    @defer.inlineCallbacks
    def start_async(self, reactor: Any, timeout: float = START_TIMEOUT) -> Any:
        """Restart from inside a running test without blocking the reactor: same ports,
        empty state. Fires once the agent has a leader (bounded by ``timeout``)."""
        self.spawn()
        http = _client(reactor)
        deadline = reactor.seconds() + timeout
        while True:
            if not self.running:
                raise AssertionError(f"consul exited:\n{self.log_tail()}")
            try:
                response = yield http.get(self.url + "/v1/status/leader", timeout=2)
                if (yield treq.json_content(response)):
                    return
            except Exception:
                pass  # not listening yet
            if reactor.seconds() >= deadline:
                raise AssertionError(f"consul had no leader within {timeout:g}s:\n"
                                     f"{self.log_tail()}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def stop(self) -> None:
        """Kill the agent (SIGKILL: like a crash, and quick) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"


def _client(reactor: Any) -> HTTPClient:
    """A treq client without persistent connections: a cached connection to an agent that
    was killed would fail the next request."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


class ConsulAPI:
    """The agent endpoints tests need, through treq (non-blocking)."""

    def __init__(self, url: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # tests run on pytest-twisted's reactor
        self.url = url
        self.http = _client(reactor)

    @defer.inlineCallbacks
    def _put(self, path: str, body: Any = None, params: Any = None) -> Any:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        response = yield self.http.put(self.url + path, data=data or b"", params=params,
                                  timeout=10)
        text = yield treq.content(response)
        if response.code != 200:
            raise AssertionError(f"PUT {path}: HTTP {response.code}: {text!r}")
        return text

    def register(self, service_id: str, name: str, port: int, address: str = "127.0.0.1",
                 tags: Optional[List[str]] = None, weights: Optional[Dict[str, int]] = None,
                 status: str = "passing") -> defer.Deferred:
        """Register an instance with a TTL check already in ``status``."""
        payload: Dict[str, Any] = {
            "ID": service_id, "Name": name, "Address": address, "Port": port,
            "Tags": tags or [],
            "Check": {"CheckID": f"{service_id}-ttl", "TTL": "10m", "Status": status},
        }
        if weights:
            payload["Weights"] = weights
        return self._put("/v1/agent/service/register", payload)

    def deregister(self, service_id: str) -> defer.Deferred:
        return self._put(f"/v1/agent/service/deregister/{service_id}")

    def maintenance(self, service_id: str, enable: bool, reason: str = "test"
                    ) -> defer.Deferred:
        return self._put(f"/v1/agent/service/maintenance/{service_id}",
                         params={"enable": "true" if enable else "false", "reason": reason})

    def check(self, service_id: str, status: str) -> defer.Deferred:
        verb = {"passing": "pass", "warning": "warn", "critical": "fail"}[status]
        return self._put(f"/v1/agent/check/{verb}/{service_id}-ttl")

    def kv_put(self, key: str, value: Any = b"") -> defer.Deferred:
        return self._put(f"/v1/kv/{key}", value)

    @defer.inlineCallbacks
    def kv_delete(self, key: str) -> Any:
        response = yield self.http.delete(self.url + f"/v1/kv/{key}", timeout=10)
        yield treq.content(response)
        if response.code != 200:
            raise AssertionError(f"DELETE {key}: HTTP {response.code}")


@pytest.fixture(scope="session")
def consul_binary() -> str:
    return find_consul_binary()


@pytest.fixture
def consul_agent(consul_binary: str, tmp_path_factory: Any) -> Iterator[ConsulAgent]:
    """A fresh dev agent for one test; killed (and its ports freed) at the end."""
    agent = ConsulAgent(consul_binary, str(tmp_path_factory.mktemp("consul")))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def consul_api(consul_agent: ConsulAgent) -> ConsulAPI:
    return ConsulAPI(consul_agent.url)
