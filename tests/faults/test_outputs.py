"""A run's commit never takes a DVC-cached output (issue 13, found by the fault suite).

The cause: when a stage of `dvc repro` fails (a Ctrl-C reaches the stage's child, which exits
non-zero), DVC takes back the `.gitignore` entries it added during that repro, i.e. those of
every stage that ran there for the first time. Those stages are cached afterwards, so DVC never
writes the entries again, and the next run's `git add -A` committed their outputs (a model, the
augmented data, the validation docs); the run after that stopped in validate with `output ... is
already tracked by SCM`.

Real workspaces throughout (git, DVC, the pipeline's own stages); the quick tests rebuild the
state the failed repro leaves (the output present, its entry gone) with one real stage: noise,
whose judgements folder is DVC-cached (the validation docs the fault suite found first are
`cache: false` since issue 14, rebuilt by validate and git-ignored by the workspace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ratchet import workspace
from tests.faults import harness
from tests.faults.invariants import ratchet_cmd, tool_env

OUT = "data/noise"  # a DVC-cached output of a quick stage
OUT_IGNORE = Path("data/.gitignore")
ENTRY = "/noise"
DOCS = "reports/validation/docs"  # a rebuilt output (workspace.REBUILT)


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, env=tool_env(), capture_output=True,
                          text=True, check=True).stdout


def cached_outs(ws: Path) -> list[str]:
    """Every output git must not hold: DVC-cached (read from dvc.yaml and the `.dvc` files,
    independently of the code under test, which asks DVC) or rebuilt (`workspace.REBUILT`)."""
    outs = []
    stages = (yaml.safe_load((ws / "dvc.yaml").read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if (opts or {}).get("cache", True) or str(path) in workspace.REBUILT:
                outs.append(str(path))
    for dvcfile in ws.glob("**/*.dvc"):
        if not dvcfile.is_file() or {".dvc", ".git"} & set(dvcfile.relative_to(ws).parts[:-1]):
            continue
        for out in (yaml.safe_load(dvcfile.read_text()) or {}).get("outs", []):
            outs.append(str((dvcfile.parent / out["path"]).relative_to(ws)))
    return sorted(outs)


def tracked_outputs(ws: Path) -> list[str]:
    """Files of DVC-cached outputs that git tracks (in the index) or HEAD holds."""
    outs = cached_outs(ws)
    index = _git(ws, "ls-files", "--", *outs).split()
    head = _git(ws, "ls-tree", "-r", "--name-only", "HEAD", "--", *outs).split()
    return sorted(set(index) | set(head))


def _status(ws: Path) -> list[str]:
    return _git(ws, "status", "--porcelain", "--untracked-files=all").splitlines()


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws,
                          env=workspace.tool_env(), capture_output=True, text=True, check=False)


def _with_outputs(tmp_path: Path, *stages: str) -> Path:
    """A workspace with one batch whose noise stage (and `stages`) have run for real: the noise
    judgements (and e.g. the validation docs) on disk."""
    ws = harness.make_workspace(tmp_path / "ws")
    workspace.ingest(ws, harness.batch_file(ws, 0))
    proc = _dvc(ws, "repro", "--single-item", "noise", *stages)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (ws / OUT).is_dir() and any((ws / OUT).rglob("*"))
    return ws


def _drop_entry(ws: Path, entry: str = ENTRY, ignore: Path = OUT_IGNORE) -> None:
    """What a failed `dvc repro` leaves: the entry DVC had added for an output, taken back."""
    path = ws / ignore
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() != entry]
    path.write_text("".join(f"{ln}\n" for ln in lines))


# --- quick: the state a failed repro leaves, and commit on it ----------------------------------


def test_commit_leaves_out_an_output_whose_gitignore_entry_was_taken_back(tmp_path):
    ws = _with_outputs(tmp_path)
    _drop_entry(ws)
    assert ENTRY not in (ws / OUT_IGNORE).read_text()

    assert workspace.commit(ws, "retrain: promoted (version 1)") is True

    assert tracked_outputs(ws) == []
    assert ENTRY in (ws / OUT_IGNORE).read_text().split()  # written back the way DVC does
    assert ENTRY in _git(ws, "show", f"HEAD:{OUT_IGNORE}").split()
    assert _status(ws) == []


def test_rebuilt_outputs_stay_out_of_git_even_without_their_workspace_ignore_lines(tmp_path):
    """The rebuilt (`cache: false`) outputs are kept out by the workspace's .gitignore; a
    workspace that lacks those lines (made before them, or edited) still commits none: the
    guard writes their entries as it does for DVC's own."""
    ws = _with_outputs(tmp_path, "validate")
    assert (ws / DOCS).is_dir() and DOCS in workspace.REBUILT
    assert _status(ws) and not any(DOCS in line for line in _status(ws))
    root = ws / ".gitignore"
    root.write_text("".join(f"{ln}\n" for ln in root.read_text().splitlines()
                            if ln.strip("/") not in workspace.REBUILT))
    assert any(DOCS in line for line in _status(ws))  # git would take the docs now

    assert workspace.commit(ws, "retrain: promoted (version 1)") is True

    assert tracked_outputs(ws) == []
    assert _git(ws, "ls-files", "--", DOCS).split() == []
    assert _status(ws) == []


