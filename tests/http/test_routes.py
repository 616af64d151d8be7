"""The route table of an http listener (SPEC "HTTP mode", "Routing"): which route a request
takes, what its path becomes, which pool a split picks; and, by property, that the indexed
table agrees with a plain scan of the routes in order on generated routes and requests."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lb.config import RouteConfig, WeightedPool
from lb.http.routes import HeaderLookup, Route, RouteTable, host_key

NO_HEADERS: Dict[str, str] = {}


def headers_of(sent: Dict[str, str]) -> HeaderLookup:
    """``header(name)`` for a request that sent these headers (lower-case names)."""
    return sent.get


def pool_of(route: Optional[Route]) -> Optional[str]:
    return None if route is None else route.pool


# --- the reference: the rules as SPEC words them, one route after another ----------------

def reference_host(value: Optional[str]) -> Optional[str]:
    """The Host header as routes name hosts, written the obvious way."""
    if value is None or any(ord(ch) > 127 for ch in value):
        return None
    if value.startswith("["):
        if "]" not in value:
            return value.lower()
        inside = value[1:value.index("]")]
        try:
            return "[" + ipaddress.ip_address(inside).compressed + "]"
        except ValueError:
            return "[" + inside.lower() + "]"
    name = value.split(":")[0].lower()
    if name.endswith("."):
        name = name[:-1]
    return name


def reference_host_matches(pattern: Optional[str], host: Optional[str]) -> bool:
    if pattern is None:
        return True
    if host is None:
        return False
    if pattern.startswith("*."):
        dotted = pattern[1:]  # ".example.com"
        return host.endswith(dotted) and len(host) > len(dotted)
    return host == pattern


def reference_path_matches(prefix: Optional[str], target: str) -> bool:
    if prefix is None:
        return True
    path = target.split("?")[0]
    whole = prefix.rstrip("/")
    if whole == "":
        return True  # "/" matches every request
    return path == whole or path.startswith(whole + "/")


def reference_match(routes: Sequence[Route], default: Optional[Route], host: Optional[str],
                    target: str, sent: Dict[str, str]) -> Optional[Route]:
    """The first route, in order, whose host, path_prefix and headers all match."""
    key = reference_host(host)
    for route in routes:
        if (reference_host_matches(route.host, key)
                and reference_path_matches(route.path_prefix, target)
                and all(sent.get(name) == value for name, value in route.headers)):
            return route
    return default


def reference_rewrite(strip: Optional[str], target: str) -> str:
    if strip is None:
        return target
    path, mark, query = target.partition("?")
    whole = strip.rstrip("/")
    if whole and (path == whole or path.startswith(whole + "/")):
        path = path[len(whole):] or "/"
    return path + mark + query


def table(*routes: RouteConfig, consul: Sequence[Route] = (),
          default: Optional[str] = None) -> RouteTable:
    return RouteTable(list(routes), list(consul), default)


# --- host --------------------------------------------------------------------------------

HOSTS = table(
    RouteConfig(host="api.example.com", pool="api"),
    RouteConfig(host="*.example.com", pool="wild"),
    RouteConfig(host="10.0.0.1", pool="ipv4"),
    RouteConfig(host="[::1]", pool="ipv6"),
    RouteConfig(host="xn--bcher-kva.example", pool="idna"),
)


@pytest.mark.parametrize("host,pool", [
    ("api.example.com", "api"),
    ("API.Example.COM", "api"),  # names ignore case
    ("api.example.com:8080", "api"),  # the port is ignored
    ("api.example.com:", "api"),  # an empty port too
    ("api.example.com.", "api"),  # the root's trailing dot
    ("api.example.com.:443", "api"),
    ("a.example.com", "wild"),  # *.suffix: one more label
    ("a.b.example.com", "wild"),  # or several
    ("example.com", None),  # never the suffix itself
    (".example.com", None),  # nor an empty label in front of it
    ("example.com.evil", None),
    ("evilexample.com", None),  # the suffix starts at a dot
    ("api.example.co", None),
    ("10.0.0.1", "ipv4"),
    ("10.0.0.1:80", "ipv4"),
    ("10.0.0.10", None),
    ("[::1]", "ipv6"),
    ("[::1]:80", "ipv6"),
    ("[0:0:0::1]:80", "ipv6"),  # an IPv6 literal in another spelling
    ("[::2]:80", None),
    ("::1", None),  # unbracketed: not a Host for an IPv6 address
    ("[::1", None),
    ("xn--bcher-kva.example", "idna"),  # route hosts are IDNA ASCII, as Hosts are sent
    ("b\u00fccher.example", None),  # a raw non-ASCII Host matches no host
    ("", None),  # an empty Host matches no host
    (None, None),  # nor does a missing one
    ("..", None),
    (".", None),
    (":80", None),
])
def test_host_matches_exactly_or_by_wildcard_without_port_case_or_trailing_dot(
        host: Optional[str], pool: Optional[str]) -> None:
    """``host`` matches the Host header's name (not its port, any case, a trailing dot
    dropped) exactly, or as ``*.suffix``: one or more labels before the suffix."""
    assert pool_of(HOSTS.match(host, "/", headers_of(NO_HEADERS))) == pool


@pytest.mark.parametrize("sent,key", [
    ("Example.COM:8080", "example.com"),
    ("example.com.", "example.com"),
    ("[::FFFF:10.0.0.1]:80", "[::ffff:a00:1]"),
    ("[fe80::1%eth0]", "[fe80::1%eth0]"),
    ("[not-v6]:1", "[not-v6]"),
    ("\u212aelvin.example", None),  # KELVIN SIGN lower-cases to an ASCII k: not a match
    ("", ""),
    (None, None),
])
def test_host_key_normalises_the_header(sent: Optional[str], key: Optional[str]) -> None:
    """``host_key`` is what a Host header is compared as: lower-case, no port, no trailing
    dot, IPv6 in its short form; non-ASCII never folds into an ASCII name."""
    assert host_key(sent) == key


def test_a_kelvin_sign_does_not_reach_a_k_host() -> None:
    """``str.lower`` folds U+212A into ``k``: a Host spelled with it must not match a route
    for the ASCII name (the peer's virtual host would read it differently)."""
    t = table(RouteConfig(host="k.example", pool="k"))
    assert t.match("\u212a.example", "/", headers_of(NO_HEADERS)) is None
    assert pool_of(t.match("K.example", "/", headers_of(NO_HEADERS))) == "k"


def test_routes_without_host_match_requests_without_host() -> None:
    """An absent matcher matches anything, a missing or odd Host included."""
    t = table(RouteConfig(path_prefix="/", pool="any"))
    for host in (None, "", "\u00e9", "[", "a.b.c"):
        assert pool_of(t.match(host, "/x", headers_of(NO_HEADERS))) == "any"


def test_a_long_host_is_walked_only_as_far_as_the_longest_wildcard() -> None:
    """A Host of 10,000 labels still matches its wildcard (found from the right), and one
    that does not match is answered; neither hangs."""
    t = table(RouteConfig(host="*.example.com", pool="wild"),
              RouteConfig(host="*.a.b.c.d.example.org", pool="deep"))
    long_host = "a." * 10_000 + "example.com"
    assert pool_of(t.match(long_host, "/", headers_of(NO_HEADERS))) == "wild"
    assert t.match("a." * 10_000 + "example.net", "/", headers_of(NO_HEADERS)) is None
    assert pool_of(t.match("x.a.b.c.d.example.org", "/", headers_of(NO_HEADERS))) == "deep"
    assert t.match("a.b.c.d.example.org", "/", headers_of(NO_HEADERS)) is None


def test_made_up_hosts_neither_grow_memory_nor_change_answers() -> None:
    """The table remembers the tries of the Hosts it has seen, at most 4,096 of them and
    none longer than 255 characters: a client sending a new Host with every request (or
    16 KiB ones) cannot grow it, and answers stay the same before and after it forgets."""
    t = table(RouteConfig(host="*.example.com", path_prefix="/a", pool="wild"),
              RouteConfig(path_prefix="/b", pool="any"), default="web")
    h = headers_of(NO_HEADERS)
    for i in range(10_000):
        host = f"h{i}.example.com" if i % 2 else f"h{i}.example.org:80"
        assert pool_of(t.match(host, "/a/x", h)) == ("wild" if i % 2 else "web")
        assert pool_of(t.match(host, "/b", h)) == "any"
        assert len(t._by_host) <= 4096
    long_host = "x" * 16_000 + ".example.com"
    assert pool_of(t.match(long_host, "/a", h)) == "wild"
    assert long_host not in t._by_host
    assert pool_of(t.match("h1.example.com", "/a", h)) == "wild"


# --- path --------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,target,matches", [
    ("/v1/", "/v1/x", True),
    ("/v1", "/v1/x", True),
    ("/v1/", "/v1", True),  # the trailing slash is not a segment of its own
    ("/v1", "/v1", True),
    ("/v1", "/v1/", True),
    ("/v1/", "/v10", False),  # whole segments only
    ("/v1", "/v10", False),
    ("/v1", "/v1x/y", False),
    ("/v1", "/v", False),
    ("/v1", "/", False),
    ("/v1", "/V1", False),  # paths are case-sensitive
    ("/v1", "/v1?x=1", True),  # the query is not the path
    ("/v1", "/v1?/v1/x", True),
    ("/v1/x", "/v1?/x", False),  # a '/' in the query is not a segment boundary
    ("/v1", "/x?/v1", False),
    ("/v1/x", "/v1/x/y/z", True),
    ("/v1/x", "/v1/y", False),
    ("/v1/x/", "/v1/x", True),
    ("/", "/", True),  # "/" matches everything
    ("/", "/anything/at/all", True),
    ("/", "*", True),  # OPTIONS *
    ("/", "", True),
    ("/v1", "*", False),
    ("/v1", "", False),
    ("/v1", "v1/x", False),  # not origin-form
    ("/v1", "//v1/x", False),  # an empty first segment is a segment
    ("//", "/x", True),  # "//" is "/" with an empty segment dropped from the end
    ("/a//b", "/a//b/c", True),  # empty segments are kept inside a prefix
    ("/a//b", "/a/b/c", False),
    ("/a/b", "/a//b", False),
    ("/v1", "/v1//x", True),
    ("/v1", "/%761/x", False),  # percent-encoding is not decoded (path_beg)
    ("/%761", "/%761/x", True),
    ("/%761", "/v1/x", False),
    ("/a%2Fb", "/a%2Fb/c", True),  # %2F is not a boundary
    ("/a", "/a%2Fb", False),
    ("/..", "/../x", True),  # dot segments are not resolved either
    ("/v1", "/v1/../admin", True),
    ("/admin", "/v1/../admin", False),
    ("/.", "/./x", True),
])
def test_path_prefix_matches_whole_segments_as_sent(prefix: str, target: str,
                                                    matches: bool) -> None:
    """``path_prefix`` matches whole segments of the path as sent: no query, no decoding of
    percent-escapes, no resolving of ``.``/``..`` (the peer sees the same path)."""
    t = table(RouteConfig(path_prefix=prefix, pool="p"))
    assert (t.match("h", target, headers_of(NO_HEADERS)) is not None) == matches
    assert reference_path_matches(prefix, target) == matches  # the reference agrees


