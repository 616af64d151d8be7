"""The HTML status page, rendered through StubTreq and read back with html.parser."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any, Dict, List, Optional, Tuple

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from lb.admin.server import build_resource
from lb.admin.status import human_age, human_bytes
from lb.config import parse_address
from lb.service import LBService
from lb.testing import make_config

BASE = "http://127.0.0.1:9901"


class Rows(HTMLParser):
    """Collects every table row that has data attributes: its attributes and cell texts,
    and the buttons (their data-* attributes) inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: List[Dict[str, Any]] = []
        self.sections: List[str] = []
        self._row: Optional[Dict[str, Any]] = None
        self._cell: Optional[List[str]] = None
        self.classes: Dict[Tuple[str, str], str] = {}

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section" and "data-pool" in a:
            self.sections.append(a["data-pool"])
        if tag == "tr" and ("data-peer" in a or "data-listener" in a):
            self._row = {"attrs": a, "cells": [], "buttons": [], "badges": [],
                         "pool": self.sections[-1] if "data-peer" in a else None}
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "button" and self._row is not None:
            self._row["buttons"].append(a)
        elif tag == "span" and self._row is not None and "badge" in a.get("class", ""):
            self._row["badges"].append(a["class"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def make_root(token_file: Optional[str] = None) -> LBService:
    admin: Dict[str, Any] = {"bind": "127.0.0.1:0"}
    if token_file:
        admin["token_file"] = token_file
    config = make_config(
        {"front": {"bind": "127.0.0.1:0", "pool": "web"}},
        {"web": {"peers": ["127.0.0.1:9001", {"address": "[::1]:9002", "weight": 3}],
                 "health": {"type": "http", "path": "/ping", "interval": "2s",
                            "timeout": "1s"}},
         "empty": {}},
        admin=admin)
    return LBService(config, MemoryReactorClock())


def fetch(root: LBService, path: str = "/") -> Tuple[int, str, Any]:
    stub = StubTreq(build_resource(root.admin_view, root.reactor))
    results: list = []
    d = stub.get(BASE + path)
    d.addCallback(lambda r: r.text().addCallback(lambda t: results.append((r, t))))
    stub.flush()
    response, text = results[0]
    return response.code, text, response.headers


def parse(page: str) -> Rows:
    rows = Rows()
    rows.feed(page)
    return rows


def peer_row(rows: Rows, pool: str, key: str) -> Dict[str, Any]:
    for row in rows.rows:
        if row["pool"] == pool and row["attrs"].get("data-peer") == key:
            return row
    raise AssertionError(f"no row for {pool} {key}")


@pytest.fixture
def root() -> LBService:
    return make_root()


def test_page_shows_every_peer_with_its_state(root: LBService) -> None:
    """Each peer of each pool has a row with its address, sources, admin state, coloured
    health, weight, active/total connections, bytes, last check detail and its age."""
    pool = root.pool("web")
    root.reactor.advance(1000)
    up = pool.get("127.0.0.1:9001")
    pool.report_check(up, True, "HTTP 200")
    up.bytes_in, up.bytes_out, up.total_connections = 1536, 3 * 1024 * 1024, 12
    pool.connection_started(up, object())
    pool.report_check(pool.get("[::1]:9002"), False, "HTTP 503")
    pool.set_admin_state("[::1]:9002", "drain")
    pool.add_peer(parse_address("127.0.0.1:9003"), 2)
    root.reactor.advance(65)
    status, page, headers = fetch(root)
    assert status == 200
    assert headers.getRawHeaders("content-type")[0] == "text/html; charset=utf-8"
    rows = parse(page)
    assert rows.sections == ["web", "empty"]
    first = peer_row(rows, "web", "127.0.0.1:9001")
    assert first["attrs"]["data-health"] == "up"
    assert first["cells"][:8] == ["127.0.0.1:9001", "static", "ready", "up", "1", "1 / 12",
                                  "1.5 KiB / 3.0 MiB", "0"]
    assert first["cells"][8] == "✔ HTTP 200" and first["cells"][9] == "1m 5s ago"
    assert "badge h-up" in first["badges"]
    second = peer_row(rows, "web", "[::1]:9002")
    assert second["cells"][1:5] == ["static", "drain", "unknown", "3"]
    assert "badge h-unknown" in second["badges"] and "badge s-drain" in second["badges"]
    assert second["cells"][8] == "✘ HTTP 503"
    added = peer_row(rows, "web", "127.0.0.1:9003")
    assert added["cells"][1] == "admin" and added["cells"][8] == "none yet"


def test_health_colours_follow_state(root: LBService) -> None:
    """Down peers get the red badge class, up the green one; the CSS defines both."""
    pool = root.pool("web")
    peer = pool.get("127.0.0.1:9001")
    for _ in range(3):
        pool.report_check(peer, False, "timeout")
    page = fetch(root)[1]
    row = peer_row(parse(page), "web", "127.0.0.1:9001")
    assert row["attrs"]["data-health"] == "down" and "badge h-down" in row["badges"]
    assert re.search(r"\.h-down \{[^}]*--down", page)
    assert re.search(r"\.h-up \{[^}]*--up", page)


def test_buttons_offer_the_other_states_and_remove_where_delete_works(
        root: LBService) -> None:
    """A ready peer offers drain and maint, a drained one ready; remove is offered where
    the API's DELETE works (admin and static peers), not for a peer Consul announces nor
    one already being removed."""
    from lb.peer import PeerSpec

    pool = root.pool("web")
    pool.set_admin_state("[::1]:9002", "drain")
    pool.add_peer(parse_address("127.0.0.1:9003"))
    pool.apply("consul", [PeerSpec(parse_address("127.0.0.1:9004"))])
    pool.add_peer(parse_address("127.0.0.1:9005"))
    pool.connection_started(pool.get("127.0.0.1:9005"), object())
    pool.remove_peer("127.0.0.1:9005")
    rows = parse(fetch(root)[1])

    def actions(key: str) -> List[str]:
        return [b.get("data-state") or b["data-action"]
                for b in peer_row(rows, "web", key)["buttons"]]

    assert actions("127.0.0.1:9001") == ["drain", "maint", "remove"]
    assert actions("[::1]:9002") == ["ready", "maint", "remove"]
    assert actions("127.0.0.1:9003") == ["drain", "maint", "remove"]
    assert actions("127.0.0.1:9004") == ["drain", "maint"]
    assert actions("127.0.0.1:9005") == ["drain", "maint"]
    button = peer_row(rows, "web", "[::1]:9002")["buttons"][0]
    assert (button["data-pool"], button["data-peer"]) == ("web", "[::1]:9002")


def test_listeners_and_empty_pools(root: LBService) -> None:
    """Listeners show address, pool and counts; an empty pool says clients are closed."""
    listener = root.listeners["front"].listener
    listener.total, listener.ended["no_peer"] = 40, 4
    listener.refused["max_connections"] += 2
    page = fetch(root)[1]
    (front,) = [r for r in parse(page).rows if r["attrs"].get("data-listener") == "front"]
    assert front["cells"][2:7] == ["web", "0 / 10000", "40", "4", "max_connections 2"]
    assert "no peers: clients of this pool are closed at once" in page


def test_a_listener_that_does_not_accept_is_marked(root: LBService) -> None:
    """A listener whose socket is not accepting (lost under lb, or never bound) is marked
    in its row, as /healthz reports it; an accepting one is not."""
    from twisted.internet.address import IPv4Address

    class Open:
        connected = True

        def getHost(self) -> IPv4Address:
            return IPv4Address("TCP", "127.0.0.1", 8080)

    def row() -> Dict[str, Any]:
        (found,) = [r for r in parse(fetch(root)[1]).rows
                    if r["attrs"].get("data-listener") == "front"]
        return found

    assert "not accepting" in row()["cells"][1] and "badge h-down" in row()["badges"]
    root.listeners["front"].port = Open()
    assert row()["cells"][1] == "127.0.0.1:8080" and row()["badges"] == []


def test_untrusted_text_is_escaped(root: LBService) -> None:
    """A check detail (it may quote a peer's answer) cannot inject markup."""
    pool = root.pool("web")
    pool.report_check(pool.get("127.0.0.1:9001"), False, '<script>alert("x")</script>')
    page = fetch(root)[1]
    assert '<script>alert("x")' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_page_is_self_contained_and_refreshes(root: LBService) -> None:
    """No external assets (inline CSS and script, a CSP that forbids others), a refresh
    with or without JavaScript, and links to the JSON API."""
    status, page, headers = fetch(root)
    csp = headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<style>" in page and "<script>" in page
    assert 'data-refresh="5"' in page
    assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in page
    assert 'href="/api/pools"' in page


def test_token_mode_asks_for_the_token(tmp_path: Any) -> None:
    """With admin.token_file the page tells its script to send a bearer token; without it
    buttons work as they are."""
    token = tmp_path / "token"
    token.write_text("abc\n")
    secured = fetch(make_root(str(token)))[1]
    assert 'data-auth="token"' in secured and "changes need the admin token" in secured
    open_page = fetch(make_root())[1]
    assert 'data-auth="open"' in open_page


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (5 * 1024 ** 3, "5.0 GiB"), (3 * 1024 ** 5, "3072.0 TiB")])
def test_human_bytes(n: int, text: str) -> None:
    """Byte counts read as binary units."""
    assert human_bytes(n) == text


@pytest.mark.parametrize("seconds, text", [(-1, "0s"), (59.9, "59s"), (60, "1m 0s"),
                                           (3725, "1h 2m"), (90000, "1d 1h")])
def test_human_age(seconds: float, text: str) -> None:
    """Ages keep the two largest units."""
    assert human_age(seconds) == text


@pytest.mark.parametrize("query, period", [("", "5"), ("?refresh=2", "2"),
                                           ("?refresh=0", "1"), ("?refresh=99999", "3600"),
                                           ("?refresh=soon", "5")])
def test_refresh_period_from_the_query(root: LBService, query: str, period: str) -> None:
    """?refresh=N sets the page's refresh period, clamped to 1-3600 seconds."""
    page = fetch(root, "/" + query)[1]
    assert f'data-refresh="{period}"' in page
    assert f'<meta http-equiv="refresh" content="{period}">' in page
