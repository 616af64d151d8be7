"""Peers from a Consul KV folder, in nginx-upsync-module's layout (for users migrating).

One key per peer under the pool's prefix: ``<prefix>/<host>:<port>``, with an optional JSON
value ``{"weight": 1, "max_fails": 2, "fail_timeout": 10, "down": 0, "backup": 0}``
(numbers or numeric strings; an empty value means all defaults)::

    consul kv put upstreams/web/10.0.0.7:80 '{"weight": 2}'
    consul kv put upstreams/web/10.0.0.8:80 '{"down": 1}'   # drain
    consul kv delete upstreams/web/10.0.0.7:80              # drain, then removed

The watch blocks on ``GET /v1/kv/<prefix>/?recurse``. The trailing slash matters: Consul
matches KV prefixes as plain strings, so ``upstreams/web`` would also return
``upstreams/web2/...``; keys outside ``<prefix>/`` are ignored as a second guard. A 404 is
Consul's answer for an empty folder: the pool's KV peers go away. Keys of which none is a
usable ``host:port`` are a broken answer, not an empty one: the pool keeps its last set.

Mapping: ``weight`` → the peer's weight (clamped to 0..256), ``down: 1`` → ``drain``,
``backup: 1`` → ``drain`` too (lb has no backup tier; the peer stays visible but takes no
new connections). ``max_fails``/``fail_timeout`` are nginx's passive checks; lb's own
(``pools.*.health`` rise/fall, and failed connects) play that part, so they are ignored.
Besides upsync's literal IPv4 keys, ``[v6]:port`` and ``hostname:port`` keys work.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

from lb.config import MAX_WEIGHT, ConsulConfig, parse_address
from lb.discovery.consul.api import (
    ConsulHTTPError,
    InvalidAnswer,
    Parsed,
    decode_json,
    merge_specs,
    nothing_usable,
)
from lb.peer import DRAIN, READY, PeerSpec

DEFAULT_WEIGHT = 1


def _number(value: Any, what: str) -> int:
    """upsync accepts numbers and numeric strings."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"{what} {value!r} is not a whole number")


def decode_value(value: Any) -> Dict[str, Any]:
    """A KV entry's ``Value`` (base64, or null for an empty value) as upsync's options."""
    if value is None:
        return {}
    if not isinstance(value, str):
        raise ValueError("Value is not base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Value is not valid base64") from None
    text = raw.decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError:
        raise ValueError(f"value {text[:60]!r} is not JSON like "
                         '{"weight": 1, "down": 0}') from None
    if not isinstance(options, dict):
        raise ValueError(f"value {text[:60]!r} is not a JSON object")
    return options


def spec_from_entry(name: str, value: Any) -> PeerSpec:
    """One peer from a key's last segment (``host:port``) and its value."""
    address = parse_address(name)
    options = decode_value(value)
    weight = _number(options.get("weight", DEFAULT_WEIGHT), "weight")
    if weight < 0:
        raise ValueError(f"weight {weight} is negative")
    down = _number(options.get("down", 0), "down")
    backup = _number(options.get("backup", 0), "backup")
    state = DRAIN if down or backup else READY
    return PeerSpec(address, min(weight, MAX_WEIGHT), state)


def parse_kv_upstreams(entries: Any, prefix: str) -> Parsed:
    """Peers from a ``GET /v1/kv/<prefix>/?recurse`` body (already decoded from JSON)."""
    if not isinstance(entries, list):
        raise InvalidAnswer(f"expected a JSON list of keys, got {type(entries).__name__}")
    folder = prefix.strip("/") + "/"
    specs: List[PeerSpec] = []
    skipped: List[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Key"), str):
            raise InvalidAnswer(f"entry #{i} has no Key")
        key = entry["Key"]
        if not key.startswith(folder):
            continue  # not ours (Consul matches prefixes as strings): upstreams/web2/...
        name = key[len(folder):]
        if not name or name.endswith("/"):
            continue  # the folder itself, or a sub-folder created by the UI
        if "/" in name:
            skipped.append(f"key {key!r}: nested below the prefix")
            continue
        try:
            specs.append(spec_from_entry(name, entry.get("Value")))
        except ValueError as e:
            skipped.append(f"key {key!r}: {e}")
    if skipped and not specs:
        raise nothing_usable(skipped, "key")
    return Parsed(merge_specs(specs), skipped)


class KVQuery:
    """``consul: {kv_prefix: upstreams/web}``: the keys directly under a KV folder."""

    service: Optional[str] = None

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.strip("/")
        self.kv_prefix: Optional[str] = self.prefix
        self.describe = f"KV prefix {self.prefix!r}"
        self.path = "/v1/kv/" + quote(self.prefix, safe="/") + "/"
        self.params: List[Tuple[str, str]] = [("recurse", "")]

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        """The folder and the datacenter: what a snapshot must match."""
        return {"kv_prefix": self.prefix, "datacenter": settings.datacenter}

    def parse(self, status: int, body: bytes) -> Parsed:
        """200: the keys as peers; 404: no keys; any other status is an error."""
        if status == 404:
            return Parsed([])  # Consul's answer for a folder with no keys
        if status != 200:
            raise ConsulHTTPError(status, body)
        return parse_kv_upstreams(decode_json(body), self.prefix)


__all__ = ["KVQuery", "decode_value", "parse_kv_upstreams", "spec_from_entry"]
