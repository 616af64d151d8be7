"""Routes from Consul tags (Fabio's ``urlprefix-`` syntax): one tag, a service's tags, the
order and conflicts of a route list, and catalog answers recorded from a real Consul 1.8.7
agent (tests/fixtures/consul/catalog-*, written by scripts/record-consul-fixtures)."""

import json
import os
import random
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lb.config import ConsulConfig
from lb.discovery import consul
from lb.discovery.consul.api import ConsulHTTPError, InvalidAnswer
from lb.discovery.consul.routes import (
    MAX_TAG_LENGTH,
    UNSUPPORTED_OPTIONS,
    CatalogRoutesQuery,
    ConsulRoute,
    RouteConflict,
    keeping,
    make_route,
    match_order,
    parse_catalog_services,
    parse_tag,
    parse_tags,
    resolve,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "consul")
P = "urlprefix-"


def recorded(name: str) -> Dict[str, Any]:
    with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def route(path: str, host: Optional[str] = None, strip: Optional[str] = None,
          service: str = "svc") -> ConsulRoute:
    return ConsulRoute(service, host, path, strip)


# --- one tag ---------------------------------------------------------------------------------

USED = [
    ("urlprefix-/api", route("/api")),
    ("urlprefix-/", route("/")),
    ("urlprefix-example.com/", route("/", "example.com")),
    ("urlprefix-Example.COM/Api/V1", route("/Api/V1", "example.com")),
    ("urlprefix-*.example.com/static strip=/static",
     route("/static", "*.example.com", "/static")),
    ("urlprefix-bücher.example/", route("/", "xn--bcher-kva.example")),
    ("urlprefix-xn--bcher-kva.example/", route("/", "xn--bcher-kva.example")),
    ("urlprefix-*.XN--BCHER-KVA.example/", route("/", "*.xn--bcher-kva.example")),
    ("urlprefix-10.0.0.1/x", route("/x", "10.0.0.1")),
    ("urlprefix-[::1]/x", route("/x", "[::1]")),
    ("urlprefix-/foo/bar strip=/foo", route("/foo/bar", None, "/foo")),
    ("urlprefix-/foo/bar strip=/foo/", route("/foo/bar", None, "/foo/")),
    ("urlprefix-/api/ strip=/api", route("/api/", None, "/api")),
    ("urlprefix-/api strip=/api/", route("/api", None, "/api/")),
    ("urlprefix-/%7Euser/", route("/%7Euser/")),
    ("  urlprefix-/api  ", route("/api")),
    ("urlprefix-/api   strip=/api", route("/api", None, "/api")),
    ("urlprefix-/api proto=http", route("/api")),
    ("urlprefix-/api proto=http strip=/api", route("/api", None, "/api")),
]


@pytest.mark.parametrize("tag,expected", USED)
def test_tags_lb_can_serve_become_routes(tag: str, expected: ConsulRoute) -> None:
    """Fabio's route tags lb serves exactly as announced: [host]/path with the host
    lower-cased and IDNA-encoded (or already so: what a snapshot stores), IPs and [v6]
    too, the path as written, ``*.suffix``
    wildcards, ``strip=`` of the whole prefix or a leading whole-segment part of it,
    ``proto=http`` (Fabio's default), white space around the tag and between words."""
    assert parse_tag("svc", tag, P) == expected


