"""Continuous client load for the fault suite: real TCP clients in threads, bounded in count
and time, every request recorded with when it started and how it ended.

A worker loops: connect to the balancer, send one HTTP/1.0 ``GET``, read the answer to the
end (the demo backends close after answering), record it. Failures are kept with their
start time, so a test can say "0 failed requests started after the kill".
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional


@dataclass
class Request:
    started: float  # time.monotonic() when the connect began
    ended: float
    ok: bool
    answer: str  # the body's first line, or what went wrong


def http_request(host: str, port: int, path: str = "/", timeout: float = 5.0) -> str:
    """One HTTP/1.0 request on a new connection; the body's first line, or raises."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: fault-suite\r\n\r\n".encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"no complete answer: {data[:80]!r}")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise ConnectionError(f"status line {status[:80]!r}")
    return body.decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""


class Load:
    """``workers`` threads sending requests until ``stop()``, ``max_requests`` or
    ``max_seconds`` (the bounds every load loop in the suite has)."""

    def __init__(self, port: int, *, workers: int = 4, max_requests: int = 200_000,
                 max_seconds: float = 60.0, host: str = "127.0.0.1", path: str = "/",
                 timeout: float = 5.0,
                 request: Optional[Callable[[], str]] = None) -> None:
        self.port = port
        self.host = host
        self.path = path
        self.timeout = timeout
        self.workers = workers
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.request = request or (lambda: http_request(self.host, self.port, self.path,
                                                        self.timeout))
        self.records: List[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._deadline = 0.0

    def __enter__(self) -> "Load":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._deadline = time.monotonic() + self.max_seconds
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> List[Request]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads = []
        return self.records

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if len(self.records) >= self.max_requests:
                    return
            started = time.monotonic()
            try:
                answer, ok = self.request(), True
            except Exception as e:  # every way a request can fail is a recorded failure
                answer, ok = f"{type(e).__name__}: {e}", False
            with self._lock:
                self.records.append(Request(started, time.monotonic(), ok, answer))

    # --- reading the records -----------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:
        """Block (bounded) until ``n`` more requests have completed."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load made no progress: {self.count()} < {target}")
            time.sleep(0.01)

    def wait_since(self, t: float, n: int, timeout: float = 10.0) -> List[Request]:
        """Block (bounded) until ``n`` requests started at or after ``t`` have completed."""
        deadline = time.monotonic() + timeout
        while len(self.since(t)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.since(t))} of {n} requests since {t}")
            time.sleep(0.01)
        return self.since(t)

    def since(self, t: float) -> List[Request]:
        with self._lock:
            return [r for r in self.records if r.started >= t]

    def failures(self, since: float = 0.0) -> List[Request]:
        return [r for r in self.since(since) if not r.ok]

    def summary(self, since: float = 0.0) -> str:
        records = self.since(since)
        failed = [r for r in records if not r.ok]
        text = f"{len(records)} requests, {len(failed)} failed"
        if failed:
            text += "; first failures: " + "; ".join(r.answer for r in failed[:5])
        return text
