"""Config validation: every error class names its key path, and all are reported at once."""

import os
from typing import Any, Dict, List

import pytest

from lb import config as lbconfig
from lb.config import Address, ConfigError, parse_address, parse_duration


def problems(raw: Any, environ: Dict[str, str] = None, path: str = "/etc/lb/lb.yaml"
             ) -> List[str]:
    with pytest.raises(ConfigError) as info:
        lbconfig.check(raw, path=path, environ=environ or {})
    return info.value.problems


def minimal(**pool: Any) -> Dict[str, Any]:
    return {"listeners": {"web": {"bind": "127.0.0.1:8080", "pool": "web"}},
            "pools": {"web": {"peers": ["127.0.0.1:9001"], **pool}}}


def test_minimal_config_gets_spec_defaults() -> None:
    """A config with only a listener and a peer gets the defaults SPEC documents."""
    cfg = lbconfig.check(minimal(), path="/srv/lb/lb.yaml", environ={})
    listener, pool = cfg.listeners["web"], cfg.pools["web"]
    assert (listener.mode, listener.accept_proxy, listener.max_connections,
            listener.idle_timeout, listener.fin_timeout, listener.allow) == (
                "tcp", False, 10000, 300.0, 30.0, ())
    assert (pool.balance, pool.slow_start, pool.connect_timeout, pool.retries,
            pool.drain_timeout, pool.send_proxy, pool.health, pool.consul) == (
        "roundrobin", 0.0, 2.0, 2, 30.0, "off", None, None)
    assert cfg.admin.bind == Address("127.0.0.1", 9901)
    assert cfg.state_dir == "/srv/lb/var/lb"
    assert cfg.shutdown_timeout == 30.0
    assert cfg.consul is None


def test_shipped_default_config_is_valid(repo_dir: str) -> None:
    """etc/lb.yaml, which the README's run command uses, validates."""
    cfg = lbconfig.load(os.path.join(repo_dir, "etc", "lb.yaml"), environ={})
    assert "web" in cfg.listeners and cfg.pools["web"].consul is not None


@pytest.mark.parametrize("raw,expected", [
    ({**minimal(), "colour": 1}, "colour: unknown key"),
    ({"listeners": {"web": {"bind": "127.0.0.1:1", "pool": "web", "port": 1}},
      "pools": {"web": {}}}, "listeners.web.port: unknown key"),
    (minimal(weight=2), "pools.web.weight: unknown key"),
    (minimal(health={"kind": "http"}), "pools.web.health.kind: unknown key"),
    (minimal(peers=[{"address": "127.0.0.1:1", "wieght": 2}]),
     "pools.web.peers[0].wieght: unknown key"),
])
def test_unknown_keys_are_named(raw: Any, expected: str) -> None:
    """Typos in keys are errors at their full path, not silently ignored."""
    assert any(p.startswith(expected) for p in problems(raw)), problems(raw)


@pytest.mark.parametrize("pool,expected", [
    ({"retries": "two"}, "pools.web.retries: expected an integer"),
    ({"retries": True}, "pools.web.retries: expected an integer"),
    ({"retries": -1}, "pools.web.retries: -1 is out of range"),
    ({"peers": "127.0.0.1:1"}, "pools.web.peers: expected a list"),
    ({"peers": [{"address": "127.0.0.1:1", "weight": 1.5}]},
     "pools.web.peers[0].weight: expected an integer"),
    ({"peers": [{"address": "127.0.0.1:1", "weight": -1}]},
     "pools.web.peers[0].weight: -1 is out of range"),
    ({"balance": "fastest"}, "pools.web.balance: 'fastest' is not one of"),
    ({"send_proxy": "v3"}, "pools.web.send_proxy: 'v3' is not one of"),
    ({"hash_balance_factor": 1.0, "balance": "source"},
     "pools.web.hash_balance_factor: 1.0 must be a number greater than 1"),
    ({"hash_balance_factor": 1.5}, "pools.web.hash_balance_factor: only applies"),
])
def test_wrong_types_and_values_are_named(pool: Dict[str, Any], expected: str) -> None:
    """Wrong types and out-of-range values name the key and what was expected."""
    found = problems(minimal(**pool))
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize("value", ["5 minutes", "-1s", "1d", "10", True, [1]])
def test_bad_durations(value: Any) -> None:
    """Durations need a unit (ms, s, m, h); anything else is an error at the key."""
    found = problems(minimal(connect_timeout=value))
    assert any(p.startswith("pools.web.connect_timeout:") for p in found), found