SKIPPED = [
    # options that change what the route does: never served without them
    ("urlprefix-/x allow=ip:10.0.0.0/8", "allow= restricts which client addresses"),
    ("urlprefix-/x deny=ip:1.2.3.4/32", "deny= refuses some client addresses"),
    ("urlprefix-/x auth=basic", "auth="),
    ("urlprefix-/x redirect=301,https://example.com/$path", "redirect="),
    ("urlprefix-/x prepend=/v2", "prepend="),
    ("urlprefix-/x host=dst", "host= sets the Host header"),
    ("urlprefix-/x weight=0.25", "weight="),
    ("urlprefix-/x proto=https tlsskipverify=true", "'proto=https'"),
    ("urlprefix-/x tlsskipverify=true", "tlsskipverify="),
    ("urlprefix-/x tlsskipverify", "tlsskipverify="),
    ("urlprefix-/x proto=grpcs grpcservername=x", "'proto=grpcs'"),
    ("urlprefix-/x grpcservername=x", "grpcservername="),
    ("urlprefix-/my.service proto=grpc", "'proto=grpc'"),
    ("urlprefix-/x proto=tcp", "'proto=tcp'"),
    ("urlprefix-/x proto=", "'proto='"),
    ("urlprefix-/x pxyproto=true", "pxyproto="),
    ("urlprefix-/x register=www", "register="),
    ("urlprefix-/x cache=1h", "unknown option 'cache=1h'"),
    ("urlprefix-/x strip", "unknown option 'strip'"),
    ("urlprefix-/x strip=/x strip=/x", "strip= twice"),
    ("urlprefix-/x strip=", "is not a path prefix"),
    ("urlprefix-/x strip=/y", "is not the route's path"),
    ("urlprefix-/api strip=/ap", "leading whole-segment part"),
    ("urlprefix-/api strip=/api/v1", "leading whole-segment part"),
    # routes lb's http listener cannot serve
    ("urlprefix-:3306 proto=tcp", "TCP route"),
    ("urlprefix-:3306", "TCP route"),
    ("urlprefix-example.com", "has no '/'"),
    ("urlprefix-", "announces nothing"),
    ("urlprefix-   ", "announces nothing"),
    ("urlprefix-example.com:8080/", "has a port"),
    ("urlprefix-[::1]:8080/", "has a port"),
    ("urlprefix-*/x", "leave host out"),
    ("urlprefix-api.*.example.com/", "whole first label"),
    ("urlprefix-api-*.example.com/", "whole first label"),
    ("urlprefix-bad..example.com/", "not a valid host name"),
    ("urlprefix-" + "a" * 64 + ".example.com/", "not a valid host name"),
    ("urlprefix-xn--a.example.com/", "not valid IDNA"),
    ("urlprefix-Bücher.xn--bcher-kva.example/", "not valid IDNA"),
    ("urlprefix-${DC}.example.com/", "'$'"),
    ("urlprefix-/api/$DC", "'$'"),
    ("urlprefix-/api/*/v1", "'*'"),
    ("urlprefix-/x?y=1", "'?' or '#'"),
    ("urlprefix-/é", "non-ASCII"),
    # hostile
    ("urlprefix-/x\x00", "control"),
    ("urlprefix-/x\tstrip=/x", "control"),
    ("urlprefix-/x\r\nX-Injected: 1", "control"),
    ("urlprefix-/x\u202e", "control"),
    ("urlprefix-/" + "a" * MAX_TAG_LENGTH, f"over {MAX_TAG_LENGTH} characters"),
    ("urlprefix-/x " + "strip=/x " * 200, f"over {MAX_TAG_LENGTH} characters"),
]


@pytest.mark.parametrize("tag,why", SKIPPED)
def test_tags_lb_cannot_serve_as_announced_are_skipped_with_a_reason(tag: str,
                                                                      why: str) -> None:
    """A tag is used only when lb does all it asks: an option that changes the route
    (an ignored allow= would expose the service), an unknown option, a TCP route, a host
    with a port or not a host name, Fabio's $DC expansion or path globs, and hostile text
    all make it skipped with a reason that names the problem, never an exception."""
    result = parse_tag("svc", tag, P)
    assert isinstance(result, str), result
    assert why in result


def test_every_fabio_option_lb_does_not_support_is_covered() -> None:
    """Each option Fabio documents and lb cannot honour has its own reason (so the log
    says what ignoring it would change), and each makes the tag skipped."""
    assert set(UNSUPPORTED_OPTIONS) == {"allow", "deny", "auth", "redirect", "prepend",
                                        "host", "weight", "tlsskipverify",
                                        "grpcservername", "pxyproto", "register"}
    for name, reason in UNSUPPORTED_OPTIONS.items():
        result = parse_tag("svc", f"urlprefix-/x {name}=1", P)
        assert result == f"option {name}= {reason}"


