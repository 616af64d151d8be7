"""Config of HTTP mode: http listeners (routes, consul_routes, the http section) and the pool
keys HTTP mode reads. What a good file becomes, and every bad value named with its key path."""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Optional

import pytest

from lb import config as lbconfig
from lb.config import (
    Config,
    ConfigError,
    ConsulRoutesConfig,
    HashKey,
    HttpConfig,
    OutlierConfig,
    PoolConfig,
    PoolConsulConfig,
    RouteConfig,
    StickyCookieConfig,
    WeightedPool,
    parse_size,
)

POOLS = ("web", "api", "canary")


def raw_config(listener: Optional[Dict[str, Any]] = None, consul: bool = False,
               **pool: Any) -> Dict[str, Any]:
    """One http listener ``www`` with the default route ``web`` (``listener`` overrides its
    keys; a value of None removes the key), pools web, api and canary (``pool``: keys of
    web)."""
    www: Dict[str, Any] = {"bind": "127.0.0.1:8080", "mode": "http", "pool": "web"}
    for key, value in (listener or {}).items():
        if value is None:
            www.pop(key, None)
        else:
            www[key] = value
    raw: Dict[str, Any] = {"listeners": {"www": www},
                           "pools": {name: {} for name in POOLS}}
    raw["pools"]["web"].update(pool)
    if consul:
        raw["consul"] = {}
    return raw


def check(raw: Dict[str, Any]) -> Config:
    return lbconfig.check(raw, path="/etc/lb/lb.yaml", environ={})


def problems(raw: Any) -> List[str]:
    with pytest.raises(ConfigError) as info:
        check(raw)
    return info.value.problems


def parse(text: str) -> Config:
    return lbconfig.parse(text, path="/etc/lb/lb.yaml", environ={})


def assert_problem(raw: Any, expected: str) -> None:
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


SPEC_EXAMPLE = """
consul: {}
listeners:
  www:
    bind: 0.0.0.0:8080
    mode: http
    pool: web
    routes:
      - {host: api.example.com, path_prefix: /v1/, pool: api, strip_prefix: true}
      - {host: "*.example.com", path_prefix: /static/, pool: static}
      - {headers: {X-Canary: "1"}, pool: web-canary}
      - {path_prefix: /, split: [{pool: web, weight: 90}, {pool: web-canary, weight: 10}]}
    consul_routes:
      tag_prefix: urlprefix-
      pool_defaults: {}
    http:
      max_header_size: 16KiB
      client_header_timeout: 10s
      client_keepalive_timeout: 60s
      response_timeout: 60s
      forwarded: append
      trusted_proxies: []
      request_id: X-Request-Id
pools:
  web:
    keepalive: 32
    keepalive_timeout: 60s
    retry_on: [connect-failure, empty-response]
    outlier:
      consecutive_5xx: 5
      ejection_time: 30s
      max_ejected: 50%
    sticky_cookie: null
    hash_key: client_ip
  api: {}
  static: {}
  web-canary: {}
"""


# --- what a good file becomes -------------------------------------------------------------


def test_spec_example_is_read_as_written() -> None:
    """SPEC's HTTP mode example (every key at its documented value) is valid and becomes
    these objects; its pool keys equal the defaults, so an empty pool reads the same."""
    cfg = parse(SPEC_EXAMPLE)
    www = cfg.listeners["www"]
    assert (www.mode, www.pool) == ("http", "web")
    assert www.routes == (
        RouteConfig(host="api.example.com", path_prefix="/v1/", pool="api", strip_prefix=True),
        RouteConfig(host="*.example.com", path_prefix="/static/", pool="static"),
        RouteConfig(headers=(("x-canary", "1"),), pool="web-canary"),
        RouteConfig(path_prefix="/", split=(WeightedPool("web", 90),
                                            WeightedPool("web-canary", 10))),
    )
    assert www.consul_routes == ConsulRoutesConfig(tag_prefix="urlprefix-",
                                                   pool_defaults=PoolConfig(name=""))
    assert www.http == HttpConfig(max_header_size=16384, client_header_timeout=10.0,
                                  client_keepalive_timeout=60.0, response_timeout=60.0,
                                  forwarded="append", trusted_proxies=(),
                                  request_id="X-Request-Id")
    assert cfg.pools["web"] == PoolConfig(name="web", outlier=OutlierConfig())
    assert cfg.pools["api"] == PoolConfig(name="api")


def test_defaults() -> None:
    """An http listener with only a pool gets SPEC's http defaults and no routes; every
    pool gets SPEC's HTTP pool defaults, with outlier and sticky_cookie off."""
    cfg = check(raw_config())
    www, web = cfg.listeners["www"], cfg.pools["web"]
    assert (www.routes, www.consul_routes, www.http) == ((), None, HttpConfig())
    assert (www.http.max_header_size, www.http.client_header_timeout,
            www.http.client_keepalive_timeout, www.http.response_timeout, www.http.forwarded,
            www.http.trusted_proxies, www.http.request_id) == (
                16 * 1024, 10.0, 60.0, 60.0, "append", (), "X-Request-Id")
    assert (web.keepalive, web.keepalive_timeout, web.retry_on, web.outlier,
            web.sticky_cookie, web.hash_key) == (
                32, 60.0, ("connect-failure", "empty-response"), None, None, HashKey())
    assert str(web.hash_key) == "client_ip"