def test_zero_connect_timeout_is_rejected() -> None:
    """A connect timeout of 0 would fail every connect: rejected."""
    assert "pools.web.connect_timeout: must be greater than 0" in problems(
        minimal(connect_timeout="0s"))


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("2s", 2.0), ("5m", 300.0),
                                          ("1h", 3600.0), ("1.5s", 1.5), (0, 0.0)])
def test_duration_units(text: Any, seconds: float) -> None:
    """The duration spellings SPEC uses parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["localhost", "127.0.0.1", "127.0.0.1:", ":80",
                                  "127.0.0.1:70000", "::1:80", "[::1]80", "[nothost]:80",
                                  "bad host:80", "127.0.0.1:0"])
def test_bad_peer_addresses(text: str) -> None:
    """Peer addresses must be host:port with a port 1-65535 and IPv6 in brackets."""
    found = problems(minimal(peers=[text]))
    assert any(p.startswith("pools.web.peers[0]:") for p in found), found


@pytest.mark.parametrize("text", [
    "a..b:80", ".a:80", "a.:80", f"{'x' * 64}.example:80", f"{'a' * 250}.example:80",
    "-a.example:80", "a-.example:80", "a\u200b.example:80", "b\u00fccher..de:80",
    "xn--zz.example:80",
])
def test_host_names_that_cannot_name_a_host_are_refused(text: str) -> None:
    """An empty label, a label over 63 bytes, a name over 253 bytes or one that is not
    valid IDNA is refused where it enters (here: the config), not when a client needs it."""
    with pytest.raises(ValueError):
        parse_address(text)
    found = problems(minimal(peers=[text]))
    assert any(p.startswith("pools.web.peers[0]:") for p in found), found


def test_international_host_names_are_kept() -> None:
    """A valid IDNA name is accepted and keyed in its ASCII (punycode) form."""
    assert str(parse_address("B\u00fccher.Example:80")) == "xn--bcher-kva.example:80"
    assert str(parse_address(f"{'x' * 63}.example:80")).startswith("x" * 63)
    # the ASCII form is accepted as it is (what a snapshot or Consul gives back)
    assert str(parse_address("xn--bcher-kva.example:80")) == "xn--bcher-kva.example:80"
    assert str(parse_address("XN--BCHER-KVA.example:80")) == "xn--bcher-kva.example:80"
    with pytest.raises(ValueError):
        parse_address("xn--zzzzzzz-.example:80")  # not punycode of anything


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:80", "127.0.0.1:80"), ("[::1]:80", "[::1]:80"),
    ("[0:0:0:0:0:0:0:1]:80", "[::1]:80"), ("Backend.Example:8080", "backend.example:8080"),
])
def test_addresses_are_normalised(text: str, expected: str) -> None:
    """One peer has one key however it is spelled."""
    assert str(parse_address(text)) == expected


def test_listener_bind_must_be_an_ip() -> None:
    """A listener binds an IP address, not a host name."""
    raw = minimal()
    raw["listeners"]["web"]["bind"] = "example.com:80"
    assert any(p.startswith("listeners.web.bind:") for p in problems(raw))


@pytest.mark.parametrize("allow", [["10.0.0.0/33"], ["banana"], "10.0.0.0/8", [None]])
def test_bad_cidrs(allow: Any) -> None:
    """allow must be a list of CIDRs."""
    raw = minimal()
    raw["listeners"]["web"]["allow"] = allow
    assert any(p.startswith("listeners.web.allow:") for p in problems(raw))


def test_cidrs_parse_v4_and_v6() -> None:
    """Valid CIDRs of both families are accepted (host bits allowed, as nginx does)."""
    raw = minimal()
    raw["listeners"]["web"]["allow"] = ["10.0.0.1/8", "::1/128", "192.168.0.0/16"]
    cfg = lbconfig.check(raw, environ={})
    assert [str(n) for n in cfg.listeners["web"].allow] == ["10.0.0.0/8", "::1/128",
                                                             "192.168.0.0/16"]


def test_listener_naming_missing_pool() -> None:
    """A listener pointing at a pool that does not exist is an error listing the pools."""
    raw = minimal()
    raw["listeners"]["web"]["pool"] = "api"
    assert "listeners.web.pool: no pool named 'api' (pools: web)" in problems(raw)


@pytest.mark.parametrize("a,b", [("127.0.0.1:8080", "127.0.0.1:8080"),
                                 ("0.0.0.0:8080", "127.0.0.1:8080"),
                                 ("127.0.0.1:8080", "0.0.0.0:8080"),
                                 ("[::]:8080", "127.0.0.1:8080"),
                                 ("127.0.0.1:9901", "127.0.0.1:1")])
def test_two_listeners_on_one_address(a: str, b: str) -> None:
    """Two listeners (or a listener and the admin server) cannot share an address,
    including a wildcard bind that covers a specific one."""
    raw = {"listeners": {"one": {"bind": a, "pool": "web"}, "two": {"bind": b, "pool": "web"}},
           "pools": {"web": {}}}
    if a.endswith(":9901"):
        raw["listeners"].pop("two")
        raw["admin"] = {"bind": a}
    found = problems(raw)
    assert any("conflicts with" in p for p in found), found


def test_different_ports_do_not_conflict() -> None:
    """Listeners on different ports or distinct addresses are fine."""
    raw = {"listeners": {"one": {"bind": "127.0.0.1:8080", "pool": "web"},
                         "two": {"bind": "127.0.0.2:8080", "pool": "web"},
                         "three": {"bind": "127.0.0.1:8081", "pool": "web"}},
           "pools": {"web": {}}}
    assert len(lbconfig.check(raw, environ={}).listeners) == 3


def test_every_problem_is_reported_at_once() -> None:
    """One pass reports every problem in the file, not just the first."""
    raw = {
        "listeners": {"a": {"bind": "nowhere", "pool": "missing", "idle_timeout": "x"},
                      "b": {"pool": "web"}},
        "pools": {"web": {"peers": ["bad"], "retries": "x", "balance": "nope",
                          "health": {"rise": 0, "interval": "-1s"}}},
        "shutdown_timeout": "soon",
    }
    found = problems(raw)
    for key in ("listeners.a.bind", "listeners.a.pool", "listeners.a.idle_timeout",
                "listeners.b.bind: missing", "pools.web.peers[0]", "pools.web.retries",
                "pools.web.balance", "pools.web.health.rise", "pools.web.health.interval",
                "shutdown_timeout"):
        assert any(p.startswith(key) for p in found), (key, found)


def test_yaml_off_means_off_for_send_proxy() -> None:
    """YAML 1.1 reads `send_proxy: off` as false; it still means off."""
    cfg = lbconfig.parse(
        "listeners: {web: {bind: '127.0.0.1:1', pool: web}}\npools: {web: {send_proxy: off}}\n",
        environ={})
    assert cfg.pools["web"].send_proxy == "off"


def test_invalid_yaml_names_line_and_column() -> None:
    """A YAML syntax error is reported with its position."""
    with pytest.raises(ConfigError) as info:
        lbconfig.parse("listeners: {web: [}\n", path="x.yaml", environ={})
    assert info.value.lines()[0].startswith("x.yaml: line 1, column")


def test_empty_file_and_missing_sections() -> None:
    """An empty file or one without listeners says what is missing."""
    assert problems(None) == ["(top level): the file is empty; expected listeners and pools"]
    assert "listeners: at least one listener is required" in problems({"pools": {}})


def test_relative_paths_and_token_files(tmp_path: Any) -> None:
    """state_dir and token files resolve against the config's folder; tokens are stripped."""
    (tmp_path / "admin.token").write_text("  s3cret\n")
    (tmp_path / "consul.token").write_text("abc-123\n")
    raw = {**minimal(), "state_dir": "state", "admin": {"token_file": "admin.token"},
           "consul": {"token_file": "consul.token"}}
    cfg = lbconfig.check(raw, path=str(tmp_path / "lb.yaml"), environ={})
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.admin.token == "s3cret"
    assert cfg.consul.token == "abc-123"
    assert "abc-123" not in repr(cfg)


