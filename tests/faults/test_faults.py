"""The fault suite: real tiny workspaces under seeded random kills and interrupts, concurrent
writers, servers dying mid-run, a full disk and files broken by hand; after each fault the
one invariant checker (tests/faults/invariants.py).

`make test-faults` runs it all (`-m faults`, tens of minutes); two cheap faults run in
`make test`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults import harness, invariants
from tests.faults.harness import Chain, Fault, one_error_line, start
from tests.faults.invariants import ratchet_cmd, tool_env
from tests.faults.procs import small_tmpfs
from tests.integration import servers

SEED = 13
RANDOM_POINTS = 32
BIN = Path(sys.executable).parent


def _ingest(ws: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(ratchet_cmd("ingest", str(path), "-w", str(ws)), cwd=ws, env=tool_env(),
                          capture_output=True, text=True, timeout=300, check=False)


def _head(ws: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True,
                          check=True).stdout.strip()


def _ratchet(ws: Path, *args: str, timeout: float = 180, env: dict | None = None
             ) -> tuple[int | None, str]:
    """Run a ratchet command in its own session; (exit code or None if it had to be killed
    after `timeout`, stderr)."""
    proc = start(list(args), ws, ws.parent / "logs", f"cmd-{time.monotonic_ns()}", env=env)
    if not proc.wait(timeout):
        proc.kill()
        return None, proc.stderr()
    return proc.popen.returncode, proc.stderr()


def _fails_with_one_error(rc: int | None, stderr: str, what: str) -> list[str]:
    if rc is None:
        return [f"[message] {what}: still running after the timeout (it did not refuse)"]
    if rc == 0:
        return [f"[message] {what}: succeeded instead of refusing"]
    return [f"{p} ({what})" for p in one_error_line(stderr)]


# --- the quick subset (make test) --------------------------------------------------------------


def test_sigkill_in_validate_twice_leaves_every_invariant(tmp_path):
    """Two runs killed in their first stage, one after the other: the second run's start
    recovers the first; nothing is recorded, nothing is left behind."""
    ws = harness.make_workspace(tmp_path / "ws")
    chain = Chain(ws, tmp_path / "logs")
    chain.ingest_next()
    for _ in range(2):
        chain.inflict(Fault("SIGKILL", "validate", 0.2))
    last = chain._pending  # noqa: SLF001 - no registry yet: there is nothing to recover
    last.problems += chain.check()
    chain._settle(last)  # noqa: SLF001
    assert [o.problems for o in chain.outcomes] == [[], []]
    assert [o.landed for o in chain.outcomes] == ["validate", "validate"]


@pytest.mark.slow  # the fault suite only (make test-faults): make test keeps its time
def test_a_batch_deleted_by_hand_is_an_error_not_a_silent_commit(tmp_path):
    ws = harness.make_workspace(tmp_path / "ws")
    chain = Chain(ws, tmp_path / "logs")
    chain.ingest_next()
    chain.ingest_next()
    gone = sorted((ws / "data" / "batches").glob("0001-*.parquet"))[0]
    gone.unlink()
    head = _head(ws)
    proc = _ingest(ws, harness.batch_file(ws, 2))
    problems = _fails_with_one_error(proc.returncode, proc.stderr, "ingest after a deletion")
    if proc.returncode != 0 and gone.stem not in proc.stderr:
        problems.append(f"[message] the error does not name the deleted batch {gone.stem}")
    if _head(ws) != head:
        problems.append("[history] the ingest committed although a batch file was missing")
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "-q", "data/batches"], cwd=ws,
                   env=tool_env(), check=True)
    problems += invariants.check(ws, accepted=chain.accepted)
    assert problems == []


# --- random points of every stage --------------------------------------------------------------


@pytest.mark.slow
def test_random_sigkill_and_sigint_points_of_every_stage(tmp_path):
    """RANDOM_POINTS faults from a fixed seed over every stage and the record step, on the
    DVC engine and (every sixth) the Prefect engine; each checked after the next recovery."""
    outcomes, final = harness.play(tmp_path / "ws", tmp_path / "logs", RANDOM_POINTS, SEED)
    harness.dump(outcomes, tmp_path / "outcomes.json")
    landed = {o.landed for o in outcomes}
    broken = [f"{o.kind} ({o.fault.engine}): {p}" for o in outcomes for p in o.problems]
    assert broken + final == []
    assert {"validate", "finetune", "gate", "record"} <= landed, landed
    exits = [o.interrupt_exit_s for o in outcomes if o.interrupt_exit_s is not None]
    assert exits and max(exits) <= harness.INTERRUPT_BOUND_S


# --- concurrent writers ------------------------------------------------------------------------


@pytest.mark.slow
def test_three_concurrent_ingests(tmp_path):
    ws = harness.make_workspace(tmp_path / "ws")
    chain = Chain(ws, tmp_path / "logs")
    chain.ingest_next()
    problems: list[str] = []
    for round_ in range(2):
        files = [harness.batch_file(ws, chain.batches + i) for i in range(3)]
        chain.batches += 3
        procs = [start(["ingest", str(f), "-w", str(ws)], ws, tmp_path / "logs",
                       f"ingest-{round_}-{i}") for i, f in enumerate(files)]
        for p in procs:
            assert p.wait(300)
            chain._note_ingest(p.popen.returncode, p.stdout())  # noqa: SLF001
            if p.popen.returncode != 0:
                problems += one_error_line(p.stderr())
        problems += invariants.check(ws, accepted=chain.accepted, refused=chain.refused)
    assert len(chain.accepted) == 7, (chain.accepted, chain.refused)
    assert problems == []


@pytest.mark.slow
def test_two_concurrent_runs(tmp_path):
    ws = harness.make_workspace(tmp_path / "ws")
    chain = Chain(ws, tmp_path / "logs")
    chain.ingest_next()
    runs = [chain.start_run("dvc") for _ in range(2)]
    for r in runs:
        assert r.wait(harness.RUN_TIMEOUT_S)
    problems = [f"[run] a concurrent run failed: {r.stderr().strip().splitlines()[-1:]}"
                for r in runs if r.popen.returncode != 0]
    problems += chain.check() + invariants.next_run_ok(ws) + chain.check()
    assert problems == []


# --- servers dying mid-run ---------------------------------------------------------------------


def _wait_stage(proc: harness.Proc, stage: str, timeout: float = harness.RUN_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not proc.done():
        if harness.running_stage(proc.pgid) == stage:
            return True
        time.sleep(0.05)
    return False


def _prefect_server(root: Path) -> tuple[servers.ServerProcess, str]:
    port = servers.free_port()
    env = {**tool_env(), "PREFECT_HOME": str(root / "prefect-home"),
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = servers.start("prefect server", [str(BIN / "prefect"), "server", "start", "--host",
                                              "127.0.0.1", "--port", str(port)],
                           url=f"http://127.0.0.1:{port}", env=env, log=root / "prefect.log")
    servers.wait_ready(server, "/api/health", 120)
    return server, f"http://127.0.0.1:{port}/api"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "gate"])
def test_the_prefect_api_killed_mid_run(tmp_path, stage):
    """`prefect server start` killed while the flow runs a stage: the run finishes or fails
    consistently (one `error:` line), and git never names a version the registry lacks."""
    ws = harness.make_workspace(tmp_path / "ws")
    chain = Chain(ws, tmp_path / "logs")
    chain.ingest_next()
    server, api = _prefect_server(tmp_path)
    try:
        proc = start(["run", "--engine", "prefect", "-w", str(ws)], ws, tmp_path / "logs",
                     "prefect-run", env={"PREFECT_API_URL": api,
                                         "PREFECT_HOME": str(tmp_path / "prefect-home")})
        assert _wait_stage(proc, stage), proc.stderr()[-2000:]
    finally:
        servers.stop(server)
    if not proc.wait(600):
        proc.kill()
        pytest.fail("the run did not end within 600 s of the Prefect API going away")
    problems = [] if proc.popen.returncode == 0 else one_error_line(proc.stderr())
    problems += chain.check() + invariants.next_run_ok(ws) + chain.check()
    assert problems == []


def _mlflow_server(root: Path, port: int) -> servers.ServerProcess:
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
           (root / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    server = servers.start("mlflow server", cmd, url=f"http://127.0.0.1:{port}",
                           env={**tool_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                           log=root / f"mlflow-{time.monotonic_ns()}.log", cwd=root)
    servers.wait_ready(server, "/health", 120)
    return server


@pytest.mark.slow
def test_the_mlflow_server_killed_mid_run(tmp_path):
    """The tracking server killed while the gate registers: the run fails with one `error:`
    line (after a bounded retry), and once the server is back the record is consistent."""
    root = tmp_path / "mlflow"
    root.mkdir()
    port = servers.free_port()
    server = _mlflow_server(root, port)
    try:
        ws = harness.make_workspace(tmp_path / "ws",
                                    {"registry": {"tracking_uri": f"http://127.0.0.1:{port}"}})
        chain = Chain(ws, tmp_path / "logs")
        chain.ingest_next()
        proc = chain.start_run("dvc")
        assert _wait_stage(proc, "gate"), proc.stderr()[-2000:]
        time.sleep(3)
        servers.stop(server)
        if not proc.wait(600):
            proc.kill()
            pytest.fail("the run did not end within 600 s of the MLflow server going away")
        problems = _fails_with_one_error(proc.popen.returncode, proc.stderr(),
                                         "run with the MLflow server gone")
        server = _mlflow_server(root, port)
        problems += chain.check() + invariants.next_run_ok(ws) + chain.check()
    finally:
        servers.stop(server)
    assert problems == []


# --- a full disk --------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_during_a_run(tmp_path):
    """The workspace on a small tmpfs, filled up before finetune writes its checkpoints: one
    `error:` line that says "no space left" and the path, nothing partial left behind."""
    with small_tmpfs(tmp_path / "small", "400m") as mnt:
        ws = harness.make_workspace(mnt / "ws")
        chain = Chain(ws, tmp_path / "logs")
        chain.ingest_next()
        assert invariants.next_run_ok(ws) == []
        chain.bump_learning_rate()
        free = shutil.disk_usage(mnt).free
        filler = mnt / "filler"
        with open(filler, "wb") as fh:  # leave ~1 MB: less than a checkpoint of the model
            fh.truncate(0)
            chunk = b"\0" * (1 << 20)
            for _ in range(max(0, free // len(chunk) - 1)):
                fh.write(chunk)
        rc, stderr = _ratchet(ws, "run", "--engine", "dvc", "-w", str(ws), timeout=600)
        problems = _fails_with_one_error(rc, stderr, "run on a full disk")
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        if errors and "no space left" not in errors[-1].lower():
            problems.append(f"[message] the error does not say 'no space left': {errors[-1]}")
        filler.unlink()
        problems += chain.check() + invariants.next_run_ok(ws) + chain.check()
    assert problems == []


# --- files broken by hand -----------------------------------------------------------------------


def _truncate_at_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))


@pytest.mark.slow
def test_corruptions_fail_with_one_error_line_and_keep_the_record(tmp_path):
    """A batch deleted by hand, mlflow.db deleted, params.yaml emptied or truncated at a line
    boundary: the next command refuses with one `error:` line, commits nothing, and once the
    file is restored every invariant holds and the next run succeeds."""
    ws = harness.make_workspace(tmp_path / "ws")
    chain = Chain(ws, tmp_path / "logs")
    chain.ingest_next()
    assert invariants.next_run_ok(ws) == []
    problems: list[str] = []

    def refused(what: str, *args: str) -> None:
        head = _head(ws)
        rc, stderr = _ratchet(ws, *args, "-w", str(ws))
        problems.extend(_fails_with_one_error(rc, stderr, what))
        if _head(ws) != head:
            problems.append(f"[history] {what}: a commit was made")

    # a batch file deleted by hand, then an ingest
    gone = sorted((ws / "data" / "batches").glob("*.parquet"))[0]
    gone.unlink()
    refused("ingest after a batch was deleted", "ingest", str(harness.batch_file(ws, 1)))
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "-q", "data/batches"], cwd=ws,
                   env=tool_env(), check=True)
    problems += chain.check()
    # mlflow.db deleted, then a run
    db = ws / "mlflow.db"
    shutil.copyfile(db, tmp_path / "mlflow.db.bak")
    db.unlink()
    refused("run with mlflow.db deleted", "run", "--engine", "dvc")
    db.unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "mlflow.db.bak", db)
    problems += chain.check()
    # params.yaml emptied, then truncated at a line boundary
    for what, damage in (("emptied", lambda p: p.write_text("")),
                         ("truncated at a line boundary", _truncate_at_line)):
        damage(ws / "params.yaml")
        refused(f"run with params.yaml {what}", "run", "--engine", "dvc")
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=ws, check=True)
        problems += chain.check()
    subprocess.run(["git", "checkout", "--", "."], cwd=ws, check=False)
    problems += invariants.next_run_ok(ws) + chain.check()
    assert problems == []