def test_listener_keys_of_both_modes_apply_to_http() -> None:
    """accept_proxy, max_connections, idle_timeout, fin_timeout and allow are read on an
    http listener as on a tcp one."""
    www = check(raw_config({"accept_proxy": True, "max_connections": 5, "idle_timeout": "1h",
                            "fin_timeout": "1s", "allow": ["10.0.0.0/8"]})).listeners["www"]
    assert (www.accept_proxy, www.max_connections, www.idle_timeout, www.fin_timeout,
            www.allow) == (True, 5, 3600.0, 1.0, (ipaddress.ip_network("10.0.0.0/8"),))


def test_a_full_http_section_is_read() -> None:
    """Every key of the http section is read: sizes to bytes, durations to seconds, CIDRs
    to networks."""
    www = check(raw_config({"http": {
        "max_header_size": "1MiB", "client_header_timeout": "2s",
        "client_keepalive_timeout": 0, "response_timeout": "1m", "forwarded": "replace",
        "request_id": "X-Trace", "trusted_proxies": None}})).listeners["www"]
    assert www.http == HttpConfig(max_header_size=1 << 20, client_header_timeout=2.0,
                                  client_keepalive_timeout=0.0, response_timeout=60.0,
                                  forwarded="replace", request_id="X-Trace")
    www = check(raw_config({"http": {"trusted_proxies": ["10.0.0.0/8", "::1/128"]}})
                ).listeners["www"]
    assert [str(n) for n in www.http.trusted_proxies] == ["10.0.0.0/8", "::1/128"]


def test_summary_counts_http_listeners_and_routes() -> None:
    """`lb check` names http listeners and config routes (and where Consul adds routes);
    a tcp-only config's summary reads as before."""
    assert parse(SPEC_EXAMPLE).summary() == (
        "configuration OK: 1 listener(s) (1 http), 4 pool(s), 4 route(s) + Consul routes on "
        "1 listener(s), 0 static peer(s), 0 Consul-discovered pool(s)")
    raw = raw_config({"mode": "tcp"})
    assert check(raw).summary() == ("configuration OK: 1 listener(s), 3 pool(s), "
                                    "0 static peer(s), 0 Consul-discovered pool(s)")


# --- which listener may have which key ----------------------------------------------------


@pytest.mark.parametrize("key,value", [("routes", []), ("consul_routes", {}),
                                       ("http", {"forwarded": "off"})])
def test_http_keys_only_apply_to_http_listeners(key: str, value: Any) -> None:
    """routes, consul_routes and http on a tcp listener (by default or by `mode: tcp`) are
    an error at the key, not silently ignored."""
    for mode in (None, "tcp"):
        assert problems(raw_config({"mode": mode, key: value}, consul=True)) == [
            f"listeners.www.{key}: only applies to mode: http"]


def test_tcp_listener_still_needs_a_pool() -> None:
    """A tcp listener without a pool is an error, as before."""
    assert problems(raw_config({"mode": "tcp", "pool": None})) == [
        "listeners.www.pool: missing (required)"]


def test_http_listener_needs_a_pool_or_routes() -> None:
    """An http listener without a pool, routes and consul_routes could only answer 404:
    an error. With routes only, or consul_routes only, it has no default route (pool "")."""
    no_routes: List[Any] = []
    for routes in (None, no_routes):
        found = problems(raw_config({"pool": None, "routes": routes}))
        assert len(found) == 1 and found[0].startswith(
            "listeners.www.pool: missing: an http listener needs a pool"), found
        assert "404" in found[0]
    www = check(raw_config({"pool": None, "routes": [{"path_prefix": "/a", "pool": "api"}]})
                ).listeners["www"]
    assert www.pool == "" and len(www.routes) == 1
    www = check(raw_config({"pool": None, "consul_routes": {}}, consul=True)).listeners["www"]
    assert www.pool == "" and www.consul_routes == ConsulRoutesConfig()


def test_http_listener_pool_must_exist() -> None:
    """The default route names a pool that exists."""
    assert problems(raw_config({"pool": "nope"})) == [
        "listeners.www.pool: no pool named 'nope' (pools: web, api, canary)"]


# --- routes -------------------------------------------------------------------------------


def route(**keys: Any) -> Dict[str, Any]:
    return raw_config({"routes": [keys]})


def first_route(**keys: Any) -> RouteConfig:
    return check(route(**keys)).listeners["www"].routes[0]


@pytest.mark.parametrize("written,kept", [
    ("api.example.com", "api.example.com"),
    ("API.Example.COM", "api.example.com"),
    ("*.example.com", "*.example.com"),
    ("*.Example.COM", "*.example.com"),
    ("b\u00fccher.example", "xn--bcher-kva.example"),
    ("*.b\u00fccher.example", "*.xn--bcher-kva.example"),
    ("localhost", "localhost"),
    ("10.0.0.1", "10.0.0.1"),
    ("[0:0::1]", "[::1]"),
])
def test_route_hosts_are_kept_lower_case_in_ascii(written: str, kept: str) -> None:
    """A host is an exact name or `*.suffix`, lower-cased and in its IDNA ASCII form (what
    a Host header carries); an IP literal is kept, IPv6 in brackets."""
    assert first_route(host=written, pool="api").host == kept