def test_a_path_of_10000_segments() -> None:
    """A very deep path is matched by the prefixes it has (split only as deep as the
    deepest prefix), whatever its length."""
    deep_prefix = "/a" * 50
    t = table(RouteConfig(path_prefix="/a/a", pool="shallow"),
              RouteConfig(path_prefix=deep_prefix, pool="deep"),
              RouteConfig(host="h", path_prefix="/b", pool="b"))
    path = "/a" * 10_000
    assert pool_of(t.match("h", path, headers_of(NO_HEADERS))) == "shallow"
    t2 = table(RouteConfig(path_prefix=deep_prefix, pool="deep"),
               RouteConfig(path_prefix="/a/a", pool="shallow"))
    assert pool_of(t2.match("h", path, headers_of(NO_HEADERS))) == "deep"
    assert pool_of(t2.match("h", "/a" * 49 + "/b" + path, headers_of(NO_HEADERS))) == "shallow"
    assert t2.match("h", "/" * 10_000, headers_of(NO_HEADERS)) is None
    assert t2.match("h", "/b" * 10_000 + "?" + "/a" * 100, headers_of(NO_HEADERS)) is None


@pytest.mark.parametrize("target,pool", [
    ("/a/b/c/d", "abcd"),
    ("/a/b/c", "abc"),
    ("/a/b/x", "ab"),
    ("/a/x", "a"),
    ("/x", "root"),
    ("/a/b/c/d/e/f", "abcd"),
])
def test_the_first_of_nested_prefixes_in_order_wins(target: str, pool: str) -> None:
    """Nested prefixes listed most specific first: each path goes to the deepest prefix it
    has, the way a Consul route table is ordered."""
    t = table(*(RouteConfig(path_prefix=p, pool=n) for p, n in
                [("/a/b/c/d", "abcd"), ("/a/b/c/", "abc"), ("/a/b", "ab"), ("/a/", "a"),
                 ("/", "root")]))
    assert pool_of(t.match(None, target, headers_of(NO_HEADERS))) == pool


