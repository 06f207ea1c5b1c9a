"""A ratchet workspace: a git + DVC repo with the pipeline, its batches and its MLflow store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ratchet.config import Params, load_params, parse_params
from ratchet.errors import BatchRefused, WorkspaceError
from ratchet.runtime import TELEMETRY_OFF, write_json

BATCHES = Path("data/batches")
INCOMING = Path("data/incoming")
CHAMPION_FILE = Path("champion.json")
GITIGNORE = """\
# ratchet workspace: heavy or local-only files stay out of git
/mlflow.db
/mlartifacts/
/.ratchet/
/data/incoming/
"""


def template(name: str) -> Path:
    """dvc.yaml / params.yaml: from the wheel, or from the repo root in an editable install."""
    packaged = resources.files("ratchet") / "_workspace" / name
    if packaged.is_file():
        return Path(str(packaged))
    root = Path(__file__).resolve().parent.parent / name
    if root.is_file():
        return root
    raise WorkspaceError(f"the installed ratchet has no {name} template")


def tool_env() -> dict[str, str]:
    """Environment for DVC and git: this interpreter's bin first (stage commands say `python`)."""
    env = dict(os.environ)
    env.update({k: env.get(k, v) for k, v in TELEMETRY_OFF.items()})
    # Stages read the store from params.yaml; an inherited value may name another workspace's.
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "ratchet")
    env.setdefault("GIT_AUTHOR_EMAIL", "ratchet@localhost")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    return env


