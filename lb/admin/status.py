"""``GET /``: the HTML status page, in the spirit of HAProxy's stats page.

One table per pool (address, sources, admin state, coloured health, weight, connections,
bytes, last check with its age, buttons) and one table of listeners. The page is complete
as served (it works without JavaScript, refreshing with a meta tag); with JavaScript it
re-fetches itself every few seconds and swaps the content in place, and its buttons call the
JSON API (with the bearer token typed into the page when ``admin.token_file`` is set).
No external assets: the CSS and script are inline in ``status.html``.
"""

from __future__ import annotations

import time
from html import escape
from importlib import resources
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

import lb
from lb.admin.view import IAdminView
from lb.peer import ADMIN_STATES
from lb.stats import ConsulStats, HealthCheckStats, ListenerStats, PeerStats, PoolStats

REFRESH_SECONDS = 5
MAX_REFRESH_SECONDS = 3600

# the page may run its own inline script and style and talk to this server only
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")


def _template() -> str:
    return resources.files("lb.admin").joinpath("status.html").read_text(encoding="utf-8")


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def human_bytes(n: int) -> str:
    """1536 → '1.5 KiB': bytes as an operator reads them."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """How long ago, to the precision that matters: '4s', '2m 5s', '3h 10m', '2d 4h'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _when(now: float, at: Optional[float]) -> str:
    if at is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return f'<span title="{_e(stamp)}">{_e(human_age(now - at))} ago</span>'


