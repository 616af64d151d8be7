"""lb as operators run it: twistd processes, signals, `lb check`, plugin discovery."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any, Iterator, List

import pytest

from lb.testing import free_port
from tests.processes import BIN, Proc, accepts, demo_backends, http_get, twistd_lb, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def procs() -> Iterator[List[Proc]]:
    """Every process a test starts is stopped at the end."""
    started: List[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def write_config(path: str, listeners: str, backend_port: int) -> None:
    lines = ['admin: {bind: "127.0.0.1:0"}', "shutdown_timeout: 20s", "listeners:"]
    lines += ["  " + line for line in listeners.splitlines()]
    lines += ["pools:", "  web:", f'    peers: ["127.0.0.1:{backend_port}"]']
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def start(tmp_path: Any, procs: List[Proc], port: int) -> tuple:
    backend_port = free_port()
    backend = demo_backends([backend_port], str(tmp_path), str(tmp_path / "backend.log"))
    procs.append(backend)
    wait_for(lambda: accepts(backend_port), what="demo backend")
    config = tmp_path / "lb.yaml"
    write_config(str(config), f'a: {{bind: "127.0.0.1:{port}", pool: web}}', backend_port)
    lb = twistd_lb(str(config), str(tmp_path), str(tmp_path / "lb.log"))
    procs.append(lb)
    wait_for(lambda: accepts(port), what="lb listener")
    return lb, config, backend_port


def test_sighup_adds_listener_and_keeps_open_connection(tmp_path: Any, procs: List[Proc]
                                                        ) -> None:
    """SIGHUP with a new listener in the file: the new port starts accepting, and a
    keep-alive connection opened before the reload keeps working on the old one."""
    port, new_port = free_port(), free_port()
    lb, config, backend_port = start(tmp_path, procs, port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
        assert b"hello from backend" in http_get(held)
        write_config(str(config), f'a: {{bind: "127.0.0.1:{port}", pool: web}}\n'
                                  f'b: {{bind: "127.0.0.1:{new_port}", pool: web}}',
                     backend_port)
        lb.signal(signal.SIGHUP)
        wait_for(lambda: accepts(new_port), what="new listener after SIGHUP")
        assert b"hello from backend" in http_get(held)
    assert "reloaded" in lb.log()


def test_sighup_with_bad_config_keeps_running_config(tmp_path: Any, procs: List[Proc]
                                                     ) -> None:
    """A config that fails validation on SIGHUP is logged with its problems and rejected;
    the listener keeps serving."""
    port = free_port()
    lb, config, _ = start(tmp_path, procs, port)
    config.write_text("listeners:\n  a: {bind: nowhere, pool: missing}\npools: {}\n")
    lb.signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in lb.log(), what="rejection logged")
    assert "listeners.a.bind" in lb.log() and "listeners.a.pool" in lb.log()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert b"hello from backend" in http_get(s)


def test_sigterm_stops_accepting_and_lets_open_connection_finish(tmp_path: Any,
                                                                 procs: List[Proc]) -> None:
    """SIGTERM: the listener stops accepting at once, an open connection keeps working
    until it closes, and then the process exits cleanly."""
    port = free_port()
    lb, _, _ = start(tmp_path, procs, port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
        assert b"hello" in http_get(held)
        lb.signal(signal.SIGTERM)
        wait_for(lambda: not accepts(port), what="listener closed after SIGTERM")
        assert lb.popen.poll() is None
        assert b"hello from backend" in http_get(held)
    assert lb.wait(15) in (0, -signal.SIGTERM)  # twistd re-raises the signal it got
    assert re.search(r"waiting up to 20s for \d+ connection", lb.log())


def test_bad_config_at_start_lists_every_problem_and_exits_1(tmp_path: Any) -> None:
    """twistd with a bad config prints every problem and exits non-zero without binding."""
    port = free_port()
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent(f"""\
        listeners:
          a: {{bind: "127.0.0.1:{port}", pool: nope, idle_timeout: forever}}
        pools:
          web: {{peers: ["127.0.0.1:99999"], retries: -1}}
        """))
    result = subprocess.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "lb", "-c",
                             str(config)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    for key in ("listeners.a.pool", "listeners.a.idle_timeout", "pools.web.peers[0]",
                "pools.web.retries"):
        assert key in result.stderr
    assert not accepts(port)


def test_lb_check_cli(tmp_path: Any, repo_dir: str) -> None:
    """`lb check -c FILE` exits 0 with a summary for a good file (the shipped default),
    1 with `FILE: path: problem` lines for a bad one."""
    lb = os.path.join(BIN, "lb")
    good = subprocess.run([lb, "check", "-c", os.path.join(repo_dir, "etc", "lb.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "configuration OK" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: {a: {bind: '127.0.0.1:1', pool: p, colour: red}}\npools: {}\n")
    result = subprocess.run([lb, "check", "-c", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert f"{bad}: listeners.a.colour: unknown key" in result.stderr
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert len(lines) == 2  # the unknown key and the missing pool


def test_twistd_lists_plugin_from_another_directory() -> None:
    """`cd /tmp && twistd --help` lists lb with the editable install used by the tests."""
    result = subprocess.run([os.path.join(BIN, "twistd"), "--help"], cwd="/tmp",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert any(line.split()[:1] == ["lb"] for line in result.stdout.splitlines())


def test_plugin_discoverable_from_a_regular_install(tmp_path: Any, repo_dir: str) -> None:
    """A non-editable install (a built wheel's layout) also exposes the twistd plugin:
    twisted/plugins/lb_plugin.py lands in the target beside lb/ without an __init__.py."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                            "--no-build-isolation", "--target", str(target), repo_dir],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "twisted" / "plugins" / "lb_plugin.py").is_file()
    assert not (target / "twisted" / "__init__.py").exists()
    # -S: no site processing, so the editable install's .pth (the repo) is not on the path;
    # Twisted comes from the venv's site-packages, lb and its plugin only from the target.
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    env = dict(os.environ, PYTHONPATH=f"{target}:{site_packages}")
    result = subprocess.run([sys.executable, "-S", "-c",
                             "import sys; from twisted.scripts.twistd import run; "
                             "sys.argv = ['twistd', '--help']; run()"],
                            cwd="/tmp", env=env, capture_output=True, text=True, timeout=120)
    assert any(line.split()[:1] == ["lb"] for line in result.stdout.splitlines()), \
        result.stdout + result.stderr


def test_listener_that_cannot_bind_at_start_is_one_line_and_exit_1(tmp_path: Any) -> None:
    """A taken port at start: one error line naming the listener and address, exit 1, no
    Python traceback (scripts/run-demo shows this line when 8080 is taken)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "lb.yaml"
        write_config(str(config), f'web: {{bind: "127.0.0.1:{port}", pool: web}}', 1)
        result = subprocess.run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "lb", "-c",
                                 str(config)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert re.search(rf"listener web: cannot listen on 127\.0\.0\.1:{port}: .*in use", output), \
        output


def test_reload_that_cannot_bind_is_one_error_line(tmp_path: Any, procs: List[Proc]) -> None:
    """SIGHUP with a new listener on a taken port: one error line naming the listener and
    address (no critical traceback); the running config stays."""
    port = free_port()
    lb, config, backend_port = start(tmp_path, procs, port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        write_config(str(config), f'a: {{bind: "127.0.0.1:{port}", pool: web}}\n'
                                  f'b: {{bind: "127.0.0.1:{busy}", pool: web}}', backend_port)
        lb.signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in lb.log(), what="rejection logged")
    log = lb.log()
    assert "Traceback" not in log and "critical" not in log, log
    assert re.search(rf"reload rejected.*listener b: cannot listen on 127\.0\.0\.1:{busy}", log)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert b"hello from backend" in http_get(s)


def test_reload_logs_the_listeners_and_pools_it_stops(tmp_path: Any, procs: List[Proc]) -> None:
    """A reload that drops a listener and a pool says so in the log."""
    port, other = free_port(), free_port()
    lb, config, backend_port = start(tmp_path, procs, port)
    write_config(str(config), f'a: {{bind: "127.0.0.1:{port}", pool: web}}\n'
                              f'b: {{bind: "127.0.0.1:{other}", pool: extra}}', backend_port)
    with open(config, "a") as f:
        f.write(f'  extra:\n    peers: ["127.0.0.1:{backend_port}"]\n')
    lb.signal(signal.SIGHUP)
    wait_for(lambda: accepts(other), what="listener b")
    write_config(str(config), f'a: {{bind: "127.0.0.1:{port}", pool: web}}', backend_port)
    lb.signal(signal.SIGHUP)
    wait_for(lambda: lb.log().count("reloaded") == 2, what="second reload")
    log = lb.log()
    assert re.search(rf"listener b on 127\.0\.0\.1:{other} stopped", log), log
    assert re.search(r"pool extra removed", log), log
