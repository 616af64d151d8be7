#!/usr/bin/env python3
"""lb next to HAProxy, nginx and a direct connection, on 127.0.0.1, in TCP and HTTP mode.

Starts an nginx backend (a 100-byte and a 1 MiB file, long keep-alive, and /post, which
answers "ok" once it has read a POST's body) and an iperf3 server, then, for each workload,
fresh instances of every proxy, and measures them in alternating runs (direct, HAProxy,
nginx, lb, HAProxy http, nginx http, lb http, direct, ...). Reports medians over rounds:

  keepalive  wrk -t1 -c50 on the 100-byte file           req/s, p50/p99, proxy CPU µs/req
  close      the same with 'Connection: close'            conn/s, p50/p99, proxy CPU µs/conn
  bulk       wrk -t1 -c10 on the 1 MiB file               MB/s, proxy CPU s/GB
  post       wrk -t1 -c10 POSTing 64 KiB bodies (http)    req/s, p50/p99, proxy CPU µs/req
  iperf      iperf3 through the proxy, one stream (tcp)   Gbit/s, proxy CPU s/GB
  idle       N connections opened through the proxy (one request each) and held idle:
             the proxy's RSS and descriptors with all of them open

Targets: direct (no proxy); tcp: HAProxy (mode tcp), nginx stream, lb, lb on PyPy; http:
HAProxy http (mode http, http-reuse safe, option forwardfor), nginx http (proxy_pass,
upstream keepalive 32), lb http (mode http, pool keepalive 32, access log on), lb http on
PyPy. --mode tcp|http|both picks them (default both); CPU and RSS ratios are to the HAProxy
of the same mode.

Proxy CPU is utime+stime of the proxy's processes (/proc/PID/stat) sampled right before and
after each run; peak RSS is VmRSS sampled every 100 ms during the run. On a small machine the
load generator, backend and proxy share the CPUs, so CPU per unit is the figure that compares
fairly; by default the proxy is pinned to one CPU and everything else to another.

Run it through bench/run (installs the Debian packages, raises the open-files limit). Writes
bench/results/latest.json and latest.md; prints the table, the HTTP-mode targets met or
missed by lb http, and a markdown copy for README.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

WORKLOADS = ("keepalive", "close", "bulk", "post", "iperf", "idle")
TCP_PROXIES = ("haproxy", "nginx", "lb-base", "lb", "lb-pypy")
HTTP_PROXIES = ("haproxy-http", "nginx-http", "lb-base-http", "lb-http", "lb-pypy-http")
PROXIES = ("direct",) + TCP_PROXIES + HTTP_PROXIES
MODES = ("tcp", "http", "both")
# Which targets a workload runs on besides direct: iperf needs a byte stream, and the
# 64 KiB POSTs are an HTTP-mode workload (direct runs them too, as the ceiling).
WORKLOAD_MODES = {"keepalive": ("tcp", "http"), "close": ("tcp", "http"),
                  "bulk": ("tcp", "http"), "post": ("http",), "iperf": ("tcp",),
                  "idle": ("tcp", "http")}
LABELS = {"direct": "direct", "haproxy": "HAProxy", "nginx": "nginx stream", "lb": "lb",
          "lb-pypy": "lb (PyPy)", "lb-base": "lb (baseline)",
          "haproxy-http": "HAProxy http", "nginx-http": "nginx http", "lb-http": "lb http",
          "lb-pypy-http": "lb http (PyPy)", "lb-base-http": "lb http (baseline)"}
VENVS = {"lb": os.path.join(ROOT, ".venv"), "lb-pypy": os.path.join(ROOT, ".venv-pypy"),
         "lb-http": os.path.join(ROOT, ".venv"),
         "lb-pypy-http": os.path.join(ROOT, ".venv-pypy")}
JIT_WARMUP = 5.0  # PyPy compiles the hot paths in its first seconds: warm it up longer

SMALL_PATH, SMALL_SIZE = "/small.bin", 100
LARGE_PATH, LARGE_SIZE = "/large.bin", 1 << 20
POST_PATH, POST_SIZE, POST_ANSWER = "/post", 64 << 10, b"ok\n"
WRK_CONNECTIONS = {"keepalive": 50, "close": 50, "bulk": 10, "post": 10}
# The targets for lb's HTTP mode, against HAProxy http in the same run:
# (workload, figure, bound, at most?, what).
HTTP_GOALS = (
    ("keepalive", "cpu_vs_haproxy", 1.25, True, "keep-alive CPU per request"),
    ("keepalive", "throughput_vs_haproxy", 0.9, False, "keep-alive req/s"),
    ("bulk", "throughput_vs_haproxy", 1.0, False, "1 MiB answers MB/s"),
    ("bulk", "cpu_vs_haproxy", 0.6, True, "1 MiB answers CPU per GB"),
    ("close", "cpu_vs_haproxy", 1.5, True, "new connection per request CPU per request"),
    ("idle", "rss_at_10000_mb", 100.0, True, "RSS with 10,000 idle keep-alive clients (MB)"),
)
IDLE_TARGET = 10_000  # the figure; fewer when the descriptor limit cannot hold it
FD_MARGIN = 200  # descriptors a proxy needs besides two per proxied connection
CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_stream_module.so",
                       "/usr/share/nginx/modules/ngx_stream_module.so",
                       "/usr/lib64/nginx/modules/ngx_stream_module.so")


class BenchError(Exception):
    """A run or a process failed; the message says what and where its log is."""


def proxy_mode(name: str) -> Optional[str]:
    """'tcp' or 'http' for a proxy, None for direct."""
    if name == "direct":
        return None
    return "http" if name.endswith("-http") else "tcp"


def reference(name: str) -> str:
    """The HAProxy a proxy is compared with: the one in the same mode."""
    return "haproxy-http" if proxy_mode(name) == "http" else "haproxy"


def runs_on(workload: str, name: str) -> bool:
    mode = proxy_mode(name)
    if mode is None:
        return workload != "idle"  # nothing to hold idle without a proxy
    return mode in WORKLOAD_MODES[workload]


# --- /proc ----------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants (nginx: master and worker)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = _read(f"/proc/{entry}/stat")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo and len(tree) < 1000:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads, dead ones included)."""
    total = 0
    for pid in pids:
        try:
            fields = _read(f"/proc/{pid}/stat")
        except OSError:
            continue
        rest = fields[fields.rindex(")") + 2:].split()
        total += int(rest[11]) + int(rest[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = _read(f"/proc/{pid}/status")
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if m:
            total += int(m.group(1)) * 1024
    return total


def fd_count(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1/0.0.0.0:port (read from /proc, no probe
    connection, which an iperf3 server would take for a test)."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        lines = _read("/proc/net/tcp").splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) > 3 and parts[1] in wanted and parts[3] == "0A":
            return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler(threading.Thread):
    """Peak VmRSS of some processes, sampled every ``interval`` until stopped."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1, limit: float = 3600.0):
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.interval = interval
        self.limit = limit
        self.peak = rss_bytes(self.pids)
        self._stop_event = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop_event.wait(self.interval) and time.monotonic() < deadline:
            self.peak = max(self.peak, rss_bytes(self.pids))

    def finish(self) -> int:
        self._stop_event.set()
        self.join(5)
        self.peak = max(self.peak, rss_bytes(self.pids))
        return self.peak


# --- processes ------------------------------------------------------------------------------


def pin(cpu: Optional[str]) -> List[str]:
    """Command prefix: die with the driver (even on SIGKILL), and run on ``cpu``."""
    prefix = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
    if cpu is not None:
        prefix += ["taskset", "-c", cpu]
    return prefix


class Proc:
    """A long-running process in its own process group, stopped with the whole group."""

    def __init__(self, name: str, argv: List[str], log_path: str, cpu: Optional[str],
                 cwd: Optional[str] = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cpu = cpu
        self.cwd = cwd
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> "Proc":
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(pin(self.cpu) + self.argv, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          cwd=self.cwd, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers left behind by a master that died first
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_listening(self, ports: Sequence[int], timeout: float = 20.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise BenchError(f"{self.name} exited at start (log {self.log_path}):\n"
                                 f"{self.tail()}")
            return all(listening(p) for p in ports)
        try:
            wait_until(ready, timeout, f"{self.name} to listen on {list(ports)}")
        except BenchError as e:
            if "exited" in str(e):
                raise
            raise BenchError(f"{e} (log {self.log_path}):\n{self.tail()}") from None


@dataclass
class Target:
    """Where a client connects for one proxy, and the process that is the proxy."""

    name: str
    web_port: int
    iperf_port: Optional[int]  # HTTP targets have no iperf listener
    proc: Optional[Proc] = None
    pids: List[int] = field(default_factory=list)
    rss_fresh: Optional[int] = None  # RSS once started and checked, before any load

    @property
    def label(self) -> str:
        return LABELS[self.name]


def render(template: str, dest: str, **values: Any) -> str:
    with open(os.path.join(HERE, template), encoding="utf-8") as f:
        text = f.read()

    def sub(m: "re.Match[str]") -> str:
        if m.group(1) not in values:
            raise BenchError(f"{template}: no value for {{{{{m.group(1)}}}}}")
        return str(values[m.group(1)])

    with open(dest, "w", encoding="utf-8") as f:
        f.write(re.sub(r"\{\{(\w+)\}\}", sub, text))
    return dest


def command_output(argv: List[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    return (out.stdout + out.stderr).strip()


# --- the bench ------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="lb-bench-")
        os.chmod(self.tmp, 0o755)  # nginx workers run as nobody and read the docroot
        self.logs = os.path.join(self.tmp, "logs")
        os.makedirs(self.logs)
        self.procs: List[Proc] = []
        self.runs: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        self.proxy_logs: Dict[str, Dict[str, Any]] = {}
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.backend_port = free_port()
        self.iperf_backend_port = free_port()
        self.backend: Optional[Proc] = None
        self.files = {SMALL_PATH: b"x" * (SMALL_SIZE - 1) + b"\n",
                      LARGE_PATH: os.urandom(LARGE_SIZE)}  # incompressible, not that it matters
        self.iperf_server: Optional[Proc] = None
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.post_script = os.path.join(self.tmp, "post.lua")
        with open(self.post_script, "w", encoding="utf-8") as out:
            for name in ("post.lua", "report.lua"):
                with open(os.path.join(HERE, name), encoding="utf-8") as f:
                    out.write(f.read() + "\n")
        self.backend_checks: Dict[str, Any] = {}
        self.target_checks: Dict[str, Dict[str, Any]] = {}
        self.start_failures: Dict[str, str] = {}  # proxies that refused their config
        modes = {proxy_mode(p) for p in args.proxies} - {None}
        # tcp: a client and a backend socket per connection; http: the client's only (the
        # backend connections are pooled)
        self.idle_count = {mode: min(args.idle_count, self.idle_capacity(mode))
                           for mode in ("tcp", "http")}
        for mode in sorted(modes):
            held = self.idle_count[mode]
            if held < args.idle_count and "idle" in args.only:
                sockets = 2 * held if mode == "tcp" else held
                self.notes.append(
                    f"idle ({mode}): the open-files limit is {self.nofile} (hard limit, not "
                    f"raisable here), so each {mode} proxy holds {held:,} connections "
                    f"({sockets:,} sockets) instead of {args.idle_count:,}; RSS at "
                    f"{args.idle_count:,} is extrapolated linearly from the measured "
                    f"per-connection growth")

    def idle_capacity(self, mode: str = "tcp") -> int:
        """Connections a proxy can hold under the descriptor limit: two sockets each in tcp
        mode, one in http mode (and the idle client needs one each too)."""
        usable = (self.nofile - FD_MARGIN) // (2 if mode == "tcp" else 1)
        return max(100, usable // 100 * 100)

    # --- processes --------------------------------------------------------------------------

    def spawn(self, name: str, argv: List[str], cpu: Optional[str],
              cwd: Optional[str] = None) -> Proc:
        proc = Proc(name, argv, os.path.join(self.logs, f"{name}.log"), cpu, cwd)
        self.procs.append(proc)
        return proc.start()

    def stop(self, proc: Optional[Proc]) -> None:
        if proc is not None:
            proc.stop()
            if proc in self.procs:
                self.procs.remove(proc)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def start_backend(self) -> None:
        docroot = os.path.join(self.tmp, "www")
        os.makedirs(docroot)
        os.chmod(docroot, 0o755)
        for path, body in self.files.items():
            with open(os.path.join(docroot, path.lstrip("/")), "wb") as f:
                f.write(body)
        # nginx's static module answers POST with 405 only for a file that exists (404
        # otherwise); the backend turns that 405 into its "ok" (nginx-backend.conf)
        with open(os.path.join(docroot, POST_PATH.lstrip("/")), "wb") as f:
            f.write(b"never served\n")
        conf = os.path.join(self.tmp, "nginx-backend.conf")
        render("nginx-backend.conf", conf, error_log=self.nginx_error_log(conf), tmp=self.tmp,
               docroot=docroot, port=self.backend_port, nofile=self.nofile,
               worker_connections=self.nofile)
        self.backend = self.spawn("backend-nginx", self.nginx_argv(conf), self.args.load_cpu)
        self.backend.wait_listening([self.backend_port])
        if "post" in self.args.only:
            self.check_backend_post()
        if "iperf" in self.args.only and any(runs_on("iperf", p) and p != "direct"
                                              for p in self.args.proxies):
            self.start_iperf_server()

    def check_backend_post(self) -> None:
        """The backend must read a POST's whole body before it answers, or the post workload
        would measure proxies forwarding bodies nobody waits for: send the head and half the
        body, make sure nothing comes back, then the rest, and expect 200 "ok"."""
        head = (f"POST {POST_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/octet-stream\r\n"
                f"Content-Length: {POST_SIZE}\r\n\r\n").encode()
        half = POST_SIZE // 2
        with socket.create_connection(("127.0.0.1", self.backend_port), timeout=10) as sock:
            sock.sendall(head + b"x" * half)
            early, _, _ = select.select([sock], [], [], 0.5)
            if early:
                raise BenchError(f"the backend answered POST {POST_PATH} before reading the "
                                 f"body: {sock.recv(200)!r}")
            sock.sendall(b"x" * (POST_SIZE - half))
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = response.read()
        if response.status != 200 or body != POST_ANSWER:
            raise BenchError(f"the backend answered POST {POST_PATH} with {response.status} "
                             f"{body[:100]!r}, not 200 {POST_ANSWER!r}")
        self.backend_checks["post_waits_for_body"] = True

    def start_iperf_server(self) -> None:
        self.stop(self.iperf_server)
        self.iperf_server = self.spawn(
            "iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p",
                              str(self.iperf_backend_port)], self.args.load_cpu)
        self.iperf_server.wait_listening([self.iperf_backend_port])

    def nginx_error_log(self, conf: str) -> str:
        return os.path.join(self.logs, os.path.basename(conf) + ".error.log")

    def nginx_argv(self, conf: str) -> List[str]:
        return ["nginx", "-p", self.tmp + "/", "-c", conf, "-e", self.nginx_error_log(conf),
                "-g", "daemon off;"]

    def stream_module_line(self) -> str:
        for path in STREAM_MODULE_PATHS:
            if os.path.exists(path):
                return f"load_module {path};"
        built = command_output(["nginx", "-V"])
        if "--with-stream" in built and "--with-stream=dynamic" not in built:
            return "# stream module built in"
        raise BenchError("nginx has no stream module: install libnginx-mod-stream")

    def start_target(self, name: str, workload: str = "") -> Target:
        if name == "direct":
            return Target(name, self.backend_port, self.iperf_backend_port)
        http_mode = proxy_mode(name) == "http"
        web = free_port()
        iperf = None if http_mode else free_port()
        ports = dict(web_port=web, iperf_port=iperf, backend_port=self.backend_port,
                     iperf_backend_port=self.iperf_backend_port, tmp=self.tmp)
        cpu = self.args.proxy_cpu
        logs = self.args.access_logs
        if name == "haproxy":
            maxconn = self.idle_capacity()
            conf = render("haproxy.cfg", os.path.join(self.tmp, "haproxy.cfg"),
                          maxconn=maxconn, **ports)
            proc = self.spawn("haproxy", ["haproxy", "-db", "-f", conf], cpu)
        elif name == "haproxy-http":
            # HAProxy sizes its descriptors for two per connection; in http mode a client
            # needs one (server connections are pooled), so where the limit is short of
            # 2 × maxconn it may still start, with a warning, instead of refusing to
            maxconn = self.idle_count["http"] + 100
            limits = ""
            if 2 * maxconn + 300 > self.nofile:
                limits = ("    no strict-limits   # the fd limit is below HAProxy's 2 per "
                          "connection sizing")
                note = (f"HAProxy http: maxconn {maxconn:,} makes HAProxy ask for two "
                        f"descriptors per connection, more than the limit {self.nofile:,}: "
                        f"started with `no strict-limits` (it warns and runs; an idle HTTP "
                        f"client takes one descriptor)")
                if "idle" in self.args.only and note not in self.notes:
                    self.notes.append(note)
            conf = render("haproxy-http.cfg", os.path.join(self.tmp, "haproxy-http.cfg"),
                          maxconn=maxconn, limits=limits,
                          log_global="    log stdout format raw local0" if logs else "",
                          log_defaults="    log global\n    option httplog" if logs else "",
                          **ports)
            proc = self.spawn("haproxy-http", ["haproxy", "-db", "-f", conf], cpu)
        elif name == "nginx":
            conf = os.path.join(self.tmp, "nginx-stream.conf")
            render("nginx-stream.conf", conf, load_stream_module=self.stream_module_line(),
                   error_log=self.nginx_error_log(conf), nofile=self.nofile,
                   worker_connections=self.nofile, **ports)
            proc = self.spawn("nginx-stream", self.nginx_argv(conf), cpu)
        elif name == "nginx-http":
            conf = os.path.join(self.tmp, "nginx-http.conf")
            access = os.path.join(self.logs, "nginx-http.access.log")
            render("nginx-http.conf", conf, error_log=self.nginx_error_log(conf),
                   nofile=self.nofile, worker_connections=self.nofile,
                   access_log=f"access_log {access};" if logs else "access_log off;", **ports)
            proc = self.spawn("nginx-http", self.nginx_argv(conf), cpu)
        elif name in VENVS:
            os.makedirs(os.path.join(self.tmp, name + "-state"), exist_ok=True)
            conf = render("lb-http.yaml" if http_mode else "lb.yaml",
                          os.path.join(self.tmp, name + ".yaml"),
                          state_dir=name + "-state", **ports)
            twistd = os.path.join(VENVS[name], "bin", "twistd")
            if not os.path.exists(twistd):
                raise BenchError(f"{twistd} is missing: run bench/run, which creates it")
            proc = self.spawn(name, [twistd, "-n", "--pidfile=", "lb", "-c", conf], cpu,
                              cwd=self.tmp)
        else:
            raise BenchError(f"unknown proxy {name}")
        target = Target(name, web, iperf, proc)
        try:
            try:
                proc.wait_listening([web] + ([iperf] if iperf else []))
            except BenchError as e:
                if not proc.alive():  # it refused its config: no use trying it again
                    self.start_failures[name] = self.refusal(proc) or str(e).splitlines()[0]
                raise
            if name in ("nginx", "nginx-http"):  # the master binds, then forks the worker
                wait_until(lambda: len(process_tree(proc.pid)) >= 2, 10, "the nginx worker")
            target.pids = process_tree(proc.pid)
            self.check_target(target, workload)
            target.rss_fresh = rss_bytes(target.pids)
        except BaseException:
            self.stop_target(target, "start")
            raise
        return target

    @staticmethod
    def refusal(proc: Proc) -> str:
        """The line of a proxy's log that says why it exited at start (lb: the config
        error; HAProxy: its ALERT; nginx: emerg), shortened for a table note."""
        lines = [line.strip() for line in proc.tail(40).splitlines() if line.strip()]
        for pattern in (r"mode http|not implemented", r"unknown key|invalid|config",
                        r"ALERT|emerg", r"Error|error"):
            for line in lines:
                if re.search(pattern, line):
                    line = re.sub(r"^\S+T\S+ \[[^]]*\] ", "", line)  # twistd's stamp
                    line = re.sub(r"^/\S+\.yaml: ", "", line)  # lb's config path
                    return line[:200]
        return lines[-1][:200] if lines else ""

    def check_target(self, target: Target, workload: str = "") -> None:
        """Fetch both files through the proxy once: a broken path fails loudly, not as a
        fast benchmark of error pages."""
        for path, expected in self.files.items():
            conn = http.client.HTTPConnection("127.0.0.1", target.web_port, timeout=10)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
            except OSError as e:
                raise BenchError(f"{target.label}: GET {path} failed: {e}") from None
            finally:
                conn.close()
            if response.status != 200 or body != expected:
                raise BenchError(f"{target.label}: GET {path} gave {response.status} with "
                                 f"{len(body)} bytes, not 200 with the file's {len(expected)}")
        if proxy_mode(target.name) == "http":
            self.check_http_target(target, post=workload == "post")

    def check_http_target(self, target: Target, post: bool) -> None:
        """An HTTP proxy must pass a 64 KiB POST (for the post workload), and what the backend
        saw is recorded: the X-Forwarded-For it got, and whether the proxy sent a client's
        second request, and a new client's first one, over a backend connection it had used
        before (HAProxy's http-reuse safe never does for a new client's first request)."""
        conn = http.client.HTTPConnection("127.0.0.1", target.web_port, timeout=10)
        seen: List[Dict[str, str]] = []
        try:
            if post:
                conn.request("POST", POST_PATH, body=b"x" * POST_SIZE,
                             headers={"Content-Type": "application/octet-stream"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or body != POST_ANSWER:
                    raise BenchError(f"{target.label}: POST {POST_PATH} ({POST_SIZE:,} bytes) "
                                     f"gave {response.status} {body[:100]!r}, not 200 "
                                     f"{POST_ANSWER!r}")
            for fresh in (False, False, True):
                if fresh:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", target.web_port, timeout=10)
                conn.request("GET", "/headers")
                response = conn.getresponse()
                text = response.read().decode(errors="replace").strip()
                if response.status != 200:
                    raise BenchError(f"{target.label}: GET /headers gave {response.status}")
                seen.append(dict(re.findall(r"(\w+)=(\S*)", text)))
        except OSError as e:
            raise BenchError(f"{target.label}: HTTP check failed: {e}") from None
        finally:
            conn.close()
        # the backend counts the requests each of its connections served: above 1, the
        # proxy sent this request over a connection it had used before
        def reused(answer: Dict[str, str]) -> bool:
            return answer.get("requests", "1").isdigit() and int(answer["requests"]) > 1

        check = {"backend_saw": seen,
                 "reuse_same_client": reused(seen[1]),   # a client's second request
                 "reuse_new_client": reused(seen[2])}    # a new client's first request
        if target.name not in self.target_checks:
            self.target_checks[target.name] = check
            yes = {True: "yes", False: "no"}
            self.notes.append(
                f"{target.label}: backend connection reused for a client's second request: "
                f"{yes[check['reuse_same_client']]}, for a new client's first request: "
                f"{yes[check['reuse_new_client']]}; X-Forwarded-For at the backend: "
                f"{seen[0].get('xff') or 'none'}")

    def stop_target(self, target: Target, workload: str) -> None:
        if target.proc is None:
            return
        self.stop(target.proc)
        self.scan_log(target, workload)
        dest = os.path.join(self.logs, f"{target.proc.name}.{workload}.log")
        try:
            os.replace(target.proc.log_path, dest)
        except OSError:
            pass

    def scan_log(self, target: Target, workload: str) -> None:
        """What the proxy said during a workload: lb's per-connection end reasons and any
        tracebacks; warnings and errors from HAProxy and nginx."""
        assert target.proc is not None
        logs = [target.proc.log_path]
        nginx_conf = {"nginx": "nginx-stream.conf", "nginx-http": "nginx-http.conf"}
        if target.name in nginx_conf:
            logs.append(self.nginx_error_log(nginx_conf[target.name]))
        ends: Counter = Counter()
        statuses: Counter = Counter()
        problems: List[str] = []
        for path in logs:
            try:
                f = open(path, encoding="utf-8", errors="replace")
            except OSError:
                continue
            with f:
                for line in f:
                    m = re.search(r" end=(\w+)", line)
                    if m:
                        ends[m.group(1)] += 1
                        continue
                    m = re.search(r'\[lb\.access#info\] \S+ \S+ \S+ ".*?" (\d{3}) ', line)
                    if m:
                        statuses[m.group(1)] += 1
                    elif workload == "iperf" and "reset by peer" in line:
                        continue  # iperf3's server resets its data stream when a test ends
                    elif (target.name == "haproxy-http" and
                          re.search(r"FD limit|too low for maxconn", line)):
                        continue  # expected where the fd limit is short (no strict-limits)
                    elif re.search(r"Traceback|Unhandled|\[(error|crit|alert|emerg)\]|"
                                   r"ALERT|WARNING|Error", line):
                        if len(problems) < 20:
                            problems.append(line.rstrip()[:300])
        if target.name in nginx_conf:  # one error log across workloads: start afresh
            try:
                os.truncate(logs[1], 0)
            except OSError:
                pass
        entry: Dict[str, Any] = {"problem_lines": problems}
        if target.name in VENVS:
            if proxy_mode(target.name) == "http":
                entry["statuses"] = dict(statuses)
            else:
                entry["connection_ends"] = dict(ends)
        self.proxy_logs[f"{target.name}/{workload}"] = entry

    # --- one run ----------------------------------------------------------------------------

    def measure(self, target: Target, action: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        """Run ``action`` and add the proxy's CPU seconds and peak RSS over it (and the
        backend's CPU, for reference)."""
        backend_pids = process_tree(self.backend.pid) if self.backend else []
        sampler = RssSampler(target.pids) if target.pids else None
        if sampler:
            sampler.start()
        cpu0, bcpu0, t0 = cpu_seconds(target.pids), cpu_seconds(backend_pids), time.monotonic()
        try:
            result = action()
        finally:
            cpu1, bcpu1, t1 = (cpu_seconds(target.pids), cpu_seconds(backend_pids),
                               time.monotonic())
            peak = sampler.finish() if sampler else None
        result.update(wall_s=round(t1 - t0, 3), backend_cpu_s=round(bcpu1 - bcpu0, 3))
        if target.pids:
            result.update(proxy_cpu_s=round(cpu1 - cpu0, 3), peak_rss_bytes=peak,
                          proxy_alive=bool(target.proc and target.proc.alive()))
        return result

    def wrk(self, target: Target, workload: str, duration: float, tag: str) -> Dict[str, Any]:
        path = {"bulk": LARGE_PATH, "post": POST_PATH}.get(workload, SMALL_PATH)
        script = self.post_script if workload == "post" else os.path.join(HERE, "report.lua")
        duration = max(1, int(round(duration)))  # wrk takes whole seconds only
        argv = ["wrk", "-t1", f"-c{WRK_CONNECTIONS[workload]}", f"-d{duration}s",
                "--latency", "--timeout", "5s", "-s", script]
        if workload == "close":
            argv += ["-H", "Connection: close"]
        argv.append(f"http://127.0.0.1:{target.web_port}{path}")
        try:
            out = subprocess.run(pin(self.args.load_cpu) + argv, capture_output=True,
                                 text=True, timeout=duration + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {duration + 60:g}s") from None
        with open(os.path.join(self.logs, f"wrk.{tag}.txt"), "w") as f:
            f.write(" ".join(argv) + "\n" + out.stdout + out.stderr)
        m = re.search(r"^BENCH_JSON (\{.*\})$", out.stdout, re.M)
        if out.returncode != 0 or not m:
            raise BenchError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-500:]}")
        r = json.loads(m.group(1))
        seconds = r["duration_us"] / 1e6
        errors = {k: r[k] for k in ("connect_errors", "read_errors", "write_errors",
                                    "status_errors", "timeouts") if r[k]}
        result = {"requests": r["requests"], "bytes": r["bytes"], "seconds": seconds,
                  "rate": r["requests"] / seconds, "mb_per_s": r["bytes"] / seconds / 1e6,
                  "p50_us": r["p50_us"], "p90_us": r["p90_us"], "p99_us": r["p99_us"],
                  "errors": errors}
        if workload == "post":  # request bodies sent (the answers are 3 bytes)
            result["bytes_up"] = r["requests"] * POST_SIZE
            result["mb_per_s_up"] = result["bytes_up"] / seconds / 1e6
        return result

    def iperf(self, target: Target, duration: float, tag: str) -> Dict[str, Any]:
        seconds = max(1, int(round(duration)))
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(target.iperf_port), "-t", str(seconds),
                "-J", "--connect-timeout", "5000"]
        try:
            out = subprocess.run(pin(self.args.load_cpu) + argv, capture_output=True,
                                 text=True, timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"iperf3 did not finish within {seconds + 60}s") from None
        with open(os.path.join(self.logs, f"iperf3.{tag}.json"), "w") as f:
            f.write(out.stdout + out.stderr)
        try:
            report = json.loads(out.stdout)
        except ValueError:
            raise BenchError(f"iperf3 failed: {(out.stderr or out.stdout)[-500:]}") from None
        if report.get("error") or out.returncode != 0:
            raise BenchError(f"iperf3 failed: {report.get('error') or out.stderr[-500:]}")
        received = report["end"]["sum_received"]
        return {"bytes": received["bytes"], "seconds": received["seconds"],
                "gbit_per_s": received["bits_per_second"] / 1e9,
                "retransmits": report["end"].get("sum_sent", {}).get("retransmits"),
                "errors": {}}

    def idle(self, target: Target, tag: str) -> Dict[str, Any]:
        """Open N connections through the proxy (one request each), hold them, and read the
        proxy's RSS and descriptors once it holds every one (both sides in tcp mode)."""
        mode = proxy_mode(target.name) or "tcp"
        count = self.idle_count[mode]
        # the proxy holds a client and a backend socket per connection in tcp mode, the
        # client's only in http mode (backend connections are pooled)
        sockets = 2 if mode == "tcp" else 1
        pids = target.pids
        rss0, fds0, cpu0 = rss_bytes(pids), fd_count(pids), cpu_seconds(pids)
        open_timeout = 30.0 + count / 500
        argv = [sys.executable, os.path.join(HERE, "idle_conns.py"), "--port",
                str(target.web_port), "--count", str(count), "--timeout", str(open_timeout),
                "--hold", str(open_timeout + 120)]
        log = open(os.path.join(self.logs, f"idle.{tag}.log"), "w")
        client = subprocess.Popen(pin(self.args.load_cpu) + argv, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            ready = self.read_event(client, "ready", open_timeout + 30)
            opened = ready["opened"]
            result: Dict[str, Any] = {"requested": count, "opened": opened,
                                      "failed": ready["failed"], "open_s": ready["seconds"],
                                      "errors": ({"connect": ready["failed"],
                                                  "detail": ready["errors"]}
                                                 if ready["failed"] else {})}
            if pids:
                try:
                    wait_until(lambda: fd_count(pids) >= fds0 + sockets * opened, 30,
                               "the proxy to hold every connection", interval=0.2)
                except BenchError as e:
                    result["errors"]["fds"] = str(e)
                time.sleep(1.0)  # let lazily allocated buffers settle
                rss1 = 0
                for _ in range(3):
                    rss1 = max(rss1, rss_bytes(pids))
                    time.sleep(0.1)
                cpu1 = cpu_seconds(pids)
                result.update(rss_fresh_bytes=target.rss_fresh, rss_before_bytes=rss0,
                              rss_bytes=rss1, fds_before=fds0,
                              fds=fd_count(pids), open_cpu_s=round(cpu1 - cpu0, 3))
            client.stdin.close()  # type: ignore[union-attr]
            closed = self.read_event(client, "closed", 60)
            if closed.get("dropped_while_idle"):
                result["errors"]["dropped_while_idle"] = closed["dropped_while_idle"]
            client.wait(30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
            log.close()
        if pids:  # the next run starts from a proxy that let go of everything
            # (an HTTP proxy may keep idle backend connections: HAProxy as many as it
            # opened, purged over seconds; nginx and lb up to keepalive 32)
            slack = 10 if mode == "tcp" else 250
            try:
                wait_until(lambda: fd_count(pids) <= fds0 + slack, 30,
                           "the proxy to close the idle connections", interval=0.2)
            except BenchError as e:
                self.notes.append(f"idle {target.label}: {e}")
        return result

    @staticmethod
    def read_event(client: subprocess.Popen, event: str, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert client.stdout is not None
        while time.monotonic() < deadline:
            r, _, _ = select.select([client.stdout], [], [], 0.5)
            if r:
                line = client.stdout.readline()
                if not line:
                    raise BenchError(f"idle client exited before '{event}' "
                                     f"(rc {client.wait(10)})")
                message = json.loads(line)
                if message.get("event") == event:
                    return message
        raise BenchError(f"idle client gave no '{event}' within {timeout:g}s")

    def backend_connection_number(self) -> Optional[int]:
        """The serial number the backend (one worker) gives a new connection of ours."""
        conn = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=10)
        try:
            conn.request("GET", "/headers")
            m = re.search(r"connection=(\d+)", conn.getresponse().read().decode())
            return int(m.group(1)) if m else None
        except OSError:
            return None
        finally:
            conn.close()

    def run_one(self, workload: str, target: Target, round_no: int) -> Dict[str, Any]:
        tag = f"{workload}.{target.name}.r{round_no}"
        duration = self.args.duration
        if workload in WRK_CONNECTIONS:
            action = lambda: self.wrk(target, workload, duration, tag)  # noqa: E731
        elif workload == "iperf":
            action = lambda: self.iperf(target, duration, tag)  # noqa: E731
        else:
            action = lambda: self.idle(target, tag)  # noqa: E731
        record: Dict[str, Any] = {"workload": workload, "proxy": target.name,
                                  "round": round_no}
        # how many backend connections an HTTP proxy opened for the run's requests: the
        # backend numbers its connections, so probe it before and after
        count_backend = proxy_mode(target.name) == "http" and workload in WRK_CONNECTIONS
        try:
            first = self.backend_connection_number() if count_backend else None
            record.update(self.measure(target, action))
            if first is not None:
                last = self.backend_connection_number()
                if last is not None:
                    record["backend_connections"] = last - first - 1
        except BenchError as e:
            record["failure"] = str(e)
            if target.proc is not None and not target.proc.alive():
                record["failure"] += f"; {target.label} died:\n{target.proc.tail()}"
            if workload == "iperf":
                self.start_iperf_server()  # a failed test can leave the server stuck
        return record

    # --- the whole benchmark ----------------------------------------------------------------

    def run(self) -> None:
        self.start_backend()
        for workload in self.args.only:
            proxies = [p for p in self.args.proxies if runs_on(workload, p)]
            targets: List[Target] = []
            try:
                for name in proxies:
                    if name in self.start_failures:  # refused its config once: not again
                        self.runs.append({"workload": workload, "proxy": name, "round": 0,
                                          "failure": "did not start: "
                                                     + self.start_failures[name]})
                        continue
                    try:
                        targets.append(self.start_target(name, workload))
                    except BenchError as e:
                        reason = self.start_failures.get(name) or str(e)
                        self.runs.append({"workload": workload, "proxy": name, "round": 0,
                                          "failure": f"did not start: {reason}"})
                        print(f"  {LABELS[name]}: did not start: "
                              f"{reason if name in self.start_failures else e}",
                              file=sys.stderr)
                if workload in WRK_CONNECTIONS and self.args.warmup > 0:
                    for target in targets:  # first connections, page faults, caches, JIT
                        warmup = self.args.warmup
                        if target.name.startswith("lb-pypy"):
                            warmup = max(warmup, JIT_WARMUP)
                        try:
                            self.wrk(target, workload, warmup,
                                     f"{workload}.{target.name}.warmup")
                        except BenchError as e:
                            print(f"  warm-up {target.label}: {e}", file=sys.stderr)
                for round_no in range(1, self.args.rounds + 1):
                    for target in targets:
                        record = self.run_one(workload, target, round_no)
                        self.runs.append(record)
                        print("  " + progress_line(record), flush=True)
                        time.sleep(self.args.settle)
            finally:
                for target in targets:
                    self.stop_target(target, workload)

    def save_logs(self, dest: str) -> str:
        """Copy the run's logs (big ones, like lb's per-connection log, trimmed) to ``dest``."""
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        for name in sorted(os.listdir(self.logs)):
            src = os.path.join(self.logs, name)
            if os.path.getsize(src) > 4 << 20:
                with open(src, "rb") as f:
                    f.seek(-(2 << 20), os.SEEK_END)
                    data = b"[... trimmed to the last 2 MiB ...]\n" + f.read()
                with open(os.path.join(dest, name), "wb") as f:
                    f.write(data)
            else:
                shutil.copy(src, dest)
        return dest


# --- summary and tables ---------------------------------------------------------------------


UNITS = {"keepalive": ("req/s", "µs/req"), "close": ("conn/s", "µs/conn"),
         "bulk": ("MB/s", "s/GB"), "post": ("req/s", "µs/req"), "iperf": ("Gbit/s", "s/GB"),
         "idle": ("held", "µs/conn")}
RATE_WORKLOADS = ("keepalive", "close", "post")  # figures per request, with latencies


def derive(record: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Per-run figures: throughput, CPU per unit, RSS."""
    w = record["workload"]
    cpu = record.get("proxy_cpu_s")
    out: Dict[str, Optional[float]] = {"throughput": None, "cpu_per_unit": None,
                                       "rss_mb": None, "p50_us": record.get("p50_us"),
                                       "p99_us": record.get("p99_us"),
                                       "mb_per_s_up": record.get("mb_per_s_up"),
                                       "backend_conns_per_req": None}
    if record.get("backend_connections") is not None and record.get("requests"):
        out["backend_conns_per_req"] = record["backend_connections"] / record["requests"]
    if w in RATE_WORKLOADS:
        out["throughput"] = record["rate"]
        if cpu is not None and record["requests"]:
            out["cpu_per_unit"] = cpu / record["requests"] * 1e6
    elif w in ("bulk", "iperf"):
        out["throughput"] = record["mb_per_s"] if w == "bulk" else record["gbit_per_s"]
        if cpu is not None and record["bytes"]:
            out["cpu_per_unit"] = cpu / (record["bytes"] / 1e9)
    elif w == "idle":
        out["throughput"] = record["opened"]
        if record.get("open_cpu_s") is not None and record["opened"]:
            out["cpu_per_unit"] = record["open_cpu_s"] / record["opened"] * 1e6
    if w == "idle":
        if record.get("rss_bytes") is not None:
            out["rss_mb"] = record["rss_bytes"] / 1e6
    elif record.get("peak_rss_bytes") is not None:
        out["rss_mb"] = record["peak_rss_bytes"] / 1e6
    return out


def median(values: List[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: List[Dict[str, Any]], idle_target: int) -> List[Dict[str, Any]]:
    """Medians per workload × proxy, then ratios to HAProxy (CPU, RSS) and direct."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for record in runs:
        groups.setdefault((record["workload"], record["proxy"]), []).append(record)
    rows = []
    for (workload, proxy), records in groups.items():
        good = [r for r in records if "failure" not in r]
        figures = [derive(r) for r in good]
        row: Dict[str, Any] = {"workload": workload, "proxy": proxy, "runs": len(good),
                               "failures": [r["failure"] for r in records if "failure" in r]}
        for key in ("throughput", "cpu_per_unit", "rss_mb", "p50_us", "p99_us",
                    "mb_per_s_up", "backend_conns_per_req"):
            row[key] = median([f[key] for f in figures])
        errors: Counter = Counter()
        for r in good:
            for k, v in (r.get("errors") or {}).items():
                if isinstance(v, int):
                    errors[k] += v
        row["errors"] = dict(errors)
        measured = [r for r in good if r.get("rss_bytes") and r.get("opened")]
        if workload == "idle" and measured:
            # The baseline is the proxy before it ever held these connections: later rounds
            # start with memory the allocator kept from the round before.
            before = min(r.get("rss_fresh_bytes") or r["rss_before_bytes"] for r in measured)
            per_conn = median([(r["rss_bytes"] - before) / r["opened"] for r in measured])
            row["rss_per_conn_kb"] = per_conn / 1024 if per_conn is not None else None
            row["fds"] = median([r.get("fds") for r in good])
            row["held"] = row["throughput"]
            if per_conn is not None and before is not None:
                row["rss_at_target_mb"] = (before + per_conn * idle_target) / 1e6
                # the figure is at 10,000 whatever this run held
                row["rss_at_10000_mb"] = (
                    row["rss_mb"] if row["held"] == IDLE_TARGET and row["rss_mb"] is not None
                    else (before + per_conn * IDLE_TARGET) / 1e6)
        rows.append(row)
    by_key = {(r["workload"], r["proxy"]): r for r in rows}
    for row in rows:
        # ratios to the HAProxy of the same mode: tcp proxies to HAProxy (mode tcp), http
        # proxies to HAProxy http; direct is a ceiling, not compared
        ha = (by_key.get((row["workload"], reference(row["proxy"])))
              if row["proxy"] != "direct" else None)
        direct = by_key.get((row["workload"], "direct"))
        row["cpu_vs_haproxy"] = ratio(row["cpu_per_unit"], ha and ha["cpu_per_unit"])
        row["rss_vs_haproxy"] = ratio(row["rss_mb"], ha and ha["rss_mb"])
        row["throughput_vs_haproxy"] = (ratio(row["throughput"], ha and ha["throughput"])
                                        if row["workload"] != "idle" else None)
        row["throughput_vs_direct"] = (ratio(row["throughput"], direct and direct["throughput"])
                                       if row["workload"] != "idle" else None)
    order = {w: i for i, w in enumerate(WORKLOADS)}
    porder = {p: i for i, p in enumerate(PROXIES)}
    rows.sort(key=lambda r: (order[r["workload"]], porder[r["proxy"]]))
    return rows


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def goals(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets for lb's HTTP mode, checked for every lb http variant that was
    selected (measured or not: a variant that did not start says so)."""
    by_key = {(r["workload"], r["proxy"]): r for r in rows}
    out = []
    for proxy in ("lb-http", "lb-pypy-http", "lb-base-http"):
        if not any(r["proxy"] == proxy for r in rows):
            continue
        for workload, key, bound, at_most, what in HTTP_GOALS:
            row = by_key.get((workload, proxy))
            if row is None:
                continue  # workload not selected
            value = row.get(key)
            entry: Dict[str, Any] = {"proxy": proxy, "workload": workload, "figure": key,
                                     "what": what, "bound": bound, "at_most": at_most,
                                     "value": value}
            if value is None:
                entry["met"] = None
                entry["why"] = (row["failures"][0].splitlines()[0][:120] if row["failures"]
                                else "no HAProxy http figure to compare with")
            else:
                entry["met"] = value <= bound if at_most else value >= bound
                if key == "rss_at_10000_mb" and row.get("held") != IDLE_TARGET:
                    entry["extrapolated_from"] = row.get("held")
            out.append(entry)
    return out


def goal_lines(entries: List[Dict[str, Any]]) -> List[str]:
    lines = []
    for proxy in dict.fromkeys(e["proxy"] for e in entries):
        mine = [e for e in entries if e["proxy"] == proxy]
        whys = {e.get("why") for e in mine}
        if all(e["met"] is None for e in mine) and len(whys) == 1:
            lines.append(f"{LABELS[proxy]}: none measured ({whys.pop()})")
            entries = [e for e in entries if e["proxy"] != proxy]
    for e in entries:
        unit = " MB" if e["figure"] == "rss_at_10000_mb" else "×"
        target = f"{'≤' if e['at_most'] else '≥'} {e['bound']:g}{unit}"
        if e["met"] is None:
            got = f"not measured ({e['why']})"
        else:
            value = f"{e['value']:.0f} MB" if unit == " MB" else f"{e['value']:.2f}×"
            if e.get("extrapolated_from"):
                value = f"≈{value} (extrapolated from {e['extrapolated_from']:,.0f})"
            got = f"{value} {'met' if e['met'] else 'MISSED'}"
        lines.append(f"{LABELS[e['proxy']]}: {e['what']} {target}: {got}")
    return lines


def fmt_us(us: Optional[float]) -> str:
    if us is None:
        return "—"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def fmt_throughput(workload: str, value: Optional[float]) -> str:
    if value is None:
        return "—"
    unit = UNITS[workload][0]
    if workload == "iperf":
        return f"{value:.2f} {unit}"
    return f"{value:,.0f} {unit}"


def fmt_cpu(workload: str, value: Optional[float]) -> str:
    if value is None:
        return "—"
    unit = UNITS[workload][1]
    return f"{value:.2f} {unit}" if unit == "s/GB" else f"{value:.1f} {unit}"


def fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


HEADERS = ["Workload", "Proxy", "Throughput", "vs direct", "p50", "p99", "Proxy CPU",
           "CPU vs HAProxy", "RSS", "RSS vs HAProxy", "Notes"]


def table_rows(rows: List[Dict[str, Any]], idle_target: int) -> List[List[str]]:
    out = []
    for row in rows:
        w = row["workload"]
        notes = [f"{k} {v:,}" for k, v in row["errors"].items()]
        if w == "post" and row.get("mb_per_s_up") is not None:
            notes.append(f"{row['mb_per_s_up']:,.0f} MB/s up")
        if row.get("backend_conns_per_req") is not None:
            notes.append(f"{row['backend_conns_per_req']:.2f} new backend conns/req")
        if row["failures"] and not row["runs"] and all(
                f.startswith("did not start") for f in row["failures"]):
            notes.append("did not start (see below)")
        elif row["failures"]:
            notes.append(f"{len(row['failures'])} run(s) failed")
        if w == "idle" and row.get("fds") is not None:
            notes.append(f"{row['fds']:,.0f} fds")
            if row.get("rss_per_conn_kb") is not None:
                notes.append(f"{row['rss_per_conn_kb']:.1f} KB/conn")
            if row.get("held") and row["held"] < idle_target and row.get("rss_at_target_mb"):
                notes.append(f"≈{row['rss_at_target_mb']:.0f} MB at {idle_target:,}")
        rss = "—" if row["rss_mb"] is None else f"{row['rss_mb']:.1f} MB"
        out.append([
            w, LABELS[row["proxy"]], fmt_throughput(w, row["throughput"]),
            fmt_ratio(row["throughput_vs_direct"]),
            fmt_us(row["p50_us"]) if w in RATE_WORKLOADS else "—",
            fmt_us(row["p99_us"]) if w in RATE_WORKLOADS else "—",
            fmt_cpu(w, row["cpu_per_unit"]) if row["proxy"] != "direct" else "—",
            fmt_ratio(row["cpu_vs_haproxy"]), rss, fmt_ratio(row["rss_vs_haproxy"]),
            "; ".join(notes)])
    return out


def text_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADERS] + rows) for i in range(len(HEADERS))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    previous = None
    for r in rows:
        if previous is not None and r[0] != previous:
            lines.append("")
        previous = r[0]
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(rows: List[List[str]]) -> str:
    align = ["---", "---"] + ["---:"] * (len(HEADERS) - 3) + ["---"]
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def progress_line(record: Dict[str, Any]) -> str:
    head = f"{record['workload']:<9} r{record['round']} {LABELS[record['proxy']]:<12}"
    if "failure" in record:
        return f"{head} FAILED: {record['failure'].splitlines()[0]}"
    f = derive(record)
    w = record["workload"]
    parts = [fmt_throughput(w, f["throughput"])]
    if f["p99_us"] is not None:
        parts.append(f"p50 {fmt_us(f['p50_us'])} p99 {fmt_us(f['p99_us'])}")
    if f["cpu_per_unit"] is not None:
        parts.append(f"CPU {fmt_cpu(w, f['cpu_per_unit'])}")
    if f["rss_mb"] is not None:
        parts.append(f"RSS {f['rss_mb']:.1f} MB")
    if record.get("errors"):
        parts.append(f"errors {record['errors']}")
    return f"{head} " + ", ".join(parts)


# --- machine and versions -------------------------------------------------------------------


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "arch": platform.machine()}
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
        info["cpu_model"] = m.group(1).strip() if m else platform.processor()
        m = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
        info["memory_gb"] = round(int(m.group(1)) / 1024 / 1024, 1) if m else None
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', _read("/etc/os-release"), re.M)
        info["os"] = m.group(1) if m else None
    except OSError:
        pass
    return info


def versions() -> Dict[str, str]:
    python = os.path.join(ROOT, ".venv", "bin", "python")
    rev = command_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    def version(argv: List[str], pattern: str) -> str:
        text = command_output(argv)
        m = re.search(pattern, text)
        return m.group(1) if m else text.splitlines()[0][:60] if text else "?"

    return {
        "haproxy": version(["haproxy", "-v"], r"version (\S+)"),
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": version(["wrk", "-v"], r"wrk (?:debian/)?(\S+)"),
        "iperf3": version(["iperf3", "--version"], r"iperf (\S+)"),
        "python": command_output([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "pypy": pypy_version(),
        "twisted": command_output([python, "-c", "import twisted; print(twisted.__version__)"]),
        "lb": rev + (" (with uncommitted changes)" if dirty and not dirty.startswith("?")
                     else ""),
    }


def pypy_version() -> str:
    python = os.path.join(VENVS["lb-pypy"], "bin", "python")
    if not os.path.exists(python):
        return "-"
    return command_output([python, "-c", "import sys; v = sys.pypy_version_info; "
                           "print('%d.%d.%d (Python %s)' % (v[:3] + (sys.version.split()[0],)))"])


def header_lines(info: Dict[str, Any], settings: Dict[str, Any], date: str) -> List[str]:
    m = info["machine"]
    lines = [
        f"{date}, {m.get('cpu_model')} ({m.get('cpus')} CPUs, {m.get('memory_gb')} GB), "
        f"{m.get('os')}, kernel {m.get('kernel')}",
        f"{settings['duration']:g}s runs, {settings['rounds']} round(s), medians; "
        f"{settings['pinning']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
    ]
    if settings.get("note"):
        lines.append(f"note: {settings['note']}")
    return lines


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measured run (default 10; --quick: 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs per workload and proxy; medians are reported "
                             "(default 3; --quick: 1)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="tcp: the TCP targets (HAProxy mode tcp, nginx stream, lb tcp "
                             "listeners) and their workloads; http: the HTTP targets (HAProxy "
                             "mode http, nginx proxy_pass, lb mode http) and theirs; both "
                             "(default): all, HTTP targets next to TCP ones in the same rounds")
    parser.add_argument("--only", default=None,
                        help=f"workloads, comma-separated (default: those of the mode, all "
                             f"being {','.join(WORKLOADS)}; iperf runs on tcp targets only, "
                             f"post on http targets only, both with direct)")
    parser.add_argument("--proxies", default=None,
                        help=f"targets, comma-separated (default: those of the mode, all "
                             f"being {','.join(p for p in PROXIES if 'base' not in p)}; "
                             f"lb-base and lb-base-http come with --baseline)")
    parser.add_argument("--access-logs", action="store_true",
                        help="HAProxy http and nginx http also log one line per request, as "
                             "lb's HTTP mode does by default (off: the references run "
                             "without logging, as they are usually benchmarked)")
    parser.add_argument("--quick", action="store_true",
                        help="development: 2s runs, 1 round, 2,000 idle connections")
    parser.add_argument("--idle-count", type=int, default=None,
                        help=f"idle connections held through each proxy (default "
                             f"{IDLE_TARGET:,}; --quick: 2,000; capped by the fd limit)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of unmeasured wrk load per proxy before each workload")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds of pause between runs")
    parser.add_argument("--proxy-cpu", default=None,
                        help="CPU list (taskset -c) for the proxies (default 1 on >= 2 CPUs)")
    parser.add_argument("--load-cpu", default=None,
                        help="CPU list for wrk, iperf3, the nginx backend and the idle client "
                             "(default 0 on >= 2 CPUs)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes")
    parser.add_argument("--baseline", metavar="DIR", default=None,
                        help="also measure the lb checked out in DIR (with its own .venv), "
                             "e.g. an earlier commit, in the same alternating rounds")
    parser.add_argument("--note", default="",
                        help="a line printed with the table, e.g. that the machine was shared")
    parser.add_argument("--report", metavar="JSON", default=None,
                        help="run nothing: summarize the runs saved in JSON again and "
                             "rewrite its summary and markdown")
    parser.add_argument("--output", default=os.path.join(RESULTS, "latest.json"),
                        help="where the JSON goes (a .md beside it gets the markdown table)")
    args = parser.parse_args(argv)
    if args.report:
        return args
    modes = {"tcp": ("tcp",), "http": ("http",), "both": ("tcp", "http")}[args.mode or "both"]
    if args.proxies is None:
        args.proxies = [p for p in PROXIES
                        if "base" not in p and (p == "direct" or proxy_mode(p) in modes)]
    else:
        args.proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
        bad = [p for p in args.proxies if p not in PROXIES]
        if bad or not args.proxies:
            parser.error(f"--proxies: unknown {', '.join(bad) or 'empty list'} "
                         f"(choose from {','.join(PROXIES)})")
        if args.mode:
            other = [p for p in args.proxies if p != "direct" and proxy_mode(p) not in modes]
            if other:
                parser.error(f"--proxies {','.join(other)} not in --mode {args.mode}")
        if any("base" in p for p in args.proxies) and not args.baseline:
            parser.error("--proxies lb-base, lb-base-http: the baseline needs --baseline DIR")
    if args.baseline:
        venv = os.path.join(os.path.abspath(args.baseline), ".venv")
        rev = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        for name, label, mode in (("lb-base", "lb", "tcp"), ("lb-base-http", "lb http", "http")):
            VENVS[name] = venv
            LABELS[name] = f"{label} (baseline {rev or args.baseline})"
            if mode in modes and name not in args.proxies and (
                    args.mode or any(proxy_mode(p) == mode for p in args.proxies)):
                args.proxies.append(name)
    selected = [p for p in args.proxies if p != "direct"]
    if args.only is None:
        args.only = [w for w in WORKLOADS
                     if any(runs_on(w, p) for p in selected) or (not selected and w != "idle")]
    else:
        args.only = [w.strip() for w in args.only.split(",") if w.strip()]
        bad = [w for w in args.only if w not in WORKLOADS]
        if bad or not args.only:
            parser.error(f"--only: unknown {', '.join(bad) or 'empty list'} "
                         f"(choose from {','.join(WORKLOADS)})")
        unused = [w for w in args.only
                  if not any(runs_on(w, p) for p in (selected or args.proxies))]
        if unused:
            parser.error(f"--only {','.join(unused)}: no selected proxy runs it "
                         f"(iperf: tcp targets; post: http targets; both with direct)")
    args.only = [w for w in WORKLOADS if w in args.only]
    args.proxies = [p for p in PROXIES if p in args.proxies]
    if args.duration is None:
        args.duration = 2.0 if args.quick else 10.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.idle_count is None:
        args.idle_count = 2000 if args.quick else IDLE_TARGET
    if not (1 <= args.duration <= 600):
        parser.error("--duration must be within 1-600 seconds (wrk takes whole seconds)")
    if not (1 <= args.rounds <= 50):
        parser.error("--rounds must be within 1-50")
    if not (1 <= args.idle_count <= 100_000):
        parser.error("--idle-count must be within 1-100000")
    available = sorted(os.sched_getaffinity(0))
    if args.no_pin:
        args.proxy_cpu = args.load_cpu = None
    elif len(available) >= 2:
        args.proxy_cpu = args.proxy_cpu or str(available[1])
        args.load_cpu = args.load_cpu or str(available[0])
    return args


def pinning_text(args: argparse.Namespace) -> str:
    if args.proxy_cpu is None and args.load_cpu is None:
        return "no CPU pinning"
    return (f"proxy on CPU {args.proxy_cpu or 'any'}; wrk, iperf3, nginx backend and idle "
            f"client on CPU {args.load_cpu or 'any'}")


def check_tools() -> None:
    missing = [t for t in ("nginx", "haproxy", "wrk", "iperf3") if not shutil.which(t)]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run bench/run, which installs them")


def publish(report: Dict[str, Any], output: str, logs: str) -> None:
    """Summarize the runs, write the JSON and markdown, print the tables."""
    settings = report["settings"]
    target = settings["idle_target"]
    rows = summarize(report["runs"], target)
    report["summary"] = rows
    cells = table_rows(rows, target)
    date = datetime.datetime.fromisoformat(report["date"]).strftime("%Y-%m-%d %H:%M UTC")
    head = header_lines(report, settings, date)
    if report.get("interrupted"):
        head.append("INTERRUPTED: only the runs finished before Ctrl-C")
    # one note per distinct failure, naming the workloads it hit (a proxy that refused
    # its config fails the same way in every workload)
    failures: Dict[tuple, List[str]] = {}
    for r in rows:
        for f in r["failures"]:
            workloads = failures.setdefault((r["proxy"], f.splitlines()[0]), [])
            if r["workload"] not in workloads:
                workloads.append(r["workload"])
    notes = report["notes"] + [f"{LABELS[proxy]} {', '.join(ws)}: {line}"
                               for (proxy, line), ws in failures.items()]
    report["goals"] = goals(rows)
    goal_text = goal_lines(report["goals"])
    with open(output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    goal_head = "HTTP-mode targets (the issue's; ratios to HAProxy http in this run):"
    markdown = "\n".join([f"{line}  " for line in head] + [""] + [markdown_table(cells)] +
                         ([""] + [f"- {n}" for n in notes] if notes else []) +
                         ([""] + [goal_head] + [f"- {g}" for g in goal_text]
                          if goal_text else []))
    with open(os.path.splitext(output)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    print()
    print("\n".join(head))
    print()
    print(text_table(cells))
    for n in notes:
        print(f"note: {n}")
    if goal_text:
        print(f"\n{goal_head}")
        for g in goal_text:
            print(f"  {g}")
        print()
    for key, entry in report.get("proxy_logs", {}).items():
        if entry.get("problem_lines"):
            print(f"log {key}: {len(entry['problem_lines'])} problem line(s), first: "
                  f"{entry['problem_lines'][0]}")
    print(f"\nJSON: {output}\nlogs: {logs}\n\nMarkdown (for README):\n")
    print(markdown)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            report = json.load(f)
        publish(report, args.report, os.path.join(os.path.dirname(args.report), "logs"))
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    check_tools()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    # a shell starts background jobs with SIGINT ignored; Ctrl-C must still clean up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bench = Bench(args)
    settings = {"duration": args.duration, "rounds": args.rounds, "workloads": args.only,
                "proxies": args.proxies, "pinning": pinning_text(args),
                "mode": args.mode or "both", "access_logs": args.access_logs,
                "wrk_connections": WRK_CONNECTIONS, "idle_connections": bench.idle_count,
                "idle_target": args.idle_count, "open_files_limit": bench.nofile,
                "post_body_bytes": POST_SIZE, "warmup_s": args.warmup, "note": args.note}
    print(f"bench: {', '.join(args.only)} × {', '.join(args.proxies)}; {args.duration:g}s runs, "
          f"{args.rounds} round(s); {settings['pinning']}; logs in {bench.logs}", flush=True)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted, stopping everything", file=sys.stderr)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        bench.cleanup()
        return 1
    finally:
        bench.cleanup()
    if not bench.runs:
        return 130 if interrupted else 1

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    logs = bench.save_logs(os.path.join(os.path.dirname(os.path.abspath(args.output)), "logs"))
    report = {"date": bench.started.isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(), "settings": settings, "runs": bench.runs,
              "notes": bench.notes, "proxy_logs": bench.proxy_logs,
              "checks": {"backend": bench.backend_checks, "targets": bench.target_checks},
              "interrupted": interrupted}
    publish(report, args.output, logs)
    shutil.rmtree(bench.tmp, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
