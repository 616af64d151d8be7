"""HTTP mode in front of a real web server (nginx, Debian's, installed by
scripts/install-test-tools) and under a real load generator (wrk), all on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import textwrap
from typing import Any, Callable, Iterator

import pytest

from lb.testing import free_port
from tests.http.clients import RawClient, keepalive
from tests.http.conftest import LB, simple
from tests.processes import Proc, accepts, wait_for

pytestmark = pytest.mark.integration

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx serving files from a temp dir: /small (100 B), /large (1 MiB, random)."""

    def __init__(self, tmp: Any, keepalive_timeout: str = "75s") -> None:
        self.port = free_port()
        self.root = tmp / "www"
        os.makedirs(self.root, exist_ok=True)
        (self.root / "small").write_bytes(b"s" * 100)
        self.large = os.urandom(1 << 20)
        (self.root / "large").write_bytes(self.large)
        conf = tmp / "nginx.conf"
        # as root nginx's workers would drop to nobody, who cannot read pytest's 0700 tmp dirs
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(textwrap.dedent(f"""\
            {user}
            worker_processes 1;
            daemon off;
            pid {tmp}/nginx.pid;
            error_log {tmp}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                keepalive_timeout {keepalive_timeout};
                client_body_temp_path {tmp}/body;
                proxy_temp_path {tmp}/proxy;
                fastcgi_temp_path {tmp}/fastcgi;
                uwsgi_temp_path {tmp}/uwsgi;
                scgi_temp_path {tmp}/scgi;
                server {{
                    listen 127.0.0.1:{self.port};
                    root {self.root};
                }}
            }}
            """))
        self.proc = Proc([NGINX, "-p", str(tmp), "-c", str(conf)], str(tmp),
                         str(tmp / "nginx.out"))
        wait_for(lambda: accepts(self.port), what="nginx")

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def nginx(tmp_path: Any) -> Iterator[Callable[..., Nginx]]:
    started = []

    def start(**kw: Any) -> Nginx:
        folder = tmp_path / f"nginx{len(started)}"
        os.makedirs(folder)
        n = Nginx(folder, **kw)
        started.append(n)
        return n
    yield start
    for n in started:
        n.stop()


def lb_in_front(lb_process: Callable[..., LB], port: int) -> LB:
    return simple(lb_process, f"127.0.0.1:{port}")


def test_nginx_as_a_peer(lb_process: Callable[..., LB], nginx: Callable[..., Nginx]) -> None:
    """Files, HEAD, conditional requests (304 from nginx's ETag), ranges (206) and 404s
    pass through lb from nginx unchanged, on reused connections."""
    server = nginx()
    lb = lb_in_front(lb_process, server.port)
    with RawClient(port=lb.port("www")) as client:
        small = client.request("GET", "/small")
        assert small.status == 200 and small.body == b"s" * 100
        large = client.request("GET", "/large")
        assert large.body_sha256 == hashlib.sha256(server.large).hexdigest()
        etag = large.header("ETag")
        assert etag
        assert client.request("GET", "/large", headers=[("If-None-Match", etag)]).status == 304
        head = client.request("HEAD", "/large")
        assert head.body == b"" and head.header("Content-Length") == str(1 << 20)
        part = client.request("GET", "/large", headers=[("Range", "bytes=10-19")])
        assert part.status == 206 and part.body == server.large[10:20]
        assert client.request("GET", "/missing").status == 404
        assert client.request("GET", "/small").status == 200


def test_nginx_closing_idle_connections_is_never_seen(lb_process: Callable[..., LB],
                                                      nginx: Callable[..., Nginx]) -> None:
    """nginx closes idle keep-alive connections after its keepalive_timeout (1 s here):
    requests after such pauses still succeed (a connection nginx closed is not reused, or
    the request is sent again on a fresh one)."""
    server = nginx(keepalive_timeout="1s")
    lb = lb_in_front(lb_process, server.port)
    port = lb.port("www")
    idle = f'lb_upstream_connections{{peer="127.0.0.1:{server.port}",pool="web",state="idle"}}'
    for _ in range(3):
        assert keepalive(port, ["/small"])[0].status == 200
        assert f"{idle} 1.0" in lb.admin("/metrics")
        wait_for(lambda: f"{idle} 0.0" in lb.admin("/metrics"), timeout=10,
                 what="nginx closing lb's idle connection (and lb noticing)")
    assert keepalive(port, ["/small", "/small"])[1].status == 200


def test_wrk_through_lb_gets_no_error(lb_process: Callable[..., LB],
                                      nginx: Callable[..., Nginx]) -> None:
    """wrk, 20 keep-alive connections for 2 s through lb to nginx: every answer is a 200
    and no socket error is reported."""
    server = nginx()
    lb = lb_in_front(lb_process, server.port)
    result = subprocess.run(["wrk", "-t1", "-c20", "-d2s", "--timeout", "5s",
                             f"http://127.0.0.1:{lb.port('www')}/small"],
                            capture_output=True, text=True, timeout=60)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    assert done > 500, out
    assert "Non-2xx" not in out and "Socket errors" not in out, out
