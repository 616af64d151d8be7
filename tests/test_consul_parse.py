"""Mapping Consul answers to peers, from answers recorded from a real Consul 1.8.7 agent
(tests/fixtures/consul, written by scripts/record-consul-fixtures)."""

import base64
import json
import os
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from lb.config import Address, ConsulConfig, PoolConsulConfig, parse_address
from lb.discovery import consul
from lb.discovery.consul.api import ConsulClient, ConsulHTTPError, InvalidAnswer, parse_index
from lb.discovery.consul.health import ServiceQuery, parse_health_service, peer_address
from lb.discovery.consul.kv import KVQuery, decode_value, parse_kv_upstreams
from lb.peer import DRAIN, READY, PeerSpec

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "consul")


def recorded(name: str) -> Dict[str, Any]:
    """One recorded answer: request, status, headers and the body as Consul sent it."""
    with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def body(name: str) -> Any:
    """A recorded answer's body, decoded (a fresh copy each time, so tests may edit it)."""
    return json.loads(recorded(name)["body"])


def headers(name: str) -> Headers:
    return Headers({k.encode(): [v.encode()] for k, v in recorded(name)["headers"].items()})


def spec(address: str, weight: int = 1, state: str = READY) -> PeerSpec:
    return PeerSpec(parse_address(address), weight, state)


def with_status(entries: List[Dict[str, Any]], check_id: str,
                status: str) -> List[Dict[str, Any]]:
    for check in entries[0]["Checks"]:
        if check["CheckID"] == check_id:
            check["Status"] = status
            return entries
    raise AssertionError(f"no check {check_id}")


# --- health/service --------------------------------------------------------------------------


def test_empty_service_address_falls_back_to_node_address() -> None:
    """Service.Address "" (registered without an address) means the instance listens on
    Node.Address."""
    entries = body("health-node-address")
    assert entries[0]["Service"]["Address"] == ""
    parsed = parse_health_service(entries)
    assert parsed.specs == [spec("127.0.0.1:27017")]
    assert parsed.skipped == []


def test_service_address_and_port_used_for_each_instance() -> None:
    """Two instances on one node are two peers on their own ports."""
    parsed = parse_health_service(body("health-two-instances"))
    assert parsed.specs == [spec("127.0.0.1:20395"), spec("127.0.0.1:39677")]


def test_passing_weight_from_service_weights() -> None:
    """A passing instance's weight is Weights.Passing (10 here), at its Service.Address."""
    assert parse_health_service(body("health-passing-weights")).specs == [
        spec("10.1.10.12:8000", 10)]


def test_missing_weights_default_to_one() -> None:
    """Weights are optional in older payloads: an instance without them weighs 1."""
    entries = body("health-passing-weights")
    del entries[0]["Service"]["Weights"]
    assert parse_health_service(entries).specs == [spec("10.1.10.12:8000", 1)]


def test_weights_clamped_to_max_weight() -> None:
    """A Consul weight above lb's maximum (256) is clamped, not rejected."""
    entries = body("health-passing-weights")
    entries[0]["Service"]["Weights"]["Passing"] = 1000
    assert parse_health_service(entries).specs == [spec("10.1.10.12:8000", 256)]


def test_warning_instance_excluded_when_passing_only() -> None:
    """passing_only keeps only instances whose checks all pass (Consul's ?passing rule)."""
    assert parse_health_service(body("health-warning"), passing_only=True).specs == []


def test_warning_instance_uses_warning_weight_without_passing_only() -> None:
    """Without passing_only a warning instance stays, weighted by Weights.Warning (1, not
    the passing 10), as Consul's DNS interface does."""
    assert parse_health_service(body("health-warning"), passing_only=False).specs == [
        spec("10.1.10.12:8000", 1)]


def test_critical_instance_excluded_even_without_passing_only() -> None:
    """A critical instance never becomes a peer: its own check critical, or its node's
    serfHealth."""
    assert parse_health_service(body("health-critical"), passing_only=False).specs == []
    entries = with_status(body("health-passing-weights"), "serfHealth", "critical")
    assert parse_health_service(entries, passing_only=False).specs == []


def test_unknown_check_status_counts_as_critical() -> None:
    """A status Consul might add later is not mistaken for passing."""
    entries = with_status(body("health-passing-weights"), "service:redis", "maintenance-ish")
    assert parse_health_service(entries, passing_only=False).specs == []


def test_service_maintenance_becomes_drain() -> None:
    """A critical _service_maintenance:<id> check (consul maint -enable -service) keeps the
    instance as a drain peer instead of removing it, even with passing_only."""
    entries = body("health-service-maintenance")
    assert "_service_maintenance:redis" in [c["CheckID"] for c in entries[0]["Checks"]]
    assert parse_health_service(entries, passing_only=True).specs == [
        spec("10.1.10.12:8000", 10, DRAIN)]