@pytest.mark.parametrize("host,expected", [
    ("api.example.com:80", "has a port"),
    ("[::1]:80", "has a port"),
    ("*", "'*' matches every host: leave host out"),
    ("*.", "is not a valid host name"),
    ("www.*.com", "a wildcard is a whole first label only"),
    ("a*.example.com", "a wildcard is a whole first label only"),
    ("**.example.com", "a wildcard is a whole first label only"),
    ("a..example.com", "is not a valid host name"),
    ("-a.example.com", "is not a valid host name"),
    ("a b.example.com", "is not a valid host name"),
    ("x" * 64 + ".example.com", "is not a valid host name"),
    ("[nothost]", "is not an IPv6 address in brackets"),
    ("", "expected a non-empty string"),
    (80, "expected a non-empty string"),
    (["a"], "expected a non-empty string"),
])
def test_bad_route_hosts(host: Any, expected: str) -> None:
    """A host with a port, a misplaced wildcard or a name that cannot name a host is an
    error at routes[i].host."""
    found = problems(route(host=host, pool="api"))
    assert len(found) == 1 and found[0].startswith("listeners.www.routes[0].host: "), found
    assert expected in found[0], found


@pytest.mark.parametrize("prefix,expected", [
    ("api/", "is not a path prefix starting with '/'"),
    ("", "is not a path prefix starting with '/'"),
    (5, "is not a path prefix starting with '/'"),
    ("/a b", "has a space, a control or a non-ASCII character"),
    ("/a\tb", "has a space, a control or a non-ASCII character"),
    ("/caf\u00e9", "has a space, a control or a non-ASCII character"),
    ("/a?b=1", "has a '?' or '#'"),
    ("/a#top", "has a '?' or '#'"),
])
def test_bad_path_prefixes(prefix: Any, expected: str) -> None:
    """A path prefix starts with '/', is printable ASCII and holds no query or fragment."""
    found = problems(route(path_prefix=prefix, pool="api"))
    assert len(found) == 1 and found[0].startswith("listeners.www.routes[0].path_prefix: ")
    assert expected in found[0], found


def test_header_matchers() -> None:
    """Header names are kept lower-cased (they ignore case) and sorted; an integer value
    (YAML's reading of `X-Canary: 1`) is the text it was written as; empty values match
    empty headers."""
    assert first_route(headers={"X-Canary": 1, "Accept": "text/html", "x-empty": ""},
                       pool="api").headers == (
        ("accept", "text/html"), ("x-canary", "1"), ("x-empty", ""))


@pytest.mark.parametrize("headers,expected", [
    ({"X Canary": "1"}, "listeners.www.routes[0].headers.X Canary: not a header name"),
    ({"X-Canary:": "1"}, "listeners.www.routes[0].headers.X-Canary:: not a header name"),
    ({"": "1"}, "listeners.www.routes[0].headers.'': not a header name"),
    ({1: "1"}, "listeners.www.routes[0].headers.1: not a header name"),
    ({"X-A": "1", "x-a": "2"},
     "listeners.www.routes[0].headers.x-a: the same header as "
     "listeners.www.routes[0].headers.X-A"),
    ({"X-A": True}, "listeners.www.routes[0].headers.X-A: expected a string, got a boolean"),
    ({"X-A": 1.5}, "listeners.www.routes[0].headers.X-A: expected a string, got a number"),
    ({"X-A": None}, "listeners.www.routes[0].headers.X-A: expected a string, got nothing"),
    ({"X-A": "a\nb"}, "listeners.www.routes[0].headers.X-A: 'a\\nb' has a control"),
    ({"X-A": "caf\u00e9"}, "listeners.www.routes[0].headers.X-A: 'caf\u00e9' has a control "
                           "or a non-ASCII"),
    ({"X-A": " 1"}, "listeners.www.routes[0].headers.X-A: ' 1' starts or ends with white "
                    "space"),
    (["X-A"], "listeners.www.routes[0].headers: expected a mapping of header name"),
])
def test_bad_header_matchers(headers: Any, expected: str) -> None:
    """A header name must be an HTTP token, once per route whatever its case; a value is
    printable ASCII text that a header could carry."""
    assert_problem(route(headers=headers, pool="api"), expected)


def test_split_is_read_with_weights() -> None:
    """split keeps its pools and relative weights in order; a weight of 0 is allowed
    beside a positive one (a canary switched off)."""
    assert first_route(path_prefix="/", split=[{"pool": "web", "weight": 1000},
                                               {"pool": "canary", "weight": 0}]).split == (
        WeightedPool("web", 1000), WeightedPool("canary", 0))


