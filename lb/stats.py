"""Read-only views of the running parts, for the admin server, the status page and /metrics.

Each part (pool, health monitor, Consul watch, listener) answers ``stats()`` with one of these
frozen dataclasses, built from its live state when asked (cheap: no I/O). The composition
root hands the admin server a way to get them, so the admin code reads typed values and never
reaches into a part's internals. A leaf module: it imports nothing from lb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple, Union


@dataclass(frozen=True)
class CheckStats:
    """The last active check of a peer."""

    ok: bool
    detail: str
    at: float  # Unix time


@dataclass(frozen=True)
class PeerStats:
    """A peer of a pool: who wants it, its states and its counters."""

    address: str  # host:port, the peer's key
    weight: int
    sources: Tuple[str, ...]  # who wants it: static, consul, admin
    admin_state: str  # the most restrictive of the operator's and every source's
    operator_state: str
    source_states: Mapping[str, str]  # source -> the admin state it asks for
    removing: bool  # no source wants it any more: draining until removed
    removable: bool  # an operator may remove it (no discovery source announces it)
    health: str  # up, down, unknown
    ramp: float  # slow start factor in (0, 1]; 1 when not ramping
    active_connections: int
    total_connections: int
    bytes_in: int  # client -> peer
    bytes_out: int  # peer -> client
    connect_failures: int
    last_check: Optional[CheckStats]
    ejected: bool = False  # taken out by outlier detection (HTTP mode)
    ejections: int = 0


@dataclass(frozen=True)
class HealthCheckStats:
    """A pool's health monitor: the checks it runs and the probes it ran. Every pool has
    one; without a ``health`` section (``configured`` false) it only probes the peers that
    passive checks took down, with the default TCP settings."""

    configured: bool  # the pool has a health section: every peer is probed
    type: str
    path: Optional[str]  # http only
    interval: float
    timeout: float
    rise: int
    fall: int
    # peer key -> {"pass": n, "fail": n} for every peer of the pool, zeros included
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


# What a pool's part (lb.interfaces.IPoolPart) shows of itself.
PartStats = Union[HealthCheckStats, ConsulStats]


@dataclass(frozen=True)
class PoolStats:
    """A pool with its peers and what its parts show."""

    name: str
    balance: str
    slow_start: float
    peers: Tuple[PeerStats, ...]  # in the order they joined
    health_check: Optional[HealthCheckStats]  # None: the pool has no health monitor
    consul: Optional[ConsulStats]  # None: the pool has no Consul watch
    # HTTP mode: peer key -> {"active": n, "idle": n} keep-alive connections to it
    upstream: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class HistogramStats:
    """Request durations: per bucket (upper bounds in seconds, then +Inf), not cumulative."""

    buckets: Tuple[float, ...]
    counts: Tuple[int, ...]  # one more than buckets: the last is above every bound
    sum: float
    count: int


@dataclass(frozen=True)
class RouteStats:
    """One route of an http listener, as ``GET /api/routes`` shows it."""

    host: Optional[str]
    path_prefix: Optional[str]
    headers: Tuple[Tuple[str, str], ...]  # (lower-case name, exact value)
    pool: Optional[str]  # or split
    split: Tuple[Tuple[str, int], ...]  # (pool, weight)
    strip_prefix: Optional[str]  # the prefix removed before the request goes on
    source: str  # "config", "consul:<service>", or "default" (the listener's pool)


@dataclass(frozen=True)
class HTTPStats:
    """An http listener's requests and routes."""

    requests: Mapping[Tuple[str, int], int]  # (pool, status sent) -> requests
    errors: Mapping[str, int]  # answers lb made itself, by reason (every reason shown)
    retries: Mapping[Tuple[str, str], int]  # (pool, condition) -> retries
    durations: Mapping[str, HistogramStats]  # pool -> request head received to last byte
    routes: Tuple[RouteStats, ...] = ()  # in match order, the default last
    consul_routes: Optional[ConsulStats] = None  # the watch of routes from Consul tags


@dataclass(frozen=True)
class ListenerStats:
    """A listener: where it listens, for which pool, and its counters."""

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
    refused: Mapping[str, int]  # reason -> clients refused at accept, every reason shown
    ended: Mapping[str, int]  # end reason -> connections, sorted by reason
    # peer key -> (total, active), for peers still in the pool or with connections open
    per_peer: Mapping[str, Tuple[int, int]]
    http: Optional["HTTPStats"] = None  # an http listener's requests
