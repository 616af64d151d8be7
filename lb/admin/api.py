"""The JSON admin API: every pool and peer as JSON, and runtime changes to peers.

Routes (the contract is SPEC's "Admin API" table; the listener routes are extra)::

    GET    /api/pools
    GET    /api/pools/{pool}
    GET    /api/pools/{pool}/peers
    POST   /api/pools/{pool}/peers               {"address": "h:p", "weight": 1}  -> 201
    GET    /api/pools/{pool}/peers/{address}
    PUT    /api/pools/{pool}/peers/{address}     {"admin_state": ..., "weight": ...} -> 200
    DELETE /api/pools/{pool}/peers/{address}     drain, then remove                 -> 202
    GET    /api/listeners
    GET    /api/routes                           every http listener's routes, in match order

Plain twisted.web rather than Klein: nine routes on three path shapes fit one leaf resource
with a small dispatcher, every error (including 404/405 for unknown routes) leaves as the
same JSON shape, and the project needs no extra dependency. Mutations only call the pool's
public methods, so the next GET, the status page and /metrics all show them at once.
Every request is validated completely before anything changes: a bad request changes nothing.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from lb.admin.view import IAdminView
from lb.config import MAX_WEIGHT
from lb.net import parse_address
from lb.peer import ADMIN_STATES
from lb.pool import Pool, PoolError
from lb.stats import ListenerStats, PeerStats, PoolStats, RouteStats

MAX_BODY = 64 * 1024  # request bodies above this are refused with 413
MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})

JSONBody = Dict[str, Any]
TokenSource = Callable[[], Optional[str]]


class ApiError(Exception):
    """A request the API refuses; becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --- what the API (and the status page) shows -----------------------------------------------


def peer_json(peer: PeerStats) -> JSONBody:
    """One peer as SPEC shows it, plus ``operator_state``, ``removing``, failures and
    outlier ejections."""
    last = peer.last_check
    return {
        "address": peer.address,
        "weight": peer.weight,
        "sources": list(peer.sources),
        "admin_state": peer.admin_state,
        "operator_state": peer.operator_state,
        "removing": peer.removing,
        "health": peer.health,
        "active_connections": peer.active_connections,
        "total_connections": peer.total_connections,
        "bytes_in": peer.bytes_in,
        "bytes_out": peer.bytes_out,
        "connect_failures": peer.connect_failures,
        "ejected": peer.ejected,  # HTTP mode: taken out by outlier detection
        "ejections": peer.ejections,
        "last_check": None if last is None else {
            "ok": last.ok, "detail": last.detail, "at": last.at},
    }


def route_json(listener: str, route: RouteStats) -> JSONBody:
    """SPEC's ROUTE: ``pool`` or ``split``; ``strip_prefix`` is the prefix removed (null:
    none); ``source`` is ``config``, ``consul:<service>``, or ``default`` for the
    listener's own pool, tried when no route matched."""
    out: JSONBody = {"listener": listener, "host": route.host,
                     "path_prefix": route.path_prefix, "headers": dict(route.headers)}
    if route.pool is not None:
        out["pool"] = route.pool
    else:
        out["split"] = [{"pool": pool, "weight": weight} for pool, weight in route.split]
    out["strip_prefix"] = route.strip_prefix
    out["source"] = route.source
    return out


def pool_json(pool: PoolStats) -> JSONBody:
    """A pool with its peers in the order they joined, plus its check and Consul status
    (``health_check`` is null without a health section: the monitor of such a pool only
    brings back peers that client traffic took out)."""
    health = pool.health_check
    consul = pool.consul
    return {
        "name": pool.name,
        "balance": pool.balance,
        "health_check": None if health is None or not health.configured else {
            "type": health.type,
            "path": health.path,
            "interval": health.interval,
            "timeout": health.timeout,
            "rise": health.rise,
            "fall": health.fall,
        },
        "consul": None if consul is None else {
            "service": consul.service,
            "kv_prefix": consul.kv_prefix,
            "last_success": consul.last_success,
        },
        "peers": [peer_json(peer) for peer in pool.peers],
    }


