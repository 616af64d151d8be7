"""Picks per second for every balancing algorithm at 3, 100 and 10,000 peers.

Not a test: a yardstick for the README. Run with ``.venv/bin/python bench/picks.py``
(``--seconds`` and ``--repeat`` bound the run; each cell is the best of the repeats, as
machines shared with other work are noisy). Peers have
weights 1-4; ``pick`` is a bare pick, ``pick+conn`` also reports the connection opening
and closing, as the proxy does (that is where leastconn does its work). ``build`` is the
first pick after adding every peer (source builds its ring then).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any, List, Optional, Tuple

from timing import rate  # bench/ is on sys.path: these run as scripts

from lb.balancer import create
from lb.interfaces import PickContext

ALGORITHMS: List[Tuple[str, str, Optional[float]]] = [
    ("roundrobin", "roundrobin", None),
    ("leastconn", "leastconn", None),
    ("random", "random", None),
    ("p2c", "p2c", None),
    ("source", "source", None),
    ("source+bounded", "source", 1.25),
]
SIZES = (3, 100, 10_000)


class FakePeer:
    __slots__ = ("key", "effective_weight", "load")

    def __init__(self, key: str, weight: float) -> None:
        self.key = key
        self.effective_weight = weight
        self.load = 0


def measure(algorithm: str, factor: Optional[float], size: int,
            seconds: float) -> Tuple[float, float, float]:
    balancer: Any = create(algorithm, rng=random.Random(1), hash_balance_factor=factor)
    peers = [FakePeer(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:80", 1 + i % 4)
             for i in range(size)]
    for peer in peers:
        balancer.add(peer)
    clients = [f"192.168.{i >> 8}.{i & 255}" for i in range(4096)]
    started = time.perf_counter()
    balancer.pick(PickContext(clients[0]))
    build = time.perf_counter() - started
    pick = balancer.pick
    contexts = [PickContext(client) for client in clients]  # a proxy builds one per client

    def bare(i: int) -> None:
        pick(contexts[i & 4095])

    # hold 4 connections per peer on average, opening and closing as a proxy would
    held: List[Any] = []

    def with_connections(i: int) -> None:
        peer = pick(contexts[i & 4095])
        peer.load += 1
        balancer.load_added(peer)
        held.append(peer)
        if len(held) > 4 * size:
            old = held[i % len(held)]
            held[i % len(held)] = held[-1]
            held.pop()
            old.load -= 1
            balancer.load_removed(old)

    return build, rate(bare, seconds), rate(with_connections, seconds)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.2,
                        help="time per measurement (default 0.2)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurements per cell; the best is shown (default 3)")
    args = parser.parse_args(argv)
    seconds = max(0.01, min(args.seconds, 10.0))
    repeat = max(1, min(args.repeat, 10))
    print(f"Python {sys.version.split()[0]}, best of {repeat} × {seconds:g}s")
    print("| algorithm | peers | build (ms) | pick/s | pick+conn/s |")
    print("|---|---:|---:|---:|---:|")
    for label, algorithm, factor in ALGORITHMS:
        for size in SIZES:
            runs = [measure(algorithm, factor, size, seconds) for _ in range(repeat)]
            build = min(r[0] for r in runs)
            bare = max(r[1] for r in runs)
            full = max(r[2] for r in runs)
            print(f"| {label} | {size:,} | {build * 1000:.1f} | {bare:,.0f} | {full:,.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