def test_unreadable_token_file_is_an_error(tmp_path: Any) -> None:
    """A token file that cannot be read is an error at its key."""
    raw = {**minimal(), "admin": {"token_file": "nope.token"}}
    found = problems(raw, path=str(tmp_path / "lb.yaml"))
    assert any(p.startswith("admin.token_file: cannot read token file") for p in found)


def test_consul_defaults_from_environment() -> None:
    """consul.url and the token default to $CONSUL_HTTP_ADDR / $CONSUL_HTTP_TOKEN."""
    raw = {**minimal(), "consul": {}}
    cfg = lbconfig.check(raw, environ={"CONSUL_HTTP_ADDR": "10.1.2.3:8500",
                                       "CONSUL_HTTP_TOKEN": "tok"})
    assert cfg.consul.url == "http://10.1.2.3:8500" and cfg.consul.token == "tok"
    cfg = lbconfig.check(raw, environ={})
    assert cfg.consul.url == "http://127.0.0.1:8500" and cfg.consul.token is None


@pytest.mark.parametrize("consul,expected", [
    ({"consistency": "eventual"}, "consul.consistency"),
    ({"wait": "11m"}, "consul.wait"),
    ({"url": "ftp://x"}, "consul.url"),
    ({"poll_interval": "0s"}, "consul.poll_interval"),
])
def test_bad_consul_section(consul: Dict[str, Any], expected: str) -> None:
    """Consul settings are validated like the rest (wait is capped at Consul's 10m)."""
    found = problems({**minimal(), "consul": consul})
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize("pool_consul,expected", [
    ({}, "needs exactly one of 'service' or 'kv_prefix'"),
    ({"service": "web", "kv_prefix": "upstreams/web"}, "needs exactly one"),
    ({"kv_prefix": "upstreams/web", "tags": ["a"]}, "'tags' and 'passing_only' only apply"),
    ({"service": "web", "tags": "a"}, "expected a list of tag strings"),
])
def test_bad_pool_consul_section(pool_consul: Dict[str, Any], expected: str) -> None:
    """A pool's consul section names a service or a KV prefix, not both."""
    found = problems({**minimal(consul=pool_consul), "consul": {}})
    assert any(expected in p and p.startswith("pools.web.consul") for p in found), found


