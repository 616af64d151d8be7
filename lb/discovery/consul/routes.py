"""Routes announced by Consul tags, in Fabio's syntax (pure: no I/O, no Twisted).

A service announces a route with a tag ``<tag_prefix>[host]/path [option ...]`` on its
instances, ``urlprefix-/api``, ``urlprefix-example.com/``, ``urlprefix-*.example.com/static
strip=/static``; each announcing service gets a pool ``consul:<service>`` (built elsewhere)
and its routes lead there. The watch reads ``GET /v1/catalog/services``, every service with
the union of its instances' tags; a service whose instances all fail keeps its route (its
pool answers 503 naming it), unlike Fabio, which drops the route and lets the request fall
through to a less specific one.

A tag is used only when lb does everything it asks. Of the options Fabio documents, lb
takes ``strip=/path`` (the matched request's path loses that leading whole-segment part)
and ``proto=http`` (Fabio's default). Every other option changes what the route does,
so ignoring it would serve the route differently from what was announced (an ignored
``allow=`` would expose a service to every client): such a tag is skipped with a reason,
as is an unknown option, a host with a port, a ``:port`` (TCP) route, a path without a
leading ``/``, Fabio's ``$DC`` expansion, a glob in the path, and anything hostile (huge,
control characters, empty), or a service name that cannot name a pool (empty, spaces,
control characters, over 255 characters). Hosts are lower-cased and IDNA-encoded, with
``*.suffix`` wildcards, by the same rules as the config file's route hosts (a host already
in IDNA form is taken as it is when canonical).

Order and conflicts: the routes come most specific first (a host before none, an exact
host before a wildcard, a longer wildcard suffix first, a longer path first, then by host,
path and service), so every lb instance builds the same table. ``/api`` and ``/api/`` match
the same requests (whole segments), so they are one route: when services announce the same
(host, path) the lowest service name (code point order, which is UTF-8 byte order) wins,
then no ``strip`` before a ``strip``, and the others are reported as a conflict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from lb.config import CONSUL_POOL_PREFIX, ConsulConfig, check_path_prefix, check_route_host
from lb.discovery.consul.api import ConsulHTTPError, InvalidAnswer, decode_json, safe_url
from lb.net import short_repr

DEFAULT_TAG_PREFIX = "urlprefix-"
MAX_TAG_LENGTH = 1024  # characters of one route tag, options included
MAX_SERVICE_NAME = 255  # characters; the name becomes a pool name, a label and a file name

# Options of Fabio's route tags that lb cannot honour, and what ignoring them would change.
UNSUPPORTED_OPTIONS: Dict[str, str] = {
    "allow": "restricts which client addresses may use the route; served without it, the "
             "service would be open to every client",
    "deny": "refuses some client addresses; served without it, they would get through",
    "auth": "requires an authorization scheme lb does not have",
    "redirect": "answers with a redirect instead of proxying",
    "prepend": "adds a prefix to the path sent to the peers",
    "host": "sets the Host header sent to the peers",
    "weight": "gives the route a share of the traffic of a path other services also serve",
    "tlsskipverify": "is about TLS to the peers, which lb does not speak",
    "grpcservername": "is about gRPC over TLS to the peers, which lb does not speak",
    "pxyproto": "sends a PROXY header on a TCP route",
    "register": "registers the balancer itself in Consul under that name, which lb does "
                "not do",
}
PROTOCOLS = {"http"}  # proto= values that mean what lb does (http is Fabio's default)


@dataclass(frozen=True)
class ConsulRoute:
    """A route a Consul service announces: requests for ``host`` (None: any host; a
    ``*.suffix`` wildcard) whose path starts with ``path_prefix`` (whole segments) go to
    the pool ``consul:<service>``, with ``strip`` (None: nothing) removed from the front of
    the path first. ``strip`` is ``path_prefix`` or a leading whole-segment part of it."""

    service: str
    host: Optional[str]
    path_prefix: str
    strip: Optional[str] = None

    @property
    def pool(self) -> str:
        """The pool this route leads to, also its ``source`` in /api/routes."""
        return CONSUL_POOL_PREFIX + self.service

    @property
    def key(self) -> Tuple[Optional[str], str]:
        """What two routes must share to match the same requests: the host and the path
        without trailing slashes (``/api`` and ``/api/`` match the same whole segments)."""
        return self.host, _segments(self.path_prefix)

    def describe(self) -> str:
        """For logs: ``api.example.com/v1 -> consul:api (strip /v1)``."""
        strip = f" (strip {self.strip})" if self.strip is not None else ""
        return f"{self.host or ''}{self.path_prefix} -> {self.pool}{strip}"


@dataclass(frozen=True)
class RouteConflict:
    """Several announcements of one (host, path): ``used`` is the one in the table."""

    used: ConsulRoute
    dropped: Tuple[ConsulRoute, ...]

    def describe(self) -> str:
        """One log line naming every announcement and the rule that chose."""
        others = "; ".join(_announcement(r) for r in self.dropped)
        return (f"route {self.used.host or ''}{self.used.path_prefix} is announced "
                f"{1 + len(self.dropped)} ways: using {_announcement(self.used)}, not "
                f"{others} (the lowest service name wins, then no strip before strip, the "
                "same on every lb)")


@dataclass(frozen=True)
class ParsedRoutes:
    """What a catalog answer announces: the routes in match order, the tags left out and
    why, and the (host, path) announced more than one way."""

    routes: Tuple[ConsulRoute, ...]
    skipped: Tuple[str, ...] = ()
    conflicts: Tuple[RouteConflict, ...] = ()


def _announcement(route: ConsulRoute) -> str:
    strip = f" strip={route.strip}" if route.strip is not None else ""
    return f"service {route.service!r}{strip}"


def _segments(path: str) -> str:
    return path.rstrip("/")


# --- one tag ---------------------------------------------------------------------------------


def check_service_name(service: Any) -> str:
    """A service name lb can name a pool after: 1-255 printable characters, no space;
    ValueError otherwise."""
    if not isinstance(service, str) or not service:
        raise ValueError("the service has no name")
    if len(service) > MAX_SERVICE_NAME:
        raise ValueError(f"the service name is over {MAX_SERVICE_NAME} characters")
    if not all(ch.isprintable() and not ch.isspace() for ch in service):
        raise ValueError(f"the service name {short_repr(service)} has a space, a control or "
                         "a non-printable character")
    return service


def make_route(service: str, host: Optional[str], path_prefix: str,
               strip: Optional[str] = None) -> ConsulRoute:
    """A validated route (the rules a tag's route must pass, also used on snapshots);
    ValueError naming the problem otherwise."""
    check_service_name(service)
    if host is not None:
        if "$" in host:
            raise ValueError(f"host {short_repr(host)} has a '$' (Fabio expands $DC there; "
                             "lb does not)")
        host = check_route_host(host)
    if "$" in path_prefix:
        raise ValueError(f"path {short_repr(path_prefix)} has a '$' (Fabio expands $DC "
                         "there; lb does not)")
    if "*" in path_prefix:
        raise ValueError(f"path {short_repr(path_prefix)} has a '*' (a glob for Fabio's "
                         "glob matcher; lb matches path prefixes literally)")
    path_prefix = check_path_prefix(path_prefix)
    if strip is not None:
        strip = check_path_prefix(strip)
        leading = _segments(strip)
        if _segments(path_prefix) != leading and not path_prefix.startswith(leading + "/"):
            raise ValueError(f"strip={short_repr(strip)} is not the route's path "
                             f"{short_repr(path_prefix)} or a leading whole-segment part of "
                             "it (lb strips from the path a request matched)")
    return ConsulRoute(service, host, path_prefix, strip)


def parse_tag(service: str, tag: str, tag_prefix: str) -> Union[ConsulRoute, str]:
    """One tag that starts with ``tag_prefix`` (after white space is trimmed, as Fabio
    does): the route it announces, or why it is not used. Never raises."""
    text = tag.strip()
    if not text.startswith(tag_prefix):
        return f"does not start with {tag_prefix!r}"
    if len(text) > MAX_TAG_LENGTH:
        return f"over {MAX_TAG_LENGTH} characters"
    if not text.isprintable():
        return "has a control or non-printable character"
    words = text[len(tag_prefix):].split()
    if not words:
        return "announces nothing after the prefix"
    route, options = words[0], words[1:]
    if route.startswith(":"):
        return "is a TCP route (':port'); lb's Consul routes are HTTP"
    host_text, slash, rest = route.partition("/")
    if not slash:
        return "has no '/': an HTTP route is [host]/path"
    strip: Optional[str] = None
    for option in options:
        name, equals, value = option.partition("=")
        if name == "strip" and equals:
            if strip is not None:
                return "has strip= twice"
            strip = value
        elif name == "proto" and equals and value in PROTOCOLS:
            continue
        elif name == "proto":
            return (f"option {short_repr(option)}: lb's Consul routes proxy plain HTTP to "
                    "the peers")
        elif name in UNSUPPORTED_OPTIONS:
            return f"option {name}= {UNSUPPORTED_OPTIONS[name]}"
        else:
            return (f"unknown option {short_repr(option)} (lb knows strip= and proto=http; "
                    "a tag is used only when lb does all it asks)")
    try:
        return make_route(service, host_text or None, "/" + rest, strip)
    except ValueError as e:
        return str(e)


def parse_tags(service: str, tags: Iterable[Any], tag_prefix: str,
               ) -> Tuple[List[ConsulRoute], List[str]]:
    """The routes a service's tags announce (each once, in the order of the sorted tags)
    and why the others are not used: ``service 'x': tag '...' not used: reason``. Tags
    without ``tag_prefix`` are the service's own business and ignored silently."""
    mine = sorted({tag.strip() for tag in tags
                   if isinstance(tag, str) and tag.strip().startswith(tag_prefix)})
    if not mine:
        return [], []
    try:
        check_service_name(service)
    except ValueError as e:
        return [], [f"service {short_repr(service)}: {len(mine)} route tag(s) not used: {e}"]
    routes: List[ConsulRoute] = []
    skipped: List[str] = []
    for tag in mine:
        parsed = parse_tag(service, tag, tag_prefix)
        if isinstance(parsed, str):
            skipped.append(f"service {service!r}: tag {short_repr(tag)} not used: {parsed}")
        elif parsed not in routes:
            routes.append(parsed)
    return routes, skipped


# --- a route list ----------------------------------------------------------------------------


def match_order(route: ConsulRoute) -> Tuple[Any, ...]:
    """Sort key, most specific first: a host before none, an exact host before a wildcard
    (a longer wildcard suffix first), a longer path first; then host, path, service and
    strip, so the order is total and the same on every lb."""
    host = route.host
    wildcard = host is not None and host.startswith("*.")
    return (host is None, wildcard, -len(host) if host is not None and wildcard else 0,
            -len(_segments(route.path_prefix)), host or "", route.path_prefix,
            route.service, route.strip is not None, route.strip or "")


def resolve(routes: Iterable[ConsulRoute],
            ) -> Tuple[Tuple[ConsulRoute, ...], Tuple[RouteConflict, ...]]:
    """One route per (host, path) in match order, and the conflicts: of the routes sharing
    a key, the lowest (service, no strip first, strip) is used. Routes that differ only in
    a trailing slash of one service (same strip) are the same route, not a conflict."""
    by_key: Dict[Tuple[Optional[str], str], List[ConsulRoute]] = {}
    for route in set(routes):
        by_key.setdefault(route.key, []).append(route)
    used: List[ConsulRoute] = []
    conflicts: List[RouteConflict] = []
    for group in by_key.values():
        group.sort(key=lambda r: (r.service, r.strip is not None, r.strip or "",
                                  r.path_prefix))
        winner = group[0]
        dropped = tuple(r for r in group[1:]
                        if (r.service, r.strip) != (winner.service, winner.strip))
        used.append(winner)
        if dropped:
            conflicts.append(RouteConflict(winner, dropped))
    used.sort(key=match_order)
    conflicts.sort(key=lambda c: match_order(c.used))
    return tuple(used), tuple(conflicts)


def keeping(old: Sequence[ConsulRoute], new: Sequence[ConsulRoute]) -> Tuple[ConsulRoute, ...]:
    """``new`` plus the routes of ``old`` whose (host, path) it does not announce (as they
    were), in match order: what to serve while removals are held back."""
    taken = {route.key for route in new}
    merged = list(new) + [route for route in old if route.key not in taken]
    return tuple(sorted(merged, key=match_order))


def parse_catalog_services(services: Any, tag_prefix: str) -> ParsedRoutes:
    """The routes of a ``/v1/catalog/services`` body (decoded from JSON): ``{service:
    [tag, ...]}``. A body of another shape is InvalidAnswer (not Consul: keep the last
    good routes); tags lb cannot use are skipped, never raised."""
    if not isinstance(services, dict):
        raise InvalidAnswer(f"expected a JSON object of services, got "
                            f"{type(services).__name__}")
    candidates: List[ConsulRoute] = []
    skipped: List[str] = []
    for service in sorted(services):
        tags = services[service]
        if tags is None:
            continue
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidAnswer(f"service {short_repr(service)}: tags are not a list of "
                                "strings")
        routes, why = parse_tags(service, tags, tag_prefix)
        candidates += routes
        skipped += why
    used, conflicts = resolve(candidates)
    return ParsedRoutes(used, tuple(skipped), conflicts)


class CatalogRoutesQuery:
    """Routes from every service's tags: ``GET /v1/catalog/services`` (a blocking query;
    Consul's ``tag=`` filter does not apply there, so the prefix is matched here)."""

    service: Optional[str] = None
    kv_prefix: Optional[str] = None
    path = "/v1/catalog/services"

    def __init__(self, tag_prefix: str = DEFAULT_TAG_PREFIX) -> None:
        if not tag_prefix or not tag_prefix.isprintable() or any(
                ch.isspace() or ch == "/" for ch in tag_prefix):
            raise ValueError(f"tag prefix {short_repr(tag_prefix)} is empty or has a space, a "
                             "'/' or a control character")
        self.tag_prefix = tag_prefix
        self.describe = f"catalog services tagged {tag_prefix!r}"
        self.params: List[Tuple[str, str]] = []

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        """What a routes snapshot must match: the agent (without credentials), the
        datacenter and the tag prefix."""
        return {"catalog": "services", "url": safe_url(settings.url),
                "datacenter": settings.datacenter, "tag_prefix": self.tag_prefix}

    def parse(self, status: int, body: bytes) -> ParsedRoutes:
        """200: the announced routes; any other status is an error."""
        if status != 200:
            raise ConsulHTTPError(status, body)
        return parse_catalog_services(decode_json(body), self.tag_prefix)
