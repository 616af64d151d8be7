"""The routes watch (RoutesWatcher on /v1/catalog/services), driven by a Clock and an
in-memory Consul (StubTreq): what it asks, what it hands to on_routes and when, problems
logged once, outages, Consul's index rules, the snapshot, stopping cleanly, and that the
loop is the pool watch's own, not a copy."""

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from lb.config import ConsulConfig
from lb.discovery.consul import (
    CatalogRoutesQuery,
    ConsulRoute,
    ConsulWatcher,
    RoutesWatcher,
    snapshot,
)
from lb.discovery.consul.api import TIMEOUT_MARGIN
from lb.discovery.consul.backoff import BURST, REFILL
from lb.discovery.consul.watch import RESULTS, SETTLE, BlockingWatch
from lb.stats import ConsulStats
from tests.test_consul_watch import FailingHTTP, FakeConsul, HangingHTTP

TOKEN = "s3cret-token-value"
WHAT = "consul catalog services tagged 'urlprefix-'"
SNAPSHOT_REASON = "consul snapshot, until Consul answers"

Call = Tuple[Tuple[ConsulRoute, ...], str]


def r(service: str, path: str, host: Optional[str] = None,
      strip: Optional[str] = None) -> ConsulRoute:
    return ConsulRoute(service, host, path, strip)