def test_a_tag_without_the_prefix_is_not_a_route() -> None:
    """parse_tag is only for tags carrying the prefix (matched case-sensitively, as
    Fabio does); others say so rather than being read at the wrong offset."""
    assert parse_tag("svc", "URLPREFIX-/x", P) == "does not start with 'urlprefix-'"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
@example("¿/")  # IDNA 2003 takes it as xn--2ba, which lb.net.host_name alone refuses
@example("bücher.example/ strip=/")
def test_any_tag_text_is_a_route_or_a_reason(text: str) -> None:
    """Whatever a tag says after the prefix, parsing ends in a route or a reason, never
    an exception; and a route passes the same checks again unchanged (so a snapshot of it
    loads back, international hosts included)."""
    result = parse_tag("svc", P + text, P)
    if isinstance(result, ConsulRoute):
        assert make_route(result.service, result.host, result.path_prefix,
                          result.strip) == result
    else:
        assert isinstance(result, str) and result


# --- a service's tags ------------------------------------------------------------------------


def test_service_tags_give_each_route_once_and_each_problem_once() -> None:
    """Only tags with the prefix count (``v1``, ``URLPREFIX-/x`` are the service's own);
    the same route written several ways is one route; every skipped tag is named with its
    service and reason, in a stable order."""
    routes, skipped = parse_tags("web", [
        "v1", "urlprefix-/b", "URLPREFIX-/x", "urlprefix-/a", "urlprefix-/a ",
        "urlprefix-/a proto=http", "urlprefix-/c allow=ip:10.0.0.0/8", "urlprefix-:80",
        "urlprefix-/c allow=ip:10.0.0.0/8"], P)
    assert routes == [route("/a", service="web"), route("/b", service="web")]
    assert skipped == [
        "service 'web': tag 'urlprefix-/c allow=ip:10.0.0.0/8' not used: option allow= "
        + UNSUPPORTED_OPTIONS["allow"],
        "service 'web': tag 'urlprefix-:80' not used: is a TCP route (':port'); lb's "
        "Consul routes are HTTP"]


def test_another_tag_prefix() -> None:
    """consul_routes.tag_prefix replaces ``urlprefix-``; then urlprefix- tags are not
    routes."""
    routes, skipped = parse_tags("web", ["lb-route-/a", "urlprefix-/b"], "lb-route-")
    assert routes == [route("/a", service="web")] and skipped == []


@pytest.mark.parametrize("service,why", [
    ("", "no name"), ("my web", "space"), ("web\n", "control"), ("a" * 256, "over 255"),
])
def test_service_names_lb_cannot_name_a_pool_after_skip_their_routes(service: str,
                                                                     why: str) -> None:
    """A service whose name cannot name a pool (``consul:<service>``: empty, spaces,
    control characters, huge) announces nothing; one line says why."""
    routes, skipped = parse_tags(service, ["urlprefix-/a", "urlprefix-/b"], P)
    assert routes == [] and len(skipped) == 1
    assert "2 route tag(s) not used" in skipped[0] and why in skipped[0]


def test_a_badly_named_service_without_route_tags_is_not_reported() -> None:
    """A service that announces no route is none of lb's business, whatever its name."""
    assert parse_tags("my web", ["v1"], P) == ([], [])


def test_route_names_its_pool() -> None:
    """A route leads to the pool ``consul:<service>`` (its source in /api/routes too)."""
    assert route("/a", service="api").pool == "consul:api"
    assert route("/a", "x.example", "/a", service="api").describe() == (
        "x.example/a -> consul:api (strip /a)")


# --- order and conflicts ---------------------------------------------------------------------

IN_ORDER = [
    route("/api/v1", "api.example.com", service="b"),
    route("/", "api.example.com", service="a"),
    route("/", "www.example.com", service="a"),
    route("/static", "*.cdn.example.com", service="c"),
    route("/static/img", "*.example.com", service="c"),
    route("/", "*.example.com", service="d"),
    route("/api/v1/", service="b"),
    route("/api", service="a"),
    route("/b", service="a"),
    route("/x", service="z"),
    route("/", service="e"),
]


