"""Validation of the balancing keys (``pools.*.balance``, ``hash_balance_factor``,
peer ``weight``, ``slow_start``): bad values are errors carrying their key path."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from lb.config import BALANCE_ALGORITHMS, ConfigError, parse
from lb.testing import make_config

LISTENERS = {"l": {"bind": "127.0.0.1:0", "pool": "web"}}


def problems(pool: Dict[str, Any]) -> List[str]:
    with pytest.raises(ConfigError) as info:
        make_config(LISTENERS, {"web": pool})
    return info.value.problems


@pytest.mark.parametrize("name", BALANCE_ALGORITHMS)
def test_every_algorithm_name_is_accepted_and_kept(name: str) -> None:
    """Each documented algorithm validates and reaches the pool config."""
    config = make_config(LISTENERS, {"web": {"balance": name, "peers": ["127.0.0.1:1"]}})
    assert config.pools["web"].balance == name


def test_default_is_roundrobin_without_bound_or_slow_start() -> None:
    """Without the keys: roundrobin, no bounded load, no slow start."""
    pool = make_config(LISTENERS, {"web": {"peers": ["127.0.0.1:1"]}}).pools["web"]
    assert (pool.balance, pool.hash_balance_factor, pool.slow_start) == (
        "roundrobin", None, 0.0)


@pytest.mark.parametrize("value", ["leastconns", "RoundRobin", "least_conn", "", 1, True])
def test_unknown_algorithm_is_an_error_with_its_path(value: Any) -> None:
    """A misspelt or wrong-typed algorithm is reported at pools.web.balance."""
    found = problems({"balance": value, "peers": ["127.0.0.1:1"]})
    assert len(found) == 1 and found[0].startswith("pools.web.balance: ")
    assert "roundrobin, leastconn, random, p2c, source" in found[0]


@pytest.mark.parametrize("weight,message", [
    (-1, "-1 is out of range (0-256)"),
    (257, "257 is out of range (0-256)"),
    (1.5, "expected an integer, got a number"),
    ("2", "expected an integer, got a string"),
    (True, "expected an integer, got a boolean"),
])
def test_bad_weights_are_errors_with_their_path(weight: Any, message: str) -> None:
    """Negative, too large, fractional, quoted or boolean weights are refused at
    pools.web.peers[i].weight."""
    found = problems({"peers": ["127.0.0.1:1", {"address": "127.0.0.1:2", "weight": weight}]})
    assert found == [f"pools.web.peers[1].weight: {message}"]


def test_weight_zero_is_valid() -> None:
    """Weight 0 is allowed: the peer is known but takes no new connections."""
    pool = make_config(LISTENERS, {"web": {"peers": [
        {"address": "127.0.0.1:1", "weight": 0}, {"address": "127.0.0.1:2", "weight": 256}]}}
    ).pools["web"]
    assert [p.weight for p in pool.peers] == [0, 256]


@pytest.mark.parametrize("factor", [1, 1.0, 0.5, 0, -2, "1.5", True, [1.5]])
def test_hash_balance_factor_must_be_a_number_above_one(factor: Any) -> None:
    """hash_balance_factor ≤ 1 (or not a number) is an error at its path."""
    found = problems({"balance": "source", "hash_balance_factor": factor,
                      "peers": ["127.0.0.1:1"]})
    assert len(found) == 1
    assert found[0].startswith("pools.web.hash_balance_factor: ")
    assert "greater than 1" in found[0]


@pytest.mark.parametrize("factor", [1.01, 1.25, 2, 10])
def test_valid_hash_balance_factor(factor: Any) -> None:
    """Factors above 1 are kept as floats."""
    pool = make_config(LISTENERS, {"web": {"balance": "source", "hash_balance_factor": factor,
                                           "peers": ["127.0.0.1:1"]}}).pools["web"]
    assert pool.hash_balance_factor == float(factor)


@pytest.mark.parametrize("balance", ["roundrobin", "leastconn", "random", "p2c"])
def test_hash_balance_factor_only_applies_to_source(balance: str) -> None:
    """A bound on a non-hashing algorithm is a mistake worth reporting."""
    found = problems({"balance": balance, "hash_balance_factor": 1.5,
                      "peers": ["127.0.0.1:1"]})
    assert found == ["pools.web.hash_balance_factor: only applies to balance: source"]


@pytest.mark.parametrize("text", [".nan", ".inf"])
def test_non_finite_hash_balance_factor_is_an_error(text: str) -> None:
    """YAML's .nan and .inf are not usable factors and should be refused."""
    with pytest.raises(ConfigError) as info:
        parse("listeners: {l: {bind: '127.0.0.1:0', pool: web}}\n"
              f"pools: {{web: {{balance: source, hash_balance_factor: {text}, "
              "peers: ['127.0.0.1:1']}}\n")
    assert info.value.problems[0].startswith("pools.web.hash_balance_factor: ")


@pytest.mark.parametrize("value", ["-1s", "30", 30, "soon"])
def test_bad_slow_start_is_an_error_with_its_path(value: Any) -> None:
    """slow_start takes a duration string; anything else is reported at its path."""
    found = problems({"slow_start": value, "peers": ["127.0.0.1:1"]})
    assert len(found) == 1 and found[0].startswith("pools.web.slow_start: ")


def test_all_problems_are_reported_together() -> None:
    """One pass reports every balancing mistake in the file, like haproxy -c."""
    found = problems({"balance": "fastest", "hash_balance_factor": 0.9,
                      "peers": [{"address": "127.0.0.1:1", "weight": -3},
                                {"address": "127.0.0.1:2", "weight": 2.5}]})
    assert [p.split(":")[0] for p in found] == [
        "pools.web.balance", "pools.web.hash_balance_factor", "pools.web.peers[0].weight",
        "pools.web.peers[1].weight"]