def test_pool_consul_needs_top_level_consul() -> None:
    """Discovery without the top-level consul section is reported, not silently off."""
    found = problems(minimal(consul={"service": "web"}))
    assert any("needs the top-level 'consul' section" in p for p in found)


def test_mode_is_tcp_or_http() -> None:
    """mode: http is accepted (tests/test_config_http.py covers its keys); any other mode
    is an error naming both, and does not also report the keys that depend on the mode."""
    raw = minimal()
    raw["listeners"]["web"]["mode"] = "http"
    assert lbconfig.check(raw, environ={}).listeners["web"].mode == "http"
    raw["listeners"]["web"].update(mode="udp", routes=[])
    assert problems(raw) == ["listeners.web.mode: 'udp' is not one of: tcp, http"]


def test_duplicate_static_peer() -> None:
    """The same peer listed twice (however spelled) is an error."""
    found = problems(minimal(peers=["127.0.0.1:9001", {"address": "127.0.0.1:9001"}]))
    assert any(p.startswith("pools.web.peers[1]: 127.0.0.1:9001 is already listed") for p in found)


# --- bad input of every kind: named problems, never a traceback ---------------------------


def parse_problems(text: str, path: str = "x.yaml") -> List[str]:
    with pytest.raises(ConfigError) as info:
        lbconfig.parse(text, path=path, environ={})
    return info.value.problems