# --- headers -----------------------------------------------------------------------------

@pytest.mark.parametrize("sent,pool", [
    ({"x-canary": "1", "x-team": "a"}, "both"),
    ({"x-canary": "1"}, "canary"),  # all must be present
    ({"x-team": "a"}, None),
    ({"x-canary": "1 ", "x-team": "a"}, None),  # exactly these values
    ({"x-canary": "01"}, None),
    ({"x-canary": "", "x-team": "a"}, None),
    ({"x-team": "A", "x-canary": "1"}, "canary"),  # values are case-sensitive
    ({}, None),
])
def test_headers_must_all_be_present_with_these_exact_values(sent: Dict[str, str],
                                                             pool: Optional[str]) -> None:
    """Every header of a route must be sent with exactly its value; names are looked up
    lower-case."""
    t = table(RouteConfig(headers=(("x-canary", "1"), ("x-team", "a")), pool="both"),
              RouteConfig(headers=(("x-canary", "1"),), pool="canary"))
    assert pool_of(t.match("h", "/", headers_of(sent))) == pool


def test_headers_are_asked_only_of_candidates() -> None:
    """``header()`` is called only for routes that already match host and path: the
    lookup is not a scan of every route (10,000 routes with headers, one host asked)."""
    routes = [RouteConfig(host=f"h{i}.example", headers=(("x-k", str(i)),), pool=f"p{i}")
              for i in range(10_000)]
    routes += [RouteConfig(host="one.example", path_prefix=f"/p{i}", headers=(("x-k", "1"),),
                           pool=f"q{i}") for i in range(10_000)]
    t = table(*routes)
    asked: List[str] = []

    def header(name: str) -> Optional[str]:
        asked.append(name)
        return "1234"

    assert pool_of(t.match("h1234.example", "/", header)) == "p1234"
    assert asked == ["x-k"]
    asked.clear()
    assert t.match("one.example", "/p5000/x", header) is None
    assert asked == ["x-k"]
    asked.clear()
    assert t.match("nowhere.example", "/p5000", header) is None
    assert asked == []