@pytest.mark.slow  # the fault suite only (make test-faults): make test keeps its time
def test_commit_untracks_outputs_an_earlier_commit_took_and_the_next_repro_runs(tmp_path,
                                                                                 capsys):
    """A workspace already broken (the outputs committed, as main's commit did): the next
    commit takes them out of git, says so in one line, and DVC can write them again."""
    ws = _with_outputs(tmp_path)
    _drop_entry(ws)
    _git(ws, "add", "-A", "--", ".")  # the old `commit`: everything not ignored
    _git(ws, "commit", "-q", "-m", "retrain: promoted (version 1)")
    took = tracked_outputs(ws)
    assert took and all(p.startswith(OUT + "/") for p in took)

    assert workspace.commit(ws, "retrain: rejected (version 2)") is True

    assert tracked_outputs(ws) == []
    assert _status(ws) == []
    said = capsys.readouterr().err
    assert OUT in said and "untracked" in said, said
    assert all((ws / p).is_file() for p in took)  # the files stay; only git forgets them
    # What failed on main from then on: the stage writes its output again.
    proc = _dvc(ws, "repro", "--single-item", "--force", "noise")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already tracked" not in proc.stderr


def test_a_run_starting_in_a_broken_workspace_heals_it_before_its_stages(tmp_path):
    """The outputs committed by an earlier version (the broken state): entering the run (the
    guard both engines run inside) takes them out of git, so its first `dvc repro` does not
    stop in validate with `already tracked by SCM`."""
    ws = _with_outputs(tmp_path)
    _drop_entry(ws)
    _git(ws, "add", "-A", "--", ".")
    _git(ws, "commit", "-q", "-m", "retrain: promoted (version 1)")
    assert tracked_outputs(ws)
    said: list[str] = []
    with workspace.run_guard(ws, log=said.append):
        assert _git(ws, "ls-files", "--", OUT).split() == []
        assert ENTRY in (ws / OUT_IGNORE).read_text().split()
        proc = _dvc(ws, "repro", "--single-item", "--force", "noise")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(OUT in line for line in said), said


@pytest.mark.slow  # the fault suite only (make test-faults): make test keeps its time
# Empty, or cut where the YAML no longer parses (a cut that still parses is a lock file with
# less recorded, which DVC handles by re-running what it lacks).
@pytest.mark.parametrize("left", ["", "schema: '2.0'\nstages:\n  validate:\n    cmd: 'pyth"])
def test_a_dvc_lock_left_half_written_is_restored_when_the_next_run_starts(tmp_path, left):
    """DVC rewrites dvc.lock in place: a kill while it writes (the fault benchmark's SIGINT
    between augment and the next stage) left it empty, and every later run failed at its start.
    The run restores the recorded dvc.lock (DVC then re-runs what no longer matches)."""
    ws = _with_outputs(tmp_path)
    assert workspace.commit(ws, "retrain: promoted (version 1)") is True
    recorded = (ws / "dvc.lock").read_text()
    (ws / "dvc.lock").write_text(left)
    said: list[str] = []
    with workspace.run_guard(ws, log=said.append):
        assert (ws / "dvc.lock").read_text() == recorded
        proc = _dvc(ws, "status")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert any("dvc.lock" in line for line in said), said


