"""Read-only views of the running parts, for the admin server, the status page and /metrics.

Each part (pool, health monitor, Consul watch, listener) answers ``stats()`` with one of these
frozen dataclasses, built from its live state when asked (cheap: no I/O). The composition
root hands the admin server a way to get them, so the admin code reads typed values and never
reaches into a part's internals. A leaf module: it imports nothing from lb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple


@dataclass(frozen=True)
class CheckStats:
    """The last active check of a peer."""

    ok: bool
    detail: str
    at: float  # Unix time


@dataclass(frozen=True)
class PeerStats:
    address: str  # host:port, the peer's key
    weight: int
    sources: Tuple[str, ...]  # who wants it: static, consul, admin
    admin_state: str  # the most restrictive of the operator's and every source's
    operator_state: str
    removing: bool
    health: str  # up, down, unknown
    active_connections: int
    total_connections: int
    bytes_in: int  # client -> peer
    bytes_out: int  # peer -> client
    connect_failures: int
    last_check: Optional[CheckStats]


@dataclass(frozen=True)
class HealthCheckStats:
    """A pool's active check settings and the probes its monitor ran."""

    type: str
    path: Optional[str]  # http only
    interval: float
    timeout: float
    rise: int
    fall: int
    # peer key -> {"pass": n, "fail": n}; every peer the monitor knows shows both labels
    results: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ConsulStats:
    """A pool's Consul watch."""

    describe: str  # "service 'web'" or "KV prefix 'upstreams/web'"
    service: Optional[str]
    kv_prefix: Optional[str]
    requests: Mapping[str, int]  # every result the watch counts, zeros included
    last_success: Optional[float]  # Unix time
    failures: int  # in a row
    last_error: Optional[str]


@dataclass(frozen=True)
class PoolStats:
    name: str
    balance: str
    slow_start: float
    peers: Tuple[PeerStats, ...]  # in the order they joined
    health_check: Optional[HealthCheckStats]  # None: no active checks configured
    consul: Optional[ConsulStats]  # None: the pool does not use Consul


@dataclass(frozen=True)
class ListenerStats:
    name: str
    bind: str  # as configured
    address: str  # as bound (the real port when the config asks for port 0)
    pool: str
    mode: str
    accepting: bool  # the listening socket is open and in the reactor
    active_connections: int
    total_connections: int
    max_connections: int
    no_peer: int
    refused: Mapping[str, int]  # reason -> clients refused at accept
    ended: Mapping[str, int]  # end reason -> connections
    per_peer: Mapping[str, Tuple[int, int]]  # peer key -> (total, active)