def listener_json(listener: ListenerStats) -> JSONBody:
    """A listener's config and counters."""
    return {
        "name": listener.name,
        "bind": listener.bind,
        "address": listener.address,
        "accepting": listener.accepting,
        "pool": listener.pool,
        "active_connections": listener.active_connections,
        "total_connections": listener.total_connections,
        "max_connections": listener.max_connections,
        "no_peer": listener.no_peer,
        "refused": dict(listener.refused),
        "ended": dict(listener.ended),
    }


# --- request helpers --------------------------------------------------------------------------


def write_json(request: Request, status: int, body: Any,
               headers: Optional[Dict[str, str]] = None) -> bytes:
    """Set status and headers for a JSON answer and return its bytes."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    pretty = (request.args or {}).get(b"pretty", [b"0"])[-1] not in (b"0", b"false", b"")
    text = json.dumps(body, indent=2 if pretty else None, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def check_token(request: Request, token: Optional[str]) -> None:
    """Without a configured token anyone on the admin address may change peers; with one,
    the request must carry ``Authorization: Bearer <token>`` (compared in constant time)."""
    if token is None:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="lb admin"'}
    header = request.getHeader(b"authorization")
    if header is None:
        raise ApiError(401, "this admin API needs 'Authorization: Bearer <token>' for changes "
                            "(admin.token_file is set)", challenge)
    scheme, _, given = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(
            given.strip(), token.encode("utf-8")):
        raise ApiError(401, "invalid bearer token", challenge)


def check_origin(request: Request) -> None:
    """Refuse changes sent by a browser from another site (cross-site request forgery):
    browsers always send ``Origin`` on such requests, and it must name this server."""
    raw = request.getHeader(b"origin")
    if raw is None:
        return
    origin = raw.decode("latin-1").strip()
    host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
    _, sep, origin_host = origin.lower().partition("://")
    if not sep or not host or origin_host.rstrip("/") != host:
        raise ApiError(403, f"cross-origin request from {origin!r} refused")


def check_body_size(request: Request) -> None:
    """413 for a body above MAX_BODY, on every path and method: the admin server keeps
    no more than that of it (``LimitedRequest``), so nothing may act on such a request."""
    too_large = getattr(request, "body_too_large", False)
    length = request.getHeader(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > MAX_BODY:
        too_large = True
    content = request.content
    if not too_large and content is not None:
        content.seek(0, 2)
        too_large = content.tell() > MAX_BODY
        content.seek(0)
    if too_large:
        raise ApiError(413, f"request body is larger than {MAX_BODY} bytes")


def read_json(request: Request) -> JSONBody:
    """The request body as a JSON object; 413 above MAX_BODY, 400 for anything else wrong."""
    check_body_size(request)
    content = request.content
    if content is None:
        raw = b""
    else:
        content.seek(0)
        raw = content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        raise ApiError(400, "expected a JSON object in the request body")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    except RecursionError:  # a few KiB of "[[[[..." get there
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"expected a JSON object, got {type(value).__name__}")
    return value


def _only(body: JSONBody, allowed: Tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))} "
                            f"(expected: {', '.join(allowed)})")


def _weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"weight must be an integer 0-{MAX_WEIGHT}, got {value!r}")
    if not 0 <= value <= MAX_WEIGHT:
        raise ApiError(400, f"weight {value} is out of range 0-{MAX_WEIGHT}")
    return value


def _admin_state(value: Any) -> str:
    if value not in ADMIN_STATES:
        raise ApiError(400, f"unknown admin_state {value!r} (expected one of: "
                            f"{', '.join(ADMIN_STATES)})")
    return str(value)


def peer_path(pool: str, key: str) -> str:
    """The API path of a peer, its address percent-encoded as SPEC says."""
    return f"/api/pools/{quote(pool, safe='')}/peers/{quote(key, safe='')}"


# --- the resource -----------------------------------------------------------------------------


class ApiResource(Resource):
    """``/api``: dispatches on the path below it; every answer is JSON."""

    isLeaf = True
    log = Logger()

    def __init__(self, view: IAdminView, token: Optional[TokenSource] = None) -> None:
        """``token`` gives the admin token in force (by default the running config's, so a
        reload that changes the token applies at once)."""
        Resource.__init__(self)
        self.view = view
        self.token: TokenSource = token or (lambda: view.config().admin.token)

    def render(self, request: Request) -> bytes:
        method = request.method.decode("ascii", "replace").upper()
        headers: Dict[str, str] = {}
        try:
            status, body, headers = self._dispatch(request, method)
        except ApiError as e:
            status, body, headers = e.status, {"error": e.message}, e.headers
        except PoolError as e:
            status, body = e.status, {"error": str(e)}
        except Exception:
            self.log.failure("admin API: {method} {path} failed", method=method,
                             path=request.uri.decode("ascii", "replace"))
            status, body = 500, {"error": "internal error (see the balancer's log)"}
        if method in MUTATING:
            client = request.getClientAddress()
            self.log.info("admin API: {method} {path} from {client}: {status}{error}",
                          method=method, path=request.uri.decode("ascii", "replace"),
                          client=getattr(client, "host", client), status=status,
                          error=f" ({body['error']})" if status >= 400 else "")
        return write_json(request, status, body, headers)

    def _dispatch(self, request: Request,
                  method: str) -> Tuple[int, Any, Dict[str, str]]:
        try:
            segments = [s.decode("utf-8") for s in request.postpath or []]
        except UnicodeDecodeError:
            raise ApiError(400, "the path is not valid UTF-8") from None
        if segments and segments[-1] == "":
            segments.pop()
        route, allowed = self._route(segments)
        if method not in allowed:
            raise ApiError(405, f"method {method} is not allowed here (allowed: "
                                f"{', '.join(allowed)})", {"Allow": ", ".join(allowed)})
        if method == "HEAD":
            method = "GET"  # twisted.web sends the head of the GET answer without its body
        check_body_size(request)
        if method in MUTATING:
            check_token(request, self.token())
            check_origin(request)
        handler: Callable[..., Tuple[int, Any, Dict[str, str]]] = getattr(
            self, f"_{route}_{method.lower()}")
        return handler(request, *segments[1::2])

    @staticmethod
    def _route(segments: List[str]) -> Tuple[str, Tuple[str, ...]]:
        shape = tuple(segments[0::2])  # the fixed words: pools, peers
        n = len(segments)
        if n == 0:
            return "index", ("GET", "HEAD")
        if segments == ["listeners"]:
            return "listeners", ("GET", "HEAD")
        if segments == ["routes"]:
            return "routes", ("GET", "HEAD")
        if shape[:1] == ("pools",) and n == 1:
            return "pools", ("GET", "HEAD")
        if shape[:1] == ("pools",) and n == 2:
            return "pool", ("GET", "HEAD")
        if shape == ("pools", "peers") and n == 3:
            return "peers", ("GET", "HEAD", "POST")
        if shape == ("pools", "peers") and n == 4:
            return "peer", ("GET", "HEAD", "PUT", "DELETE")
        raise ApiError(404, f"no such API path /api/{'/'.join(segments)} (see /api)")

    # lookups

    def _pool(self, name: str) -> PoolStats:
        pool = self.view.pool(name)
        if pool is None:
            raise self._no_pool(name)
        return pool

    def _pool_to_change(self, name: str) -> Pool:
        pool = self.view.pool_to_change(name)
        if pool is None:
            raise self._no_pool(name)
        return pool

    def _no_pool(self, name: str) -> ApiError:
        known = ", ".join(pool.name for pool in self.view.pools()) or "none"
        return ApiError(404, f"no pool named {name!r} (pools: {known})")

    @staticmethod
    def _peer_key(text: str) -> str:
        try:
            return str(parse_address(text))
        except ValueError as e:
            raise ApiError(400, f"invalid peer address in the path: {e}") from None

    # handlers: _{route}_{method}(request, *path parameters) -> (status, body, headers)

    def _index_get(self, request: Request) -> Tuple[int, Any, Dict[str, str]]:
        return 200, {"pools": "/api/pools", "listeners": "/api/listeners",
                     "routes": "/api/routes",
                     "metrics": "/metrics", "healthz": "/healthz",
                     "auth_required_for_changes": self.token() is not None}, {}

    def _listeners_get(self, request: Request) -> Tuple[int, Any, Dict[str, str]]:
        return 200, {"listeners": [listener_json(listener)
                                   for listener in self.view.listeners()]}, {}

    def _routes_get(self, request: Request) -> Tuple[int, Any, Dict[str, str]]:
        return 200, {"routes": [route_json(listener.name, route)
                                for listener in self.view.listeners()
                                if listener.http is not None
                                for route in listener.http.routes]}, {}

    def _pools_get(self, request: Request) -> Tuple[int, Any, Dict[str, str]]:
        return 200, {"pools": [pool_json(pool) for pool in self.view.pools()]}, {}

    def _pool_get(self, request: Request, name: str) -> Tuple[int, Any, Dict[str, str]]:
        return 200, pool_json(self._pool(name)), {}

    def _peers_get(self, request: Request, name: str) -> Tuple[int, Any, Dict[str, str]]:
        return 200, {"peers": [peer_json(peer) for peer in self._pool(name).peers]}, {}

    def _peers_post(self, request: Request, name: str) -> Tuple[int, Any, Dict[str, str]]:
        pool = self._pool_to_change(name)
        body = read_json(request)
        _only(body, ("address", "weight"))
        if "address" not in body:
            raise ApiError(400, "missing 'address' (\"host:port\", IPv6 as \"[::1]:80\")")
        try:
            address = parse_address(body["address"])
        except ValueError as e:
            raise ApiError(400, f"invalid address: {e}") from None
        weight = _weight(body.get("weight", 1))
        peer = pool.add_peer(address, weight, source="admin")
        return 201, peer_json(pool.peer_stats(peer)), {"Location": peer_path(pool.name,
                                                                             peer.key)}

    def _peer_get(self, request: Request, name: str,
                  address: str) -> Tuple[int, Any, Dict[str, str]]:
        pool = self._pool(name)
        key = self._peer_key(address)
        for peer in pool.peers:
            if peer.address == key:
                return 200, peer_json(peer), {}
        raise ApiError(404, f"no peer {key} in pool {pool.name}")

    def _peer_put(self, request: Request, name: str,
                  address: str) -> Tuple[int, Any, Dict[str, str]]:
        pool = self._pool_to_change(name)
        key = self._peer_key(address)
        body = read_json(request)
        _only(body, ("admin_state", "weight"))
        if not body:
            raise ApiError(400, "expected 'admin_state' and/or 'weight'")
        state = _admin_state(body["admin_state"]) if "admin_state" in body else None
        weight = _weight(body["weight"]) if "weight" in body else None
        if weight is not None:  # an unknown peer fails here (404), before any change
            pool.set_weight(key, weight, reason="admin API")
        if state is not None:
            pool.set_admin_state(key, state, reason="admin API")
        return 200, peer_json(pool.peer_stats(pool.get(key))), {}

    def _peer_delete(self, request: Request, name: str,
                     address: str) -> Tuple[int, Any, Dict[str, str]]:
        pool = self._pool_to_change(name)
        peer = pool.remove_peer(self._peer_key(address), reason="admin API")
        return 202, peer_json(pool.peer_stats(peer)), {}
