"""The route table of an http listener: which route (and so which pool) a request goes to.

The rules are SPEC's "Routing": routes are tried in order (the config's, then Consul's) and
the first whose matchers all match wins; ``host`` matches the Host header without its port,
exactly or as ``*.suffix``; ``path_prefix`` matches whole segments; ``headers`` match exact
values. A loop over the routes would say it all, and the tests keep such a loop as the
reference this table must agree with.

Why not that loop: a listener in front of a Consul catalog can carry thousands of routes
(one per service and path), and every request pays for the lookup on lb's one data-path
core. A scan costs every route's matchers, and a miss (a 404, or the default pool) costs
the most. So the table indexes what the rules can answer without trying a route:

- **Host first, by dict.** Exact hosts are one dict lookup. A wildcard ``*.example.com``
  can only match a Host ending in ``.example.com``, so the table looks up the Host's
  suffixes, label by label from the right, in a dict of wildcard suffixes -- only as many
  labels as the longest wildcard has, so a hostile Host of thousands of labels costs no
  more than a real one. Routes without a host sit in one more bucket, tried for every
  request. A listener sees few distinct Hosts, so the tries a Host leads to are remembered
  for the next request that sends it (a bounded memo: made-up Hosts only cost the walk).
- **Then the path, by segment trie.** Each host bucket holds a trie keyed by path segment;
  a route sits at the node its prefix ends at (``/v1`` and ``/v1/`` at the same node:
  they match the same whole segments; ``/`` at the root). Walking the request's segments
  down the trie visits exactly the prefixes that match, so the cost is the depth of the
  deepest prefix, however many prefixes share a host, and the path is split no deeper than
  that (a path of 10,000 segments is split once, at the trie's depth).
- **Order decides, not specificity.** Every route keeps its index in the match order; the
  nodes visited hold candidates that match host and path, and the winner is the lowest index
  among those whose headers match (headers are tried last and only on candidates: they are
  rare, and checking one calls back into the request). A node's routes are kept sorted, and
  end at the first without headers (it always matches there, so none after it can win), so
  each node stops at its first match or as soon as it cannot beat the best so far.

The path is matched as sent, percent-encoding and all (``/%761/`` is not ``/v1/``), as
HAProxy's ``path_beg`` does: decoding would make ``%2F`` a segment boundary and let two
spellings of one path route differently from how the peer reads them. A table's routes
never change: a config reload or a Consul change builds a new table and swaps it in whole,
so a request never sees half an update.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from lb.config import RouteConfig, WeightedPool

HeaderLookup = Callable[[str], Optional[str]]  # lower-case name -> value as sent, or None

SOURCE_CONFIG = "config"
SOURCE_DEFAULT = "default"  # the listener's pool when no route matched
SOURCE_CONSUL_PREFIX = "consul:"  # + the announcing service


@dataclass(frozen=True)
class Route:
    """One route: its matchers (an absent one matches anything), where it sends a request
    (``pool``, or one of ``split`` by weight: exactly one of the two) and the path prefix
    removed before the request goes on (``strip``)."""

    host: Optional[str] = None  # lower-case ASCII, IP, "[v6]" or "*.suffix"
    path_prefix: Optional[str] = None  # starts with "/"; matches whole segments
    headers: Tuple[Tuple[str, str], ...] = ()  # (lower-case name, exact value)
    pool: Optional[str] = None
    split: Tuple[WeightedPool, ...] = ()
    strip: Optional[str] = None  # starts with "/"; may differ from path_prefix (Consul)
    source: str = SOURCE_CONFIG  # "config", "consul:<service>" or "default"
    _bounds: Tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.pool is None) == (not self.split):
            raise ValueError("a route needs exactly one of pool or split")
        if any(entry.weight < 0 for entry in self.split):
            raise ValueError("a split weight is negative")
        if self.split and not any(entry.weight for entry in self.split):
            raise ValueError("every split weight is 0")
        for name, value in (("path_prefix", self.path_prefix), ("strip", self.strip)):
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{name} {value!r} does not start with '/'")
        if self.host is not None and "*" in self.host[2 if self.host.startswith("*.") else 0:]:
            raise ValueError(f"host {self.host!r}: a wildcard is a whole first label only")
        # cumulative weights: pick_pool bisects them
        object.__setattr__(self, "_bounds",
                           tuple(accumulate(entry.weight for entry in self.split)))

    @classmethod
    def from_config(cls, config: RouteConfig) -> "Route":
        """A route of the config file: ``strip_prefix: true`` strips its own path_prefix."""
        return cls(host=config.host, path_prefix=config.path_prefix, headers=config.headers,
                   pool=config.pool, split=config.split,
                   strip=config.path_prefix if config.strip_prefix else None,
                   source=SOURCE_CONFIG)

    def pick_pool(self, rng_random: Callable[[], float]) -> str:
        """The pool for one request: ``pool``, or one of ``split`` with a chance in proportion
        to its weight (a weight of 0 is never picked). ``rng_random`` returns a float in
        [0, 1), like ``random.Random().random``; it is not called for a single pool."""
        if self.pool is not None:
            return self.pool
        bounds = self._bounds
        i = bisect_right(bounds, rng_random() * bounds[-1])
        if i >= len(bounds):  # rng_random() at 1.0, or rounding on the way there
            i = bisect_right(bounds, bounds[-1] - 1)  # the last entry with a weight
        return self.split[i].pool

    def rewrite(self, target: str) -> str:
        """The request target to send on: ``strip`` removed from the front of the path when
        it ends there at a segment boundary (``/v1`` strips ``/v1`` and ``/v1/x``, not
        ``/v10``), an emptied path becoming ``/``; the query string kept. A target that does
        not start with the prefix (or ``*``) goes on unchanged."""
        strip = self.strip
        if strip is None:
            return target
        prefix = strip.rstrip("/")
        if not prefix or not target.startswith(prefix):
            return target  # stripping "/" changes nothing; "*" has no path to strip
        rest = target[len(prefix):]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
        if rest[0] == "?":
            return "/" + rest
        return target  # /v10 under /v1: not a segment boundary

    def pools(self) -> Tuple[str, ...]:
        """Every pool this route may send to (a split's pools of weight 0 included: they
        are named, so they exist)."""
        if self.pool is not None:
            return (self.pool,)
        return tuple(entry.pool for entry in self.split)

    def to_json(self) -> Dict[str, Any]:
        """SPEC's ROUTE of ``GET /api/routes`` without its ``listener`` (the caller adds it).

        ``strip_prefix`` is the prefix removed before the request goes on, or null: the
        config's ``strip_prefix: true`` shows as its path_prefix, and a Consul route's
        ``strip=/path`` (which may differ from the prefix it matches) shows as it is."""
        out: Dict[str, Any] = {
            "host": self.host,
            "path_prefix": self.path_prefix,
            "headers": dict(self.headers),
        }
        if self.pool is not None:
            out["pool"] = self.pool
        else:
            out["split"] = [{"pool": entry.pool, "weight": entry.weight}
                            for entry in self.split]
        out["strip_prefix"] = self.strip
        out["source"] = self.source
        return out


def host_key(value: Optional[str]) -> Optional[str]:
    """The Host header as routes name hosts: without its port, lower-case, without a
    trailing dot, an IPv6 literal in its short form (``[0:0::1]:80`` → ``[::1]``). ``None``
    (no Host) stays ``None``, and so does a non-ASCII Host: route hosts are ASCII (IDNA), and
    ``str.lower`` would fold some non-ASCII letters into ASCII ones (KELVIN SIGN → ``k``)."""
    if value is None or not value.isascii():
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value.lower()  # not a Host at all; matches no host
        try:
            return f"[{ipaddress.IPv6Address(value[1:end])}]"
        except ValueError:
            return value[:end + 1].lower()
    colon = value.find(":")
    name = (value if colon < 0 else value[:colon]).lower()
    return name[:-1] if name.endswith(".") else name


# (index in match order, its headers, the route)
_Entry = Tuple[int, Tuple[Tuple[str, str], ...], Route]

# Host header → its tries, remembered for the Hosts a listener sees (a few, usually); bounded
# in count and length so that clients sending made-up Hosts cost only the walk they skip.
_CACHED_HOSTS = 4096
_CACHED_HOST_LENGTH = 255


class _Node:
    """A trie node: the routes whose prefix ends here, by index (up to the first without
    headers: it matches whenever this node is reached, so none after it can win), and the
    next segments."""

    __slots__ = ("entries", "children")

    def __init__(self) -> None:
        self.entries: List[_Entry] = []
        self.children: Dict[str, _Node] = {}


def _segments(prefix: Optional[str]) -> List[str]:
    """The whole segments a path prefix stands for: ``/v1/`` and ``/v1`` → ``["v1"]``,
    ``/`` → ``[]`` (every path)."""
    if prefix is None:
        return []
    trimmed = prefix.rstrip("/")
    return trimmed.split("/")[1:] if trimmed else []


def _child(nodes: Dict[str, _Node], key: str) -> _Node:
    node = nodes.get(key)
    if node is None:
        node = nodes[key] = _Node()
    return node


class RouteTable:
    """The routes of one http listener in match order, indexed by host and path segments
    (see the module's docstring). Its routes never change; ``match`` is all the data path
    calls."""

    def __init__(self, config_routes: Sequence[RouteConfig], consul_routes: Sequence[Route],
                 default_pool: Optional[str]) -> None:
        self._routes: Tuple[Route, ...] = (
            tuple(Route.from_config(r) for r in config_routes) + tuple(consul_routes))
        self.default: Optional[Route] = (
            Route(pool=default_pool, source=SOURCE_DEFAULT) if default_pool else None)
        self._exact: Dict[str, _Node] = {}
        self._wild: Dict[str, _Node] = {}  # by suffix: "*.example.com" under "example.com"
        self._any: Optional[_Node] = None  # routes without a host
        self._wild_dots = 0  # dots in the longest wildcard suffix: how far a Host is walked
        self._depth = 0  # segments in the deepest prefix: how far a path is split
        self._by_host: Dict[Optional[str], Tuple[_Node, ...]] = {}  # see _CACHED_HOSTS
        for index, route in enumerate(self._routes):
            host = route.host
            if host is None:
                if self._any is None:
                    self._any = _Node()
                root = self._any
            elif host.startswith("*."):
                root = _child(self._wild, host[2:])
                self._wild_dots = max(self._wild_dots, host.count(".") - 1)
            else:
                root = _child(self._exact, host)
            node = root
            segments = _segments(route.path_prefix)
            for segment in segments:
                node = _child(node.children, segment)
            self._depth = max(self._depth, len(segments))
            entries = node.entries  # in index order: routes are added in order
            if not entries or entries[-1][1]:  # else one without headers is there already
                entries.append((index, route.headers, route))

    def match(self, host: Optional[str], path: str, header: HeaderLookup) -> Optional[Route]:
        """The route a request takes: the first in match order whose matchers all match,
        else the default pool's (``source="default"``), else None (404).

        ``host`` is the Host header as sent (any case, ``:port``, ``[v6]:port``, a trailing
        dot; None when absent); ``path`` the request target as sent (origin-form with its
        query, or ``*``), matched without decoding percent-escapes; ``header(name)`` a
        header's value by lower-case name, or None (called only for routes with headers)."""
        roots = self._by_host.get(host)
        if roots is None:
            roots = self._roots(host)
            if host is None or len(host) <= _CACHED_HOST_LENGTH:
                if len(self._by_host) >= _CACHED_HOSTS:
                    self._by_host.clear()
                self._by_host[host] = roots
        if not roots:
            return self.default
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        # origin-form splits to ["", seg1, seg2, ...]; "*" (OPTIONS) has no segment, so only
        # routes at a root ("/" or no prefix) match it
        segments = path.split("/", self._depth + 1) if path.startswith("/") else [""]
        depth = min(len(segments) - 1, self._depth)
        best: Optional[Route] = None
        best_index = len(self._routes)
        for root in roots:
            node: Optional[_Node] = root
            i = 0
            while node is not None:
                for index, headers, route in node.entries:
                    if index >= best_index:
                        break
                    if not headers or all(header(name) == value for name, value in headers):
                        best, best_index = route, index
                        break
                if i == depth:
                    break
                i += 1
                node = node.children.get(segments[i])
        return best if best is not None else self.default

    def _roots(self, host: Optional[str]) -> Tuple[_Node, ...]:
        """The tries a Host leads to: its exact host's, the wildcards' it matches, and the
        routes' without a host."""
        roots: List[_Node] = []
        key = host_key(host)
        if key is not None:
            root = self._exact.get(key)
            if root is not None:
                roots.append(root)
            if self._wild:
                self._wild_roots(key, roots)
        if self._any is not None:
            roots.append(self._any)
        return tuple(roots)

    def _wild_roots(self, key: str, roots: List[_Node]) -> None:
        """Add the tries of the wildcards that ``key`` matches: a suffix after a dot with at
        least one character before it (``*.a.com`` matches ``x.a.com`` and ``x.y.a.com``, not
        ``a.com`` nor ``.a.com``), no longer than the longest wildcard."""
        end = len(key)
        for _ in range(self._wild_dots + 1):
            dot = key.rfind(".", 0, end)
            if dot <= 0:
                return
            root = self._wild.get(key[dot + 1:])
            if root is not None:
                roots.append(root)
            end = dot

    def routes(self) -> Tuple[Route, ...]:
        """Every route in match order (the config's, then Consul's), without the default."""
        return self._routes

    def pools(self) -> FrozenSet[str]:
        """Every pool a route of this table names, the default pool included."""
        names = {pool for route in self._routes for pool in route.pools()}
        if self.default is not None:
            names.update(self.default.pools())
        return frozenset(names)

    def __len__(self) -> int:
        """The routes, without the default."""
        return len(self._routes)
