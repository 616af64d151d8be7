"""Peers failing under continuous client load: health verdicts, a killed peer, a hung peer.

lb, its peers and the clients are real processes and sockets on 127.0.0.1. Each test keeps a
bounded client load running through lb while a peer fails, and reads the outcome from the
recorded requests and from lb's admin API.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections import Counter
from typing import Any, List

import pytest

from lb.testing import free_port
from tests.faults.conftest import Cluster
from tests.faults.load import Load
from tests.processes import wait_for

pytestmark = pytest.mark.integration

INTERVAL, TIMEOUT, FALL, RISE = 0.2, 0.2, 2, 2


def start(cluster: Cluster, ports: List[int], check: str = "http", retries: int = 2) -> int:
    port = free_port()
    peers = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    cluster.start_lb(f"""\
        listeners:
          web: {{bind: "127.0.0.1:{port}", pool: web}}
        pools:
          web:
            peers: [{peers}]
            retries: {retries}
            connect_timeout: 1s
            health: {{type: {check}, interval: {INTERVAL * 1000:g}ms,
                      timeout: {TIMEOUT * 1000:g}ms, fall: {FALL}, rise: {RISE}}}
        """, port)
    for p in ports:
        wait_for(lambda p=p: cluster.peer("web", f"127.0.0.1:{p}")["health"] == "up",
                 what=f"peer {p} up")
    return port


def get(port: int, path: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        r.read()


def served_by(records: List[Any]) -> Counter:
    return Counter(r.answer for r in records if r.ok)


def test_failing_active_check_takes_a_busy_peer_out(cluster: Cluster) -> None:
    """Under continuous load, a peer whose /health answers 503 goes down after `fall`
    probes and gets no new requests; once it passes `rise` probes it serves again. No
    request fails: the peer still answers `/`, only its check fails."""
    _, a = cluster.backend()
    _, b = cluster.backend()
    port = start(cluster, [a, b])
    with Load(port, workers=4, max_seconds=40) as load:
        load.wait_for_requests(200)
        get(a, "/fail")
        failed_at = time.monotonic()
        wait_for(lambda: cluster.peer("web", f"127.0.0.1:{a}")["health"] == "down",
                 timeout=5, what="the failing peer down")
        down_after = time.monotonic() - failed_at
        settled = time.monotonic() + 0.1
        while_down = load.wait_since(settled, 300)
        get(a, "/recover")
        wait_for(lambda: cluster.peer("web", f"127.0.0.1:{a}")["health"] == "up",
                 timeout=5, what="the peer up again")
        back = time.monotonic() + 0.1
        after = load.wait_since(back, 300)
    peer = cluster.peer("web", f"127.0.0.1:{a}")
    print(f"\nhealth under load: down {down_after:.2f}s after /health failed "
          f"(bound {FALL * (INTERVAL + TIMEOUT):.1f}s); {load.summary()}")
    assert down_after <= FALL * (INTERVAL + TIMEOUT) + 1.0
    assert load.failures() == [], load.summary()
    assert served_by(while_down) == Counter({f"backend {b}": len(while_down)})
    assert served_by(after).get(f"backend {a}", 0) > 0
    assert peer["last_check"]["ok"] is True


def test_sigkill_of_a_peer_under_load_fails_no_later_request(cluster: Cluster) -> None:
    """A peer killed with SIGKILL under load: every request started after it died is
    served (a refused connect is retried on another peer), and the peer goes down."""
    _, a = cluster.backend()
    victim, b = cluster.backend()
    _, c = cluster.backend()
    port = start(cluster, [a, b, c], check="tcp")
    with Load(port, workers=4, max_seconds=40) as load:
        load.wait_for_requests(300)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(5)
        dead = time.monotonic()
        wait_for(lambda: cluster.peer("web", f"127.0.0.1:{b}")["health"] == "down",
                 timeout=5, what="the killed peer down")
        out_after = time.monotonic() - dead
        after = load.wait_since(dead, 1000)
    print(f"\nSIGKILL under load: down {out_after:.2f}s after death; after the kill "
          f"{load.summary(dead)}; overall {load.summary()}")
    assert load.failures(since=dead) == [], load.summary(dead)
    assert served_by(after).get(f"backend {b}", 0) == 0


def test_sigstop_of_a_peer_under_load_takes_it_out_in_bounded_time(cluster: Cluster) -> None:
    """A peer stopped with SIGSTOP (its kernel still accepts, nothing answers) under load is
    taken out by its probes timing out, within fall × (interval + timeout) plus the
    scheduling slack; requests started after that are all served by the other peers."""
    _, a = cluster.backend()
    hung, b = cluster.backend()
    port = start(cluster, [a, b])
    try:
        with Load(port, workers=4, max_seconds=40, timeout=3.0) as load:
            load.wait_for_requests(200)
            hung.popen.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            wait_for(lambda: cluster.peer("web", f"127.0.0.1:{b}")["health"] == "down",
                     timeout=5, interval=0.01, what="the hung peer down")
            out_after = time.monotonic() - stopped
            out = time.monotonic()
            load.wait_since(out, 1000, timeout=20)
    finally:
        hung.popen.send_signal(signal.SIGCONT)
    print(f"\nSIGSTOP under load: down {out_after:.2f}s after the stop (bound "
          f"{FALL * (INTERVAL + TIMEOUT):.1f}s + slack); after it was out "
          f"{load.summary(out)}; overall {load.summary()}")
    assert out_after <= FALL * (INTERVAL + TIMEOUT) + 0.5
    assert load.failures(since=out) == [], load.summary(out)
    assert served_by(load.since(out)).get(f"backend {b}", 0) == 0
