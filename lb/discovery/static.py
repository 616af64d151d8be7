"""Static peers from the config file: the ``static`` source of a pool."""

from __future__ import annotations

from lb.config import PoolConfig
from lb.peer import PeerSpec
from lb.pool import Pool

SOURCE = "static"


def apply(pool: Pool, config: PoolConfig) -> None:
    """Make the pool's static peers exactly those in ``config`` (on start and reload)."""
    pool.apply(SOURCE, [PeerSpec(p.address, p.weight) for p in config.peers],
               reason="config")
