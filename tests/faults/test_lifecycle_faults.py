"""The balancer's own life under continuous client load: reloads, slow readers, shutdown.

lb, its peers and the clients are real processes and sockets on 127.0.0.1; every load loop
is bounded in count and time.
"""

from __future__ import annotations

import signal
import socket
import time
from typing import List

import pytest

from lb.testing import free_port
from tests.faults.conftest import Cluster
from tests.faults.load import Load
from tests.processes import accepts, http_get, wait_for

pytestmark = pytest.mark.integration


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def config(port: int, peers: List[int], *, weight: int = 1, extra_listener: int = 0,
           shutdown_timeout: str = "20s") -> str:
    listeners = f'  web: {{bind: "127.0.0.1:{port}", pool: web}}\n'
    if extra_listener:
        listeners += f'  extra: {{bind: "127.0.0.1:{extra_listener}", pool: web}}\n'
    return (f"shutdown_timeout: {shutdown_timeout}\nlisteners:\n{listeners}pools:\n  web:\n"
            f'    peers: ["127.0.0.1:{peers[0]}", {{address: "127.0.0.1:{peers[1]}", '
            f"weight: {weight}}}]\n")


def test_ten_sighups_under_load_fail_nothing_and_keep_long_connections(
        cluster: Cluster) -> None:
    """Ten SIGHUP reloads under continuous load, each changing the config (a weight, a
    listener added or removed): no request fails, and keep-alive connections opened before
    the first reload still work after the last."""
    _, a = cluster.backend()
    _, b = cluster.backend()
    port, extra = free_port(), free_port()
    cluster.start_lb(config(port, [a, b]), port)
    admin = f'admin: {{bind: "127.0.0.1:{cluster.admin_port}"}}\n'
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for sock in held:
            assert http_get(sock).startswith(b"backend ")
        with Load(port, workers=4, max_seconds=60) as load:
            load.wait_for_requests(200)
            started = time.monotonic()
            for i in range(10):
                cluster.write_config(admin + config(port, [a, b], weight=1 + i % 3,
                                                    extra_listener=extra if i % 2 else 0))
                cluster.lb.signal(signal.SIGHUP)
                wait_for(lambda i=i: cluster.lb.log().count("reloaded") == i + 1, timeout=10,
                         what=f"reload {i + 1}")
                assert accepts(extra) == bool(i % 2)
                for sock in held:  # long-lived connections keep working across reloads
                    assert http_get(sock).startswith(b"backend ")
            took = time.monotonic() - started
            load.wait_for_requests(200)
        print(f"\n10 SIGHUPs in {took:.1f}s under load: {load.summary()}")
        assert load.failures() == [], load.summary()
        assert "reload rejected" not in cluster.lb.log()
    finally:
        for sock in held:
            sock.close()


def test_slow_readers_keep_lb_memory_bounded(cluster: Cluster) -> None:
    """Clients that ask for 64 MiB each and do not read: flow control stops the peers, so
    lb's memory stays bounded (a proxy buffering the answers would need 1.2 GiB)."""
    _, a = cluster.backend()
    _, b = cluster.backend()
    port = free_port()
    cluster.start_lb(config(port, [a, b]), port)
    pid = cluster.lb.popen.pid
    with Load(port, workers=2, max_requests=200, max_seconds=20) as warm:
        warm.wait_for_requests(200)
    before = rss_kib(pid)
    readers = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b"GET /big?bytes=67108864 HTTP/1.0\r\n\r\n")
            readers.append(sock)
        peak = before
        deadline = time.monotonic() + 3.0  # bounded: a few seconds of not reading
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(pid))
            time.sleep(0.1)
        # they are still connected and the answer is flowing, just not read
        got = readers[0].recv(65536)
        assert got.startswith(b"HTTP/1.0 200")
    finally:
        for sock in readers:
            sock.close()
    growth_mib = (peak - before) / 1024
    print(f"\n20 slow readers of 64 MiB: lb RSS {before / 1024:.1f} MiB -> peak "
          f"{peak / 1024:.1f} MiB (+{growth_mib:.1f} MiB)")
    assert growth_mib < 32


def test_sigterm_under_load_finishes_requests_in_flight(cluster: Cluster) -> None:
    """SIGTERM under load: the listener closes at once, every request lb had accepted is
    answered (they take 500 ms each), and lb exits as soon as they are done, well before
    shutdown_timeout."""
    _, a = cluster.backend()
    _, b = cluster.backend()
    port = free_port()
    cluster.start_lb(config(port, [a, b], shutdown_timeout="20s"), port)
    load = Load(port, workers=8, max_seconds=30, path="/slow?ms=500", timeout=10)
    with load:
        load.wait_for_requests(16)
        time.sleep(0.25)  # mid-request: the next round of requests is half answered
        sent = time.monotonic()
        cluster.lb.signal(signal.SIGTERM)
        wait_for(lambda: not accepts(port), timeout=5, what="the listener closed")
        closed = time.monotonic()
        assert cluster.lb.wait(15) is not None, "lb did not exit"
        exited = time.monotonic() - sent
    accepted = [r for r in load.records if r.started < sent - 0.1]
    in_flight = [r for r in accepted if r.ended > sent]
    print(f"\nSIGTERM under load: listener closed after {closed - sent:.2f}s, lb exited after "
          f"{exited:.2f}s; {len(in_flight)} request(s) in flight at SIGTERM, "
          f"{sum(not r.ok for r in accepted)} of {len(accepted)} accepted ones failed")
    assert in_flight, "no request was in flight at SIGTERM"
    assert all(r.ok for r in accepted), [r.answer for r in accepted if not r.ok]
    assert exited < 5
    assert "waiting up to 20s" in cluster.lb.log()
