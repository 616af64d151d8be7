"""Validation of ``pools.*.health``: what a good section becomes, and every bad input named
with its key path."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from lb.config import ConfigError, HealthConfig
from lb.testing import make_config


def _check(health: Any) -> Any:
    config = make_config({"web": {"bind": "127.0.0.1:0", "pool": "web"}},
                         {"web": {"peers": ["127.0.0.1:9001"], "health": health}})
    return config.pools["web"].health


def _problems(health: Any) -> List[str]:
    with pytest.raises(ConfigError) as info:
        _check(health)
    return info.value.problems


def test_defaults() -> None:
    """An empty health section turns http checks on with SPEC's defaults; no section means
    no active checks."""
    assert _check({}) == HealthConfig(type="http", path="/health", host=None,
                                      expect_status=((200, 200),), interval=2.0, timeout=1.0,
                                      rise=2, fall=3, concurrency=10)
    assert _check(None) is None


def test_full_section_parsed() -> None:
    """Every key is read: durations to seconds, status codes and ranges to (low, high)."""
    health = _check({"type": "http", "path": "/ready?deep=1", "host": "web.example:8080",
                     "expect_status": [200, "300-399", " 404 "], "interval": "500ms",
                     "timeout": "250ms", "rise": 3, "fall": 5, "concurrency": 4})
    assert health == HealthConfig(type="http", path="/ready?deep=1", host="web.example:8080",
                                  expect_status=((200, 200), (300, 399), (404, 404)),
                                  interval=0.5, timeout=0.25, rise=3, fall=5, concurrency=4)
    assert [code for code in (199, 200, 204, 300, 399, 400, 404, 503)
            if health.status_ok(code)] == [200, 300, 399, 404]


def test_tcp_section() -> None:
    """type: tcp needs no path/host/expect_status."""
    health = _check({"type": "tcp", "interval": "5s", "timeout": "2s"})
    assert (health.type, health.interval, health.timeout) == ("tcp", 5.0, 2.0)


@pytest.mark.parametrize("section,interval,timeout", [
    ({"timeout": "2s"}, 2.0, 2.0),
    ({"timeout": "3s", "interval": "2s"}, 2.0, 3.0),
    ({"interval": "500ms"}, 0.5, 1.0),
    ({"type": "tcp", "interval": "1s", "timeout": "10s"}, 1.0, 10.0),
])
def test_timeout_may_equal_or_exceed_interval(section: Dict[str, Any], interval: float,
                                              timeout: float) -> None:
    """A timeout as long as or longer than the interval is accepted, as HAProxy and Envoy
    accept it: a peer's next probe starts `interval` after its last one ended."""
    health = _check(section)
    assert (health.interval, health.timeout) == (interval, timeout)


BAD: List[Dict[str, Any]] = [
    # (section, expected problem lines)
    {"in": {"rise": 0}, "out": ["pools.web.health.rise: 0 is out of range (1-100)"]},
    {"in": {"fall": 0}, "out": ["pools.web.health.fall: 0 is out of range (1-100)"]},
    {"in": {"rise": -1}, "out": ["pools.web.health.rise: -1 is out of range (1-100)"]},
    {"in": {"rise": True}, "out": ["pools.web.health.rise: expected an integer, got a boolean"]},
    {"in": {"concurrency": 0},
     "out": ["pools.web.health.concurrency: 0 is out of range (1-10000)"]},
    {"in": {"interval": "-1s"}, "out": [
        "pools.web.health.interval: '-1s' is not a duration (use e.g. '500ms', '2s', '5m', "
        "'1h')"]},
    {"in": {"interval": -2}, "out": [
        "pools.web.health.interval: expected a duration like '2s', got -2"]},
    {"in": {"interval": "0s"}, "out": ["pools.web.health.interval: must be greater than 0"]},
    {"in": {"timeout": "-1s", "interval": "5s"}, "out": [
        "pools.web.health.timeout: '-1s' is not a duration (use e.g. '500ms', '2s', '5m', "
        "'1h')"]},
    {"in": {"timeout": 0}, "out": ["pools.web.health.timeout: must be greater than 0"]},
    # one mistake, one line
    {"in": {"interval": "soon", "timeout": "5s"}, "out": [
        "pools.web.health.interval: 'soon' is not a duration (use e.g. '500ms', '2s', '5m', "
        "'1h')"]},
    {"in": {"expect_status": []}, "out": [
        "pools.web.health.expect_status: expected a non-empty list of status codes or "
        "ranges like '200-399'"]},
    {"in": {"expect_status": ""}, "out": [
        "pools.web.health.expect_status: expected a non-empty list of status codes or "
        "ranges like '200-399'"]},
    {"in": {"expect_status": ["2xx"]}, "out": [
        "pools.web.health.expect_status: '2xx' is not a status code or a range like "
        "'200-399'"]},
    {"in": {"expect_status": ["399-200"]}, "out": [
        "pools.web.health.expect_status: '399-200' is not a valid status code range "
        "(100-599, low-high)"]},
    {"in": {"expect_status": [700]}, "out": [
        "pools.web.health.expect_status: 700 is not a valid status code range "
        "(100-599, low-high)"]},
    {"in": {"type": "udp"}, "out": ["pools.web.health.type: 'udp' is not one of: http, tcp"]},
    {"in": {"type": "tcp", "path": "/x", "expect_status": [200]}, "out": [
        "pools.web.health.path: only applies to type: http",
        "pools.web.health.expect_status: only applies to type: http"]},
    {"in": {"path": "health"}, "out": [
        "pools.web.health.path: 'health' is not an absolute request path like '/health'"]},
    {"in": {"path": "/a b"}, "out": [
        "pools.web.health.path: '/a b' is not an absolute request path like '/health'"]},
    {"in": {"path": "/a\x00"}, "out": [
        "pools.web.health.path: '/a\\x00' is not an absolute request path like '/health'"]},
    # header injection through the Host value
    {"in": {"host": "a\r\nX-Evil: 1"}, "out": [
        "pools.web.health.host: 'a\\r\\nX-Evil: 1' is not a Host header value like "
        "'www.example.com'"]},
    {"in": {"host": ""}, "out": [
        "pools.web.health.host: expected a non-empty string, got a string"]},
    {"in": {"intervall": "2s"}, "out": [
        "pools.web.health.intervall: unknown key (expected one of: type, path, host, "
        "expect_status, interval, timeout, rise, fall, concurrency)"]},
    {"in": "yes", "out": ["pools.web.health: expected a mapping, got a string"]},
]


@pytest.mark.parametrize("case", BAD, ids=[str(c["in"]) for c in BAD])
def test_bad_input_rejected(case: Dict[str, Any]) -> None:
    """Each bad section is rejected with exactly these `path: problem` lines."""
    assert _problems(case["in"]) == case["out"]


def test_every_problem_reported_at_once() -> None:
    """Several mistakes in one section are all reported, so one pass fixes the file."""
    problems = _problems({"rise": 0, "fall": 0, "expect_status": [], "concurrency": -1})
    assert [p.split(":")[0] for p in problems] == [
        "pools.web.health.expect_status", "pools.web.health.rise", "pools.web.health.fall",
        "pools.web.health.concurrency"]
