"""The Consul watch loop, driven by a Clock and an in-memory Consul (StubTreq): blocking
query parameters, index rules, backoff, outages, snapshots and stopping cleanly."""

import json
import os
from typing import Any, Dict, List, Optional

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from lb.config import ConsulConfig, PoolConfig, PoolConsulConfig, parse_address
from lb.discovery import consul
from lb.discovery.consul import ConsulWatcher, KVQuery, ServiceQuery, snapshot
from lb.discovery.consul.api import TIMEOUT_MARGIN
from lb.discovery.consul.backoff import BURST, REFILL, backoff_delay
from lb.discovery.consul.watch import RESULTS, SETTLE
from lb.peer import DRAIN, READY, PeerSpec
from lb.pool import Pool
from lb.service import default_pool_parts
from lb.stats import ConsulStats

TOKEN = "s3cret-token-value"


def instance(address: str, port: int, *, status: str = "passing", weight: int = 1,
             maintenance: bool = False, sid: Optional[str] = None) -> Dict[str, Any]:
    """One /v1/health/service entry shaped like Consul's (see tests/fixtures/consul)."""
    sid = sid or f"web-{port}"
    checks = [{"CheckID": "serfHealth", "Status": "passing", "ServiceID": ""},
              {"CheckID": f"service:{sid}", "Status": status, "ServiceID": sid}]
    if maintenance:
        checks.append({"CheckID": f"_service_maintenance:{sid}", "Status": "critical",
                       "ServiceID": sid})
    return {"Node": {"Node": "n1", "Address": "10.9.9.9"},
            "Service": {"ID": sid, "Service": "web", "Address": address, "Port": port,
                        "Weights": {"Passing": weight, "Warning": 1}},
            "Checks": checks}