# --- order and the default ---------------------------------------------------------------

def test_first_match_in_order_wins_across_hosts_and_prefixes() -> None:
    """Order decides, not specificity: a route without a host listed first beats an exact
    host; a shorter prefix listed first beats a longer one; a wildcard listed first beats
    the exact host."""
    t = table(RouteConfig(path_prefix="/static", pool="any-static"),
              RouteConfig(host="*.example.com", path_prefix="/", pool="wild"),
              RouteConfig(host="a.example.com", path_prefix="/a", pool="exact"),
              RouteConfig(host="b.example.com", path_prefix="/x", pool="bx"),
              RouteConfig(host="b.example.com", path_prefix="/x/y", pool="bxy"))
    h = headers_of(NO_HEADERS)
    assert pool_of(t.match("a.example.com", "/static/x", h)) == "any-static"
    assert pool_of(t.match("a.example.com", "/a", h)) == "wild"
    assert pool_of(t.match("b.example.com", "/x/y", h)) == "wild"
    t2 = table(RouteConfig(host="b.example.com", path_prefix="/x", pool="bx"),
               RouteConfig(host="b.example.com", path_prefix="/x/y", pool="bxy"))
    assert pool_of(t2.match("b.example.com", "/x/y", h)) == "bx"


def test_a_header_route_listed_later_does_not_beat_an_earlier_one() -> None:
    """A header match is not more specific: the earlier route wins even when a later one's
    headers match too; a header route listed first wins when its headers match."""
    h = headers_of({"x-canary": "1"})
    t = table(RouteConfig(path_prefix="/", pool="web"),
              RouteConfig(headers=(("x-canary", "1"),), pool="canary"))
    assert pool_of(t.match("h", "/x", h)) == "web"
    t2 = table(RouteConfig(headers=(("x-canary", "1"),), pool="canary"),
               RouteConfig(path_prefix="/", pool="web"))
    assert pool_of(t2.match("h", "/x", h)) == "canary"
    assert pool_of(t2.match("h", "/x", headers_of(NO_HEADERS))) == "web"


