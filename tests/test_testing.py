"""lb.testing's own helpers, where a mistake would make other tests flaky."""

from __future__ import annotations

from lb.testing import free_port


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    """The kernel hands the same free port out again often enough (about 7% of 2,000 binds
    to port 0 here) that a config got one port for two listeners and lb could not start."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