@pytest.mark.parametrize("split,expected", [
    ([], "listeners.www.routes[0].split: expected a non-empty list"),
    ({"pool": "web", "weight": 1}, "listeners.www.routes[0].split: expected a non-empty list"),
    (["web"], "listeners.www.routes[0].split[0]: expected a mapping like {pool: web, "
              "weight: 90}, got a string"),
    ([{"pool": "web"}], "listeners.www.routes[0].split[0].weight: missing (required)"),
    ([{"weight": 1}], "listeners.www.routes[0].split[0].pool: missing (required)"),
    ([{"pool": "nope", "weight": 1}],
     "listeners.www.routes[0].split[0].pool: no pool named 'nope'"),
    ([{"pool": "web", "weight": 1001}],
     "listeners.www.routes[0].split[0].weight: 1001 is out of range (0-1000)"),
    ([{"pool": "web", "weight": -1}],
     "listeners.www.routes[0].split[0].weight: -1 is out of range (0-1000)"),
    ([{"pool": "web", "weight": 0.5}],
     "listeners.www.routes[0].split[0].weight: expected an integer"),
    ([{"pool": "web", "weight": 0}, {"pool": "api", "weight": 0}],
     "listeners.www.routes[0].split: every weight is 0: at least one must be above 0"),
    ([{"pool": "web", "weight": 1}, {"pool": "web", "weight": 2}],
     "listeners.www.routes[0].split[1].pool: 'web' is already in "
     "listeners.www.routes[0].split[0]"),
    ([{"pool": "web", "weight": 1, "share": 2}],
     "listeners.www.routes[0].split[0].share: unknown key"),
])
def test_bad_splits(split: Any, expected: str) -> None:
    """A split is a non-empty list of existing pools, each once, each with an integer
    weight 0-1000, at least one above 0."""
    assert_problem(route(path_prefix="/", split=split), expected)


@pytest.mark.parametrize("keys,expected", [
    ({"pool": "api"}, "listeners.www.routes[0]: matches every request: use the listener's "
                      "pool"),
    ({"headers": {}, "pool": "api"}, "listeners.www.routes[0]: matches every request"),
    ({"path_prefix": "/a"}, "listeners.www.routes[0]: needs exactly one of 'pool' or 'split'"),
    ({"path_prefix": "/a", "pool": "api", "split": [{"pool": "web", "weight": 1}]},
     "listeners.www.routes[0]: needs exactly one of 'pool' or 'split'"),
    ({"path_prefix": "/a", "pool": "nope"}, "listeners.www.routes[0].pool: no pool named "
                                            "'nope' (pools: web, api, canary)"),
    ({"host": "a.example", "pool": "api", "strip_prefix": True},
     "listeners.www.routes[0].strip_prefix: needs a path_prefix to strip"),
    ({"path_prefix": "/a", "pool": "api", "strip_prefix": "yes"},
     "listeners.www.routes[0].strip_prefix: expected true or false"),
    ({"path_prefix": "/a", "pool": "api", "prefix": "/a"},
     "listeners.www.routes[0].prefix: unknown key"),
])
def test_bad_routes(keys: Dict[str, Any], expected: str) -> None:
    """A route needs a matcher (the listener's pool is the catch-all), exactly one of pool
    or split, and strip_prefix only with a path_prefix."""
    assert_problem(route(**keys), expected)


@pytest.mark.parametrize("routes,expected", [
    ({"path_prefix": "/a", "pool": "api"}, "listeners.www.routes: expected a list of routes"),
    (["/a"], "listeners.www.routes[0]: expected a mapping like {path_prefix: /api/, "
             "pool: api}, got a string"),
])
def test_routes_must_be_a_list_of_mappings(routes: Any, expected: str) -> None:
    """routes is a list (it is tried in order) of mappings."""
    assert_problem(raw_config({"routes": routes}), expected)


@pytest.mark.parametrize("first,second", [
    ({"host": "a.example", "path_prefix": "/v1/"}, {"host": "A.example", "path_prefix": "/v1/"}),
    ({"path_prefix": "/v1"}, {"path_prefix": "/v1/"}),
    ({"headers": {"X-A": "1"}}, {"headers": {"x-a": 1}}),
    ({"host": "*.example.com", "headers": {"X-A": "1", "X-B": "2"}},
     {"headers": {"X-B": "2", "X-A": "1"}, "host": "*.example.com"}),
])
def test_duplicate_routes_name_both(first: Dict[str, Any], second: Dict[str, Any]) -> None:
    """Two routes matching the same requests (same host, same whole-segment prefix, same
    headers, however spelled): the second could never be used, an error naming both."""
    raw = raw_config({"routes": [dict(first, pool="api"), {"path_prefix": "/x", "pool": "api"},
                                 dict(second, split=[{"pool": "canary", "weight": 1}])]})
    assert problems(raw) == [
        "listeners.www.routes[2]: matches the same requests as listeners.www.routes[0] "
        "(same host, path_prefix and headers), so it would never be used"]


def test_routes_differing_in_one_matcher_are_not_duplicates() -> None:
    """Routes that differ in host, prefix or a header value are kept in order."""
    routes = [{"host": "a.example", "path_prefix": "/v1", "pool": "api"},
              {"host": "b.example", "path_prefix": "/v1", "pool": "api"},
              {"host": "a.example", "path_prefix": "/v2", "pool": "api"},
              {"host": "a.example", "path_prefix": "/v1", "headers": {"X-A": "1"},
               "pool": "api"},
              {"host": "a.example", "path_prefix": "/v1", "headers": {"X-A": "2"},
               "pool": "api"}]
    cfg = check(raw_config({"routes": routes}))
    assert [(r.host, r.path_prefix, r.headers) for r in cfg.listeners["www"].routes] == [
        ("a.example", "/v1", ()), ("b.example", "/v1", ()), ("a.example", "/v2", ()),
        ("a.example", "/v1", (("x-a", "1"),)), ("a.example", "/v1", (("x-a", "2"),))]