def test_consul_routes_come_after_the_config_routes_in_their_order() -> None:
    """Routes from Consul are tried after every config route, in the order given."""
    consul = [Route(path_prefix="/api", pool="consul:api", source="consul:api"),
              Route(path_prefix="/", pool="consul:web", source="consul:web"),
              Route(path_prefix="/api/v2", pool="consul:v2", source="consul:v2")]
    t = table(RouteConfig(path_prefix="/api/v1", pool="v1"), consul=consul)
    h = headers_of(NO_HEADERS)
    assert pool_of(t.match(None, "/api/v1/x", h)) == "v1"
    assert pool_of(t.match(None, "/api/v2/x", h)) == "consul:api"
    assert pool_of(t.match(None, "/other", h)) == "consul:web"
    assert [r.source for r in t.routes()] == ["config", "consul:api", "consul:web",
                                              "consul:v2"]


def test_no_match_gives_the_default_pool_as_a_route_or_none() -> None:
    """Without a match, the default pool comes back as a route of source ``default`` (so
    the caller always has a route when there is a default); without a default, None."""
    with_default = table(RouteConfig(host="a", pool="a"), default="web")
    route = with_default.match("b", "/x", headers_of(NO_HEADERS))
    assert route is not None
    assert (route.pool, route.source, route.host, route.path_prefix, route.strip) == (
        "web", "default", None, None, None)
    assert route.rewrite("/x?y") == "/x?y"
    assert with_default.match(None, "/", headers_of(NO_HEADERS)) is route
    near_miss = table(RouteConfig(host="a", path_prefix="/x", pool="a"),
                      RouteConfig(path_prefix="/y", headers=(("h", "1"),), pool="y"),
                      default="web")
    assert near_miss.match("a", "/y", headers_of(NO_HEADERS)) is near_miss.default
    assert table(RouteConfig(host="a", pool="a")).match("b", "/", headers_of(NO_HEADERS)) \
        is None
    assert table().match("a", "/", headers_of(NO_HEADERS)) is None
    assert table(default="").match("a", "/", headers_of(NO_HEADERS)) is None  # "": none
    assert pool_of(table(default="web").match(None, "*", headers_of(NO_HEADERS))) == "web"


def test_routes_pools_and_len() -> None:
    """``routes()`` is the match order without the default; ``pools()`` every pool any
    route names (a split's pools of weight 0 and the default included); ``len`` counts
    routes."""
    consul = [Route(host="c.example", pool="consul:c", source="consul:c")]
    t = table(RouteConfig(host="a", pool="a"),
              RouteConfig(path_prefix="/", split=(WeightedPool("w", 9), WeightedPool("z", 0))),
              consul=consul, default="web")
    assert [r.pools() for r in t.routes()] == [("a",), ("w", "z"), ("consul:c",)]
    assert t.routes()[2] is consul[0]
    assert t.pools() == frozenset({"a", "w", "z", "consul:c", "web"})
    assert len(t) == 3
    assert len(table(default="web")) == 0
    assert table(default="web").pools() == frozenset({"web"})


# --- Route: from config, validation, JSON ------------------------------------------------

def test_a_config_route_strips_its_own_prefix() -> None:
    """``strip_prefix: true`` strips the route's path_prefix; otherwise nothing."""
    on = Route.from_config(RouteConfig(path_prefix="/v1/", pool="api", strip_prefix=True))
    off = Route.from_config(RouteConfig(path_prefix="/v1/", pool="api"))
    assert (on.strip, off.strip, on.source) == ("/v1/", None, "config")


@pytest.mark.parametrize("kwargs", [
    {},
    {"pool": "a", "split": (WeightedPool("b", 1),)},
    {"split": (WeightedPool("b", 0),)},
    {"split": (WeightedPool("b", 1), WeightedPool("c", -1))},
    {"pool": "a", "strip": "v1"},
    {"pool": "a", "path_prefix": "v1"},
    {"pool": "a", "host": "a.*.com"},
    {"pool": "a", "host": "*"},
])
def test_a_route_that_cannot_route_is_refused(kwargs: Dict[str, object]) -> None:
    """A route needs one pool or a split with a weight above 0, prefixes starting with
    '/', a wildcard only as a whole first label."""
    with pytest.raises(ValueError):
        Route(**kwargs)  # type: ignore[arg-type]