def _run(ws: Path, args: list[str], what: str, capture: bool = True) -> str:
    proc = subprocess.run(args, cwd=ws, env=tool_env(), text=True,
                          capture_output=capture, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()[-4000:] if capture else ""
        raise WorkspaceError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{detail}")
    return proc.stdout if capture else ""


def git(ws: Path, *args: str) -> str:
    return _run(ws, ["git", *args], f"git {args[0]}")


def dvc(ws: Path, *args: str, capture: bool = True) -> str:
    return _run(ws, [sys.executable, "-m", "dvc", *args], f"dvc {args[0]}", capture)


def commit(ws: Path, message: str) -> bool:
    """Commit whatever changed (DVC outputs are git-ignored by DVC); False if nothing did."""
    git(ws, "add", "-A")
    if not git(ws, "status", "--porcelain").strip():
        return False
    git(ws, "commit", "-q", "-m", message)
    return True


def require(ws: Path) -> Path:
    ws = ws.resolve()
    if not (ws / "dvc.yaml").is_file() or not (ws / ".dvc").is_dir():
        raise WorkspaceError(f"{ws} is not a ratchet workspace (run `ratchet init {ws}` first)")
    return ws


def init(ws: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Make a workspace: git, DVC with a local remote, params, an empty batch folder."""
    ws = ws.resolve()
    if (ws / "dvc.yaml").exists():
        raise WorkspaceError(f"{ws} is already a workspace")
    raw = yaml.safe_load(template("params.yaml").read_text())
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    from ratchet.models import source_dir

    source_dir(parse_params(raw, "params overrides").model.source)  # fail before touching disk
    ws.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template("dvc.yaml"), ws / "dvc.yaml")
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (ws / ".gitignore").write_text(GITIGNORE)
    for d in (BATCHES, INCOMING):
        (ws / d).mkdir(parents=True, exist_ok=True)
    (ws / BATCHES / ".gitkeep").touch()
    write_json(ws / CHAMPION_FILE, {"name": None, "version": None, "fingerprint": None})
    if not (ws / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
    dvc(ws, "init", "-q")
    dvc(ws, "config", "core.analytics", "false")
    dvc(ws, "config", "core.autostage", "true")
    remote = ws / ".ratchet" / "dvc-remote"
    remote.mkdir(parents=True, exist_ok=True)
    dvc(ws, "remote", "add", "-d", "-f", "local", str(remote))
    dvc(ws, "add", "-q", str(BATCHES))
    commit(ws, "ratchet init: empty workspace")
    return ws


@dataclass(frozen=True)
class IngestResult:
    batch_id: str
    path: Path
    rows: int
    created: bool
    warnings: list[str]


def known_labels(params: Params, batches_dir: Path) -> list[str]:
    """The label set a new batch must keep to: declared in params, else what earlier batches had."""
    import pandas as pd

    from ratchet.data import LABEL, batch_files

    if params.data.labels:
        return sorted(params.data.labels)
    labels: set[str] = set()
    for f in batch_files(batches_dir):
        labels.update(pd.read_parquet(f, columns=[LABEL])[LABEL].dropna().astype(str))
    return sorted(labels)


def ingest(ws: Path, source: Path) -> IngestResult:
    """Validate an incoming file and, only if it passes, add it as a new immutable batch."""
    from ratchet.data import batch_files, canonical, content_hash, read_table, write_parquet_atomic
    from ratchet.validation import validate_frame

    ws = require(ws)
    params = load_params(ws / "params.yaml")
    batches = ws / BATCHES
    df = canonical(read_table(source))
    report = validate_frame(
        df, params.validate_, params.data, known_labels(params, batches), source.name
    )
    if not report.passed:
        raise BatchRefused(source.name, [str(p) for p in report.critical])
    digest = content_hash(df)
    existing = batch_files(batches)
    for f in existing:
        if f.stem.endswith(digest[:12]):
            return IngestResult(f.stem, f, len(df), False, [str(p) for p in report.warnings])
    batch_id = f"{len(existing) + 1:04d}-{digest[:12]}"
    path = batches / f"{batch_id}.parquet"
    write_parquet_atomic(df, path)
    try:
        dvc(ws, "add", "-q", str(BATCHES))
        commit(ws, f"ingest {source.name} as batch {batch_id} ({len(df)} rows)")
    except WorkspaceError:
        path.unlink(missing_ok=True)  # leave no trace of a batch that could not be versioned
        raise
    return IngestResult(batch_id, path, len(df), True, [str(p) for p in report.warnings])


def refresh_champion(ws: Path) -> dict[str, Any]:
    """Resolve the `champion` alias into champion.json, rewriting it only when it changed.

    The evaluate stage depends on this file, so a move made by hand in the MLflow UI re-runs
    exactly evaluate and gate, and nothing else.
    """
    from ratchet.registry import connect, current_champion

    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    ref = current_champion(client, params.registry.model_name)
    content = {
        "name": params.registry.model_name if ref else None,
        "version": ref.version if ref else None,
        "fingerprint": ref.fingerprint if ref else None,
    }
    path = ws / CHAMPION_FILE
    if not path.is_file() or json.loads(path.read_text()) != content:
        write_json(path, content)
    return content


def stage_names(ws: Path) -> list[str]:
    """Stages in the order dvc.yaml lists them (which is a topological order)."""
    return list(yaml.safe_load((ws / "dvc.yaml").read_text())["stages"])


def fingerprint(model_dir: Path) -> str:
    """Content hash of a model's weights: the identity of a trained model."""
    h = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def repro(ws: Path, stage: str | None = None) -> float:
    """`dvc repro` (one stage or all); returns the wall time in seconds."""
    start = time.perf_counter()
    args = ["repro", "--single-item", stage] if stage else ["repro"]
    # Streamed, not captured: the stages' progress bars and errors reach the person watching.
    dvc(ws, *args, capture=False)
    return time.perf_counter() - start


def finish_run(ws: Path) -> None:
    """Record the run in git (dvc.lock, metrics, champion.json) and push data to the remote."""
    gate = ws / "reports" / "gate.json"
    summary = ""
    if gate.is_file():
        g = json.loads(gate.read_text())
        summary = f": {g.get('decision', '?')} (version {g.get('version', '-')})"
    commit(ws, f"retrain{summary}")
    dvc(ws, "push", "-q")


def run_pipeline(ws: Path) -> dict[str, Any]:
    """The pipeline through DVC alone (no Prefect): refresh champion, `dvc repro`, record."""
    ws = require(ws)
    start = time.perf_counter()
    refresh_champion(ws)
    repro(ws)
    gate = json.loads((ws / "reports" / "gate.json").read_text())
    finish_run(ws)
    gate.update(timings={}, wall_s=time.perf_counter() - start)
    return gate
