"""Fixtures of the fault suite: lb and its backends as real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import urllib.request
from typing import Any, Iterator, List

import pytest

from lb.testing import free_port
from tests.processes import Proc, accepts, twistd_lb, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.integration


class Cluster:
    """Processes a fault test starts; every one is stopped when the test ends."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.procs: List[Proc] = []
        self.lb: Any = None
        self.admin_port = 0
        self.config_path = str(tmp_path / "lb.yaml")

    def backend(self, port: int = 0) -> "tuple[Proc, int]":
        """One backend process (``tests/faults/backend.py``: ``GET /`` names it, ``/health``
        is 200 until ``/fail``, ``/slow``, ``/big``), so a test can kill or stop one peer
        alone."""
        port = port or free_port()
        proc = Proc([sys.executable, "-m", "tests.faults.backend", "--port", str(port)],
                    REPO, str(self.tmp_path / f"backend-{port}.log"))
        self.procs.append(proc)
        wait_for(lambda: accepts(port), what=f"backend on {port}")
        return proc, port

    def write_config(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(textwrap.dedent(text))

    def start_lb(self, text: str, listen_port: int) -> Proc:
        """Write ``text`` (admin bound to a free port is added) and run ``twistd -n lb``."""
        self.admin_port = free_port()
        self.write_config(f'admin: {{bind: "127.0.0.1:{self.admin_port}"}}\n'
                          + textwrap.dedent(text))
        self.lb = twistd_lb(self.config_path, str(self.tmp_path),
                            str(self.tmp_path / "lb.log"))
        self.procs.append(self.lb)
        wait_for(lambda: accepts(listen_port) and accepts(self.admin_port),
                 what="lb listener and admin server")
        return self.lb

    def admin(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
        return json.loads(body) if path.startswith("/api") else body.decode()

    def peer(self, pool: str, address: str) -> Any:
        return self.admin(f"/api/pools/{pool}/peers/{address}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def lb_log(c: Cluster) -> str:
    return c.lb.log() if c.lb is not None else ""


__all__ = ["Cluster", "cluster", "lb_log", "os"]