def test_routes_come_most_specific_first_whatever_the_answer_order() -> None:
    """Host before no host, exact host before wildcard (a longer wildcard suffix first),
    a longer path first (a trailing slash does not count), then host, path and service:
    every lb builds the same table from the same catalog, however Consul ordered it."""
    rng = random.Random(7)
    for _ in range(50):
        shuffled = list(IN_ORDER)
        rng.shuffle(shuffled)
        assert list(resolve(shuffled)[0]) == IN_ORDER
    assert sorted(IN_ORDER, key=match_order) == IN_ORDER


def test_same_route_from_two_services_lowest_name_wins_and_is_reported() -> None:
    """Two services announcing one (host, path): the lowest service name in byte order
    wins (``B`` before ``a``, ``z`` before ``é``), on every lb; the losers are reported."""
    used, conflicts = resolve([route("/api", service="a"), route("/api", service="B")])
    assert used == (route("/api", service="B"),)
    assert conflicts == (RouteConflict(route("/api", service="B"),
                                       (route("/api", service="a"),)),)
    used, _ = resolve([route("/x", service="é"), route("/x", service="z")])
    assert used == (route("/x", service="z"),)


def test_a_trailing_slash_is_the_same_route() -> None:
    """``/api`` and ``/api/`` match the same requests (whole segments): from two services
    they conflict; from one service, with the same strip, they are one route."""
    used, conflicts = resolve([route("/api/", service="a"), route("/api", service="b")])
    assert used == (route("/api/", service="a"),) and len(conflicts) == 1
    used, conflicts = resolve([route("/api/", service="a"), route("/api", service="a")])
    assert used == (route("/api", service="a"),) and conflicts == ()


def test_one_service_announcing_one_route_two_ways_is_a_conflict() -> None:
    """Instances of one service disagreeing on strip (say, mid-deploy): without strip wins,
    deterministically, and it is reported."""
    used, conflicts = resolve([route("/api", None, "/api", "a"), route("/api", None, None,
                                                                       "a")])
    assert used == (route("/api", service="a"),)
    assert "announced 2 ways" in conflicts[0].describe()
    assert "using service 'a', not service 'a' strip=/api" in conflicts[0].describe()


def test_different_hosts_do_not_conflict() -> None:
    """Conflicts are per (host, path): the same path on two hosts, or with and without a
    host, are different routes."""
    routes = [route("/", "a.example", service="x"), route("/", "b.example", service="y"),
              route("/", None, service="z")]
    used, conflicts = resolve(routes)
    assert set(used) == set(routes) and conflicts == ()


def test_keeping_holds_removed_routes_back() -> None:
    """While Consul re-fills a lost catalog, the new list plus the old routes whose (host,
    path) it no longer announces, in match order."""
    old = (route("/a", service="a"), route("/b", service="b"))
    new = (route("/a", service="c"), route("/", "x.example", service="c"))
    assert keeping(old, new) == (route("/", "x.example", service="c"),
                                 route("/a", service="c"), route("/b", service="b"))


# --- catalog answers -------------------------------------------------------------------------


def test_recorded_catalog_answer() -> None:
    """A real /v1/catalog/services answer: www and shop announce routes (shop's two
    instances different ones: the answer carries their union), billing only tags lb cannot
    serve (allow=, a TCP route: skipped with reasons, though its one instance is failing:
    the catalog lists it all the same), the other services no route."""
    answer = recorded("catalog-services-routes")
    parsed = CatalogRoutesQuery().parse(answer["status"], answer["body"].encode())
    assert parsed.routes == (
        route("/", "example.com", service="www"),
        route("/", "shop.example.com", service="shop"),
        route("/static", "*.example.com", "/static", service="shop"),
        route("/shop", service="shop"),
        route("/www", None, "/www", service="www"),
    )
    assert len(parsed.skipped) == 2
    assert "service 'billing': tag 'urlprefix-/billing allow=ip:10.0.0.0/8' not used" in (
        parsed.skipped[0])
    assert "service 'billing': tag 'urlprefix-:3306 proto=tcp' not used" in parsed.skipped[1]
    assert parsed.conflicts == ()