class StatusPage(Resource):
    """Renders the page from fresh views on every request (cheap: no I/O)."""

    isLeaf = True

    def __init__(self, view: IAdminView, clock: IReactorTime,
                 token: Optional[Callable[[], Optional[str]]] = None,
                 refresh: int = REFRESH_SECONDS) -> None:
        Resource.__init__(self)
        self.view = view
        self.clock = clock
        self.token = token or (lambda: view.config().admin.token)
        self.refresh = refresh
        self.started = clock.seconds()
        self._template = _template()
        self._requests: Dict[str, Tuple[float, int]] = {}  # pool → (when, requests), for rates

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", CSP.encode("ascii"))
        request.setHeader(b"referrer-policy", b"no-referrer")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        return self.render_page(host, self._refresh(request)).encode("utf-8")

    def _refresh(self, request: Request) -> int:
        """``?refresh=N`` sets the period in seconds (1-3600), as HAProxy's stats URI does."""
        value = (request.args or {}).get(b"refresh", [b""])[-1]
        if value.isdigit():
            return max(1, min(int(value), MAX_REFRESH_SECONDS))
        return self.refresh

    def render_page(self, host: str = "", refresh: Optional[int] = None) -> str:
        now = self.clock.seconds()
        pools, listeners = self.view.pools(), self.view.listeners()
        subtitle = (f"{lb.__version__} · {len(pools)} pool(s), {len(listeners)} "
                    f"listener(s) · up {human_age(now - self.started)}")
        parts = [self._summary(now), self._listeners(listeners), self._routes(listeners, now)]
        http = _http_by_pool(listeners)
        for pool in pools:
            parts.append(self._pool(pool, now, http.get(pool.name)))
        if not pools:
            parts.append('<p class="empty">no pools configured</p>')
        page = self._template
        title = f"lb status · {host or self.view.config().admin.bind}"
        for marker, value in (("title", _e(title)),
                              ("subtitle", _e(subtitle)),
                              ("auth", "token" if self.token() else "open"),
                              ("refresh", str(int(refresh or self.refresh))),
                              ("content", "\n".join(parts))):
            page = page.replace(f"<!--lb:{marker}-->", value)
        return page

    def _summary(self, now: float) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        changes = ("changes need the admin token" if self.token()
                   else "changes are open to anyone who can reach this address")
        return (f'<p class="meta">config <b>{_e(self.view.config().path)}</b> · generated '
                f'<span id="generated">{_e(stamp)}</span> · {_e(changes)}</p>')

    # listeners

    @staticmethod
    def _listeners(listeners: Sequence[ListenerStats]) -> str:
        rows: List[str] = []
        for listener in listeners:
            refused = ", ".join(f"{_e(reason)} {count}" for reason, count in
                                listener.refused.items() if count) or "0"
            ended = ", ".join(f"{_e(reason)} {count}" for reason, count in
                              listener.ended.items()) or "—"
            pool_name = listener.pool
            address = _e(listener.address)
            if not listener.accepting:  # what makes /healthz 503
                address += (' <span class="badge h-down" title="its listening socket is '
                            'closed: /healthz answers 503">not accepting</span>')
            rows.append(
                f'<tr data-listener="{_e(listener.name)}"><td>{_e(listener.name)}</td>'
                f'<td class="addr">{address}</td>'
                f'<td><a href="#pool-{_e(pool_name)}">{_e(pool_name)}</a></td>'
                f'<td class="num">{listener.active_connections} / '
                f'{listener.max_connections}</td>'
                f'<td class="num">{listener.total_connections}</td>'
                f'<td class="num">{listener.no_peer}</td>'
                f'<td class="num">{refused}</td><td>{ended}</td></tr>')
        if not rows:
            rows.append('<tr><td colspan="8" class="empty">no listeners</td></tr>')
        return ('<h2>listeners</h2><table id="listeners"><thead><tr><th>name</th>'
                '<th>address</th><th>pool</th><th class="num">active / max</th>'
                '<th class="num">total</th><th class="num">no peer</th>'
                '<th class="num">refused</th><th>ended</th></tr></thead><tbody>'
                + "".join(rows) + "</tbody></table>")

    # routes

    @staticmethod
    def _routes(listeners: Sequence[ListenerStats], now: float) -> str:
        """Every http listener's routes in match order, and how its Consul routes watch
        fares; nothing when no listener is in http mode."""
        rows: List[str] = []
        watches: List[str] = []
        for listener in listeners:
            http = listener.http
            if http is None:
                continue
            for route in http.routes:
                if route.pool is not None:
                    to = f'<a href="#pool-{_e(route.pool)}">{_e(route.pool)}</a>'
                else:
                    to = ", ".join(f'<a href="#pool-{_e(pool)}">{_e(pool)}</a> {weight}'
                                   for pool, weight in route.split)
                headers = "<br>".join(f"{_e(name)}: {_e(value)}"
                                      for name, value in route.headers) or "—"
                rows.append(
                    f'<tr data-listener="{_e(listener.name)}"><td>{_e(listener.name)}</td>'
                    f'<td class="addr">{_e(route.host or "*")}</td>'
                    f'<td class="addr">{_e(route.path_prefix or "/")}</td>'
                    f'<td>{headers}</td><td>{to}</td>'
                    f'<td class="addr">{_e(route.strip_prefix or "—")}</td>'
                    f'<td>{_e(route.source)}</td></tr>')
            consul = http.consul_routes
            if consul is not None:
                state = (f"last answer {human_age(now - consul.last_success)} ago"
                         if consul.last_success is not None else "no answer yet")
                if consul.failures:
                    state += (f' · <span class="h-down">{consul.failures} failure(s) in a '
                              f'row: {_e(consul.last_error)}</span> (serving the last good '
                              'routes)')
                watches.append(f'<p class="meta">listener <b>{_e(listener.name)}</b>: '
                               f'routes from Consul ({_e(consul.describe)}): {state}</p>')
        if not rows and not watches:
            return ""
        if not rows:
            rows.append('<tr><td colspan="7" class="empty">no routes</td></tr>')
        return ('<h2>routes</h2>' + "".join(watches) + '<table id="routes"><thead><tr>'
                '<th>listener</th><th>host</th><th>path prefix</th><th>headers</th>'
                '<th>pool</th><th>strip</th><th>source</th></tr></thead><tbody>'
                + "".join(rows) + "</tbody></table>")

    # pools

    def _pool(self, pool: PoolStats, now: float,
              http: Optional[Dict[str, int]] = None) -> str:
        peers = pool.peers
        up = sum(1 for p in peers if p.health == "up")
        active = sum(p.active_connections for p in peers)
        meta = [f"balance <b>{_e(pool.balance)}</b>",
                f"<b>{up}</b> of {len(peers)} peer(s) up",
                f"<b>{active}</b> active connection(s)",
                self._checks(pool.health_check), *self._consul(pool.consul, now)]
        if http is not None:
            meta.append(self._http(pool.name, http, now))
        if pool.slow_start > 0:
            meta.append(f"slow start {pool.slow_start:g}s")
        rows = [self._peer_row(pool, peer, now) for peer in peers]
        if not rows:
            rows.append('<tr><td colspan="11" class="empty">no peers: clients of this pool are '
                        'closed at once</td></tr>')
        name = _e(pool.name)
        return (f'<section class="pool" id="pool-{name}" data-pool="{name}">'
                f'<h2><span class="kind">pool</span> {name}</h2>'
                f'<p class="meta">{" · ".join(meta)}</p>'
                '<table class="peers"><thead><tr><th>peer</th><th>sources</th>'
                '<th>admin state</th><th>health</th><th class="num">weight</th>'
                '<th class="num">active / total</th><th class="num">bytes in / out</th>'
                '<th class="num">connect failures</th><th>last check</th><th>checked</th>'
                '<th>actions</th></tr></thead><tbody>' + "".join(rows) + '</tbody></table>'
                f'<form class="add" data-pool="{name}">add a peer: '
                '<input name="address" placeholder="host:port" required aria-label="address"> '
                'weight <input name="weight" type="number" min="0" max="256" value="1" '
                'aria-label="weight"> <button type="submit">add</button></form></section>')

    def _http(self, pool: str, classes: Dict[str, int], now: float) -> str:
        """HTTP requests of the pool: the rate since the page was last rendered, and the
        answers by status class."""
        total = sum(classes.values())
        last = self._requests.get(pool)
        self._requests[pool] = (now, total)
        rate = "—"
        if last is not None and now > last[0]:
            rate = f"{(total - last[1]) / (now - last[0]):.1f}/s"
        shown = " ".join(f'<span class="http-{cls}">{cls} {classes.get(cls, 0)}</span>'
                         for cls in ("2xx", "3xx", "4xx", "5xx"))
        return f'HTTP <b>{total}</b> request(s), <b class="rate">{rate}</b> · {shown}'

    @staticmethod
    def _checks(health: Optional[HealthCheckStats]) -> str:
        if health is None or not health.configured:
            return "no active checks (connect failures count)"
        what = f"{health.type} {health.path}" if health.type == "http" else health.type
        return (f"checks <b>{_e(what)}</b> every {health.interval:g}s, timeout "
                f"{health.timeout:g}s, rise {health.rise}, fall {health.fall}")

    @staticmethod
    def _consul(consul: Optional[ConsulStats], now: float) -> List[str]:
        if consul is None:
            return []
        what = consul.service or f"kv {consul.kv_prefix}"
        if consul.last_success is None:
            answer = '<span class="check-fail">no answer yet</span>'
        else:
            answer = f"last answer {_when(now, consul.last_success)}"
        if consul.last_error:
            answer += (f' · <span class="check-fail">error ({consul.failures}× in a row): '
                       f'{_e(consul.last_error)}</span>')
        return [f"Consul <b>{_e(what)}</b>: {answer}"]

    def _peer_row(self, pool: PoolStats, peer: PeerStats, now: float) -> str:
        state = peer.admin_state
        health = peer.health
        why = [f"operator: {peer.operator_state}"] + [
            f"{source}: {wanted}" for source, wanted in sorted(peer.source_states.items())]
        state_html = f'<span class="badge s-{_e(state)}" title="{_e("; ".join(why))}">' \
                     f'{_e(state)}</span>'
        if peer.removing:
            state_html += ' <span class="badge s-removing" title="no source wants it: ' \
                          'removed once idle or after drain_timeout">removing</span>'
        if peer.ejected:
            state_html += ' <span class="badge s-ejected" title="outlier detection took it ' \
                          f'out ({peer.ejections}× so far)">ejected</span>'
        weight = f"{peer.weight}"
        if peer.ramp < 1.0:
            weight += f' <span class="muted">(slow start {peer.ramp:.0%})</span>'
        check = peer.last_check
        if check is None:
            checked_here = pool.health_check is not None and pool.health_check.configured
            detail = ('<span class="muted">none yet</span>' if checked_here
                      else '<span class="muted">—</span>')
            checked = "—"
        else:
            cls = "check-ok" if check.ok else "check-fail"
            mark = "✔" if check.ok else "✘"
            detail = f'<span class="{cls}">{mark} {_e(check.detail)}</span>'
            checked = _when(now, check.at)
        return (f'<tr class="health-{_e(health)} state-{_e(state)}" '
                f'data-peer="{_e(peer.address)}" '
                f'data-admin-state="{_e(state)}" data-health="{_e(health)}">'
                f'<td class="addr">{_e(peer.address)}</td>'
                f'<td>{_e(", ".join(peer.sources)) or "—"}</td>'
                f'<td class="state">{state_html}</td>'
                f'<td class="health"><span class="badge h-{_e(health)}">{_e(health)}</span></td>'
                f'<td class="num">{weight}</td>'
                f'<td class="num">{peer.active_connections} / {peer.total_connections}</td>'
                f'<td class="num"><span title="{peer.bytes_in} bytes client → peer">'
                f'{human_bytes(peer.bytes_in)}</span> / <span title="{peer.bytes_out} bytes '
                f'peer → client">{human_bytes(peer.bytes_out)}</span></td>'
                f'<td class="num">{peer.connect_failures}</td>'
                f'<td class="detail">{detail}</td><td>{checked}</td>'
                f'<td class="actions">{self._buttons(pool, peer)}</td></tr>')

    @staticmethod
    def _buttons(pool: PoolStats, peer: PeerStats) -> str:
        data = f'data-pool="{_e(pool.name)}" data-peer="{_e(peer.address)}"'
        buttons = [f'<button type="button" class="{state}" data-action="state" '
                   f'data-state="{state}" {data}>{state}</button>'
                   for state in ADMIN_STATES if state != peer.operator_state]
        if peer.removable:
            buttons.append(f'<button type="button" class="remove" data-action="remove" '
                           f'{data}>remove</button>')
        return " ".join(buttons)


def _http_by_pool(listeners: Sequence[ListenerStats]) -> Dict[str, Dict[str, int]]:
    """Requests per pool over every http listener, by status class (``2xx``...)."""
    out: Dict[str, Dict[str, int]] = {}
    for listener in listeners:
        if listener.http is None:
            continue
        for (pool, code), n in listener.http.requests.items():
            classes = out.setdefault(pool, {})
            cls = f"{code // 100}xx" if code else "0xx"
            classes[cls] = classes.get(cls, 0) + n
    return out