# --- consul_routes ------------------------------------------------------------------------


def test_consul_routes_pool_defaults_make_the_consul_pools() -> None:
    """pool_defaults takes every pool key but peers and consul; the pool a service gets is
    those defaults named consul:<service>, fed by its passing instances."""
    cfg = check(raw_config({"consul_routes": {"tag_prefix": "lb-route-", "pool_defaults": {
        "balance": "leastconn", "retries": 1, "health": {"type": "tcp"}, "keepalive": 4}}},
        consul=True))
    routes = cfg.listeners["www"].consul_routes
    assert routes is not None and routes.tag_prefix == "lb-route-"
    pool = routes.pool_for("shop")
    assert (pool.name, pool.balance, pool.retries, pool.keepalive, pool.peers) == (
        "consul:shop", "leastconn", 1, 4, ())
    assert pool.health is not None and pool.health.type == "tcp"
    assert pool.consul == PoolConsulConfig(service="shop", passing_only=True)


@pytest.mark.parametrize("section,expected", [
    ({"pool_defaults": {"balance": "fastest"}},
     "listeners.www.consul_routes.pool_defaults.balance: 'fastest' is not one of"),
    ({"pool_defaults": {"health": {"rise": 0}}},
     "listeners.www.consul_routes.pool_defaults.health.rise: 0 is out of range"),
    ({"pool_defaults": {"keepalive": -1}},
     "listeners.www.consul_routes.pool_defaults.keepalive: -1 is out of range"),
    ({"pool_defaults": {"hash_key": "path"}},
     "listeners.www.consul_routes.pool_defaults.hash_key: only applies to balance: source"),
    ({"pool_defaults": {"peers": ["127.0.0.1:1"]}},
     "listeners.www.consul_routes.pool_defaults.peers: not allowed here: Consul gives"),
    ({"pool_defaults": {"consul": {"service": "x"}}},
     "listeners.www.consul_routes.pool_defaults.consul: not allowed here"),
    ({"pool_defaults": {"wieght": 1}},
     "listeners.www.consul_routes.pool_defaults.wieght: unknown key"),
    ({"pool_defaults": 5}, "listeners.www.consul_routes.pool_defaults: expected a mapping"),
    ({"tag_prefix": ""}, "listeners.www.consul_routes.tag_prefix: expected a non-empty string"),
    ({"tag_prefix": "url prefix-"}, "listeners.www.consul_routes.tag_prefix: 'url prefix-' "
                                    "has a space, a '/' or a control character"),
    ({"tag_prefix": "a/"}, "listeners.www.consul_routes.tag_prefix: 'a/' has a space"),
    ({"tag_prefix": "urlprefix-", "prefix": "x"},
     "listeners.www.consul_routes.prefix: unknown key"),
    ([], "listeners.www.consul_routes: expected a mapping, got a list"),
])
def test_bad_consul_routes(section: Any, expected: str) -> None:
    """consul_routes' problems name their key, pool_defaults' with the pool checker's own
    messages under listeners.www.consul_routes.pool_defaults."""
    assert_problem(raw_config({"consul_routes": section}, consul=True), expected)


def test_consul_routes_need_the_consul_section() -> None:
    """Routes from Consul without the top-level consul section are reported, not off."""
    assert problems(raw_config({"consul_routes": {}})) == [
        "listeners.www.consul_routes: needs the top-level 'consul' section (write "
        "'consul: {}' for defaults)"]


def test_listeners_with_consul_routes_share_pool_defaults() -> None:
    """consul:<service> is one pool whichever listener routes to it: two listeners'
    pool_defaults must agree (equal ones, however written, are fine)."""
    raw = raw_config({"consul_routes": {"pool_defaults": {"retries": 1}}}, consul=True)
    raw["listeners"]["two"] = {"bind": "127.0.0.1:8081", "mode": "http",
                               "consul_routes": {"tag_prefix": "other-",
                                                 "pool_defaults": {"retries": 1,
                                                                   "balance": "roundrobin"}}}
    assert check(raw).listeners["two"].consul_routes is not None
    raw["listeners"]["two"]["consul_routes"]["pool_defaults"]["retries"] = 2
    assert problems(raw) == [
        "listeners.two.consul_routes.pool_defaults: differs from "
        "listeners.www.consul_routes.pool_defaults: the pools Consul routes create "
        "(consul:<service>) are shared by every listener, so their defaults must be the same"]


def test_pool_names_starting_with_consul_are_reserved() -> None:
    """A config pool cannot take a name consul_routes' pools use, nor the name a routes
    watch has in the lb_consul_* metrics."""
    raw = raw_config()
    raw["pools"]["consul:web"] = {}
    raw["pools"]["routes:www"] = {}
    assert problems(raw) == [
        "pools.consul:web: names starting with 'consul:' are kept for the pools "
        "consul_routes create",
        "pools.routes:www: names starting with 'routes:' are kept for the Consul routes "
        "watches in lb_consul_* metrics"]