def load_problems(tmp_path: Any, data: bytes) -> List[str]:
    config = tmp_path / "lb.yaml"
    config.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        lbconfig.load(str(config), environ={})
    assert all(line.startswith(f"{config}: ") for line in info.value.lines())
    return info.value.problems


@pytest.mark.parametrize("text,expected", [
    ("pools: 5\nlisteners: {}\n", "pools: expected a mapping, got an integer"),
    ("pools: {}\nlisteners: true\n", "listeners: expected a mapping, got a boolean"),
    ("pools: 1.5\nlisteners: {}\n", "pools: expected a mapping, got a number"),
    ("pools: [web]\nlisteners: {}\n", "pools: expected a mapping, got a list"),
    ("pools: {}\nlisteners: abc\n", "listeners: expected a mapping, got a string"),
])
def test_sections_of_the_wrong_type_are_named(text: str, expected: str) -> None:
    """`pools: 5` or `listeners: true` is a problem at that key, not a TypeError."""
    assert expected in parse_problems(text)


def test_a_document_that_is_not_a_mapping_is_named_at_the_top_level() -> None:
    """A list or a scalar as the whole document is reported as `(top level): ...`."""
    assert parse_problems("- 1\n") == ["(top level): expected a mapping, got a list"]
    assert parse_problems("5\n") == ["(top level): expected a mapping, got an integer"]


def test_pool_and_listener_names_must_be_strings() -> None:
    """A name YAML reads as a number, boolean or null is refused at its key, and a listener
    naming that pool is told which pools exist."""
    found = parse_problems("listeners: {web: {bind: '127.0.0.1:1', pool: '1'}, 2: {}}\n"
                           "pools: {1: {}, web: {}, ~: {}}\n")
    assert "pools.1: a name must be a non-empty string, got an integer" in found
    assert "pools.None: a name must be a non-empty string, got nothing" in found
    assert "listeners.2: a name must be a non-empty string, got an integer" in found
    assert "listeners.web.pool: no pool named '1' (pools: web)" in found


def test_huge_integers_are_out_of_range_not_an_overflow() -> None:
    """10**400 where a number is expected is out of range, not an OverflowError, and the
    problem line shows a shortened number."""
    found = problems(minimal(balance="source", hash_balance_factor=10 ** 400))
    assert len(found) == 1 and found[0].startswith("pools.web.hash_balance_factor: "), found
    assert "too large" in found[0] and len(found[0]) < 200, found
    found = problems(minimal(retries=10 ** 400))
    assert len(found) == 1 and found[0].startswith("pools.web.retries: 1000"), found
    assert "is out of range (0-100)" in found[0] and len(found[0]) < 200, found


@pytest.mark.parametrize("value", ["9" * 400 + "s", "577h", "1.0e+400", float("inf"),
                                   float("nan")])
def test_durations_must_be_finite_and_at_most_24_days(value: Any) -> None:
    """A duration too long to mean anything (over 576h, or infinite) is refused: timers
    that long would never fire or would overflow the clock arithmetic."""
    found = problems(minimal(drain_timeout=value))
    assert any(p.startswith("pools.web.drain_timeout: ") and len(p) < 200 for p in found), found
    assert lbconfig.check(minimal(drain_timeout="576h"), environ={}).pools[
        "web"].drain_timeout == 576 * 3600


def test_host_name_bind_on_the_admin_port_does_not_crash() -> None:
    """A listener on a host name (refused) at the admin server's port is reported, not a
    ValueError from the address-overlap check; a host-name admin bind works the same."""
    raw = minimal()
    raw["listeners"]["web"]["bind"] = "example.com:9901"
    assert any(p.startswith("listeners.web.bind: 'example.com' must be an IP address")
               for p in problems(raw))
    raw = {**minimal(), "admin": {"bind": "localhost:8080"}}
    assert lbconfig.check(raw, environ={}).admin.bind == Address("localhost", 8080)


def test_problem_lines_never_span_lines() -> None:
    """A key with a newline or a control character in it is escaped, so every problem is
    one `path: problem` line on stderr and in the log."""
    found = problems({**minimal(), "a\nb\x85c": 1})
    assert found == ["a\\nb\\x85c: unknown key (expected one of: consul, admin, state_dir, "
                     "shutdown_timeout, listeners, pools)"]
    err = ConfigError(["x: two\nlines"], "dir\n/lb.yaml")
    assert err.lines() == ["dir\\n/lb.yaml: x: two\\nlines"]


