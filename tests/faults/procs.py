"""Shared by the fault tests: a tiny real workspace, the environment a `ratchet` subprocess runs
in, and the process tree of a run read from /proc (to prove nothing of it is left)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, TINY

RATCHET = str(Path(sys.executable).parent / "ratchet")


def tiny_workspace(path: Path, batches: int = 1) -> Path:
    """A real workspace (git, DVC, SQLite MLflow) on the tiny model with `batches` ingested."""
    from ratchet import workspace
    from ratchet.demo_data import all_labels, demo_batches, write_batch

    o = {s: dict(v) for s, v in TINY.items()}
    o.update(model={"source": "tiny"}, data={"labels": all_labels()},
             pretrain={"enabled": False}, augment={"enabled": False},
             noise={"cold_start": "skip"}, drift={"permutations": 400, "max_rows": 200},
             evaluate={"bootstrap_resamples": 200, "latency_examples": 8, "behaviour_rows": 20},
             gate={**TINY["gate"], "min_score": 0.0, "min_invariance": 0.0})
    ws = workspace.init(path, o)
    for b in demo_batches(seed=0, scale=0.3)[:batches]:
        workspace.ingest(ws, write_batch(b, ws / "data/incoming"))
    return ws


def ratchet_env(home: Path, **extra: str) -> dict[str, str]:
    """What `ratchet` runs with in these tests: this checkout first on PYTHONPATH, telemetry
    off, Prefect's state in `home`, no Prefect API named unless `extra` names one."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PREFECT_HOME": str(home), "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    })
    env.update(extra)
    return env


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, session id, start time) of a live process, None once it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[3]), fields[19]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def tree(root: int, session: int | None = None) -> dict[int, str]:
    """Live processes under `root` (by parent links) or in `session`: pid -> start time."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            procs[int(entry)] = st
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, (ppid, _sid, start) in procs.items():
            if ppid == pid and child not in found:
                found[child] = start
                frontier.append(child)
    for pid, (_ppid, sid, start) in procs.items():
        if session is not None and sid == session and pid != root:
            found.setdefault(pid, start)
    return found


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of `size` (e.g. "2m") mounted on `folder` (made here), for a disk that fills
    up; unmounted afterwards whatever happened. Skips the test, with the reason, where
    mounting is not allowed."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: "
                    f"{proc.stderr.strip() or 'not permitted'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def default_signals() -> None:  # in the child, before exec
    """SIGINT as a terminal's foreground job has it: a shell without job control starts
    background jobs with SIGINT ignored, and their children inherit that, which would make
    every interrupt fault a silent no-op."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Watched:
    """A `ratchet` subprocess in a session of its own, its descendants remembered as they
    appear (so that one reparented to init after its parent died is still known)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([RATCHET, *args], env=env, cwd=cwd,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=default_signals)
        self.seen: dict[int, str] = {}  # pid -> start time
        self.names: dict[int, str] = {}

    def poll_tree(self) -> None:
        for pid, start in tree(self.proc.pid, session=self.proc.pid).items():
            if pid not in self.seen:
                self.seen[pid] = start
                self.names[pid] = cmdline(pid)

    def wait_for(self, what, timeout: float, step: float = 0.2) -> None:
        """Poll until `what(self)` is true; fail with the log if the run ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll_tree()
            if what(self):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"ratchet exited ({self.proc.returncode}) first\n"
                                     f"{self.tail()}")
            time.sleep(step)
        raise AssertionError(f"not seen within {timeout:.0f} s\n{self.tail()}")

    def running(self, needle: str) -> bool:
        return any(needle in cmdline(pid) for pid in self.seen if self.alive(pid))

    def alive(self, pid: int) -> bool:
        st = _stat(pid)
        return st is not None and st[2] == self.seen.get(pid, st[2])

    def left(self) -> dict[int, str]:
        """Descendants seen at any time that are still alive."""
        if self.proc.poll() is None:
            self.poll_tree()
        return {pid: self.names[pid] for pid in self.seen if self.alive(pid)}

    def wait_exit(self, timeout: float) -> float:
        """Seconds until it exited; AssertionError (after killing what is left) past timeout."""
        start = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - start < timeout:
            self.poll_tree()
            time.sleep(0.05)
        took = time.monotonic() - start
        if self.proc.poll() is None:
            self.kill_all()
            raise AssertionError(f"ratchet still running {timeout:.0f} s after the signal\n"
                                 f"{self.tail()}")
        return took

    def kill_all(self) -> None:
        import signal

        for pid in [self.proc.pid, *self.left()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self, chars: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.log} ---\n{text[-chars:]}"