# --- the http section ---------------------------------------------------------------------


@pytest.mark.parametrize("value,size", [
    (16384, 16384), ("16384", 16384), ("16KiB", 16384), ("16 KiB", 16384), ("1MiB", 1 << 20),
    ("1024B", 1024), (1024, 1024), (1 << 20, 1 << 20),
])
def test_max_header_size_spellings(value: Any, size: int) -> None:
    """A size is bytes (an integer, or text with the unit B, KiB or MiB), 1KiB-1MiB."""
    assert check(raw_config({"http": {"max_header_size": value}})
                 ).listeners["www"].http.max_header_size == size


@pytest.mark.parametrize("value,expected", [
    ("16k", "'16k' is ambiguous (1000 or 1024?): write '16KiB' or a number of bytes"),
    ("16KB", "'16KB' is ambiguous (1000 or 1024?): write '16KiB'"),
    ("16kib", "'16kib' is ambiguous (1000 or 1024?): write '16KiB'"),
    ("1M", "'1M' is ambiguous (1000 or 1024?): write '1MiB'"),
    ("1GiB", "'1GiB' has an unknown unit (use B, KiB or MiB)"),
    ("1.5KiB", "'1.5KiB' is not a size"),
    ("-1", "'-1' is not a size"),
    ("lots", "'lots' is not a size (use e.g. '16KiB'"),
    (1023, "1023 is out of range (1KiB-1MiB)"),
    ("2MiB", "'2MiB' is out of range (1KiB-1MiB)"),
    (10 ** 400, "is out of range (1KiB-1MiB)"),
    (True, "expected a size like '16KiB', got a boolean"),
    (16.0, "expected a size like '16KiB', got a number"),
])
def test_bad_max_header_sizes(value: Any, expected: str) -> None:
    """Units other than B, KiB and MiB are refused, ``k``/``KB``/``M`` as ambiguous; the
    size is 1KiB-1MiB."""
    found = problems(raw_config({"http": {"max_header_size": value}}))
    assert len(found) == 1 and found[0].startswith("listeners.www.http.max_header_size: ")
    assert expected in found[0] and len(found[0]) < 200, found


def test_parse_size() -> None:
    """parse_size reads bytes without a range (the caller bounds it)."""
    assert [parse_size(v) for v in (0, "0B", "3KiB", "2MiB")] == [0, 0, 3072, 2 << 20]


@pytest.mark.parametrize("http,expected", [
    ({"client_header_timeout": "0s"}, "listeners.www.http.client_header_timeout: must be "
                                      "greater than 0"),
    ({"response_timeout": 0}, "listeners.www.http.response_timeout: must be greater than 0"),
    ({"response_timeout": "soon"}, "listeners.www.http.response_timeout: 'soon' is not a "
                                   "duration"),
    ({"client_keepalive_timeout": "-1s"}, "listeners.www.http.client_keepalive_timeout: "),
    ({"forwarded": "on"}, "listeners.www.http.forwarded: 'on' is not one of: append, "
                          "replace, off"),
    ({"forwarded": True}, "listeners.www.http.forwarded: True is not one of"),
    ({"trusted_proxies": ["10.0.0.0/33"]}, "listeners.www.http.trusted_proxies: not a CIDR"),
    ({"trusted_proxies": "10.0.0.0/8"}, "listeners.www.http.trusted_proxies: expected a list"),
    ({"trusted_proxies": ["10.0.0.0/8"], "forwarded": "replace"},
     "listeners.www.http.trusted_proxies: only applies to forwarded: append"),
    ({"request_id": "X Request Id"}, "listeners.www.http.request_id: 'X Request Id' is not a "
                                     "header name"),
    ({"request_id": ""}, "listeners.www.http.request_id: '' is not a header name"),
    ({"request_id": True}, "listeners.www.http.request_id: True is not a header name"),
    ({"max_header": "16KiB"}, "listeners.www.http.max_header: unknown key"),
    (["forwarded"], "listeners.www.http: expected a mapping, got a list"),
])
def test_bad_http_section(http: Any, expected: str) -> None:
    """Every http key's bad values are named at listeners.NAME.http.KEY."""
    assert_problem(raw_config({"http": http}), expected)


def test_yaml_off_means_off_for_forwarded() -> None:
    """YAML 1.1 reads `forwarded: off` (and `no`) as false; it still means off."""
    for spelling in ("off", "no", "'off'"):
        cfg = parse("listeners: {www: {bind: '127.0.0.1:1', mode: http, pool: web, "
                    f"http: {{forwarded: {spelling}}}}}}}\npools: {{web: {{}}}}\n")
        assert cfg.listeners["www"].http.forwarded == "off"