def test_node_maintenance_becomes_drain() -> None:
    """_node_maintenance (consul maint -enable on the node) drains every instance there."""
    specs = parse_health_service(body("health-node-maintenance")).specs
    assert [s.state for s in specs] == [DRAIN, DRAIN]


def test_maintenance_with_failing_service_check_still_drains() -> None:
    """Maintenance wins over the other checks: the peer stays listed as drain."""
    entries = with_status(body("health-service-maintenance"), "service:redis", "critical")
    assert parse_health_service(entries).specs[0].state == DRAIN


def test_unusable_instances_are_skipped_with_a_reason() -> None:
    """An instance without any address or with port 0 is reported and left out; the rest
    of the answer still counts."""
    entries = body("health-two-instances")
    entries[0]["Service"]["Address"] = ""
    entries[0]["Node"]["Address"] = ""
    entries[1]["Service"]["Port"] = 0
    parsed = parse_health_service(entries + body("health-node-address"))
    assert parsed.specs == [spec("127.0.0.1:27017")]
    assert len(parsed.skipped) == 2
    assert "no address" in parsed.skipped[0] and "port 0" in parsed.skipped[1]


def test_duplicate_addresses_merge_preferring_ready() -> None:
    """Two instances on one address make one peer; a ready one wins over a drained one."""
    entries = body("health-service-maintenance") + body("health-passing-weights")
    assert parse_health_service(entries).specs == [spec("10.1.10.12:8000", 10)]


def test_ipv6_and_hostname_addresses() -> None:
    """IPv6 addresses are normalised (one peer, one key); host names are kept."""
    entries = body("health-passing-weights") + body("health-passing-weights")
    entries[0]["Service"]["Address"] = "2001:DB8:0:0::1"
    entries[1]["Service"]["Address"] = "Redis-1.Example.com"
    specs = parse_health_service(entries).specs
    assert sorted(str(s.address) for s in specs) == ["[2001:db8::1]:8000",
                                                    "redis-1.example.com:8000"]


@pytest.mark.parametrize("entries", [{}, "[]", [1], [{"Node": {}}], [{"Service": {},
                                                                     "Checks": {}}]])
def test_garbage_is_invalid_not_empty(entries: Any) -> None:
    """A body that is not a list of instances is rejected (the pool keeps its last set)
    rather than read as "no instances"."""
    with pytest.raises(InvalidAnswer):
        parse_health_service(entries)


def test_empty_list_is_an_empty_set() -> None:
    """Consul's answer for an unknown service ([] with 200) is a valid empty set."""
    assert recorded("health-unknown-service")["status"] == 200
    assert parse_health_service(body("health-unknown-service")).specs == []


def test_tags_are_filtered_by_consul() -> None:
    """lb sends one tag= per configured tag and Consul returns only instances carrying all
    of them (so lb does not filter tags itself)."""
    assert recorded("health-tag-filter")["request"]["query"] == "tag=v1&tag=blue"
    assert len(body("health-all-tags")) == 2
    assert parse_health_service(body("health-tag-filter")).specs == [spec("10.0.0.1:8080")]


def test_peer_address_validation() -> None:
    """Ports outside 1-65535 and non-strings are refused with a reason."""
    assert peer_address("10.0.0.1", 80) == Address("10.0.0.1", 80)
    assert peer_address("[::1]", 80) == Address("::1", 80)
    for host, port in (("10.0.0.1", 0), ("10.0.0.1", 70000), ("10.0.0.1", "80"),
                       (None, 80), ("bad host", 80), ("10.0.0.1", True)):
        with pytest.raises(ValueError):
            peer_address(host, port)


# --- headers and queries ---------------------------------------------------------------------


def test_index_header_is_read_case_insensitively() -> None:
    """X-Consul-Index is found however the server spells the header name."""
    for name in (b"X-Consul-Index", b"x-consul-index", b"X-CONSUL-INDEX"):
        assert parse_index(Headers({name: [b"5100254"]})) == 5100254


@pytest.mark.parametrize("value", [None, b"", b"abc", b"-3", b"1.5"])
def test_missing_or_bad_index_is_none(value: Any) -> None:
    """Without a usable index the watch cannot block (and falls back to polling)."""
    hdrs = Headers({b"X-Consul-Index": [value]} if value is not None else {})
    assert parse_index(hdrs) is None


