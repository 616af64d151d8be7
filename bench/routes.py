"""Route lookups per second: lb's RouteTable next to a scan of every route in order.

Not a test: a yardstick for the README. Run with ``.venv/bin/python bench/routes.py``
(``--seconds`` and ``--repeat`` bound the run; each cell is the best of the repeats, as
machines shared with other work are noisy). Tables of 10, 1,000 and 10,000 routes are a
mix like a catalog's: many exact hosts, wildcard hosts, prefixes of depth 1-4, some routes
on a header; "one host" is 10,000 prefixes under a single host. A hit is a request built
from a route of the table (Host with a port, a query string, the route's headers); a miss
names a host and a path no route has (the default pool answers it), among 1,000 Hosts.
The table remembers the tries of the last few thousand Hosts it saw, so the last column
sends a Host it has not seen with every request (a client making them up). Both
implementations are checked to agree on a sample of the requests before anything is
timed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from timing import rate  # bench/ is on sys.path: these run as scripts

from lb.config import RouteConfig, WeightedPool
from lb.http.routes import Route, RouteTable, host_key

Request = Tuple[Optional[str], str, Dict[str, str]]
SIZES = (10, 1_000, 10_000)


class Scan:
    """The obvious implementation: every route in order, its matchers tried in turn (their
    normal forms computed once, as any sensible scan would)."""

    def __init__(self, routes: Sequence[Route], default: Optional[Route]) -> None:
        self.default = default
        self.rows = []
        for route in routes:
            host = route.host
            wild = host[1:] if host is not None and host.startswith("*.") else None
            prefix = route.path_prefix.rstrip("/") if route.path_prefix is not None else None
            self.rows.append((host, wild, prefix, route.headers, route))

    def match(self, host: Optional[str], path: str,
              header: Callable[[str], Optional[str]]) -> Optional[Route]:
        key = host_key(host)
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        for want, wild, prefix, headers, route in self.rows:
            if want is not None:
                if key is None:
                    continue
                if wild is not None:
                    if not (key.endswith(wild) and len(key) > len(wild)):
                        continue
                elif key != want:
                    continue
            if prefix and path != prefix and not path.startswith(prefix + "/"):
                continue
            if headers and not all(header(name) == value for name, value in headers):
                continue
            return route
        return self.default


def prefix_of(rng: random.Random, i: int) -> str:
    depth = rng.randint(1, 4)
    words = ["api", "v1", "v2", "static", "assets", "users", "orders", "img", "admin"]
    return "/" + "/".join([f"s{i}"] + [rng.choice(words) for _ in range(depth - 1)])


def mixed_routes(size: int, rng: random.Random) -> List[RouteConfig]:
    """A catalog-like mix: 60% exact host + prefix, 15% wildcard host + prefix, 10% prefix
    only, 10% host + header, 5% host only (no route matches every request)."""
    routes: List[RouteConfig] = []
    for i in range(size):
        kind = rng.random()
        host = f"svc{i}.example.com"
        if kind < 0.60:
            routes.append(RouteConfig(host=host, path_prefix=prefix_of(rng, i), pool=f"p{i}",
                                      strip_prefix=rng.random() < 0.3))
        elif kind < 0.75:
            routes.append(RouteConfig(host=f"*.team{i}.example.org",
                                      path_prefix=prefix_of(rng, i), pool=f"p{i}"))
        elif kind < 0.85:
            routes.append(RouteConfig(path_prefix=prefix_of(rng, i), pool=f"p{i}"))
        elif kind < 0.95:
            routes.append(RouteConfig(host=host, headers=(("x-canary", str(i % 3)),),
                                      split=(WeightedPool(f"p{i}", 90),
                                             WeightedPool(f"c{i}", 10))))
        else:
            routes.append(RouteConfig(host=host, pool=f"p{i}"))
    return routes


def one_host_routes(size: int, rng: random.Random) -> List[RouteConfig]:
    """``size`` prefixes of depth 1-4 under one host, sharing their first segments."""
    routes = []
    for i in range(size):
        depth = rng.randint(1, 4)
        segments = [f"a{i % 50}", f"b{i % 500}", f"c{i}", "x"][:depth]
        if depth == 1:
            segments = [f"top{i}"]
        routes.append(RouteConfig(host="api.example.com", path_prefix="/" + "/".join(segments),
                                  pool=f"p{i}"))
    return routes


def hits(routes: Sequence[Route], rng: random.Random, n: int) -> List[Request]:
    """Requests that each match a route of the table (maybe an earlier one)."""
    out: List[Request] = []
    for _ in range(n):
        route = rng.choice(routes)
        host = route.host or f"any{rng.randrange(1000)}.example.net"
        if host.startswith("*."):
            host = f"web{rng.randrange(10)}" + host[1:]
        if rng.random() < 0.5:
            host += ":8080"
        path = (route.path_prefix or "") + f"/item/{rng.randrange(10_000)}?page=2"
        out.append((host, path, dict(route.headers)))
    return out


def misses(rng: random.Random, n: int, hosts: int) -> List[Request]:
    """Requests no route matches, naming ``hosts`` different Hosts."""
    return [(f"nowhere{i % hosts}.example.net:8080",
             f"/nothing/{rng.randrange(10_000)}/here?q=1", {}) for i in range(n)]


def lookups(match: Callable[[Optional[str], str, Callable[[str], Optional[str]]],
                            Optional[Route]],
            requests: Sequence[Request], seconds: float) -> float:
    prepared = [(host, path, sent.get) for host, path, sent in requests]
    mask = len(prepared) - 1  # a power of two

    def step(i: int) -> None:
        host, path, header = prepared[i & mask]
        match(host, path, header)

    return rate(step, seconds)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.05,
                        help="time per measurement (default 0.05)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurements per cell; the best is shown (default 3)")
    args = parser.parse_args(argv)
    seconds = max(0.01, min(args.seconds, 10.0))
    repeat = max(1, min(args.repeat, 10))
    tables: List[Tuple[str, List[RouteConfig]]] = [
        (f"mixed {size:,}", mixed_routes(size, random.Random(size))) for size in SIZES]
    tables.append(("one host 10,000", one_host_routes(10_000, random.Random(7))))
    print(f"Python {sys.version.split()[0]}, best of {repeat} × {seconds:g}s")
    print("| table | routes | build (ms) | hits/s table | hits/s scan | misses/s table "
          "| misses/s scan | misses/s table, new Host each |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, configs in tables:
        started = time.perf_counter()
        table = RouteTable(configs, (), "web")
        build = time.perf_counter() - started
        scan = Scan(table.routes(), table.default)
        rng = random.Random(label)
        hit_requests = hits(table.routes(), rng, 4096)
        miss_requests = misses(rng, 4096, 1000)
        new_host_requests = misses(rng, 8192, 8192)  # beyond what the table remembers
        for host, path, sent in hit_requests[:300] + miss_requests[:50]:
            got = table.match(host, path, sent.get)
            assert got is scan.match(host, path, sent.get), (host, path, sent)
        assert all(table.match(h, p, s.get) is not table.default for h, p, s in hit_requests)
        cells = []
        for requests in (hit_requests, miss_requests):
            for match in (table.match, scan.match):
                cells.append(max(lookups(match, requests, seconds) for _ in range(repeat)))
        cells.append(max(lookups(table.match, new_host_requests, seconds)
                         for _ in range(repeat)))
        print(f"| {label} | {len(table):,} | {build * 1000:.1f} | "
              + " | ".join(f"{cell:,.0f}" for cell in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
