"""Fixtures for HTTP-mode tests: lb as a real process (``twistd -n lb``) with http listeners in
front of the test backends of tests/http/backend.py, every process stopped at the end."""

from __future__ import annotations

import json
import os
import textwrap
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import pytest

from lb.testing import free_port
from tests.http.backend import Backend, start_backend
from tests.processes import Proc, accepts, twistd_lb, wait_for


class LB:
    """One lb process: ``start(config_text)`` (admin on a free port is added), then
    ``port(listener)``, ``admin(path)``, ``log()``."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.proc: Optional[Proc] = None
        self.ports: Dict[str, int] = {}
        self.admin_port = 0
        self.config_path = str(tmp_path / "lb.yaml")

    def write(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(f'admin: {{bind: "127.0.0.1:{self.admin_port}"}}\n'
                    + textwrap.dedent(text))

    def start(self, text: str, **ports: int) -> "LB":
        """``text`` may use ``{name}`` placeholders for the listener ports given (free ports
        are picked for names given as 0)."""
        self.ports = {name: port or free_port() for name, port in ports.items()}
        self.admin_port = free_port()
        self.write(text.format(**self.ports))
        self.proc = twistd_lb(self.config_path, str(self.tmp_path),
                              str(self.tmp_path / "lb.log"))
        wait_for(lambda: all(accepts(p) for p in self.ports.values())
                 and accepts(self.admin_port), what="lb's listeners", timeout=20)
        return self

    def port(self, name: str) -> int:
        return self.ports[name]

    def admin(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                         data=data, method=method)
        with urllib.request.urlopen(request, timeout=5) as r:
            raw = r.read()
        return json.loads(raw) if r.headers.get("content-type", "").startswith(
            "application/json") else raw.decode()

    def log(self) -> str:
        return self.proc.log() if self.proc is not None else ""

    def access_lines(self) -> List[str]:
        return [line for line in self.log().splitlines() if "[lb.access#info]" in line]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def simple(lb_process: Callable[..., LB], *peers: Union[Backend, str], pool: str = "",
           listener: str = "") -> LB:
    """An http listener ``www`` in front of pool ``web`` of ``peers`` (backends or
    ``host:port``; extra pool and listener keys as YAML indented by ``indent(text, 4)``)."""
    addresses = ", ".join(f'"{getattr(b, "address", b)}"' for b in peers)
    return lb_process(f"""\
        listeners:
          www:
            bind: "127.0.0.1:{{www}}"
            mode: http
            pool: web
        {listener}
        pools:
          web:
            peers: [{addresses}]
        {pool}
        """.replace("\n        \n", "\n"), www=0)


def indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.strip().splitlines())


@pytest.fixture
def lb_process(tmp_path: Any) -> Iterator[Callable[..., LB]]:
    """Start lb processes from config text; all stopped at the end."""
    started: List[LB] = []

    def start(text: str, **ports: int) -> LB:
        lb = LB(tmp_path / f"lb{len(started)}")
        os.makedirs(lb.tmp_path, exist_ok=True)
        started.append(lb)
        return lb.start(text, **ports)
    yield start
    for lb in started:
        lb.stop()


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """In-process HTTP backends (each on its own thread's event loop); stopped at the end."""
    started: List[Backend] = []

    def start(name: Optional[str] = None, **kw: Any) -> Backend:
        backend = start_backend(name, **kw)
        started.append(backend)
        return backend
    yield start
    for backend in started:
        backend.stop()


@pytest.fixture(scope="module")
def http_lb(tmp_path_factory: Any) -> Iterator[Callable[[int], int]]:
    """For the smuggling corpus: an http listener in front of one peer (lb as a process,
    default http settings); returns its port. Module-scoped: the corpus runs many cases."""
    started: List[LB] = []

    def start(peer_port: int) -> int:
        lb = LB(tmp_path_factory.mktemp("lb-corpus"))
        started.append(lb)
        lb.start(f"""\
            listeners:
              www:
                bind: "127.0.0.1:{{www}}"
                mode: http
                pool: web
            pools:
              web:
                peers: ["127.0.0.1:{peer_port}"]
                retries: 0
            """, www=0)
        return lb.port("www")
    yield start
    for lb in started:
        lb.stop()