def test_wait_running_out_returns_the_index_sent() -> None:
    """When a blocking query's wait runs out, Consul answers 200 with the very index it
    was sent: the watch's "nothing changed" rule relies on this."""
    answer = recorded("health-blocking-wait-ran-out")
    sent = dict(p.split("=") for p in answer["request"]["query"].split("&"))["index"]
    assert answer["status"] == 200
    assert parse_index(headers("health-blocking-wait-ran-out")) == int(sent)
    assert body("health-blocking-wait-ran-out") == body("health-passing-weights")


def test_wait_is_sent_with_a_unit() -> None:
    """Consul refuses a wait without a unit (400 "Invalid wait time"); lb sends whole
    milliseconds."""
    refused = recorded("health-bad-wait")
    assert refused["status"] == 400 and refused["body"].strip() == "Invalid wait time"
    client = ConsulClient(None, ConsulConfig)
    assert client.request_params([], 7, ConsulConfig(wait=2.5)) == [
        ("index", "7"), ("wait", "2500ms")]


def test_service_query_shape() -> None:
    """One tag= per configured tag, the service name percent-encoded into the path."""
    query = ServiceQuery(PoolConsulConfig(service="my web", tags=("a", "b")))
    assert query.path == "/v1/health/service/my%20web"
    assert query.params == [("tag", "a"), ("tag", "b")]


def test_service_query_rejects_non_200() -> None:
    """Only 200 is a service answer; 404 from a misrouted URL is an error, not empty."""
    query = ServiceQuery(PoolConsulConfig(service="web"))
    for status in (403, 404, 500):
        with pytest.raises(ConsulHTTPError):
            query.parse(status, b"Permission denied")


def test_http_error_hints_at_the_token_on_403() -> None:
    """A 403 says to check the ACL token (without showing it) and quotes Consul's text."""
    error = ConsulHTTPError(403, b"ACL not found")
    assert "ACL token" in str(error) and "ACL not found" in str(error)


# --- KV (nginx-upsync layout) ----------------------------------------------------------------


def test_upsync_layout_maps_weight_and_down() -> None:
    """The upsync listing: weight from the JSON value, down: 1 → drain, a null value →
    defaults (weight 1, ready); max_fails/fail_timeout are ignored."""
    parsed = parse_kv_upstreams(body("kv-upsync"), "upstreams/test")
    assert parsed.specs == [spec("10.0.0.7:80", 2, DRAIN), spec("127.0.0.1:8088", 10),
                            spec("127.0.0.1:8089", 1), spec("127.0.0.1:8090", 1)]
    assert parsed.skipped == []


def test_prefix_does_not_match_a_longer_sibling() -> None:
    """upstreams/web must not pick up upstreams/web2/... (Consul matches prefixes as
    strings, as the recording without the trailing slash shows) nor the folder key."""
    sibling = body("kv-prefix-without-slash")
    assert "upstreams/test2/10.0.0.9:80" in [e["Key"] for e in sibling]
    assert "10.0.0.9:80" not in [str(s.address) for s in
                                  parse_kv_upstreams(sibling, "upstreams/test").specs]
    entries = [{"Key": "upstreams/web/", "Value": None},
               {"Key": "upstreams/web/10.0.0.1:80", "Value": None},
               {"Key": "upstreams/web2/10.0.0.2:80", "Value": None},
               {"Key": "upstreams/webby", "Value": None}]
    assert parse_kv_upstreams(entries, "upstreams/web").specs == [spec("10.0.0.1:80")]
    assert parse_kv_upstreams(entries, "/upstreams/web/").specs == [spec("10.0.0.1:80")]


def encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_upsync_values_accept_numeric_strings_and_backup() -> None:
    """upsync accepts "10" for 10; backup: 1 has no lb equivalent and becomes drain."""
    entries = [{"Key": "u/10.0.0.1:80", "Value": encode('{"weight": "10", "down": "0"}')},
               {"Key": "u/10.0.0.2:80", "Value": encode('{"backup": 1}')},
               {"Key": "u/10.0.0.3:80", "Value": encode('{"weight": 999}')}]
    assert parse_kv_upstreams(entries, "u").specs == [
        spec("10.0.0.1:80", 10), spec("10.0.0.2:80", 1, DRAIN), spec("10.0.0.3:80", 256)]


def test_bad_kv_entries_are_skipped_with_reasons() -> None:
    """A key that is not host:port, a value that is not JSON or base64, a nested key and a
    negative weight are each reported and left out."""
    entries = [{"Key": "u/not-an-address", "Value": None},
               {"Key": "u/10.0.0.1:80", "Value": encode("weight=2")},
               {"Key": "u/10.0.0.2:80", "Value": "%%%"},
               {"Key": "u/sub/10.0.0.3:80", "Value": None},
               {"Key": "u/10.0.0.4:80", "Value": encode('{"weight": -1}')},
               {"Key": "u/10.0.0.5:80", "Value": encode("  ")}]
    parsed = parse_kv_upstreams(entries, "u")
    assert parsed.specs == [spec("10.0.0.5:80")]
    assert len(parsed.skipped) == 5


