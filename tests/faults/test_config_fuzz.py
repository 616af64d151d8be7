"""Fuzzing the config loader: whatever a file holds, ``lb.config`` returns a Config or raises
a ConfigError whose every line is ``FILE: path: problem`` — in ``parse``/``load``, in the
real ``lb check`` and ``twistd lb`` processes, and on a SIGHUP-style reload.

The hypothesis tests are derandomized (the same examples on every run, so CI is
reproducible) and keep no example database.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from lb import config as lbconfig
from lb.config import Config, ConfigError
from lb.service import LBService
from lb.testing import make_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: Any) -> str:
    """Where fuzzed files are written; relative paths in them resolve here, not elsewhere."""
    return str(tmp_path_factory.mktemp("fuzz") / "lb.yaml")


def assert_config_or_problems(path: str, attempt: Callable[[], Any]) -> None:
    """``attempt`` gives a Config, or a ConfigError whose lines all read
    ``path: where: problem`` on one printable line — and none says lb has a bug."""
    try:
        result = attempt()
    except ConfigError as e:
        lines = e.lines()
        assert lines, "a ConfigError without problems"
        shape = re.compile(re.escape(path) + r": (\S|\S.*?\S): \S.*")
        for line in lines:
            assert line.isprintable(), line
            assert shape.fullmatch(line), line
            assert not line.startswith(f"{path}: (internal):"), line
    else:
        assert isinstance(result, Config)


# --- (a) documents of mixed types at the top level and at every known key -----------------

BASE: Dict[str, Any] = {
    "consul": {"url": "http://127.0.0.1:8500", "wait": "55s", "poll_interval": "5s"},
    "admin": {"bind": "127.0.0.1:9901"},
    "shutdown_timeout": "30s",
    "listeners": {
        "web": {"bind": "127.0.0.1:8080", "pool": "web", "allow": ["10.0.0.0/8"]},
        "www": {"bind": "127.0.0.1:8081", "mode": "http", "pool": "web",
                "routes": [{"host": "*.example.com", "path_prefix": "/api/",
                            "headers": {"X-Canary": "1"}, "pool": "api", "strip_prefix": True},
                           {"path_prefix": "/", "split": [{"pool": "web", "weight": 90},
                                                          {"pool": "api", "weight": 10}]}],
                "consul_routes": {"tag_prefix": "urlprefix-",
                                  "pool_defaults": {"balance": "leastconn", "outlier": {}}},
                "http": {"max_header_size": "16KiB", "client_header_timeout": "10s",
                         "client_keepalive_timeout": "60s", "response_timeout": "60s",
                         "forwarded": "append", "trusted_proxies": ["10.0.0.0/8"],
                         "request_id": "X-Request-Id"}},
    },
    "pools": {"web": {"peers": ["127.0.0.1:9001", {"address": "127.0.0.1:9002", "weight": 2}],
                      "consul": {"service": "web"},
                      "health": {"interval": "2s", "timeout": "1s", "expect_status": [200]},
                      "balance": "source", "hash_key": "header:X-User", "keepalive": 32,
                      "keepalive_timeout": "60s", "retry_on": ["connect-failure", 502],
                      "outlier": {"consecutive_5xx": 5, "ejection_time": "30s",
                                  "max_ejected": "50%"},
                      "sticky_cookie": {"name": "lb_peer"}},
              "api": {"peers": ["127.0.0.1:9003"]}},
}

POOL_KEYS = ("balance", "hash_balance_factor", "slow_start", "peers", "consul", "health",
             "connect_timeout", "retries", "drain_timeout", "send_proxy", "keepalive",
             "keepalive_timeout", "retry_on", "outlier", "sticky_cookie", "hash_key")
SECTIONS: Dict[Tuple[Any, ...], Tuple[str, ...]] = {
    (): ("consul", "admin", "state_dir", "shutdown_timeout", "listeners", "pools"),
    ("consul",): ("url", "token_file", "datacenter", "consistency", "wait", "poll_interval"),
    ("admin",): ("bind", "token_file"),
    ("listeners",): ("web", "www", "api"),
    ("listeners", "web"): ("bind", "mode", "pool", "accept_proxy", "max_connections",
                           "idle_timeout", "fin_timeout", "allow", "routes"),
    ("listeners", "www"): ("bind", "mode", "pool", "accept_proxy", "routes", "consul_routes",
                           "http"),
    ("listeners", "www", "routes", 0): ("host", "path_prefix", "headers", "pool", "split",
                                        "strip_prefix"),
    ("listeners", "www", "routes", 1): ("host", "path_prefix", "split"),
    ("listeners", "www", "routes", 1, "split", 0): ("pool", "weight"),
    ("listeners", "www", "consul_routes"): ("tag_prefix", "pool_defaults"),
    ("listeners", "www", "consul_routes", "pool_defaults"): POOL_KEYS,
    ("listeners", "www", "http"): ("max_header_size", "client_header_timeout",
                                   "client_keepalive_timeout", "response_timeout", "forwarded",
                                   "trusted_proxies", "request_id"),
    ("pools",): ("web", "api"),
    ("pools", "web"): POOL_KEYS,
    ("pools", "web", "health"): ("type", "path", "host", "expect_status", "interval",
                                 "timeout", "rise", "fall", "concurrency"),
    ("pools", "web", "consul"): ("service", "kv_prefix", "tags", "passing_only"),
    ("pools", "web", "outlier"): ("consecutive_5xx", "ejection_time", "max_ejected"),
    ("pools", "web", "sticky_cookie"): ("name",),
}
KEY_PATHS: List[Tuple[Any, ...]] = sorted(
    {section + (key,) for section, keys in SECTIONS.items() for key in keys}
    | {("pools", "web", "peers", 0), ("pools", "web", "peers", 1),
       ("pools", "web", "peers", 1, "weight"), ("pools", "web", "health", "expect_status", 0),
       ("listeners", "web", "allow", 0), ("listeners", "www", "routes", 0, "headers", "X-Canary"),
       ("listeners", "www", "routes", 2), ("listeners", "www", "http", "trusted_proxies", 0),
       ("pools", "web", "retry_on", 1)}, key=str)
KEY_NAMES = sorted({str(path[-1]) for path in KEY_PATHS})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.dates(),
    st.sampled_from([0, -1, 1, 100, 257, 65536, 10 ** 400, -10 ** 400, 2 ** 63, 1.0e300]),
    st.sampled_from(["2s", "0s", "500ms", "-1s", "9" * 400 + "s", "577h", "1.5", "127.0.0.1:80",
                     "[::1]:80", "localhost:0", "0.0.0.0:9901", "127.0.0.1:9901", "web", "api",
                     "off", "v1", "http", "tcp", "source", "/health", "200-399", "10.0.0.0/8",
                     "a\nb", "\x00", "", " ", "x" * 300, "16KiB", "16k", "*.example.com",
                     "*", "a.example:80", "/api/", "/a?b", "X-Canary", "50%", "0.5", 502,
                     "reset", "header:X-User", "cookie:", "path", "append", "urlprefix-",
                     "consul:web"]),
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.one_of(st.sampled_from(KEY_NAMES), st.text(max_size=8), st.integers(), st.none(),
                  st.booleans()),
        children, max_size=4),
    max_leaves=12)


def harmless(path: Tuple[Any, ...], value: Any) -> Any:
    """A token file is read: keep generated names inside the fuzz folder."""
    if path[-1] == "token_file" and isinstance(value, str):
        return os.path.basename(value) or "missing.token"
    return value


def with_values(changes: List[Tuple[Tuple[Any, ...], Any]]) -> Any:
    doc: Any = copy.deepcopy(BASE)
    for path, value in changes:
        parent = doc
        for key in path[:-1]:
            if isinstance(parent, dict):
                parent = parent.setdefault(key, {})
            elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
                parent = parent[key]
            else:
                break
        else:
            key = path[-1]
            if isinstance(parent, dict) or (isinstance(parent, list) and isinstance(key, int)
                                            and key < len(parent)):
                parent[key] = harmless(path, value)
    return doc


documents = st.one_of(
    values,  # the whole document: a scalar, a list, a mapping of anything
    st.lists(st.tuples(st.sampled_from(KEY_PATHS), values), min_size=1, max_size=4
             ).map(with_values),
)


@FUZZ
@given(doc=documents)
def test_any_document_is_a_config_or_named_problems(config_path: str, doc: Any) -> None:
    """Any value at the top level or at any known key (a wrong type, a huge or non-finite
    number, a control character, a mapping where a list belongs) is a Config or named
    problems, whether checked as data or written as YAML and parsed."""
    assert_config_or_problems(config_path, lambda: lbconfig.check(doc, path=config_path,
                                                                   environ={}))
    text = yaml.safe_dump(doc)
    assert_config_or_problems(config_path, lambda: lbconfig.parse(text, path=config_path,
                                                                  environ={}))


# --- (b) byte-level mutations of valid configs --------------------------------------------

with open(os.path.join(REPO, "etc", "lb.yaml"), "rb") as _f:
    SHIPPED = _f.read()
SAMPLES = [
    SHIPPED,
    b"listeners:\n  web: {bind: '127.0.0.1:1', pool: web, allow: ['10.0.0.0/8']}\n"
    b"pools:\n  web:\n    peers: ['127.0.0.1:2', {address: 'h.example:3', weight: 3}]\n"
    b"    health: {interval: 2s, timeout: 5s, expect_status: [200, '300-399']}\n",
    b"consul: {}\nlisteners:\n  a: {bind: '[::1]:80', pool: p}\n"
    b"pools:\n  p: &p {consul: {service: s, tags: [a]}, balance: source, "
    b"hash_balance_factor: 1.5}\n  q: {<<: *p, retries: 1}\n",
    b"consul: {}\nlisteners:\n  www:\n    bind: '127.0.0.1:80'\n    mode: http\n"
    b"    routes:\n      - {host: '*.example.com', path_prefix: /v1/, pool: a, "
    b"strip_prefix: true}\n      - {headers: {X-Canary: 1}, split: [{pool: a, weight: 9}, "
    b"{pool: b, weight: 1}]}\n    consul_routes: {pool_defaults: {retries: 1}}\n"
    b"    http: {max_header_size: 16KiB, forwarded: off, request_id: null}\n"
    b"pools:\n  a: {keepalive: 0, retry_on: [reset, 502], outlier: {max_ejected: 50%}}\n"
    b"  b: {balance: source, hash_key: 'cookie:sid', sticky_cookie: {name: lb}}\n",
]
ALIAS_BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
              + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9)
                        + "]\n" for i in range(8)))
SNIPPETS = [b"1" + b"0" * 400, b"9" * 5000, b"\xff\xfe", b"\xc3", b"[" * 40, b"]", b"{", b"}",
            b"&a ", b"*a", b"<<: *a\n", b"!!binary ", b"!!int ", b"!!timestamp ", b"!!set ",
            b"\x00", b"\t", b": ", b"- ", b"? ", b"'", b'"', b"\n", b"  ", b"~", b".inf",
            b"2001-13-45", b"&a [*a]", b"---\n", b"%YAML 1.1\n"]
TAILS = [b"", b"\n" + ALIAS_BOMB.encode(), b"\nzz: " + b"[" * 200 + b"]" * 200 + b"\n",
         b"\nzz: &z {x: *z}\n", b"\nzz: " + b"1" + b"0" * 400 + b"\n", b"\n\xff\n"]


@pytest.mark.parametrize("name,text", [("BASE", None)] + [
    (f"SAMPLES[{i}]", sample) for i, sample in enumerate(SAMPLES)])
def test_the_fuzzed_documents_start_valid(config_path: str, name: str, text: Any) -> None:
    """The fuzz starts from valid documents, so that one changed key is near a good config
    (and the checks past the first problem are reached)."""
    if text is None:
        assert isinstance(lbconfig.check(BASE, path=config_path, environ={}), Config)
    else:
        assert isinstance(lbconfig.parse(text.decode(), path=config_path, environ={}), Config)


# Mostly mutations that keep the text UTF-8 (a flip of bit 7 or a random byte would make
# most examples stop at decoding); the snippets and tails bring the non-UTF-8 bytes.
mutations = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 6)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16),
              st.text(min_size=1, max_size=8).map(str.encode) | st.sampled_from(SNIPPETS)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 40)),
    st.tuples(st.just("repeat"), st.integers(0, 1 << 16), st.integers(1, 200)),
), min_size=1, max_size=4)


def mutate(data: bytes, steps: List[Tuple[str, int, Any]], tail: bytes) -> bytes:
    out = bytearray(data)
    for op, at, arg in steps:
        at %= len(out) + 1
        if op == "flip" and at < len(out):
            out[at] ^= 1 << arg
        elif op == "insert":
            out[at:at] = arg
        elif op == "delete":
            del out[at:at + arg]
        elif op == "repeat":
            out[at:at] = out[at:at + arg]
    return bytes(out) + tail


@FUZZ
@given(base=st.sampled_from(SAMPLES), steps=mutations, tail=st.sampled_from(TAILS))
def test_any_mutated_file_is_a_config_or_named_problems(config_path: str, base: bytes,
                                                        steps: List[Tuple[str, int, Any]],
                                                        tail: bytes) -> None:
    """Flipped, inserted, deleted or repeated bytes in a valid file (with non-UTF-8 bytes,
    huge numbers, deep nesting, aliases, an alias bomb) load as a Config or named problems,
    each in bounded time."""
    with open(config_path, "wb") as f:
        f.write(mutate(base, steps, tail))
    started = time.monotonic()
    assert_config_or_problems(config_path, lambda: lbconfig.load(config_path, environ={}))
    assert time.monotonic() - started < 5


@FUZZ
@given(depth=st.integers(3, 200), flow=st.booleans())
def test_nesting_is_read_up_to_the_limit_and_refused_past_it(depth: int, flow: bool) -> None:
    """A value nested ``depth`` levels deep (the top-level mapping is one, the scalar at
    the bottom another) is read up to MAX_DEPTH and refused past it, however written."""
    lists = depth - 2  # levels between the top-level mapping and the scalar
    if flow:
        text = "x: " + "[" * lists + "1" + "]" * lists + "\n"
    else:
        text = "x:\n" + "".join("  " * i + "-\n" for i in range(lists)) + "  " * lists + "1\n"
    with pytest.raises(ConfigError) as info:
        lbconfig.parse(text, path="FILE", environ={})
    refused = [p for p in info.value.problems if "nested deeper than" in p]
    assert bool(refused) == (depth > lbconfig.MAX_DEPTH), (depth, info.value.problems)


# --- the nasty files, as an operator meets them -------------------------------------------

GOOD = b"listeners: {web: {bind: '127.0.0.1:1', pool: web}}\npools: {web: {}}\n"
NASTY: Dict[str, Tuple[bytes, str]] = {
    # name: (file, the problem line after "FILE: ")
    "alias-bomb": (ALIAS_BOMB.encode() + b"listeners: {web: {bind: '127.0.0.1:1', pool: web, "
                   b"allow: *i}}\npools: {web: {}}\n",
                   "line 7, column 4: aliases expand this to more than 1000000 values "
                   "(the limit for a config; an alias bomb?)"),
    "deep-nesting": (b"listeners: " + b"[" * 5000 + b"]" * 5000 + b"\npools: {}\n",
                     "line 1, column 43: nested deeper than 32 levels (the limit for a config)"),
    "non-utf8": (GOOD + b"# caf\xe9\n", "line 3, column 6: not UTF-8 text (byte 0xe9)"),
    "huge-integer": (b"listeners: {web: {bind: '127.0.0.1:1', pool: web}}\n"
                     b"pools: {web: {balance: source, hash_balance_factor: 1" + b"0" * 400
                     + b"}}\n",
                     "pools.web.hash_balance_factor: 100000000000000000...0000000000000000000 "
                     "is too large (a number greater than 1, e.g. 1.25)"),
    "5001-digits": (GOOD + b"shutdown_timeout: 1" + b"0" * 5000 + b"\n",
                    "line 3, column 19: invalid YAML: an integer of more than 4300 digits"),
    "wrong-types": (b"pools: 5\nlisteners: true\n", "pools: expected a mapping, got an integer"),
    "bad-date": (GOOD + b"shutdown_timeout: 2001-13-45\n",
                 "line 3, column 19: invalid YAML: '2001-13-45' is not a valid timestamp "
                 "(month must be in 1..12)"),
}


@pytest.fixture(params=sorted(NASTY))
def nasty(request: Any, tmp_path: Any) -> Iterator[Tuple[str, str]]:
    """One nasty file written to disk: (its path, the problem line lb must print)."""
    data, problem = NASTY[request.param]
    path = tmp_path / f"{request.param}.yaml"
    path.write_bytes(data)
    yield str(path), f"{path}: {problem}"


@pytest.mark.integration
def test_lb_check_names_the_problem_of_a_nasty_file(nasty: Tuple[str, str]) -> None:
    """`lb check -c FILE` on each nasty file exits 1 within seconds, printing the problem as
    `FILE: where: problem` and no traceback."""
    path, expected = nasty
    started = time.monotonic()
    result = subprocess.run([os.path.join(BIN, "lb"), "check", "-c", path],
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert expected in lines, lines
    assert all(line.startswith(f"{path}: ") for line in lines), lines


@pytest.mark.integration
@pytest.mark.parametrize("name", ["alias-bomb", "non-utf8"])
def test_twistd_refuses_a_nasty_file_at_start(tmp_path: Any, name: str) -> None:
    """`twistd -n lb -c FILE` with a nasty file prints the same line as `lb check` and exits
    1 without a traceback."""
    data, problem = NASTY[name]
    path = tmp_path / "lb.yaml"
    path.write_bytes(data)
    result = subprocess.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "lb", "-c",
                             str(path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{path}: {problem}" in result.stderr.splitlines(), result.stderr


def test_reload_with_a_nasty_file_logs_the_problem_and_keeps_the_config(
        tmp_path: Any, nasty: Tuple[str, str]) -> None:
    """A SIGHUP-style reload of a nasty file logs the problem line (no failure, no
    traceback) and the running config, listeners and pools stay as they were."""
    path, expected = nasty
    config = make_config({"web": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"]}}, path=path)
    service = LBService(config, MemoryReactorClock())
    listeners, pools = dict(service.listeners), dict(service.pools)
    with capturedLogs() as events:
        assert service.reload() is False
    assert service.config is config
    assert (service.listeners, service.pools) == (listeners, pools)
    assert not [e for e in events if e.get("log_failure") is not None]
    logged = "\n".join(formatEvent(e) for e in events)
    assert "reload rejected, the running config stays" in logged
    assert expected in logged.splitlines(), logged