@pytest.mark.parametrize("spelling,request_id", [
    ("null", None), ("~", None), ("off", None), ("", None), ("X-Trace-Id", "X-Trace-Id"),
    ("x-request-id", "x-request-id"),
])
def test_request_id_null_turns_it_off(spelling: str, request_id: Optional[str]) -> None:
    """`request_id: null` (or a bare `off`) turns request ids off, where elsewhere null
    means the default; a header name is kept as written (lb sends it)."""
    cfg = parse("listeners: {www: {bind: '127.0.0.1:1', mode: http, pool: web, "
                f"http: {{request_id: {spelling}}}}}}}\npools: {{web: {{}}}}\n")
    assert cfg.listeners["www"].http.request_id == request_id
    cfg = parse("listeners: {www: {bind: '127.0.0.1:1', mode: http, pool: web, http: {}}}\n"
                "pools: {web: {}}\n")
    assert cfg.listeners["www"].http.request_id == "X-Request-Id"


# --- pool keys of HTTP mode ---------------------------------------------------------------


def test_http_pool_keys_are_read() -> None:
    """keepalive, retry_on (status codes as integers or text), outlier (a percentage or a
    number), sticky_cookie and hash_key are read into their objects."""
    web = check(raw_config(
        balance="source", keepalive=0, keepalive_timeout="5s",
        retry_on=[502, "503", "reset", "connect-failure"],
        outlier={"consecutive_5xx": 3, "ejection_time": "1m", "max_ejected": "12.5%"},
        sticky_cookie={"name": "SID"}, hash_key="header:X-User")).pools["web"]
    assert (web.keepalive, web.keepalive_timeout, web.retry_on) == (
        0, 5.0, ("502", "503", "reset", "connect-failure"))
    assert web.outlier == OutlierConfig(consecutive_5xx=3, ejection_time=60.0,
                                        max_ejected=12.5)
    assert web.sticky_cookie == StickyCookieConfig(name="SID")
    assert web.hash_key == HashKey("header", "x-user") and str(web.hash_key) == "header:x-user"


@pytest.mark.parametrize("written,key", [
    ("client_ip", HashKey()), ("path", HashKey("path")),
    ("header:X-User", HashKey("header", "x-user")), ("cookie:SID", HashKey("cookie", "SID")),
])
def test_hash_keys(written: str, key: HashKey) -> None:
    """hash_key names what `source` hashes; a header name is lower-cased, a cookie name
    (case-sensitive) is kept."""
    assert check(raw_config(balance="source", hash_key=written)).pools["web"].hash_key == key


def test_empty_sections_turn_policies_on_with_defaults() -> None:
    """`outlier: {}` is outlier detection with SPEC's defaults; `sticky_cookie: {}` a
    cookie named lb_peer; `sticky_cookie: off` (false) none; `retry_on: []` only the
    connect failures SPEC always retries."""
    web = check(raw_config(outlier={}, sticky_cookie={}, retry_on=[])).pools["web"]
    assert (web.outlier, web.sticky_cookie, web.retry_on) == (
        OutlierConfig(5, 30.0, 50.0), StickyCookieConfig("lb_peer"), ())
    assert check(raw_config(sticky_cookie=False)).pools["web"].sticky_cookie is None


@pytest.mark.parametrize("value,percent", [("50%", 50.0), ("0%", 0.0), ("100 %", 100.0),
                                           (50, 50.0), (33.3, 33.3), (0, 0.0), (1, 1.0)])
def test_max_ejected_spellings(value: Any, percent: float) -> None:
    """max_ejected is a percentage: `50%`, or a plain number read as percent."""
    assert check(raw_config(outlier={"max_ejected": value})
                 ).pools["web"].outlier.max_ejected == percent  # type: ignore[union-attr]


