"""What client traffic may do to a peer's health: only ever take it out.

A failed connect on a client's behalf counts as a failed check of the peer, so a dead peer
leaves rotation after ``fall`` failed clients, between two probes. A successful one counts for
nothing: it must not bring a peer back or undo the failures its active checks counted (a busy
peer whose probes fail would otherwise stay up for as long as it serves traffic). HAProxy's
``observe`` and Envoy's outlier detection follow the same rule; only active probes (or, in a
pool without checks, the monitor's TCP probe of peers that traffic took out) bring a peer back.
"""

from __future__ import annotations

from typing import Optional, Tuple

from lb.config import HealthConfig

# A pool without a `health` section still counts failed client connects, with HAProxy's
# default thresholds, and probes peers they took down over TCP every 2 s to bring them back.
THRESHOLDS_WITHOUT_CHECKS = HealthConfig(type="tcp")


def traffic_verdict(ok: bool, detail: str) -> Optional[Tuple[bool, str]]:
    """What one outcome of client traffic counts as for the peer's health: a failure is a
    failed check (its detail says where it came from); a success is no verdict at all."""
    if ok:
        return None
    return False, f"{detail} (client traffic)"
