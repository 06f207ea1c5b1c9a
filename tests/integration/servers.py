"""Server processes for integration tests: started on loopback in a process group of their own,
polled over HTTP until ready, logged to a file, and always stopped (the whole group)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

STOP_TIMEOUT = 15.0
# Loopback only, never through a proxy that the environment may name.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ServerProcess:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return f"--- {self.name} log ({self.log}) ---\n{text[-chars:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In the child: SIGTERM it if the test process dies without running its teardown."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(name: str, cmd: list[str], *, url: str, env: dict[str, str], log: Path,
          cwd: Path | None = None) -> ServerProcess:
    """Start `cmd` in its own session (so its workers are stopped with it), output to `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    return ServerProcess(name, proc, url, log)


def wait_ready(server: ServerProcess, path: str, timeout: float) -> float:
    """Poll GET `path` until 200; fail at once, with the log, if the process exits.

    Returns the seconds it took."""
    start_time = time.monotonic()
    deadline = start_time + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.name} exited with {server.proc.returncode}\n"
                        f"{server.log_tail()}")
        try:
            with OPENER.open(f"{server.url}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start_time
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{server.name} not ready after {timeout:.0f} s\n{server.log_tail()}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the group id was reused by someone else's processes
        return False
    return True


def stop(server: ServerProcess) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after a grace period."""
    proc, pgid = server.proc, server.proc.pid  # start_new_session: leader's pid is the group id
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive(pgid):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(pgid):
                return
            time.sleep(0.2)
    proc.wait(timeout=STOP_TIMEOUT)