def test_to_json_is_the_admin_api_route() -> None:
    """``to_json`` gives SPEC's ROUTE without ``listener``: headers as a mapping, ``pool`` or
    ``split``, ``strip_prefix`` as the prefix stripped (or null), the source."""
    route = Route.from_config(RouteConfig(host="api.example.com", path_prefix="/v1/",
                                          headers=(("x-a", "1"),), pool="api",
                                          strip_prefix=True))
    assert route.to_json() == {"host": "api.example.com", "path_prefix": "/v1/",
                               "headers": {"x-a": "1"}, "pool": "api",
                               "strip_prefix": "/v1/", "source": "config"}
    split = Route(path_prefix="/", split=(WeightedPool("web", 90), WeightedPool("c", 10)))
    assert split.to_json() == {"host": None, "path_prefix": "/", "headers": {},
                               "split": [{"pool": "web", "weight": 90},
                                         {"pool": "c", "weight": 10}],
                               "strip_prefix": None, "source": "config"}
    fabio = Route(path_prefix="/foo/bar", pool="consul:foo", strip="/foo",
                  source="consul:foo")
    assert fabio.to_json()["strip_prefix"] == "/foo"
    assert fabio.to_json()["source"] == "consul:foo"


# --- rewrite -----------------------------------------------------------------------------

@pytest.mark.parametrize("strip,target,sent", [
    ("/v1/", "/v1/x", "/x"),
    ("/v1", "/v1/x", "/x"),
    ("/v1/", "/v1/x/y?a=1", "/x/y?a=1"),  # the query is kept
    ("/v1/", "/v1", "/"),  # an emptied path becomes "/"
    ("/v1/", "/v1/", "/"),
    ("/v1/", "/v1?a=/v1/", "/?a=/v1/"),
    ("/v1/", "/v1?", "/?"),
    ("/v1/", "/v10/x", "/v10/x"),  # not at a segment boundary: unchanged
    ("/v1", "/v1x?y", "/v1x?y"),
    ("/v1/", "/v1//x", "//x"),  # the path's own empty segments stay
    ("/v1/", "/x/v1/y", "/x/v1/y"),  # only from the front
    ("/v1/x", "/v1/x/v1/x", "/v1/x"),  # once
    ("/", "/x", "/x"),  # stripping "/" changes nothing
    ("/", "/", "/"),
    ("/v1", "*", "*"),
    ("/foo", "/foo/bar/baz", "/bar/baz"),  # Fabio's strip=/foo on a /foo/bar route
    ("/foo", "/other", "/other"),
    ("/%76", "/%76/x", "/x"),  # as sent, like matching
    ("/%76", "/v/x", "/v/x"),
    (None, "/v1/x", "/v1/x"),  # no strip: untouched
])
def test_rewrite_strips_the_prefix_at_a_segment_boundary(strip: Optional[str], target: str,
                                                         sent: str) -> None:
    """``rewrite`` removes ``strip`` from the front of the path at a segment boundary only,
    keeps the query, and never leaves an empty path."""
    route = Route(pool="p", strip=strip)
    assert route.rewrite(target) == sent
    assert reference_rewrite(strip, target) == sent  # the reference agrees


# --- pick_pool ---------------------------------------------------------------------------

def test_split_picks_pools_in_proportion_to_weight() -> None:
    """100,000 picks of a 70/20/10/0 split with a seeded RNG land within 1% of the weights;
    weight 0 is never picked."""
    route = Route(split=(WeightedPool("a", 70), WeightedPool("zero", 0),
                         WeightedPool("b", 20), WeightedPool("c", 10)))
    rng = random.Random(20240601)
    counts = Counter(route.pick_pool(rng.random) for _ in range(100_000))
    assert counts["zero"] == 0
    assert set(counts) == {"a", "b", "c"}
    for pool, weight in (("a", 70), ("b", 20), ("c", 10)):
        assert abs(counts[pool] / 1000 - weight) < 1.0, counts