def test_a_character_yaml_refuses_is_named_with_line_and_column() -> None:
    """A NUL or other control character: one line giving where it is, not PyYAML's
    two-line message."""
    assert parse_problems("a: 1\nb: x\x00y\n") == [
        "line 2, column 5: invalid YAML: unacceptable character #x0000: "
        "special characters are not allowed"]


@pytest.mark.parametrize("text,expected", [
    ("a: 2001-13-45\n", "line 1, column 4: invalid YAML: '2001-13-45' is not a valid "
                        "timestamp (month must be in 1..12)"),
    ("a: !!int abc\n", "line 1, column 4: invalid YAML: 'abc' is not a valid int"),
    ("a: !!float abc\n", "line 1, column 4: invalid YAML: 'abc' is not a valid float"),
    ("a: !!timestamp abc\n", "line 1, column 4: invalid YAML: 'abc' is not a valid "
                             "timestamp"),
    ("a: 1" + "0" * 5000 + "\n", "line 1, column 4: invalid YAML: an integer of more "
                                 "than 4300 digits"),
])
def test_values_yaml_cannot_build_are_named(text: str, expected: str) -> None:
    """A value whose tag's constructor fails (bad date, `!!int abc`, a 5001-digit
    integer) is a problem at its line and column, not a ValueError."""
    found = parse_problems(text)
    assert len(found) == 1 and found[0].startswith(expected), found


@pytest.mark.parametrize("text,where", [
    ("a: " + "[" * 1000 + "]" * 1000 + "\n", "line 1, column 35"),
    ("".join("  " * i + "-\n" for i in range(100)), "line 33, column 65"),
])
def test_deep_nesting_is_refused(text: str, where: str) -> None:
    """Nesting deeper than 32 levels is refused where it goes too deep (no RecursionError)."""
    assert parse_problems(text) == [
        f"{where}: nested deeper than 32 levels (the limit for a config)"]


ALIAS_BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
              + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9)
                        + "]\n" for i in range(8)))


def test_alias_bomb_is_refused() -> None:
    """A 'billion laughs' document (9**9 values once aliases are expanded, a few hundred
    bytes of text) is refused before anything walks it."""
    assert parse_problems(ALIAS_BOMB) == [
        "line 7, column 4: aliases expand this to more than 1000000 values "
        "(the limit for a config; an alias bomb?)"]


def test_aliases_cannot_nest_deeper_than_text_can() -> None:
    """Aliases chained to nest a value past the depth limit are refused like nesting in
    the text."""
    text = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 40))
    assert parse_problems(text) == [
        "line 32, column 6: aliases nest this deeper than 32 levels (the limit for a config)"]


def test_recursive_alias_is_refused() -> None:
    """A collection containing an alias to itself (a cycle) is refused."""
    assert parse_problems("listeners: &l {web: *l}\npools: {}\n") == [
        "line 1, column 12: this collection contains an alias to itself "
        "(recursive aliases are not allowed)"]


def test_plain_aliases_and_merge_keys_still_work() -> None:
    """Anchors, aliases and `<<` merge keys within the bounds mean what YAML says."""
    cfg = lbconfig.parse(
        "listeners: {web: {bind: '127.0.0.1:1', pool: web}, api: {bind: '127.0.0.1:2', "
        "pool: api}}\n"
        "pools:\n  web: &p {retries: 5, balance: leastconn}\n  api: {<<: *p, retries: 1}\n",
        environ={})
    assert (cfg.pools["web"].retries, cfg.pools["api"].retries) == (5, 1)
    assert cfg.pools["api"].balance == "leastconn"


def test_non_utf8_file_is_named_with_line_and_column(tmp_path: Any) -> None:
    """Bytes that are not UTF-8 are a problem at their line and column, not a
    UnicodeDecodeError."""
    assert load_problems(tmp_path, b"pools: {}\nlisteners: \xff\xfe\n") == [
        "line 2, column 12: not UTF-8 text (byte 0xff)"]


