"""Peers from ``/v1/health/service/<name>`` answers (pure: no I/O, no Twisted).

Instances map to peers as Consul's own DNS interface does: address ``Service.Address`` (or
``Node.Address`` when empty), port ``Service.Port``, weight ``Service.Weights.Passing``
(``Weights.Warning`` for an instance whose worst check is ``warning``); critical instances
are left out, warning ones too with ``passing_only``. An instance in maintenance mode
(``_service_maintenance:<id>`` or ``_node_maintenance``) stays listed as ``drain``, so
``consul maint -enable`` lets its connections finish while no new ones arrive. Consul's
server-side ``?passing`` filter would hide maintenance instances entirely, so the watch
reads every instance and applies the same filter itself.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from lb.config import MAX_WEIGHT, Address, ConsulConfig, PoolConsulConfig, parse_address
from lb.discovery.consul.api import (
    ConsulHTTPError,
    InvalidAnswer,
    Parsed,
    decode_json,
    merge_specs,
    nothing_usable,
)
from lb.peer import DRAIN, READY, PeerSpec

NODE_MAINTENANCE = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
_SEVERITY = {"passing": 0, "warning": 1, "critical": 2}


def peer_address(host: Any, port: Any) -> Address:
    """An ``Address`` from Consul's separate host and port fields (IPs normalised)."""
    if host is not None and not isinstance(host, str):
        raise ValueError(f"address {host!r} is not text")
    if not host or not host.strip():
        raise ValueError("no address (Service.Address and Node.Address are empty)")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not 1-65535")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return Address(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    return parse_address(f"{host}:{port}")


def clamp_weight(value: Any, default: int = 1) -> int:
    """A weight in 0..MAX_WEIGHT; anything that is not an integer gets ``default``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return max(0, min(MAX_WEIGHT, value))


def instance_health(checks: Sequence[Any]) -> Tuple[bool, str]:
    """``(in_maintenance, worst status of the other checks)`` for one instance.

    Maintenance is a critical ``_node_maintenance`` or ``_service_maintenance:<id>`` check;
    an unknown status counts as critical, as Consul's own filters do."""
    maintenance = False
    worst = "passing"
    for check in checks:
        if not isinstance(check, dict):
            raise InvalidAnswer(f"a check is {type(check).__name__}, not an object")
        check_id = check.get("CheckID") or ""
        status = check.get("Status")
        if isinstance(check_id, str) and (check_id == NODE_MAINTENANCE or check_id.startswith(
                SERVICE_MAINTENANCE_PREFIX)):
            if status != "passing":
                maintenance = True
            continue
        severity = _SEVERITY.get(status, 2) if isinstance(status, str) else 2
        if severity > _SEVERITY[worst]:
            worst = "critical" if severity == 2 else "warning"
    return maintenance, worst


def parse_health_service(entries: Any, passing_only: bool = True) -> Parsed:
    """Peers from a ``/v1/health/service/<name>`` body (already decoded from JSON)."""
    if not isinstance(entries, list):
        raise InvalidAnswer(f"expected a JSON list of instances, got {type(entries).__name__}")
    specs: List[PeerSpec] = []
    skipped: List[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Service"), dict):
            raise InvalidAnswer(f"instance #{i} has no Service object")
        service = entry["Service"]
        node = entry.get("Node")
        node = {} if node is None else node
        checks = entry.get("Checks")
        checks = [] if checks is None else checks
        if not isinstance(node, dict) or not isinstance(checks, list):
            raise InvalidAnswer(f"instance #{i} has a malformed Node or Checks")
        name = service.get("ID") or service.get("Service") or f"#{i}"
        maintenance, worst = instance_health(checks)
        if not maintenance and (worst == "critical" or (passing_only and worst != "passing")):
            continue  # not healthy enough: Consul's ?passing (or DNS) would leave it out too
        try:
            address = peer_address(service.get("Address") or node.get("Address"),
                                   service.get("Port"))
        except ValueError as e:
            skipped.append(f"instance {name}: {e}")
            continue
        weights = service.get("Weights")
        weights = weights if isinstance(weights, dict) else {}
        weight = clamp_weight(weights.get("Warning" if worst == "warning" else "Passing"))
        specs.append(PeerSpec(address, weight, DRAIN if maintenance else READY))
    if skipped and not specs:
        raise nothing_usable(skipped, "instance")
    return Parsed(merge_specs(specs), skipped)


class ServiceQuery:
    """Healthy instances of one service: ``GET /v1/health/service/<service>``."""

    kv_prefix: Optional[str] = None

    def __init__(self, config: PoolConsulConfig) -> None:
        assert config.service is not None
        self.config = config
        self.service: Optional[str] = config.service
        self.describe = f"service {config.service!r}"
        self.path = "/v1/health/service/" + quote(config.service, safe="")
        self.params: List[Tuple[str, str]] = [("tag", tag) for tag in config.tags]

    def identity(self, settings: ConsulConfig) -> Dict[str, Any]:
        """The service, its filters and the datacenter: what a snapshot must match."""
        return {"service": self.config.service, "tags": list(self.config.tags),
                "passing_only": self.config.passing_only, "datacenter": settings.datacenter}

    def parse(self, status: int, body: bytes) -> Parsed:
        """200: the instances as peers; any other status is an error."""
        if status != 200:
            raise ConsulHTTPError(status, body)
        return parse_health_service(decode_json(body), self.config.passing_only)