class FakeConsul(Resource):
    """Holds every request open until the test answers it, like a blocking query."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: List[Any] = []
        self.seen: List[Any] = []
        self.lost: List[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.pending.append(request)
        self.seen.append(request)
        request.notifyFinish().addErrback(lambda f: self.lost.append(request))
        return NOT_DONE_YET


class FailingHTTP:
    """A client whose every request fails before any HTTP answer (agent down)."""

    def __init__(self) -> None:
        self.calls = 0

    def get(self, url: str, **kwargs: Any) -> defer.Deferred:
        self.calls += 1
        return defer.fail(ConnectionRefusedError("Connection refused"))


class Harness:
    """A pool, a watcher on a Clock, and the fake Consul behind StubTreq."""

    def __init__(self, tmp_path: Any, *, query: Any = None, http: Any = None,
                 pool_consul: Optional[PoolConsulConfig] = None, **settings: Any) -> None:
        self.clock = Clock()
        self.fake = FakeConsul()
        self.stub = StubTreq(self.fake)
        self.state_dir = str(tmp_path / "state")
        pool_consul = pool_consul or PoolConsulConfig(service="web", tags=("v1",))
        self.pool = Pool(PoolConfig(name="web", consul=pool_consul, drain_timeout=30.0),
                         self.clock)
        values = dict(url="http://consul.test:8500", token=TOKEN, wait=10.0,
                      poll_interval=5.0)
        values.update(settings)
        self.settings = ConsulConfig(**values)
        self.jitter = 0.0
        self.watcher = ConsulWatcher(
            self.pool, query or consul.make_query(pool_consul), lambda: self.settings,
            reactor=self.clock, http=http or self.stub, state_dir=lambda: self.state_dir,
            jitter=lambda: self.jitter)
        self.events: List[str] = []
        self.pool.subscribe(lambda pool, peer, event: self.events.append(f"{event} {peer.key}"))

    def start(self) -> None:
        self.watcher.startService()
        self.clock.advance(0)

    def request(self) -> Any:
        assert self.fake.pending, "no request is waiting for an answer"
        return self.fake.pending[0]

    def args(self) -> Dict[str, List[str]]:
        return {k.decode(): [v.decode() for v in vs] for k, vs in self.request().args.items()}

    def answer(self, body: Any = None, index: Optional[Any] = 1, status: int = 200,
               raw: Optional[bytes] = None, header: bytes = b"X-Consul-Index") -> None:
        request = self.fake.pending.pop(0)
        request.setResponseCode(status)
        if index is not None:
            request.responseHeaders.setRawHeaders(header, [str(index).encode()])
        request.write(raw if raw is not None else json.dumps(body).encode())
        request.finish()
        self.stub.flush()

    def peers(self) -> Dict[str, str]:
        return {key: f"{p.admin_state}/{p.weight}" for key, p in self.pool.peers.items()}


@pytest.fixture
def h(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    yield harness
    if harness.watcher.running:
        harness.watcher.stopService()


# --- requests --------------------------------------------------------------------------------


def test_first_request_is_a_plain_read_with_filters_and_token(h: Harness) -> None:
    """The first query has no index/wait, carries one tag= per tag and the ACL token as
    X-Consul-Token (never in the URL), and asks for every instance (health is filtered
    here so maintenance can become drain)."""
    h.start()
    assert h.request().path == b"/v1/health/service/web"
    assert h.args() == {"tag": ["v1"]}
    assert h.request().requestHeaders.getRawHeaders(b"X-Consul-Token") == [TOKEN.encode()]
    assert TOKEN.encode() not in h.request().uri


def test_datacenter_and_consistency_are_sent(tmp_path: Any) -> None:
    """consul.datacenter becomes dc=, consistency stale/consistent the matching flag."""
    h = Harness(tmp_path, datacenter="dc2", consistency="stale", token=None)
    h.start()
    assert h.args() == {"tag": ["v1"], "dc": ["dc2"], "stale": [""]}
    assert h.request().requestHeaders.getRawHeaders(b"X-Consul-Token") is None
    h.watcher.stopService()


def test_answer_applies_peers_then_blocks_on_its_index(h: Harness) -> None:
    """A 200 sets the pool's Consul peers; the next request sends the index and the wait
    (in ms, as Go's ParseDuration needs a unit) and is sent at once."""
    h.settings = ConsulConfig(url=h.settings.url, wait=2.5, poll_interval=5.0)
    h.start()
    h.answer([instance("10.0.0.1", 80, weight=3), instance("10.0.0.2", 80)], index=42)
    assert h.peers() == {"10.0.0.1:80": "ready/3", "10.0.0.2:80": "ready/1"}
    assert h.watcher.requests == {"ok": 1}
    assert h.watcher.last_success == h.clock.seconds()
    h.clock.advance(0)
    assert h.args() == {"tag": ["v1"], "index": ["42"], "wait": ["2500ms"]}


def test_same_index_changes_nothing(h: Harness) -> None:
    """An answer with the index we sent (the wait ran out) is not applied even if its body
    differs, counts as unchanged, and the next request blocks on the same index."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=7)
    h.clock.advance(0)
    h.events.clear()
    h.answer([], index=7)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    assert h.events == []
    assert h.watcher.requests == {"ok": 1, "unchanged": 1}
    h.clock.advance(0)
    assert h.args()["index"] == ["7"]


def test_new_index_with_same_set_is_unchanged(h: Harness) -> None:
    """A new index whose instances map to the same peers (say a check's output changed)
    touches no peer and is counted unchanged."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=7)
    h.clock.advance(0)
    h.events.clear()
    h.answer([instance("10.0.0.1", 80)], index=9)
    assert h.events == [] and h.watcher.requests["unchanged"] == 1
    h.clock.advance(0)
    assert h.args()["index"] == ["9"]


def test_index_going_backwards_resets_to_a_plain_read(h: Harness) -> None:
    """An index lower than the one sent (Consul restored or restarted) adds what it lists
    at once, keeps the peers it no longer lists for SETTLE, then a plain read (no index,
    no wait) applies Consul's full answer."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=100)
    h.clock.advance(0)
    h.answer([instance("10.0.0.2", 80)], index=5)
    assert h.peers() == {"10.0.0.1:80": "ready/1", "10.0.0.2:80": "ready/1"}
    assert h.watcher.index == 0
    h.clock.advance(SETTLE - 0.01)
    assert h.fake.pending == []
    h.clock.advance(0.01)
    assert "index" not in h.args() and "wait" not in h.args()
    h.answer([instance("10.0.0.2", 80)], index=6)
    assert h.peers() == {"10.0.0.2:80": "ready/1"}


@pytest.mark.parametrize("index", [None, 0, "garbage"])
def test_unusable_index_falls_back_to_polling(h: Harness, index: Any) -> None:
    """Without an index >= 1 the watch cannot block: the answer is applied, and the next
    plain read waits poll_interval instead of hammering Consul."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=index)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    h.clock.advance(4.9)
    assert h.fake.pending == []
    h.clock.advance(0.1)
    assert "index" not in h.args()


def test_lowercase_index_header_is_honoured(h: Harness) -> None:
    """The index header is matched case-insensitively."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=31, header=b"x-consul-index")
    h.clock.advance(0)
    assert h.args()["index"] == ["31"]


def test_churning_index_is_rate_limited(h: Harness) -> None:
    """When every answer comes back at once with a new index, a burst of 5 requests goes
    out back to back, then at most one per second."""
    h.start()
    for i in range(BURST):
        assert h.fake.pending, f"request {i} should have gone out at once"
        h.answer([instance("10.0.0.1", 80 + i)], index=10 + i)
        h.clock.advance(0)
    assert h.fake.pending == []
    h.clock.advance(REFILL - 0.01)
    assert h.fake.pending == []
    h.clock.advance(0.01)
    assert len(h.fake.pending) == 1


# --- outages ---------------------------------------------------------------------------------


def test_errors_keep_the_last_good_set_and_back_off(h: Harness, logs: List[str]) -> None:
    """500, 403 and garbage never change the pool; each is counted by kind, resets the
    index, and the retries wait 125 ms doubling per failure up to 1 s (not poll_interval)."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=50)
    h.clock.advance(0)
    h.events.clear()
    failures = [dict(status=500, raw=b"No cluster leader"),
                dict(status=403, raw=b"ACL not found"),
                dict(raw=b"<html>proxy error</html>"),
                dict(status=502, raw=b""),
                dict(status=429, raw=b"rate limited")]
    expected_delays = [0.125, 0.25, 0.5, 1.0, 1.0]
    for failure, delay in zip(failures, expected_delays):
        h.answer(index=50, **failure)
        assert h.peers() == {"10.0.0.1:80": "ready/1"}
        assert h.watcher.index == 0
        h.clock.advance(delay - 0.001)
        assert h.fake.pending == [], f"retried before {delay}s"
        h.clock.advance(0.002)
        assert "index" not in h.args(), "a retry after an error is a plain read"
    assert h.events == []
    assert h.watcher.requests == {"ok": 1, "http_error": 4, "invalid": 1}
    assert h.watcher.failures == 5
    assert "ACL token" in " ".join(logs)
    assert all(TOKEN not in line for line in logs)


def test_success_after_errors_resets_backoff_and_error(h: Harness) -> None:
    """The first good answer after failures clears last_error and the failure count, so
    the next outage starts again with the quickest retry."""
    h.start()
    for _ in range(5):
        h.answer(status=500, raw=b"No known Consul servers", index=None)
        h.clock.advance(2)
    assert h.watcher.last_error == "HTTP 500: No known Consul servers"
    h.answer([instance("10.0.0.1", 80)], index=3)
    assert h.watcher.last_error is None and h.watcher.failures == 0
    h.clock.advance(0)
    h.answer(status=500, raw=b"x", index=None)
    h.clock.advance(0.124)
    assert h.fake.pending == []
    h.clock.advance(0.001)
    assert h.fake.pending


def test_backoff_is_a_pure_function_of_the_attempt() -> None:
    """125 ms doubling per attempt up to 1 s; jitter only lengthens a pause, by up to 25%
    (so at most one request a second once at the cap, and never more than 1.25 s)."""
    assert [backoff_delay(n, 0.0) for n in range(1, 7)] == [0.125, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert backoff_delay(1, 0.5) == pytest.approx(0.140625)
    assert backoff_delay(10**6, 0.999) == pytest.approx(1.24975)
    assert backoff_delay(0, 0.0) == 0.125
    assert all(1.0 <= backoff_delay(n, j) <= 1.25 for n in range(4, 200)
               for j in (0.0, 0.5, 0.999))


def test_connection_refused_is_an_error_and_never_stops(tmp_path: Any) -> None:
    """With the agent down every attempt fails at once; the loop keeps retrying on its
    backoff schedule (bounded here) and never gives up."""
    http = FailingHTTP()
    h = Harness(tmp_path, http=http)
    h.start()
    assert http.calls == 1
    for _ in range(20):
        h.clock.advance(30)
    assert http.calls == 21
    assert h.watcher.requests == {"error": 21}
    assert "Connection refused" in (h.watcher.last_error or "")
    assert h.watcher.running
    h.watcher.stopService()


def test_request_timeout_cancels_and_retries(h: Harness) -> None:
    """A blocking request unanswered after wait × 17/16 + margin is cancelled (the
    connection is dropped), counted as a timeout, and retried after backoff."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=9)
    h.clock.advance(0)
    hung = h.request()
    limit = 10.0 * 17 / 16 + TIMEOUT_MARGIN
    h.clock.advance(limit - 0.01)
    assert h.watcher.requests.get("timeout") is None
    h.clock.advance(0.02)
    h.stub.flush()
    assert h.watcher.requests["timeout"] == 1
    assert hung in h.fake.lost
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    h.fake.pending.clear()
    h.clock.advance(5)
    assert len(h.fake.pending) == 1


def test_empty_successful_answer_empties_the_pool(h: Harness) -> None:
    """Unlike an error, a healthy Consul saying "no instances" removes the peers (idle
    ones at once)."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    h.clock.advance(0)
    h.answer([], index=4)
    assert h.pool.peers == {}
    assert h.watcher.requests == {"ok": 2}


def test_maintenance_drains_and_comes_back(h: Harness) -> None:
    """Maintenance turns a peer to drain (kept, with its counters); leaving maintenance
    makes the same peer ready again."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    peer = h.pool.peers["10.0.0.1:80"]
    peer.total_connections = 7
    h.clock.advance(0)
    h.answer([instance("10.0.0.1", 80, maintenance=True)], index=4)
    assert h.pool.peers["10.0.0.1:80"] is peer and peer.admin_state == DRAIN
    h.clock.advance(0)
    h.answer([instance("10.0.0.1", 80)], index=5)
    assert h.pool.peers["10.0.0.1:80"] is peer and peer.admin_state == READY
    assert peer.total_connections == 7


def test_disappeared_peer_with_connections_drains_until_drain_timeout(h: Harness) -> None:
    """A peer Consul no longer lists keeps its open connection (drain) and is removed once
    drain_timeout passes; discovery never closes it."""
    h.start()
    h.answer([instance("10.0.0.1", 80), instance("10.0.0.2", 80)], index=3)
    peer = h.pool.peers["10.0.0.2:80"]
    conn = object()
    h.pool.connection_started(peer, conn)
    h.clock.advance(0)
    h.answer([instance("10.0.0.1", 80)], index=4)
    assert peer.admin_state == DRAIN and "10.0.0.2:80" in h.pool.peers
    assert conn in peer.connections
    h.clock.advance(30)
    assert "10.0.0.2:80" not in h.pool.peers


# --- the loop's robustness and stopping -----------------------------------------------------


class BrokenOnce:
    """A query whose parser fails with a bug (not a Consul problem) on its first answer."""

    def __init__(self, query: Any) -> None:
        self.query = query
        self.describe = query.describe
        self.service = query.service
        self.kv_prefix = query.kv_prefix
        self.path = query.path
        self.params = query.params
        self.broken = True

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        return self.query.identity(settings)

    def parse(self, status: int, body: bytes) -> Any:
        if self.broken:
            self.broken = False
            raise RuntimeError("a bug in the parser")
        return self.query.parse(status, body)


class HangingHTTP:
    """A client whose requests never end, and ignore being cancelled."""

    def __init__(self) -> None:
        self.requests: List[defer.Deferred] = []

    def get(self, url: str, **kwargs: Any) -> defer.Deferred:
        self.requests.append(defer.Deferred())
        return self.requests[-1]


def test_a_bug_handling_one_answer_does_not_stop_the_loop(tmp_path: Any,
                                                          logs: List[str]) -> None:
    """An exception raised while handling an answer is logged with its traceback, counted
    as an error (the pool keeps its set), and the loop asks again after the usual backoff;
    the next answer applies. (This replaces a test of the old watchdog re-arming a lost
    callLater chain: the same promise, that no bug stops discovery, now kept by the loop.)"""
    query = BrokenOnce(consul.make_query(PoolConsulConfig(service="web", tags=("v1",))))
    h = Harness(tmp_path, query=query)
    tracebacks: List[Any] = []

    def observer(event: Dict[str, Any]) -> None:
        tracebacks.append(event.get("log_failure"))
    globalLogPublisher.addObserver(observer)
    try:
        h.start()
        h.answer([instance("10.0.0.1", 80)], index=3)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert h.pool.peers == {}
    assert h.watcher.requests == {"error": 1}
    assert h.watcher.last_error == "internal error (see the traceback above)"
    assert any("internal error, the watch goes on" in line for line in logs)
    assert [f.getErrorMessage() for f in tracebacks if f is not None] == ["a bug in the parser"]
    h.clock.advance(0.124)
    assert h.fake.pending == []
    h.clock.advance(0.001)
    assert "index" not in h.args()
    h.answer([instance("10.0.0.1", 80)], index=4)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    assert h.watcher.failures == 0
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []


def test_a_bug_outside_answer_handling_does_not_stop_the_loop(h: Harness,
                                                              logs: List[str]) -> None:
    """Even a failure in the watch's own bookkeeping (here settings() giving something
    unusable, which also breaks counting the error) is logged and the loop tries again a
    second later."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    good = h.settings
    h.settings = None  # type: ignore[assignment]  # the watcher's settings() gives None
    h.clock.advance(0)
    assert h.fake.pending == []
    assert any("counting an internal error failed" in line for line in logs)
    h.settings = good
    h.clock.advance(0.99)
    assert h.fake.pending == []
    h.clock.advance(0.01)
    assert "index" not in h.args(), "after an error, a plain read"
    assert h.peers() == {"10.0.0.1:80": "ready/1"}


def test_a_request_that_never_ends_is_given_up_at_its_timeout(tmp_path: Any) -> None:
    """A request whose client never answers and ignores cancellation is still given up
    at its timeout (wait × 17/16 + margin for a blocking one), counted as a timeout and
    retried after backoff, again and again. (This replaces a test of the old watchdog
    cancelling a stalled request: addTimeout on the loop's one Deferred does it now.)"""
    http = HangingHTTP()
    h = Harness(tmp_path, http=http)
    h.start()
    assert len(http.requests) == 1
    h.clock.advance(TIMEOUT_MARGIN - 0.01)
    assert h.watcher.requests == {}
    h.clock.advance(0.01)
    assert h.watcher.requests == {"timeout": 1}
    assert h.watcher.last_error == f"no answer within {TIMEOUT_MARGIN:g}s"
    h.clock.advance(0.125)
    assert len(http.requests) == 2
    h.clock.advance(TIMEOUT_MARGIN)
    assert h.watcher.requests == {"timeout": 2}
    h.clock.advance(0.25)
    assert len(http.requests) == 3
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []
    assert h.watcher.requests == {"timeout": 2}


def test_poll_interval_is_read_when_used(h: Harness) -> None:
    """A reload that changes poll_interval applies to the next answer without an index:
    the pause before the following plain read is the new value. (This replaces a test of
    the watchdog LoopingCall's period, which is gone.)"""
    h.start()
    h.settings = ConsulConfig(url=h.settings.url, wait=10.0, poll_interval=1.0)
    h.answer([instance("10.0.0.1", 80)], index=None)
    h.clock.advance(0.99)
    assert h.fake.pending == []
    h.clock.advance(0.01)
    assert "index" not in h.args()


def test_stop_cancels_request_and_timers(h: Harness) -> None:
    """stopService cancels the in-flight blocking query and every timer it started and
    leaves nothing scheduled on the clock."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    h.clock.advance(0)
    pending = h.request()
    h.watcher.stopService()
    h.stub.flush()
    assert pending in h.fake.lost
    assert h.clock.getDelayedCalls() == []
    assert h.watcher.requests == {"ok": 1}


def test_stop_during_backoff_leaves_no_timer(tmp_path: Any) -> None:
    """Stopping while waiting to retry cancels the retry."""
    h = Harness(tmp_path, http=FailingHTTP())
    h.start()
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []


def test_stop_before_the_first_request_leaves_nothing(h: Harness) -> None:
    """Stopping right after starting (the first request not sent yet) cancels the pause
    and sends nothing."""
    h.watcher.startService()
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(10)
    assert h.fake.seen == [] and h.watcher.requests == {}


def test_stop_while_rate_limited_leaves_no_timer(h: Harness) -> None:
    """Stopping while the token bucket holds the next request back cancels that pause."""
    h.start()
    for i in range(BURST):
        h.answer([instance("10.0.0.1", 80 + i)], index=10 + i)
        h.clock.advance(0)
    assert h.fake.pending == [] and h.clock.getDelayedCalls() != []
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []


def test_stop_cancels_a_request_that_ignores_cancellation(tmp_path: Any) -> None:
    """A request whose client never fires is still let go by stopService, with its
    timeout timer, and is not counted."""
    h = Harness(tmp_path, http=HangingHTTP())
    h.start()
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []
    assert h.watcher.requests == {}


# --- snapshots -------------------------------------------------------------------------------


def test_change_is_written_to_the_snapshot(h: Harness) -> None:
    """Every applied change is saved (atomically) with the query it answers."""
    h.start()
    h.answer([instance("10.0.0.1", 80, weight=4), instance("10.0.0.2", 80,
                                                            maintenance=True)], index=3)
    document = snapshot.load(snapshot.path_for(h.state_dir, "web"))
    assert document["query"] == {"service": "web", "tags": ["v1"], "passing_only": True,
                                 "datacenter": None}
    assert document["peers"] == [
        {"address": "10.0.0.1:80", "weight": 4, "state": "ready"},
        {"address": "10.0.0.2:80", "weight": 1, "state": "drain"}]
    assert document["index"] == 3
    assert [n for n in os.listdir(h.state_dir) if ".tmp" in n] == []


def test_snapshot_served_at_start_while_consul_is_down(tmp_path: Any) -> None:
    """A new watcher loads the last good set before Consul answers, and keeps serving it
    while every request fails."""
    first = Harness(tmp_path)
    first.start()
    first.answer([instance("10.0.0.1", 80), instance("10.0.0.2", 80)], index=3)
    first.watcher.stopService()

    second = Harness(tmp_path, http=FailingHTTP())
    second.watcher.startService()
    assert second.peers() == {"10.0.0.1:80": "ready/1", "10.0.0.2:80": "ready/1"}
    assert second.pool.peers["10.0.0.1:80"].sources == ["consul"]
    for _ in range(5):
        second.clock.advance(30)
    assert set(second.peers()) == {"10.0.0.1:80", "10.0.0.2:80"}
    second.watcher.stopService()


def test_first_answer_replaces_the_snapshot(tmp_path: Any) -> None:
    """Once Consul answers, its set wins over the snapshot (and is saved)."""
    first = Harness(tmp_path)
    first.start()
    first.answer([instance("10.0.0.1", 80)], index=3)
    first.watcher.stopService()
    second = Harness(tmp_path)
    second.start()
    assert second.peers() == {"10.0.0.1:80": "ready/1"}
    second.answer([instance("10.0.0.3", 80)], index=9)
    assert second.peers() == {"10.0.0.3:80": "ready/1"}
    saved = snapshot.load(snapshot.path_for(second.state_dir, "web"))
    assert [p["address"] for p in saved["peers"]] == ["10.0.0.3:80"]
    second.watcher.stopService()


def test_snapshot_of_another_query_is_ignored(tmp_path: Any) -> None:
    """A snapshot taken for other tags (or service, or datacenter) is not served."""
    first = Harness(tmp_path)
    first.start()
    first.answer([instance("10.0.0.1", 80)], index=3)
    first.watcher.stopService()
    other = Harness(tmp_path, http=FailingHTTP(),
                    pool_consul=PoolConsulConfig(service="web", tags=("v2",)))
    other.watcher.startService()
    assert other.pool.peers == {}
    other.watcher.stopService()


def test_corrupt_snapshot_is_ignored(tmp_path: Any, logs: List[str]) -> None:
    """A damaged snapshot file is logged and not used; the watch starts empty."""
    h = Harness(tmp_path, http=FailingHTTP())
    os.makedirs(h.state_dir)
    with open(snapshot.path_for(h.state_dir, "web"), "w") as f:
        f.write('{"version": 1, "query": ')
    h.watcher.startService()
    assert h.pool.peers == {}
    assert any("snapshot not used" in line for line in logs)
    h.watcher.stopService()


def test_unchanged_first_answer_does_not_rewrite_snapshot(tmp_path: Any,
                                                          monkeypatch: Any) -> None:
    """When Consul's first answer equals the loaded snapshot, nothing is applied or
    written."""
    first = Harness(tmp_path)
    first.start()
    first.answer([instance("10.0.0.1", 80)], index=3)
    first.watcher.stopService()
    saves: List[str] = []
    monkeypatch.setattr(snapshot, "save", lambda path, doc: saves.append(path))
    second = Harness(tmp_path)
    second.start()
    second.events.clear()
    second.answer([instance("10.0.0.1", 80)], index=8)
    assert saves == [] and second.events == []
    assert second.watcher.requests == {"unchanged": 1}
    second.watcher.stopService()


def test_unwritable_state_dir_does_not_stop_discovery(tmp_path: Any, logs: List[str]) -> None:
    """If the snapshot cannot be written the change still applies; the error is logged
    and counted."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    h = Harness(tmp_path)
    h.state_dir = str(blocker / "state")
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    assert h.watcher.snapshot_errors == 1
    assert any("cannot write the Consul snapshot" in line for line in logs)
    h.watcher.stopService()


def test_reload_keeps_the_pools_consul_peers(tmp_path: Any) -> None:
    """A watcher started for a pool that already holds Consul peers (a reload replaced the
    watcher) takes them as its last good set instead of loading the snapshot."""
    h = Harness(tmp_path, http=FailingHTTP())
    h.pool.apply("consul", [PeerSpec(parse_address("10.0.0.5:80"))])
    os.makedirs(h.state_dir)
    snapshot.save(snapshot.path_for(h.state_dir, "web"), {
        "version": 1, "query": {"service": "web", "tags": ["v1"], "passing_only": True,
                                "datacenter": None},
        "peers": [{"address": "10.0.0.9:80", "weight": 1, "state": "ready"}]})
    h.watcher.startService()
    assert set(h.peers()) == {"10.0.0.5:80"}
    assert h.watcher.peers == [PeerSpec(parse_address("10.0.0.5:80"))]
    h.watcher.stopService()


def test_release_drains_consul_peers_and_forgets_the_snapshot(h: Harness) -> None:
    """When a reload drops the pool's consul section, release() lets go of its peers and
    deletes the snapshot so it is not served later."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    path = snapshot.path_for(h.state_dir, "web")
    assert os.path.exists(path)
    h.watcher.stopService()
    h.watcher.release()
    assert h.pool.peers == {} and not os.path.exists(path)


# --- stats() ---------------------------------------------------------------------------------


def test_stats_show_every_result_from_the_start(h: Harness) -> None:
    """Before any request, stats() lists every result label at zero (rate() needs the
    zero), no success, no failure, and what is watched."""
    assert h.watcher.stats() == ConsulStats(
        describe="service 'web'", service="web", kv_prefix=None,
        requests=dict.fromkeys(RESULTS, 0), last_success=None, failures=0, last_error=None)


def test_stats_follow_the_counters(h: Harness) -> None:
    """stats() reads the live counters: results by label, the last success (clock time),
    failures in a row and the last error."""
    h.start()
    h.clock.advance(7)
    h.answer([instance("10.0.0.1", 80)], index=3)
    h.clock.advance(0)
    h.answer(status=500, raw=b"No cluster leader", index=None)
    stats = h.watcher.stats()
    assert stats.requests == {**dict.fromkeys(RESULTS, 0), "ok": 1, "http_error": 1}
    assert stats.last_success == 7.0
    assert stats.failures == 1 and stats.last_error == "HTTP 500: No cluster leader"


def test_stats_of_a_kv_watch_name_the_folder(tmp_path: Any) -> None:
    """A KV watch's stats name its prefix, not a service."""
    h = Harness(tmp_path, pool_consul=PoolConsulConfig(kv_prefix="/upstreams/web/"))
    stats = h.watcher.stats()
    assert (stats.describe, stats.service, stats.kv_prefix) == (
        "KV prefix 'upstreams/web'", None, "upstreams/web")


# --- KV --------------------------------------------------------------------------------------


def test_kv_watch_blocks_on_a_404_index(tmp_path: Any) -> None:
    """An empty KV folder answers 404 with an index: an empty set, and the next request
    blocks on that index; keys appearing later become peers."""
    h = Harness(tmp_path, pool_consul=PoolConsulConfig(kv_prefix="upstreams/web"))
    h.start()
    assert h.request().path == b"/v1/kv/upstreams/web/"
    assert h.args() == {"recurse": [""]}
    h.answer(status=404, raw=b"", index=12)
    assert h.pool.peers == {} and h.watcher.requests == {"ok": 1}
    h.clock.advance(0)
    assert h.args()["index"] == ["12"]
    h.answer([{"Key": "upstreams/web/10.0.0.1:80", "Value": None},
              {"Key": "upstreams/web2/10.0.0.2:80", "Value": None}], index=13)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    h.watcher.stopService()


# --- wiring (lb.service.default_pool_parts) -------------------------------------------------


class FakeRoot:
    def __init__(self, clock: Clock, state_dir: str) -> None:
        from lb.testing import make_config
        self.reactor = clock
        self.http_client = StubTreq(FakeConsul())
        self.config = make_config({"l": {"bind": "127.0.0.1:0", "pool": "web"}},
                                  {"web": {"consul": {"service": "web"}}, "plain": {}},
                                  consul={"url": "http://127.0.0.1:1"}, state_dir=state_dir)


def test_build_part_only_for_consul_pools(tmp_path: Any) -> None:
    """Pools with a consul section get a watcher using the root's client and settings
    (read live, so a reload's new settings apply); others get nothing."""
    build_part = default_pool_parts()["consul"]
    root: Any = FakeRoot(Clock(), str(tmp_path))
    pool = Pool(root.config.pools["web"], root.reactor)
    part = build_part(root, pool, root.config.pools["web"])
    assert isinstance(part, ConsulWatcher)
    assert isinstance(part.query, ServiceQuery)
    assert part.settings().url == "http://127.0.0.1:1"
    assert build_part(root, Pool(root.config.pools["plain"], root.reactor),
                      root.config.pools["plain"]) is None


def test_kv_query_watcher_type() -> None:
    """A kv_prefix pool's watcher queries the KV folder."""
    assert isinstance(consul.make_query(PoolConsulConfig(kv_prefix="a/b")), KVQuery)


def test_unusable_instance_is_logged_once_per_problem(h: Harness, logs: List[str]) -> None:
    """An instance lb cannot use (no port) is reported once, not on every answer, while
    the usable ones are applied."""
    h.start()
    bad = instance("10.0.0.2", 0)
    for index in (3, 4, 5):
        h.answer([instance("10.0.0.1", 80), bad], index=index)
        h.clock.advance(0)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    assert len([line for line in logs if "ignored instance web-0" in line]) == 1


# --- answers of which nothing is usable ------------------------------------------------------


def unusable_instances() -> List[Dict[str, Any]]:
    """Passing instances that cannot name a peer: bad ports and host names."""
    return [instance("10.0.0.9", 0, sid="zero-port"), instance("10.0.0.9", 70000, sid="big"),
            instance("bad..example.com", 80, sid="empty-label"),
            instance("a" * 64 + ".example.com", 80, sid="long-label"),
            instance("xn--a.example.com", 80, sid="bad-idna")]


def test_all_unusable_answer_keeps_the_pool_counts_and_logs_once(h: Harness,
                                                                  logs: List[str]) -> None:
    """An answer listing instances of which none is usable does not empty the pool (6,000
    failed client requests in 0.8 s before): the last good set stays, each such answer is
    counted invalid, the problem is logged once however often it repeats, and a good
    answer afterwards applies."""
    h.start()
    h.answer([instance("10.0.0.1", 80), instance("10.0.0.2", 80)], index=3)
    h.events.clear()
    for index in (4, 5, 6):
        h.clock.advance(30)  # past any retry pause
        h.answer(unusable_instances(), index=index)
        assert h.peers() == {"10.0.0.1:80": "ready/1", "10.0.0.2:80": "ready/1"}
    assert h.events == []
    assert h.watcher.requests == {"ok": 1, "invalid": 3}
    assert "none of the 5 instance(s) is usable" in (h.watcher.last_error or "")
    assert len([line for line in logs if "is usable" in line]) == 1
    h.clock.advance(30)
    h.answer([instance("10.0.0.3", 80)], index=7)
    assert set(h.peers()) == {"10.0.0.3:80"}


def test_all_unhealthy_answer_still_empties_the_pool(h: Harness) -> None:
    """Instances that are merely critical (or warning with passing_only) are Consul saying
    "nothing healthy": the pool empties, the answer is ok, not invalid."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=3)
    h.clock.advance(0)
    h.answer([instance("10.0.0.1", 80, status="critical"),
              instance("10.0.0.2", 80, status="warning")], index=4)
    assert h.pool.peers == {}
    assert h.watcher.requests == {"ok": 2}


def test_kv_all_unusable_keys_keep_the_pool_but_404_empties(tmp_path: Any) -> None:
    """KV the same way: keys of which none is host:port keep the last set (invalid); a
    404, Consul's answer for a folder with no keys, still empties the pool."""
    h = Harness(tmp_path, pool_consul=PoolConsulConfig(kv_prefix="u"))
    h.start()
    h.answer([{"Key": "u/10.0.0.1:80", "Value": None}], index=3)
    h.clock.advance(0)
    h.answer([{"Key": "u/not-an-address", "Value": None},
              {"Key": "u/bad..example.com:80", "Value": None}], index=4)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    assert h.watcher.requests == {"ok": 1, "invalid": 1}
    h.clock.advance(5)
    h.answer(status=404, raw=b"", index=5)
    assert h.pool.peers == {}
    h.watcher.stopService()


# --- outages: request rate and recovery time -------------------------------------------------


class OutageHTTP:
    """StubTreq in front of a Consul that can be down: while ``down`` every request is
    refused at once, like a killed agent; ``times`` records when each request was sent."""

    def __init__(self, stub: StubTreq, clock: Clock) -> None:
        self.stub = stub
        self.clock = clock
        self.down = False
        self.times: List[float] = []

    def get(self, url: str, **kwargs: Any) -> defer.Deferred:
        self.times.append(self.clock.seconds())
        if self.down:
            return defer.fail(ConnectionRefusedError("Connection refused"))
        return self.stub.get(url, **kwargs)


class LiveConsul(Resource):
    """Answers at once unless a request blocks on the current index; then it is held until
    the set changes (a blocking query), or dropped when the agent is killed."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.index = 10
        self.entries: List[Dict[str, Any]] = []
        self.held: List[Any] = []

    def render_GET(self, request: Any) -> Any:
        sent = int(request.args.get(b"index", [b"0"])[0])
        if sent == self.index:
            self.held.append(request)
            request.notifyFinish().addErrback(lambda f: None)
            return NOT_DONE_YET
        return self._body(request)

    def _body(self, request: Any) -> bytes:
        request.setHeader(b"X-Consul-Index", str(self.index).encode())
        return json.dumps(self.entries).encode()

    def set(self, entries: List[Dict[str, Any]], index: Optional[int] = None) -> None:
        self.entries = entries
        self.index = self.index + 1 if index is None else index
        held, self.held = self.held, []
        for request in held:
            request.write(self._body(request))
            request.finish()

    def kill(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.loseConnection()


class Outage:
    """A watcher on a Clock against a LiveConsul that a test takes down and brings back."""

    def __init__(self, tmp_path: Any, poll_interval: float, jitter: float) -> None:
        self.h = Harness(tmp_path, poll_interval=poll_interval, wait=55.0)
        self.consul = LiveConsul()
        self.h.stub = StubTreq(self.consul)
        self.http = OutageHTTP(self.h.stub, self.h.clock)
        self.h.watcher._http = self.http
        self.h.jitter = jitter

    def run(self, seconds: float, until: Any = lambda: False, step: float = 0.01) -> float:
        """Advance simulated time in small steps (flushing the in-memory HTTP); return how
        long it took until ``until()`` held (or ``seconds``)."""
        start = self.h.clock.seconds()
        while self.h.clock.seconds() - start < seconds:
            self.h.stub.flush()
            if until():
                break
            self.h.clock.advance(step)
        self.h.stub.flush()
        return self.h.clock.seconds() - start

    def start_with(self, entries: List[Dict[str, Any]]) -> None:
        self.consul.set(entries)
        self.h.start()
        self.run(1.0)
        assert set(self.h.peers()) == {f"{e['Service']['Address']}:{e['Service']['Port']}"
                                      for e in entries}

    def kill(self) -> None:
        self.http.down = True
        self.consul.kill()
        self.h.stub.flush()


GOOD = [instance("10.0.0.1", 80), instance("10.0.0.2", 80)]
CHANGED = [instance("10.0.0.1", 80), instance("10.0.0.3", 80)]


@pytest.mark.parametrize("poll_interval", [0.1, 1.0, 5.0, 30.0])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999])
def test_outage_sends_about_one_request_per_second(tmp_path: Any, poll_interval: float,
                                                   jitter: float) -> None:
    """During a 60 s outage (the agent refusing connections) a watch sends at most about
    one request a second whatever poll_interval is: a few quick retries, then one every
    1-1.25 s; and it never stops trying."""
    o = Outage(tmp_path, poll_interval, jitter)
    o.start_with(GOOD)
    o.kill()
    before = len(o.http.times)
    o.run(60.0, step=0.05)
    sent = len(o.http.times) - before
    assert 45 <= sent <= 64, f"{sent} requests in a 60 s outage"
    gaps = [b - a for a, b in zip(o.http.times[before + 4:], o.http.times[before + 5:])]
    assert all(gap >= 0.99 for gap in gaps), "after the first retries, at most one a second"
    assert set(o.h.peers()) == {"10.0.0.1:80", "10.0.0.2:80"}
    o.h.watcher.stopService()


@pytest.mark.parametrize("poll_interval", [0.1, 1.0, 5.0, 30.0])
@pytest.mark.parametrize("jitter", [0.0, 0.999])
@pytest.mark.parametrize("outage", [0.3, 3.0, 17.7, 60.0])
@pytest.mark.parametrize("state_lost", [False, True])
def test_pool_is_current_within_two_seconds_of_consul_answering_again(
        tmp_path: Any, poll_interval: float, jitter: float, outage: float,
        state_lost: bool) -> None:
    """However long the outage and whatever poll_interval is, once Consul answers again
    (here with a changed set) the pool holds that set within 2 s (simulated time), also
    when Consul lost its state (its index went back, so removals wait for SETTLE)."""
    o = Outage(tmp_path, poll_interval, jitter)
    o.start_with(GOOD)
    o.kill()
    o.run(outage)
    o.consul.set(CHANGED, index=3 if state_lost else None)
    o.http.down = False
    took = o.run(10.0, until=lambda: set(o.h.peers()) == {"10.0.0.1:80", "10.0.0.3:80"})
    assert took <= 2.0, f"pool current {took:.2f}s after Consul answered again"
    o.h.watcher.stopService()


# --- a Consul that lost its state (restart, new cluster, restore) ----------------------------


def test_restarted_consul_answering_empty_before_its_sync_keeps_the_pool(
        tmp_path: Any) -> None:
    """The window Fabio users hit (routes vanish when the agent restarts): Consul 1.8.7 on
    fresh state answers 200, X-Consul-KnownLeader: true, X-Consul-LastContact: 0 and a
    *lower* X-Consul-Index with [] for ~150 ms until its agent has synced its services.
    The index going back is the only sign: lb removes nothing for SETTLE, so the pool never
    empties, and is current as soon as the synced set arrives."""
    o = Outage(tmp_path, poll_interval=5.0, jitter=0.0)
    o.consul.index = 40
    o.start_with(GOOD)
    o.kill()
    o.run(3.0)
    o.h.events.clear()
    o.consul.set([], index=6)  # the restarted agent, before its services are synced
    o.http.down = False
    o.run(2.0, until=lambda: o.h.watcher.requests["unchanged"] >= 1)
    assert set(o.h.peers()) == {"10.0.0.1:80", "10.0.0.2:80"}
    assert o.h.events == []
    o.consul.set(CHANGED, index=8)  # synced: a changed set
    took = o.run(2.0, until=lambda: set(o.h.peers()) == {"10.0.0.1:80", "10.0.0.3:80"})
    assert took <= SETTLE + 0.01
    assert o.h.events[0] == "added 10.0.0.3:80" and o.h.events[-1] == "removed 10.0.0.2:80"
    o.h.watcher.stopService()


def test_empty_answer_after_a_reset_still_empties_once_settled(h: Harness) -> None:
    """If the Consul that lost its state still lists nothing after SETTLE, that is its
    answer: the pool empties."""
    h.start()
    h.answer([instance("10.0.0.1", 80)], index=50)
    h.clock.advance(0)
    h.answer(status=500, raw=b"No cluster leader", index=None)
    h.clock.advance(1)
    h.answer([], index=3)
    assert h.peers() == {"10.0.0.1:80": "ready/1"}
    h.clock.advance(SETTLE)
    h.answer([], index=3)
    assert h.pool.peers == {}


def test_snapshot_index_detects_a_reset_after_a_balancer_restart(tmp_path: Any) -> None:
    """A balancer restarted while Consul also lost its state compares with the index saved
    in its snapshot: the snapshot's peers are not dropped by the first, unsynced answer."""
    first = Harness(tmp_path)
    first.start()
    first.answer([instance("10.0.0.1", 80)], index=70)
    first.watcher.stopService()
    second = Harness(tmp_path)
    second.start()
    second.answer([], index=4)
    assert second.peers() == {"10.0.0.1:80": "ready/1"}
    second.clock.advance(SETTLE)
    second.answer([instance("10.0.0.2", 80)], index=5)
    assert second.peers() == {"10.0.0.2:80": "ready/1"}
    second.watcher.stopService()


def test_outage_is_logged_once_and_its_end_once(tmp_path: Any, logs: List[str]) -> None:
    """A 60 s outage (about 60 refused requests) logs one error line per distinct problem
    (the request in flight dropped, then connections refused), not one per retry, and one
    line when Consul answers again."""
    o = Outage(tmp_path, poll_interval=5.0, jitter=0.0)
    o.start_with(GOOD)
    logs.clear()
    o.kill()
    o.run(60.0, step=0.05)
    o.http.down = False
    o.run(2.0)
    errors = [line for line in logs if "keeping the last good set" in line]
    assert len(errors) == 2
    assert "Connection was closed" in errors[0] and "Connection refused" in errors[1]
    assert len([line for line in logs if "answering again after" in line]) == 1
    o.h.watcher.stopService()