def test_file_over_1_mib_is_refused(tmp_path: Any) -> None:
    """A file over 1 MiB is not a config (and would stall a reload while it parsed)."""
    data = b"# " + b"x" * (1 << 20) + b"\n"
    assert load_problems(tmp_path, data) == [
        "(file): larger than 1 MiB (the limit for a config file)"]
    assert parse_problems(data.decode()) == [
        "(file): larger than 1 MiB (the limit for a config file)"]


def test_a_directory_is_not_readable(tmp_path: Any) -> None:
    """`-c` naming a directory says so."""
    with pytest.raises(ConfigError) as info:
        lbconfig.load(str(tmp_path), environ={})
    assert info.value.problems == ["(file): cannot read: Is a directory"]


def test_an_unexpected_error_while_checking_becomes_a_config_error(monkeypatch: Any) -> None:
    """The last line of defence: a bug in the checker still gives a `path: problem` line
    (saying it is a bug), never a traceback."""
    def broken(*args: Any) -> Any:
        raise KeyError("boom")

    monkeypatch.setattr(lbconfig, "_check_admin", broken)
    found = parse_problems("listeners: {}\n")
    assert found == ["(internal): checking failed with KeyError: 'boom' (a bug in lb; "
                     "please report it)"]


@pytest.mark.parametrize("content,expected", [
    (b"x" * 5000, "is larger than 4 KiB"),
    (b"abc\r\nX-Evil: 1\n", "has a control character or more than one line"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_bad_token_files_are_named(tmp_path: Any, content: bytes, expected: str) -> None:
    """A token file that is huge, holds more than one line (header injection) or is not
    UTF-8 is refused at its key."""
    (tmp_path / "admin.token").write_bytes(content)
    raw = {**minimal(), "admin": {"token_file": "admin.token"}}
    found = problems(raw, path=str(tmp_path / "lb.yaml"))
    assert any(p.startswith("admin.token_file: token file") and expected in p
               for p in found), found


def test_a_path_with_a_nul_is_refused() -> None:
    """A NUL in state_dir or a token file's path cannot name a file: refused at its key
    (instead of failing when the state is first written)."""
    found = problems({**minimal(), "state_dir": "var/\x00lb", "admin": {"token_file": "a\x00"}})
    assert "state_dir: expected a path without a NUL character" in found, found
    assert "admin.token_file: expected a path without a NUL character" in found, found


def test_two_documents_say_so_in_one_line() -> None:
    """PyYAML splits this message in a context and a problem; both are kept."""
    assert parse_problems("a: 1\n---\nb: 2\n") == [
        "line 2, column 1: invalid YAML: expected a single document in the stream "
        "but found another document"]


def test_lb_check_prints_a_file_name_that_is_not_utf8(tmp_path: Any, repo_dir: str,
                                                      capsys: Any) -> None:
    """A config whose file name holds bytes that are not UTF-8 (Python sees surrogates) is
    named with them escaped: printing the raw name would raise UnicodeEncodeError."""
    from lb import cli

    config = tmp_path / "lb-\udcff.yaml"
    with open(os.path.join(repo_dir, "etc", "lb.yaml"), "rb") as f:
        config.write_bytes(f.read().replace(b"state_dir: ../var/lb", b"state_dir: var"))
    assert cli.main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")
    assert "lb-\\udcff.yaml: configuration OK" in out
    config.write_text("pools: 5\n")
    assert cli.main(["check", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    err.encode("utf-8")
    assert "lb-\\udcff.yaml: pools: expected a mapping, got an integer" in err


def test_blank_or_padded_keys_are_quoted() -> None:
    """An empty or space-padded key is quoted in its path, so the line keeps its
    `path: problem` shape and the stray space is visible."""
    raw = minimal()
    raw[""] = 1
    raw["listeners"]["web"]["pool "] = "web"
    found = problems(raw)
    assert "'': unknown key" in [p.split(" (")[0] for p in found], found
    assert any(p.startswith("listeners.web.'pool ': unknown key") for p in found), found
