"""Load-balancing algorithms, one module each, behind ``lb.interfaces.IBalancer``.

Adding an algorithm is a new module here with a ``Balancer`` class and its name in
``lb.config.BALANCE_ALGORITHMS``; nothing else changes.
"""

from __future__ import annotations

import importlib
import random as _random
from typing import Optional

from lb.interfaces import IBalancer


def create(name: str, *, rng: Optional[_random.Random] = None,
           hash_balance_factor: Optional[float] = None) -> IBalancer:
    """Build the balancer called ``name`` (a validated ``balance`` value)."""
    module = importlib.import_module(f"lb.balancer.{name}")
    balancer: IBalancer = module.Balancer(rng=rng or _random.Random(),
                                          hash_balance_factor=hash_balance_factor)
    return balancer