@pytest.mark.parametrize("value,pool", [
    (0.0, "a"),  # the first pool with a weight
    (0.49999, "a"),
    (0.5, "b"),
    (0.99999999, "b"),
    (1.0, "b"),  # a value [0, 1) never has: still a pool with a weight
])
def test_split_edges_never_pick_a_zero_weight(value: float, pool: str) -> None:
    """At the ends of the RNG's range, zero-weight pools (first, between, last) are skipped."""
    route = Route(split=(WeightedPool("z0", 0), WeightedPool("a", 1), WeightedPool("z1", 0),
                         WeightedPool("b", 1), WeightedPool("z2", 0)))
    assert route.pick_pool(lambda: value) == pool


def test_a_single_pool_does_not_draw() -> None:
    """A route with ``pool`` returns it without calling the RNG."""
    def never() -> float:
        raise AssertionError("called")
    assert Route(pool="web").pick_pool(never) == "web"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=6).filter(any),
       st.floats(0.0, 1.0, exclude_max=True))
def test_split_pick_is_a_weighted_pool(weights: List[int], value: float) -> None:
    """Whatever the weights and the draw, the pick is one of the split's pools with a
    weight above 0, the one whose cumulative share contains the draw."""
    route = Route(split=tuple(WeightedPool(f"p{i}", w) for i, w in enumerate(weights)))
    picked = route.pick_pool(lambda: value)
    index = int(picked[1:])
    assert weights[index] > 0
    below = sum(weights[:index])
    total = sum(weights)
    assert below <= value * total <= below + weights[index]


# --- the table against the reference ----------------------------------------------------

ROUTE_HOSTS = [None, "a.com", "b.a.com", "c.b.a.com", "*.a.com", "*.b.a.com", "*.com",
               "10.0.0.1", "[::1]", "*.c.b.a.com"]
SEGMENTS = ["x", "y", "xy", "", "%78", ".."]
POOLS = ["p1", "p2", "p3"]

prefixes = st.one_of(
    st.none(),
    st.builds(lambda segs, slash: "/" + "/".join(segs) + ("/" if slash else ""),
              st.lists(st.sampled_from(SEGMENTS), max_size=4), st.booleans()),
)
header_sets = st.dictionaries(st.sampled_from(["h1", "h2"]), st.sampled_from(["1", "2"]),
                              max_size=2).map(lambda d: tuple(sorted(d.items())))
targets = st.sampled_from(POOLS).map(lambda p: {"pool": p}) | st.builds(
    lambda order, weights: {"split": tuple(WeightedPool(p, w) for p, w in zip(order, weights))},
    st.permutations(POOLS), st.lists(st.integers(0, 3), min_size=1, max_size=3).map(
        lambda ws: ws if any(ws) else ws[:-1] + [1]))


@st.composite
def config_routes(draw: st.DrawFn) -> RouteConfig:
    prefix = draw(prefixes)
    return RouteConfig(host=draw(st.sampled_from(ROUTE_HOSTS)), path_prefix=prefix,
                       headers=draw(header_sets), **draw(targets),
                       strip_prefix=prefix is not None and draw(st.booleans()))


@st.composite
def consul_routes(draw: st.DrawFn) -> Route:
    prefix = draw(prefixes)
    service = draw(st.sampled_from(["s1", "s2"]))
    return Route(host=draw(st.sampled_from(ROUTE_HOSTS)), path_prefix=prefix,
                 pool="consul:" + service, strip=draw(st.none() | prefixes),
                 source="consul:" + service)


def decorate(host: str, upper: bool, dot: bool, port: Optional[str]) -> str:
    if upper:
        host = host.upper()
    if dot and not host.startswith("["):
        host += "."
    return host + (":" + port if port is not None else "")


request_hosts = st.one_of(
    st.none(),
    st.builds(decorate,
              st.sampled_from(["a.com", "b.a.com", "x.b.a.com", "c.b.a.com", "y.c.b.a.com",
                               "com", "x.com", "10.0.0.1", "[::1]", "[0::1]", "", ".a.com",
                               "a..com", ".", "..", "x.y.c.b.a.com", "ba.com", "a.co"]),
              st.booleans(), st.booleans(), st.none() | st.sampled_from(["", "80", "8080"])),
    st.text(max_size=12),
)
request_targets = st.one_of(
    st.builds(lambda segs, query: "/" + "/".join(segs) + query,
              st.lists(st.sampled_from(SEGMENTS + ["x?", "X"]), max_size=6),
              st.sampled_from(["", "?", "?q=/x", "?/y/x"])),
    st.sampled_from(["*", "", "x", "//", "/x//y"]),
    st.text(max_size=12),
)
request_headers = st.dictionaries(st.sampled_from(["h1", "h2", "h3"]),
                                  st.sampled_from(["1", "2", "1 "]), max_size=3)