@pytest.mark.parametrize("pool,expected", [
    ({"keepalive": -1}, "pools.web.keepalive: -1 is out of range (0-10000)"),
    ({"keepalive": 10001}, "pools.web.keepalive: 10001 is out of range (0-10000)"),
    ({"keepalive": "32"}, "pools.web.keepalive: expected an integer"),
    ({"keepalive_timeout": "0s"}, "pools.web.keepalive_timeout: must be greater than 0"),
    ({"retry_on": "502"}, "pools.web.retry_on: expected a list like [connect-failure, "
                          "empty-response], got a string"),
    ({"retry_on": [500]}, "pools.web.retry_on[0]: 500 is not one of: connect-failure, "
                          "empty-response, reset, 502, 503, 504"),
    ({"retry_on": ["reset", "timeout"]}, "pools.web.retry_on[1]: 'timeout' is not one of"),
    ({"retry_on": [True]}, "pools.web.retry_on[0]: True is not one of"),
    ({"retry_on": [502, "502"]}, "pools.web.retry_on[1]: 502 is already listed at "
                                 "pools.web.retry_on[0]"),
    ({"outlier": True}, "pools.web.outlier: expected a mapping (write 'outlier: {}' for the "
                        "defaults), got a boolean"),
    ({"outlier": {"consecutive_5xx": 0}}, "pools.web.outlier.consecutive_5xx: 0 is out of "
                                          "range (1-1000)"),
    ({"outlier": {"consecutive_5xx": 1001}}, "pools.web.outlier.consecutive_5xx: 1001 is out"),
    ({"outlier": {"ejection_time": "0s"}}, "pools.web.outlier.ejection_time: must be greater "
                                           "than 0"),
    ({"outlier": {"max_ejected": "150%"}}, "pools.web.outlier.max_ejected: '150%' is out of "
                                           "range (0%-100%)"),
    ({"outlier": {"max_ejected": -1}}, "pools.web.outlier.max_ejected: -1 is out of range"),
    ({"outlier": {"max_ejected": float("nan")}}, "pools.web.outlier.max_ejected: nan is out"),
    ({"outlier": {"max_ejected": 10 ** 400}}, "pools.web.outlier.max_ejected: "),
    ({"outlier": {"max_ejected": 0.5}}, "pools.web.outlier.max_ejected: 0.5 is ambiguous: "
                                        "write '50%' or '0.5%'"),
    ({"outlier": {"max_ejected": "half"}}, "pools.web.outlier.max_ejected: 'half' is not a "
                                           "percentage like '50%'"),
    ({"outlier": {"max_ejected": True}}, "pools.web.outlier.max_ejected: expected a "
                                         "percentage like '50%', got a boolean"),
    ({"outlier": {"ejections": 1}}, "pools.web.outlier.ejections: unknown key"),
    ({"sticky_cookie": "lb_peer"}, "pools.web.sticky_cookie: expected a mapping like "
                                   "{name: lb_peer}, got a string"),
    ({"sticky_cookie": True}, "pools.web.sticky_cookie: expected a mapping"),
    ({"sticky_cookie": {"name": "lb peer"}}, "pools.web.sticky_cookie.name: 'lb peer' is not "
                                             "a cookie name"),
    ({"sticky_cookie": {"name": "a=b"}}, "pools.web.sticky_cookie.name: 'a=b' is not a cookie"),
    ({"sticky_cookie": {"name": "x", "path": "/"}}, "pools.web.sticky_cookie.path: unknown "
                                                    "key"),
    ({"balance": "source", "hash_key": "ip"}, "pools.web.hash_key: 'ip' is not one of: "
                                              "client_ip, path, header:NAME, cookie:NAME"),
    ({"balance": "source", "hash_key": "header:"}, "pools.web.hash_key: '' is not a header "
                                                   "name"),
    ({"balance": "source", "hash_key": "header:X User"}, "pools.web.hash_key: 'X User' is not "
                                                         "a header name"),
    ({"balance": "source", "hash_key": "cookie:a;b"}, "pools.web.hash_key: 'a;b' is not a "
                                                      "cookie name"),
    ({"balance": "source", "hash_key": "query:x"}, "pools.web.hash_key: 'query:x' is not "
                                                   "one of"),
    ({"balance": "source", "hash_key": 5}, "pools.web.hash_key: 5 is not one of"),
])
def test_bad_http_pool_keys(pool: Dict[str, Any], expected: str) -> None:
    """Every HTTP pool key's bad values are named at pools.NAME.KEY (list items at their
    index)."""
    found = problems(raw_config(**pool))
    assert len(found) == 1 and found[0].startswith(expected) and len(found[0]) < 200, found


@pytest.mark.parametrize("balance", ["roundrobin", "leastconn", "random", "p2c"])
def test_hash_key_only_applies_to_balance_source(balance: str) -> None:
    """A hash_key other than client_ip with a balance that hashes nothing is an error (as
    hash_balance_factor is); `client_ip`, the default, may be spelled out with any balance
    (SPEC's example does); an unknown balance is reported once, not also here."""
    for key in ("path", "header:X-User", "cookie:SID"):
        assert problems(raw_config(balance=balance, hash_key=key)) == [
            "pools.web.hash_key: only applies to balance: source"]
    assert check(raw_config(balance=balance, hash_key="client_ip")).pools["web"].balance == (
        balance)
    found = problems(raw_config(balance="hash", hash_key="path"))
    assert len(found) == 1 and found[0].startswith("pools.web.balance: "), found


def test_sticky_cookie_goes_with_any_balance() -> None:
    """sticky_cookie picks the peer its cookie names and leaves the rest to the balance,
    whichever it is, source included."""
    for balance in ("roundrobin", "source"):
        web = check(raw_config(balance=balance, hash_key="path", sticky_cookie={})
                    if balance == "source" else raw_config(balance=balance, sticky_cookie={})
                    ).pools["web"]
        assert web.sticky_cookie == StickyCookieConfig()


def test_every_http_problem_is_reported_at_once() -> None:
    """One pass reports every problem of an http listener and its pools."""
    raw = raw_config({"routes": [{"host": "a:1", "pool": "nope"},
                                 {"path_prefix": "x", "split": []}],
                      "http": {"max_header_size": "16k", "forwarded": "yes"},
                      "consul_routes": {"pool_defaults": {"retries": "x"}}},
                     keepalive=-1, retry_on=[418], outlier={"max_ejected": "x"})
    found = problems(raw)
    for key in ("listeners.www.routes[0].host", "listeners.www.routes[0].pool",
                "listeners.www.routes[1].path_prefix", "listeners.www.routes[1].split",
                "listeners.www.http.max_header_size", "listeners.www.http.forwarded",
                "listeners.www.consul_routes: needs the top-level 'consul' section",
                "listeners.www.consul_routes.pool_defaults.retries", "pools.web.keepalive",
                "pools.web.retry_on[0]", "pools.web.outlier.max_ejected"):
        assert any(p.startswith(key) for p in found), (key, found)
