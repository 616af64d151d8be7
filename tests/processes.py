"""Running lb and demo backends as real processes, with bounded waits and sure cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, List, Optional

BIN = os.path.dirname(sys.executable)


def wait_for(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.05) -> object:
    """Poll ``condition`` until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """A child process whose output goes to a file; killed (group) on ``stop``."""

    def __init__(self, args: List[str], cwd: str, log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, cwd=cwd, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait(10) is None:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def twistd_lb(config_path: str, cwd: str, log_path: str) -> Proc:
    return Proc([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "lb", "-c", config_path],
                cwd, log_path)


def demo_backends(ports: List[int], cwd: str, log_path: str) -> Proc:
    return Proc([sys.executable, "-m", "lb.demo", "--ports", ",".join(map(str, ports))],
                cwd, log_path)


def http_get(sock: socket.socket, path: str = "/") -> bytes:
    """One keep-alive GET on an open socket; returns the body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before headers: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return body