Request = Tuple[Optional[str], str, Dict[str, str]]
random_requests: st.SearchStrategy[Request] = st.tuples(request_hosts, request_targets,
                                                        request_headers)


@st.composite
def near_requests(draw: st.DrawFn, routes: Sequence[Route]) -> Request:
    """A request built from one of the routes, matching it or just missing it: random
    requests rarely hit the edge of a prefix, a wildcard or a header set."""
    if not routes:
        return draw(random_requests)
    route = draw(st.sampled_from(routes))
    if route.host is None:
        host = draw(request_hosts)
    else:
        name = route.host
        if name.startswith("*."):
            name = draw(st.sampled_from(["", ".", "x.", "x.y.", "x"])) + name[2:]
        host = decorate(name, draw(st.booleans()), draw(st.booleans()),
                        draw(st.none() | st.just("80")))
    base = ("" if route.path_prefix is None else route.path_prefix.rstrip("/")) + draw(
        st.sampled_from(["", "/", "/x", "x", "?", "?q=/x/y", "/y?z=/", "//", "/x/y/xy/x"]))
    sent = dict(route.headers)
    change = draw(st.sampled_from(["keep", "keep", "drop", "alter", "add"]))
    if change == "drop" and sent:
        del sent[sorted(sent)[0]]
    elif change == "alter" and sent:
        sent[sorted(sent)[0]] += " "
    elif change == "add":
        sent["h3"] = "1"
    return host, base, sent


@settings(max_examples=800, deadline=None)
@given(st.lists(config_routes(), max_size=12), st.lists(consul_routes(), max_size=6),
       st.none() | st.sampled_from(POOLS), st.data())
def test_the_table_agrees_with_a_scan_of_the_routes_in_order(
        config: List[RouteConfig], consul: List[Route], default: Optional[str],
        data: st.DataObject) -> None:
    """On generated route lists and requests (random ones, and ones built from a route to
    just match or just miss it), the indexed table picks exactly the route a plain scan of
    the routes in order picks (the same object), and rewrites its path the same way as
    the reference does."""
    t = RouteTable(config, consul, default)
    assert len(t.routes()) == len(config) + len(consul)
    assert [r.source for r in t.routes()] == ["config"] * len(config) + [
        r.source for r in consul]
    assert t.routes()[len(config):] == tuple(consul)
    asked = data.draw(st.lists(random_requests | near_requests(t.routes()), min_size=1,
                               max_size=8))
    for host, target, sent in asked:
        got = t.match(host, target, headers_of(sent))
        want = reference_match(t.routes(), t.default, host, target, sent)
        assert got is want
        event("no match" if want is None else "default" if want is t.default else "a route")
        if got is not None:
            assert got.rewrite(target) == reference_rewrite(got.strip, target)


@settings(max_examples=500, deadline=None)
@given(prefixes.filter(lambda p: p is not None), st.sampled_from(["", "/", "x", "?", "/x"]),
       st.sampled_from(["", "?q", "?q=/x/", "/y", "//y?"]))
def test_rewrite_agrees_with_the_reference(strip: str, join: str, tail: str) -> None:
    """For prefixes and targets that start with them (or with them less a character), at a
    boundary or not, ``rewrite`` gives what the reference gives, starting with '/'."""
    for target in (strip.rstrip("/") + join + tail, strip[:-1] + tail):
        got = Route(pool="p", strip=strip).rewrite(target)
        assert got == reference_rewrite(strip, target)
        assert got.startswith("/") or not target.startswith("/")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=20),
                 st.from_regex(r"\[[0-9a-fA-F:.]{0,12}\](:[0-9]{0,5})?", fullmatch=True)))
def test_host_key_agrees_with_the_reference(host: Optional[str]) -> None:
    """Any Host text normalises as the reference does it (and never raises)."""
    assert host_key(host) == reference_host(host)