def test_a_commit_of_named_paths_takes_no_output_either(tmp_path):
    """`paths` (ingest's commit) with a path that holds an output whose entry is gone."""
    ws = _with_outputs(tmp_path)
    _drop_entry(ws)
    assert workspace.commit(ws, "partial", paths=[Path("data")]) is True
    assert tracked_outputs(ws) == []
    assert ENTRY in _git(ws, "show", f"HEAD:{OUT_IGNORE}").split()


# --- slow: the real interrupts ------------------------------------------------------------------


def _start(args: list[str], ws: Path, logs: Path, tag: str) -> harness.Proc:
    """`args` in a session of its own (its pid is its group's id), with Ctrl-C's default action
    even when this test process was started with SIGINT ignored (a shell's background job)."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    with out.open("wb") as o, err.open("wb") as e:
        # PATH as ratchet gives DVC: stage commands say `python`
        env = tool_env({"PATH": workspace.tool_env()["PATH"]})
        popen = subprocess.Popen(args, cwd=ws, env=env, stdin=subprocess.DEVNULL,
                                 stdout=o, stderr=e, start_new_session=True,
                                 preexec_fn=harness.default_signals)
    return harness.Proc(popen, out, err)


def _interrupt(proc: harness.Proc, stage: str, after_s: float) -> str | None:
    """SIGINT to the process group once `stage` runs (a later stage counts); the stage the
    signal found running."""
    order = harness.STAGES
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not proc.done():
        now = harness.running_stage(proc.pgid)
        if now is not None and order.index(now) >= order.index(stage):
            break
        time.sleep(0.05)
    time.sleep(after_s)
    landed = harness.running_stage(proc.pgid)
    if not proc.done():
        os.killpg(proc.pgid, signal.SIGINT)
    assert proc.wait(180), "the interrupted command did not exit"
    return landed


@pytest.mark.slow
def test_an_interrupted_dvc_repro_leaves_nothing_for_commit_to_take(tmp_path):
    """`dvc repro` itself, interrupted in drift on a workspace's first pass (validate, noise
    and prepare ran there for the first time); then the run's commit."""
    ws = harness.make_workspace(tmp_path / "ws")
    workspace.ingest(ws, harness.batch_file(ws, 0))
    proc = _start([sys.executable, "-m", "dvc", "repro"], ws, tmp_path / "logs", "repro")
    assert _interrupt(proc, "drift", 0.3) == "drift"
    assert proc.popen.returncode != 0, proc.stderr()[-2000:]
    assert (ws / OUT).is_dir() and (ws / DOCS).is_dir()

    workspace.commit(ws, "retrain: promoted (version 1)")

    assert tracked_outputs(ws) == []
    assert _status(ws) == []
    # DVC's own locks do not stand in the way of the next repro.
    proc2 = _dvc(ws, "repro", "drift")
    assert proc2.returncode == 0, proc2.stderr[-2000:]


@pytest.mark.slow
def test_after_a_run_interrupted_in_drift_the_next_runs_record_no_output(tmp_path):
    """The fault suite's chain, shortened: a first run interrupted in drift (validate, noise
    and prepare ran in its `dvc repro` for the first time), a run to the end, a new batch,
    another run (the one that stopped in validate on main)."""
    ws = harness.make_workspace(tmp_path / "ws")
    logs = tmp_path / "logs"
    workspace.ingest(ws, harness.batch_file(ws, 0))
    run = _start(ratchet_cmd("run", "--engine", "dvc", "-w", str(ws)), ws, logs, "run-1")
    assert _interrupt(run, "drift", 0.3) == "drift"
    assert run.popen.returncode != 0, run.stderr()[-2000:]

    for n, batch in ((2, None), (3, 1)):
        if batch is not None:
            workspace.ingest(ws, harness.batch_file(ws, batch))
        proc = subprocess.run(ratchet_cmd("run", "--engine", "dvc", "-w", str(ws)), cwd=ws,
                              env=tool_env(), capture_output=True, text=True, timeout=900,
                              check=False)
        assert proc.returncode == 0, f"run {n}: {proc.stderr[-1500:]}"
        assert tracked_outputs(ws) == [], f"after run {n}"
        assert _status(ws) == [], f"after run {n}"
