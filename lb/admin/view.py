"""What the admin server is handed by the composition root: read-only views of the running
parts and the pools an operator may change. The admin code reads nothing else."""

from __future__ import annotations

from typing import Optional, Sequence

from zope.interface import Interface

from lb.config import Config
from lb.pool import Pool
from lb.stats import ListenerStats, PoolStats


class IAdminView(Interface):
    """All the admin server reads and changes, handed to it by the root: read-only views
    built when asked (no I/O), and the pools whose public methods make an operator's
    changes (so the next view shows them)."""

    def config() -> Config:
        """The running config (the admin token and bind, the config path)."""

    def stopping() -> bool:
        """Shutdown has begun (/healthz answers 503 from then on)."""

    def pools() -> Sequence[PoolStats]:
        """Every pool, in config order."""

    def pool(name: str) -> Optional[PoolStats]:
        """The pool called ``name``; None when there is none."""

    def listeners() -> Sequence[ListenerStats]:
        """Every listener, in config order."""

    def pool_to_change(name: str) -> Optional[Pool]:
        """The live pool called ``name`` (None when there is none), for ``add_peer``,
        ``remove_peer``, ``set_admin_state`` and ``set_weight`` only."""
