"""Faults around ingest and the workspace's own records, on real git, DVC and MLflow stores:
three ingests at once, batch files deleted by hand, the store deleted or replaced, params.yaml
emptied or truncated, a config error before any server starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ratchet import workspace
from ratchet.demo_data import all_labels, demo_batches
from ratchet.workspace import tool_env

RATCHET = Path(sys.executable).with_name("ratchet")


def make_ws(root: Path) -> Path:
    """A real workspace on the tiny model with the demo's labels declared."""
    return workspace.init(root / "ws", {"model": {"source": "tiny"},
                                        "data": {"labels": all_labels()}})


def csv_files(root: Path, n: int) -> list[Path]:
    """n small CSV files with distinct demo rows (no text in two of them)."""
    frame = demo_batches(seed=0, scale=0.1)[0].frame.sample(frac=1.0, random_state=0)
    size = len(frame) // n
    files = []
    for i in range(n):
        path = root / f"part{i + 1}.csv"
        frame.iloc[i * size:(i + 1) * size].to_csv(path, index=False)
        files.append(path)
    return files


def ratchet(*args: str, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    env = tool_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return subprocess.run([str(RATCHET), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def git(ws: Path, *args: str) -> str:
    return workspace.git(ws, *args)


def recorded_batches(ws: Path, rev: str = "HEAD") -> list[str]:
    """The files data/batches.dvc at `rev` records, from its DVC .dir manifest in the cache."""
    dvc_file = yaml.safe_load(git(ws, "show", f"{rev}:data/batches.dvc"))
    md5 = dvc_file["outs"][0]["md5"]
    assert md5.endswith(".dir")
    manifest = ws / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    return sorted(e["relpath"] for e in json.loads(manifest.read_text())
                  if e["relpath"].endswith(".parquet"))


@pytest.mark.slow  # three real CLI processes, serialized by the lock (~30-60 s)
def test_three_concurrent_ingests_get_three_numbers_and_three_commits(tmp_path):
    ws = make_ws(tmp_path)
    files = csv_files(tmp_path, 3)
    env = tool_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([str(RATCHET), "ingest", str(f), "-w", str(ws)], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for f in files]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs

    names = sorted(p.name for p in (ws / "data" / "batches").glob("*.parquet"))
    assert [n[:4] for n in names] == ["0001", "0002", "0003"], names  # no reuse, no skip
    assert len({n[5:] for n in names}) == 3  # three distinct contents

    subjects = git(ws, "log", "--format=%s").splitlines()
    ingests = [s for s in subjects if s.startswith("ingest ")]
    assert len(ingests) == 3, subjects
    for name in names:  # each commit names one batch, each batch one commit
        assert sum(Path(name).stem in s for s in ingests) == 1, (name, ingests)
    assert recorded_batches(ws) == names
    assert workspace.dvc(ws, "status", "data/batches.dvc").strip() in (
        "", "Data and pipelines are up to date.")
    assert not git(ws, "status", "--porcelain", "--", "data").strip()
