"""A backend peer: who wants it, its admin state, its health and its counters.

Only ``lb.pool.Pool`` changes a peer's state; the data path only bumps its counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set

from lb.health.risefall import UNKNOWN, UP, HealthState
from lb.net import Address

# Admin states, least restrictive first: the one place they are named.
READY = "ready"
DRAIN = "drain"
MAINT = "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)
_SEVERITY = {state: i for i, state in enumerate(ADMIN_STATES)}

# Where a peer's weight comes from when several sources want it: an operator's choice
# first, then the config file, then discovery.
SOURCE_PRIORITY = ("admin", "static", "consul")


@dataclass(frozen=True)
class PeerSpec:
    """What one source wants: this address, with this weight, in this state."""

    address: Address
    weight: int = 1
    state: str = READY  # a source may ask for drain (Consul maintenance, upsync down: 1)


@dataclass(frozen=True)
class LastCheck:
    ok: bool
    detail: str
    at: float


class Peer:
    """One backend address in one pool."""

    def __init__(self, address: Address, health: HealthState) -> None:
        self.address = address
        self.key = str(address)
        self.wants: Dict[str, PeerSpec] = {}  # source -> what it asked for
        self.operator_state: str = READY  # set through the admin API
        self.operator_weight: Optional[int] = None
        self.removing = False  # no source wants it any more: draining until removed
        self.health_state = health
        self.last_check: Optional[LastCheck] = None
        self.ramp = 1.0  # slow start factor in (0, 1]
        self.effective_weight = 0.0  # weight × ramp, what balancers use
        self.active_connections = 0
        self.load = 0  # in flight: connections (tcp) or requests (http); what balancers weigh
        self.ejected = False  # taken out by outlier detection (HTTP mode's passive check)
        self.ejections = 0
        self.total_connections = 0
        self.bytes_in = 0  # client → peer
        self.bytes_out = 0  # peer → client
        self.connect_failures = 0
        self.connections: Set[Any] = set()  # open proxied connections (closable on maint)
        self.balancer_data: Any = None  # a balancer's per-peer slot

    @property
    def health(self) -> str:
        return self.health_state.status

    @property
    def sources(self) -> List[str]:
        return [s for s in SOURCE_PRIORITY if s in self.wants] + sorted(
            s for s in self.wants if s not in SOURCE_PRIORITY)

    @property
    def weight(self) -> int:
        if self.operator_weight is not None:
            return self.operator_weight
        for source in self.sources:
            return self.wants[source].weight
        return 0

    @property
    def admin_state(self) -> str:
        """The most restrictive of what the operator and every source ask for."""
        states = [self.operator_state] + [spec.state for spec in self.wants.values()]
        if self.removing:
            states.append(DRAIN)
        return max(states, key=_SEVERITY.__getitem__)

    @property
    def serving(self) -> bool:
        """Would take new connections if healthy."""
        return self.admin_state == READY and self.weight > 0

    @property
    def is_up(self) -> bool:
        return self.health_state.status == UP

    @property
    def is_unknown(self) -> bool:
        return self.health_state.status == UNKNOWN

    def __repr__(self) -> str:
        return f"<Peer {self.key} {self.admin_state}/{self.health} w={self.weight}>"