class Harness:
    """A RoutesWatcher on a Clock against the fake Consul, recording on_routes calls."""

    def __init__(self, tmp_path: Any, *, http: Any = None, tag_prefix: str = "urlprefix-",
                 **settings: Any) -> None:
        self.clock = Clock()
        self.fake = FakeConsul()
        self.stub = StubTreq(self.fake)
        self.state_dir = str(tmp_path / "state")
        values = dict(url="http://consul.test:8500", token=TOKEN, wait=10.0,
                      poll_interval=5.0)
        values.update(settings)
        self.settings = ConsulConfig(**values)
        self.jitter = 0.0
        self.calls: List[Call] = []
        self.fail_next = 0  # on_routes raises this many more times
        self.watcher = RoutesWatcher(
            "www", CatalogRoutesQuery(tag_prefix), lambda: self.settings, self.on_routes,
            reactor=self.clock, http=http or self.stub, state_dir=lambda: self.state_dir,
            jitter=lambda: self.jitter)

    def on_routes(self, routes: Sequence[ConsulRoute], reason: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("a bug in the route table")
        self.calls.append((tuple(routes), reason))

    def start(self) -> None:
        self.watcher.startService()
        self.clock.advance(0)

    def request(self) -> Any:
        assert self.fake.pending, "no request is waiting for an answer"
        return self.fake.pending[0]

    def args(self) -> Dict[str, List[str]]:
        return {k.decode(): [v.decode() for v in vs] for k, vs in self.request().args.items()}

    def answer(self, services: Any = None, index: Optional[Any] = 1, status: int = 200,
               raw: Optional[bytes] = None) -> None:
        request = self.fake.pending.pop(0)
        request.setResponseCode(status)
        if index is not None:
            request.responseHeaders.setRawHeaders(b"X-Consul-Index", [str(index).encode()])
        request.write(raw if raw is not None else json.dumps(services).encode())
        request.finish()
        self.stub.flush()

    def next(self, services: Any, index: Any, advance: float = 0.0) -> None:
        """Let the next request go (after ``advance`` seconds) and answer it."""
        self.clock.advance(advance)
        self.answer(services, index)

    def routes(self) -> Tuple[ConsulRoute, ...]:
        assert self.calls, "on_routes was never called"
        return self.calls[-1][0]

    def path(self) -> str:
        return snapshot.path_for(self.state_dir, "www", snapshot.ROUTES_SUFFIX)


@pytest.fixture
def h(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    yield harness
    if harness.watcher.running:
        harness.watcher.stopService()


TWO = {"web": ["v1", "urlprefix-/web"], "api": ["urlprefix-api.example.com/"],
       "consul": []}


# --- what it asks, what it hands on ----------------------------------------------------------


def test_first_request_reads_the_catalog_with_token_and_datacenter(tmp_path: Any) -> None:
    """A plain read of /v1/catalog/services (no tag=: the prefix is matched by lb), the ACL
    token as X-Consul-Token, the datacenter and consistency like every Consul query."""
    h = Harness(tmp_path, datacenter="dc2", consistency="stale")
    h.start()
    assert h.request().path == b"/v1/catalog/services"
    assert h.args() == {"dc": ["dc2"], "stale": [""]}
    assert h.request().requestHeaders.getRawHeaders(b"X-Consul-Token") == [TOKEN.encode()]
    h.watcher.stopService()


def test_answer_hands_the_routes_in_match_order_then_blocks_on_its_index(h: Harness,
                                                                         ) -> None:
    """The first answer calls on_routes once with every announced route, most specific
    first, naming the query as the reason; the next request blocks on its index."""
    h.start()
    h.answer(TWO, index=42)
    assert h.calls == [((r("api", "/", "api.example.com"), r("web", "/web")), WHAT)]
    assert h.watcher.routes == h.routes()
    assert h.watcher.requests == {"ok": 1}
    h.clock.advance(0)
    assert h.args() == {"index": ["42"], "wait": ["10000ms"]}


def test_a_first_answer_without_routes_is_handed_on(h: Harness) -> None:
    """Consul answering "no route" is news too: on_routes(()) tells the caller Consul
    answered, so it stops waiting for a first answer."""
    h.start()
    h.answer({"consul": [], "web": ["v1"]}, index=3)
    assert h.calls == [((), WHAT)]


def test_only_changes_are_handed_on(h: Harness) -> None:
    """The wait running out (same index) and a new index announcing the same routes (an
    instance's other tags changed) do not call on_routes; a change does, with the whole
    list; a service deregistered takes its routes with it."""
    h.start()
    h.answer(TWO, index=7)
    h.next(TWO, 7)
    h.next({**TWO, "web": ["v2", "urlprefix-/web"], "db": ["primary"]}, 8)
    assert len(h.calls) == 1
    assert h.watcher.requests == {"ok": 1, "unchanged": 2}
    h.next({**TWO, "web": ["urlprefix-/web strip=/web"]}, 9)
    assert h.routes() == (r("api", "/", "api.example.com"), r("web", "/web", None, "/web"))
    h.next({"api": TWO["api"]}, 10)
    assert h.routes() == (r("api", "/", "api.example.com"),)
    assert len(h.calls) == 3


def test_each_change_is_one_log_line_naming_the_routes(h: Harness, logs: List[str]) -> None:
    """One line per applied change: the count and which routes came and went."""
    h.start()
    h.answer(TWO, index=3)
    h.next({"web": ["urlprefix-/web"], "new": ["urlprefix-/new"]}, 4)
    lines = [line for line in logs if "route(s):" in line]
    assert lines == [
        f"routes www: {WHAT} (index 3): 2 route(s): added api.example.com/ -> consul:api, "
        "/web -> consul:web",
        f"routes www: {WHAT} (index 4): 2 route(s): added /new -> consul:new; removed "
        "api.example.com/ -> consul:api"]


# --- problems logged once --------------------------------------------------------------------


def test_a_conflict_is_decided_the_same_way_and_logged_once(h: Harness,
                                                            logs: List[str]) -> None:
    """Two services announcing /api: the lower name wins on every answer; the conflict is
    in ``conflicts`` and logged once, however many answers repeat it."""
    h.start()
    for index in (3, 4, 5):
        h.next({"b": ["urlprefix-/api"], "a": ["urlprefix-/api/"],
                "other": [f"urlprefix-/o{index}"]}, index)
    assert all(r("a", "/api/") in call[0] and r("b", "/api") not in call[0]
               for call in h.calls)
    assert [c.used.service for c in h.watcher.conflicts] == ["a"]
    assert len([line for line in logs if "is announced 2 ways" in line]) == 1


def test_a_skipped_tag_is_logged_once_and_only_new_ones_later(h: Harness,
                                                              logs: List[str]) -> None:
    """A tag lb cannot serve is logged once with its reason, not on every answer; when
    another appears, only the new one is logged."""
    h.start()
    allow = "urlprefix-/admin allow=ip:10.0.0.0/8"
    h.next({"web": ["urlprefix-/web", allow]}, 3)
    h.next({"web": ["urlprefix-/web", allow, "v2"]}, 4)
    h.next({"web": ["urlprefix-/web", allow, "urlprefix-:22"]}, 5)
    assert len([line for line in logs if "allow=" in line and "not used" in line]) == 1
    assert len([line for line in logs if "urlprefix-:22" in line]) == 1
    assert len(h.watcher.skipped) == 2
    assert h.routes() == (r("web", "/web"),)


# --- outages and bad answers -----------------------------------------------------------------


@pytest.mark.parametrize("status,raw,result", [
    (500, b"No cluster leader", "http_error"),
    (403, b"ACL not found", "http_error"),
    (200, b"<html>proxy error</html>", "invalid"),
    (200, b'["not", "services"]', "invalid"),
])
def test_errors_and_invalid_answers_keep_the_last_good_routes(h: Harness, status: int,
                                                              raw: bytes,
                                                              result: str) -> None:
    """An error or a body that is not Consul's answer changes nothing: on_routes is not
    called, the last good routes stay, the error is counted and the next request is a
    plain read after backoff."""
    h.start()
    h.answer(TWO, index=3)
    h.clock.advance(0)
    h.answer(raw=raw, status=status, index=4)
    assert len(h.calls) == 1 and h.watcher.routes == h.routes()
    assert h.watcher.requests == {"ok": 1, result: 1} and h.watcher.failures == 1
    h.clock.advance(0.124)
    assert h.fake.pending == []
    h.clock.advance(0.001)
    assert "index" not in h.args()


class Switch:
    """The in-memory Consul behind a switch: while ``down`` every request is refused at
    once, like a killed agent."""

    def __init__(self, stub: StubTreq) -> None:
        self.stub = stub
        self.down = False
        self.calls = 0

    def get(self, url: str, **kwargs: Any) -> Any:
        self.calls += 1
        if self.down:
            return FailingHTTP().get(url)
        return self.stub.get(url, **kwargs)


def test_an_outage_keeps_the_routes_is_logged_once_and_ends_in_one_line(
        tmp_path: Any, logs: List[str]) -> None:
    """Consul failing for a minute (a 500, then connections refused): the routes stay (no
    on_routes call), one error line per distinct problem (not one per retry, about one a
    second) saying how many routes are kept, and one line when Consul answers again."""
    h = Harness(tmp_path)
    switch = Switch(h.stub)
    h.watcher._http = switch
    h.start()
    h.answer(TWO, index=3)
    h.clock.advance(0)
    h.answer(raw=b"No cluster leader", status=500, index=None)
    switch.down = True
    before = switch.calls
    for _ in range(600):
        h.clock.advance(0.1)
    assert 45 <= switch.calls - before <= 64
    assert len(h.calls) == 1 and h.watcher.routes == h.routes()
    errors = [line for line in logs if "keeping the last good set" in line]
    assert len(errors) == 2 and all("of 2 route(s)" in line for line in errors)
    assert "HTTP 500" in errors[0] and "Connection refused" in errors[1]
    switch.down = False
    h.clock.advance(1.0)
    h.answer(TWO, index=9)
    assert len([line for line in logs if "answering again after" in line]) == 1
    assert len(h.calls) == 1 and h.watcher.failures == 0
    h.watcher.stopService()


def test_a_request_that_never_ends_is_given_up_at_its_timeout(tmp_path: Any) -> None:
    """The request has a timeout on the clock (addTimeout): a hung Consul counts as a
    timeout and the watch asks again."""
    http = HangingHTTP()
    h = Harness(tmp_path, http=http)
    h.start()
    h.clock.advance(TIMEOUT_MARGIN)
    assert h.watcher.requests == {"timeout": 1}
    h.clock.advance(0.125)
    assert len(http.requests) == 2
    h.watcher.stopService()
    assert h.clock.getDelayedCalls() == []


def test_a_bug_in_on_routes_is_counted_and_the_routes_offered_again(h: Harness,
                                                                    logs: List[str]) -> None:
    """on_routes raising (a bug in the caller) does not stop the watch: it is logged with
    its traceback and counted as an error; after the backoff a plain read offers the same
    routes again."""
    h.start()
    h.fail_next = 1
    h.answer(TWO, index=3)
    assert h.calls == [] and h.watcher.routes is None
    assert h.watcher.requests == {"error": 1}
    assert any("internal error, the watch goes on" in line for line in logs)
    h.clock.advance(0.125)
    assert "index" not in h.args()
    h.answer(TWO, index=3)
    assert len(h.calls) == 1 and h.watcher.failures == 0


# --- Consul's index rules --------------------------------------------------------------------


@pytest.mark.parametrize("index", [None, 0, "garbage"])
def test_without_a_usable_index_the_watch_polls(h: Harness, index: Any) -> None:
    """An answer without an index >= 1 is applied, and the next plain read waits
    poll_interval."""
    h.start()
    h.answer(TWO, index=index)
    assert len(h.calls) == 1
    h.clock.advance(4.9)
    assert h.fake.pending == []
    h.clock.advance(0.1)
    assert "index" not in h.args()


def test_index_going_back_adds_at_once_and_removes_after_settle(h: Harness) -> None:
    """Consul that lost its state answers with a lower index before its agents have
    re-registered: new routes come at once, none goes for SETTLE, then a plain read
    applies Consul's whole answer."""
    h.start()
    h.answer({"a": ["urlprefix-/a"], "b": ["urlprefix-/b"]}, index=50)
    h.next({"a": ["urlprefix-/a"], "c": ["urlprefix-/c"]}, 3)
    assert h.routes() == (r("a", "/a"), r("b", "/b"), r("c", "/c"))
    h.clock.advance(SETTLE - 0.01)
    assert h.fake.pending == []
    h.clock.advance(0.01)
    assert "index" not in h.args()
    h.answer({"a": ["urlprefix-/a"], "c": ["urlprefix-/c"]}, index=4)
    assert h.routes() == (r("a", "/a"), r("c", "/c"))


def test_empty_catalog_after_a_reset_empties_once_settled(h: Harness) -> None:
    """A restarted Consul's first empty answer removes nothing; the same answer after
    SETTLE is Consul's word: no routes."""
    h.start()
    h.answer(TWO, index=40)
    h.next({"consul": []}, 2)
    assert len(h.routes()) == 2
    h.next({"consul": []}, 2, advance=SETTLE)
    assert h.routes() == ()


def test_a_churning_index_is_rate_limited(h: Harness) -> None:
    """A burst of BURST requests back to back, then one per REFILL second."""
    h.start()
    for i in range(BURST):
        h.next({"web": [f"urlprefix-/{i}"]}, 10 + i)
    h.clock.advance(0)
    assert h.fake.pending == []
    h.clock.advance(REFILL)
    assert len(h.fake.pending) == 1


# --- the snapshot ----------------------------------------------------------------------------


def test_every_change_is_written_atomically_with_its_query(h: Harness) -> None:
    """``<state_dir>/<name>.routes.json`` holds the routes in match order, the Consul
    index and the query (agent without credentials, datacenter, tag prefix)."""
    h.settings = ConsulConfig(url="http://user:pw@consul.test:8500", wait=10.0)
    h.start()
    h.answer({"web": ["urlprefix-/web strip=/web", "urlprefix-web.example/"]}, index=3)
    document = snapshot.load(h.path())
    assert document is not None
    assert document["query"] == {"catalog": "services", "url": "http://consul.test:8500",
                                 "datacenter": None, "tag_prefix": "urlprefix-"}
    assert document["routes"] == [
        {"service": "web", "host": "web.example", "path_prefix": "/", "strip": None},
        {"service": "web", "host": None, "path_prefix": "/web", "strip": "/web"}]
    assert document["index"] == 3 and document["routes_watch"] == "www"
    assert sorted(os.listdir(h.state_dir)) == ["www.routes.json"]


def test_restarted_with_consul_down_serves_the_snapshot(tmp_path: Any) -> None:
    """A new watch hands the snapshot's routes to on_routes at start, before any answer,
    and keeps them while every request fails."""
    first = Harness(tmp_path)
    first.start()
    first.answer(TWO, index=3)
    first.watcher.stopService()
    second = Harness(tmp_path, http=FailingHTTP())
    second.watcher.startService()
    assert second.calls == [(first.routes(), SNAPSHOT_REASON)]
    for _ in range(5):
        second.clock.advance(30)
    assert len(second.calls) == 1 and second.watcher.routes == first.routes()
    second.watcher.stopService()


def test_first_answer_equal_to_the_snapshot_changes_nothing(tmp_path: Any,
                                                            monkeypatch: Any) -> None:
    """Consul's first answer announcing what the snapshot held is not handed on again,
    and the file is not rewritten; a different one replaces it."""
    first = Harness(tmp_path)
    first.start()
    first.answer(TWO, index=3)
    first.watcher.stopService()
    saves: List[str] = []
    monkeypatch.setattr(snapshot, "save", lambda path, doc: saves.append(path))
    second = Harness(tmp_path)
    second.start()
    second.answer(TWO, index=8)
    assert len(second.calls) == 1 and saves == []
    assert second.watcher.requests == {"unchanged": 1}
    second.next({"web": ["urlprefix-/web"]}, 9)
    assert second.routes() == (r("web", "/web"),) and saves == [second.path()]
    second.watcher.stopService()


def test_snapshot_index_detects_a_consul_reset_across_a_restart(tmp_path: Any) -> None:
    """The index saved with the routes lets a restarted lb see that Consul lost its state
    meanwhile: its first, empty answer does not drop the snapshot's routes."""
    first = Harness(tmp_path)
    first.start()
    first.answer(TWO, index=70)
    first.watcher.stopService()
    second = Harness(tmp_path)
    second.start()
    second.answer({"consul": []}, index=4)
    assert second.watcher.routes == first.routes()
    second.next({"web": ["urlprefix-/web"]}, 5, advance=SETTLE)
    assert second.routes() == (r("web", "/web"),)
    second.watcher.stopService()


@pytest.mark.parametrize("change", [
    {"tag_prefix": "lb-"}, {"datacenter": "dc2"}, {"url": "http://other.test:8500"}])
def test_a_snapshot_of_another_query_is_not_used(tmp_path: Any, change: Dict[str, Any],
                                                 logs: List[str]) -> None:
    """Routes saved for another tag prefix, datacenter or agent are not served."""
    first = Harness(tmp_path)
    first.start()
    first.answer(TWO, index=3)
    first.watcher.stopService()
    second = Harness(tmp_path, http=FailingHTTP(), **change)
    second.watcher.startService()
    assert second.calls == [] and second.watcher.routes is None
    assert any("is for another query" in line for line in logs)
    second.watcher.stopService()


@pytest.mark.parametrize("content", [
    '{"version": 1, "query": ',
    None,  # a pool's peer snapshot where the routes should be
    "ROUTES:bad host",
    "ROUTES:not a list",
])
def test_a_corrupt_or_foreign_snapshot_is_logged_and_not_used(tmp_path: Any, content: Any,
                                                              logs: List[str]) -> None:
    """A damaged file, another kind of snapshot, or routes that fail the tag rules are
    logged and not served; the watch starts without routes."""
    h = Harness(tmp_path, http=FailingHTTP())
    identity = CatalogRoutesQuery().identity(h.settings)
    if content is None:
        document: Any = snapshot.make_document("www", identity, 3, [], saved_at=0)
    elif content == "ROUTES:bad host":
        document = snapshot.make_routes_document("www", identity, 3, [], saved_at=0)
        document["routes"] = [{"service": "web", "host": "bad..host", "path_prefix": "/"}]
    elif content == "ROUTES:not a list":
        document = snapshot.make_routes_document("www", identity, 3, [], saved_at=0)
        document["routes"] = {"web": "/"}
    else:
        document = content
    os.makedirs(h.state_dir)
    with open(h.path(), "w") as f:
        f.write(document if isinstance(document, str) else json.dumps(document))
    h.watcher.startService()
    assert h.calls == [] and h.watcher.routes is None
    assert any("snapshot not used" in line for line in logs)
    h.watcher.stopService()


def test_a_bug_in_on_routes_at_start_does_not_stop_the_start(tmp_path: Any,
                                                              logs: List[str]) -> None:
    """on_routes raising while the snapshot is handed on at start is logged; the watch
    starts without the snapshot's routes and Consul's first answer is handed on."""
    first = Harness(tmp_path)
    first.start()
    first.answer(TWO, index=3)
    first.watcher.stopService()
    second = Harness(tmp_path)
    second.fail_next = 1
    second.start()
    assert second.calls == [] and second.watcher.routes is None
    assert any("applying the Consul snapshot" in line for line in logs)
    second.answer(TWO, index=4)
    assert second.calls == [(first.routes(), WHAT)]
    second.watcher.stopService()


def test_release_removes_the_routes_and_forgets_the_snapshot(h: Harness) -> None:
    """When a reload drops consul_routes, release() hands on no routes and deletes the
    snapshot, so it is never served later."""
    h.start()
    h.answer(TWO, index=3)
    assert os.path.exists(h.path())
    h.watcher.stopService()
    h.watcher.release()
    assert h.calls[-1] == ((), f"{WHAT}: no longer configured")
    assert not os.path.exists(h.path())


# --- stopping, stats, one loop ---------------------------------------------------------------


@pytest.mark.parametrize("moment", ["request in flight", "pause after an error",
                                    "rate limited", "hung request"])
def test_stop_leaves_nothing_in_the_reactor(tmp_path: Any, moment: str) -> None:
    """Whatever the loop waits for when stopped (a blocking request, a backoff pause, the
    token bucket, a request ignoring cancellation) is cancelled with its timers."""
    h = Harness(tmp_path, http=HangingHTTP() if moment == "hung request" else None)
    h.start()
    if moment == "pause after an error":
        h.answer(raw=b"x", status=500, index=None)
    elif moment == "rate limited":
        for i in range(BURST):
            h.next({"web": [f"urlprefix-/{i}"]}, 10 + i)
        h.clock.advance(0)
    assert h.clock.getDelayedCalls() != []
    h.watcher.stopService()
    h.stub.flush()
    assert h.clock.getDelayedCalls() == []
    if moment == "request in flight":
        assert h.fake.lost == h.fake.seen[-1:]
    h.clock.advance(60)
    assert h.fake.pending == [] or moment == "request in flight"


def test_stats_look_like_a_pool_watch(h: Harness) -> None:
    """stats() is the pool watch's ConsulStats: every result at zero from the start, then
    the live counters, so the admin server shows it like a pool's watch."""
    assert h.watcher.stats() == ConsulStats(
        describe="catalog services tagged 'urlprefix-'", service=None, kv_prefix=None,
        requests=dict.fromkeys(RESULTS, 0), last_success=None, failures=0, last_error=None)
    h.start()
    h.clock.advance(7)
    h.answer(TWO, index=3)
    h.clock.advance(0)
    h.answer(raw=b"No cluster leader", status=500, index=None)
    stats = h.watcher.stats()
    assert stats.requests == {**dict.fromkeys(RESULTS, 0), "ok": 1, "http_error": 1}
    assert (stats.last_success, stats.failures) == (7.0, 1)
    assert stats.last_error == "HTTP 500: No cluster leader"


def test_the_loop_is_written_once() -> None:
    """Both watches are BlockingWatch; neither defines any part of the loop (requests,
    index rules, errors, backoff, snapshot files): each only says what an answer is
    applied to."""
    loop = {"startService", "stopService", "stats", "release", "_run", "_wait_for", "_poll",
            "_crashed", "_failed", "_answered", "_report", "_succeeded", "_error", "_apply",
            "_save", "_load_snapshot"}
    for kind in (ConsulWatcher, RoutesWatcher):
        assert issubclass(kind, BlockingWatch)
        assert loop.isdisjoint(vars(kind)), sorted(loop & set(vars(kind)))
        assert loop <= set(vars(BlockingWatch))
