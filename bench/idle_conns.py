#!/usr/bin/env python3
"""Open N connections through a proxy and hold them idle, to measure what idle costs it.

Each connection by default sends one HTTP request and reads the whole response, which proves
it reaches the backend through the proxy, and then stays open doing nothing (the backend's
keep-alive is long). ``--mode silent`` only connects; ``--mode partial`` sends half a request
line, like a slow client.

Protocol with the driver (bench.py), one JSON object per line on stdout:
  {"event": "ready", "opened": N, "failed": M, ...}   once every attempt finished
  {"event": "closed", ...}                            after the connections are closed
Closing stdin (or a line on it) ends the hold; ``--hold`` bounds it anyway, and
``--timeout`` bounds the opening phase. Only the standard library, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time
from collections import Counter
from typing import Dict, List, Optional, Tuple

Conn = Tuple[asyncio.StreamReader, asyncio.StreamWriter]


def raise_nofile() -> int:
    """Soft open-files limit up to the hard one; returns what we got."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length; returns the body size."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"status {status[:60]!r}")
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(length)
    return length


async def open_one(host: str, port: int, mode: str, path: str, limit: asyncio.Semaphore,
                   connect_timeout: float,
                   ) -> Tuple[Optional[Conn], Optional[str]]:
    async with limit:  # a bounded burst: listen backlogs are finite
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=4096), connect_timeout)
            if mode == "request":
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await asyncio.wait_for(read_response(reader), connect_timeout)
            elif mode == "partial":
                writer.write(f"GET {path} HTTP/1.1\r\n".encode())
                await writer.drain()
            return (reader, writer), None
        except Exception as e:  # every failure is counted by kind, none stops the rest
            if writer is not None:
                writer.transport.abort()
            return None, type(e).__name__ + (f": {e}" if str(e) else "")


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def wait_for_release(hold: float) -> str:
    """Until stdin closes or has a line (the driver is done measuring), at most ``hold`` s."""
    loop = asyncio.get_running_loop()
    released = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not released.done():
            released.set_result("released")

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(released, hold)
    except asyncio.TimeoutError:
        return "hold timeout"
    finally:
        loop.remove_reader(fd)


async def main_async(args: argparse.Namespace) -> int:
    limit = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    tasks = [asyncio.ensure_future(open_one(args.host, args.port, args.mode, args.path, limit,
                                            args.connect_timeout))
             for _ in range(args.count)]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    conns: List[Conn] = []
    errors: Dict[str, int] = Counter()
    for task in done:
        conn, error = task.result()
        if conn is not None:
            conns.append(conn)
        else:
            errors[str(error)[:120]] += 1
    if pending:
        errors["not finished within --timeout"] += len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    emit("ready", opened=len(conns), failed=args.count - len(conns),
         errors=dict(errors.most_common(5)), seconds=round(time.monotonic() - started, 3))

    why = await wait_for_release(args.hold)
    # Connections the other side closed while we held them (an idle timeout somewhere).
    dropped = sum(1 for r, w in conns if r.at_eof() or w.transport.is_closing())
    linger_off = struct.pack("ii", 1, 0)
    for _, writer in conns:
        sock = writer.get_extra_info("socket")
        try:  # close with RST: no 10,000 TIME_WAIT sockets left on the shared machine
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_off)
        except OSError:
            pass
        writer.transport.abort()
    await asyncio.sleep(0)
    emit("closed", closed=len(conns), dropped_while_idle=dropped, reason=why)
    return 0 if conns else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--mode", choices=("request", "silent", "partial"), default="request")
    parser.add_argument("--path", default="/small.bin", help="requested path (mode request)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="connection attempts in flight at once")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds per connection for connect (and its request)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for the whole opening phase")
    parser.add_argument("--hold", type=float, default=120.0,
                        help="seconds to hold at most when nobody releases")
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    if args.count + 64 > nofile:
        parser.error(f"--count {args.count} needs more descriptors than the limit {nofile}")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