def test_recorded_catalog_answer_with_a_conflict() -> None:
    """The recorded answer plus a service announcing shop's /shop as /shop/: shop keeps it
    (lower name), the conflict is in the answer."""
    services = json.loads(recorded("catalog-services-routes")["body"])
    services["shop2"] = ["urlprefix-/shop/"]
    parsed = consul.routes.parse_catalog_services(services, P)
    assert route("/shop", service="shop") in parsed.routes
    assert [c.dropped for c in parsed.conflicts] == [(route("/shop/", service="shop2"),)]


def test_catalog_blocking_answer_carries_the_same_index() -> None:
    """The catalog endpoint is a blocking query like the others: waiting on the current
    index, the wait runs out and that index comes back (what the watch counts as
    unchanged)."""
    answer = recorded("catalog-services-blocking-wait-ran-out")
    sent = dict(pair.split("=") for pair in answer["request"]["query"].split("&"))
    assert answer["status"] == 200 and answer["headers"]["X-Consul-Index"] == sent["index"]


@pytest.mark.parametrize("body,why", [
    (b"[]", "expected a JSON object of services, got list"),
    (b'{"web": "urlprefix-/"}', "tags are not a list of strings"),
    (b'{"web": [1]}', "tags are not a list of strings"),
    (b"<html>", "body is not JSON"),
])
def test_bodies_consul_never_sends_are_invalid(body: bytes, why: str) -> None:
    """A body of another shape is not Consul's answer (a proxy's error page, a wrong URL):
    InvalidAnswer, so the watch keeps its last good routes."""
    with pytest.raises(InvalidAnswer) as caught:
        CatalogRoutesQuery().parse(200, body)
    assert why in str(caught.value)


def test_a_service_with_null_tags_announces_nothing() -> None:
    """null tags is a service without tags."""
    assert parse_catalog_services({"web": None, "api": ["urlprefix-/api"]}, P).routes == (
        route("/api", service="api"),)


def test_only_200_is_an_answer() -> None:
    """403 (ACL), 500 (no leader): errors, the last good routes stay."""
    for status in (403, 404, 500):
        with pytest.raises(ConsulHTTPError):
            CatalogRoutesQuery().parse(status, b"Permission denied")


def test_an_answer_of_unusable_tags_only_is_a_real_empty_list() -> None:
    """Unlike peers, tags lb cannot serve are not a broken answer: a service that changes
    its only tag to one with allow= must lose its unrestricted route, not keep it."""
    parsed = parse_catalog_services({"web": ["urlprefix-/ allow=ip:10.0.0.0/8"]}, P)
    assert parsed.routes == () and len(parsed.skipped) == 1


def test_query_shape_and_identity() -> None:
    """The catalog query: no parameters of its own (tag= does not filter there), and a
    snapshot identity of agent (without credentials), datacenter and tag prefix."""
    query = CatalogRoutesQuery("lb-")
    assert (query.path, query.params, query.service, query.kv_prefix) == (
        "/v1/catalog/services", [], None, None)
    assert query.describe == "catalog services tagged 'lb-'"
    assert query.identity(ConsulConfig(url="https://u:p@consul.test:8501",
                                       datacenter="dc2")) == {
        "catalog": "services", "url": "https://consul.test:8501", "datacenter": "dc2",
        "tag_prefix": "lb-"}
    for bad in ("", "a b", "a/", "a\x00"):
        with pytest.raises(ValueError):
            CatalogRoutesQuery(bad)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(
        ["urlprefix-/", "urlprefix-/a strip=/a", "urlprefix-x.example/", "urlprefix-:1",
         "v1", "urlprefix-/a allow=1", ""]) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["web", "api", "", "a b"]) | st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_is_routes_or_invalid(document: Any) -> None:
    """Whatever JSON arrives, parsing ends in routes (one per host and path, in match
    order) or InvalidAnswer, never another exception."""
    try:
        parsed = CatalogRoutesQuery().parse(200, json.dumps(document).encode())
    except InvalidAnswer:
        return
    routes: List[ConsulRoute] = list(parsed.routes)
    assert routes == sorted(routes, key=match_order)
    assert len({r.key for r in routes}) == len(routes)