def test_kv_garbage_is_invalid() -> None:
    """A KV answer that is not a list of {Key: ...} objects keeps the last set."""
    for entries in ({"Key": "u/1.2.3.4:80"}, [{"Value": None}], ["u/1.2.3.4:80"]):
        with pytest.raises(InvalidAnswer):
            parse_kv_upstreams(entries, "u")


def test_kv_query_blocks_on_the_folder_and_reads_404_as_empty() -> None:
    """The request path ends in '/' with ?recurse; a 404 (empty folder, recorded with an
    index to block on) is an empty set; other statuses are errors."""
    query = KVQuery("upstreams/web")
    assert query.path == "/v1/kv/upstreams/web/"
    assert query.params == [("recurse", "")]
    empty = recorded("kv-empty-folder")
    assert empty["status"] == 404 and parse_index(headers("kv-empty-folder")) >= 1
    assert query.parse(404, empty["body"].encode()).specs == []
    with pytest.raises(ConsulHTTPError):
        query.parse(500, b"No cluster leader")


def test_kv_canonical_upsync_value() -> None:
    """upsync's canonical value (weight, max_fails, fail_timeout, down) decodes to its
    options."""
    entry = next(e for e in body("kv-upsync") if e["Key"].endswith("127.0.0.1:8090"))
    assert decode_value(entry["Value"]) == {"weight": 1, "max_fails": 2, "fail_timeout": 10,
                                            "down": 0}


def test_make_query_picks_kv_or_service() -> None:
    """kv_prefix pools watch the KV folder; service pools watch health/service."""
    assert isinstance(consul.make_query(PoolConsulConfig(kv_prefix="u/w")), KVQuery)
    assert isinstance(consul.make_query(PoolConsulConfig(service="w")), ServiceQuery)


# --- answers of which nothing is usable ------------------------------------------------------


def test_all_unusable_instances_are_invalid_not_empty() -> None:
    """Consul accepts registrations lb cannot use (an empty label, a 64-byte label, invalid
    IDNA, port 0); an answer listing only such instances is invalid (the pool keeps its
    last set) instead of an empty set, and says why."""
    with pytest.raises(InvalidAnswer) as caught:
        parse_health_service(body("health-all-unusable"))
    text = str(caught.value)
    assert "none of the 4 instance(s) is usable" in text
    assert "instance bad-1" in text and "empty label" in text


def test_unhealthy_instances_with_bad_addresses_are_still_an_empty_set() -> None:
    """Instances left out for their health are not "unusable": when every listed instance
    is critical the answer is a valid empty set, whatever their addresses."""
    entries = body("health-all-unusable")
    for entry in entries:
        with_status([entry], "service:" + entry["Service"]["ID"], "critical")
    assert parse_health_service(entries).specs == []


def test_one_usable_instance_among_unusable_ones_is_applied() -> None:
    """As long as one instance maps to a peer, the answer is used and the others skipped."""
    parsed = parse_health_service(body("health-all-unusable") + body("health-node-address"))
    assert parsed.specs == [spec("127.0.0.1:27017")]
    assert len(parsed.skipped) == 4


def test_all_unusable_kv_keys_are_invalid_not_empty() -> None:
    """A KV folder whose keys are all unusable is invalid; only a 404 (no keys) empties."""
    with pytest.raises(InvalidAnswer) as caught:
        KVQuery("upstreams/broken").parse(200, recorded("kv-all-unusable")["body"].encode())
    assert "none of the 3 key(s) is usable" in str(caught.value)


# --- any body at all -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=False)
    | st.sampled_from(["", "10.0.0.1", "passing", "critical", "bad..host", "u/10.0.0.1:80",
                       "_node_maintenance", "eyJ3ZWlnaHQiOiAyfQ=="]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["Service", "Node", "Checks", "Address", "Port", "Weights", "Passing",
                         "Status", "CheckID", "ID", "Key", "Value"]), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_any_json_is_peers_or_invalid(document: Any) -> None:
    """Whatever JSON Consul (or something in its place) sends, parsing ends in a set of
    peers or InvalidAnswer, never another exception; and a set is never empty because its
    entries were unusable."""
    raw = json.dumps(document).encode()
    for query in (ServiceQuery(PoolConsulConfig(service="web", passing_only=False)),
                  KVQuery("u")):
        try:
            parsed = query.parse(200, raw)
        except InvalidAnswer:
            continue
        assert parsed.specs or not parsed.skipped
