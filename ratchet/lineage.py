"""What a registered version came from: this run's data and model hashes, the commit that
reproduces it, and whether the run was a DVC experiment rather than a real retrain.

The gate stage runs before the run is committed, so it can know only the run's parent commit;
`stamp_commit` (called once the run is recorded, on every path that records one) sets the
version's `git_commit` tag to the run's own commit and brings the card logged in MLflow up to
date. The workspace's card file is in that commit and so cannot name it: it names the parent.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GATE_STAGE = "gate"
# DVC sets these in every stage's environment during `dvc exp run` (dvc/env.py,
# dvc/repo/experiments/queue/base.py), and never during `dvc repro`.
EXP_NAME_ENV = "DVC_EXP_NAME"
EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"
STAGE_ENV = "DVC_STAGE"
# Decisions after which the gate tagged a version with this run's lineage.
TAGGED = ("promoted", "rejected", "deferred")
LINEAGE_TAG = "lineage"
PENDING = "pending"  # git_commit is the run's parent: the run's own commit is not recorded yet
RECORDED = "recorded"  # git_commit is the commit that records the run
EXPERIMENT = "experiment"  # git_commit is a DVC experiment's baseline (its params differ)
CODE_LINE = re.compile(r"^- Code: .*?(?=; params hash)", re.MULTILINE)


def data_hashes(lock: Path, running: str | None = None) -> dict[str, str]:
    """md5 of every data and model path in dvc.lock as THIS run computed it.

    DVC rewrites a stage's entry when the stage runs (or finds it up to date), so while a
    stage runs, every entry upstream of it is this run's, and its own entry is the previous
    run's. So the running stage's entry (`running`, default $DVC_STAGE, else the gate) is left
    out, and a path's hash comes from the outs of the stage that produced it, deps only for
    paths no stage produces (the `dvc add`-ed batches).
    """
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    skip = (running or os.environ.get(STAGE_ENV) or GATE_STAGE).split(":")[-1]
    produced: dict[str, str] = {}
    used: dict[str, str] = {}
    for stage_name, stage in stages.items():
        if stage_name == skip:
            continue
        for kind, target in (("outs", produced), ("deps", used)):
            for entry in stage.get(kind, []):
                if entry.get("md5") and entry["path"].startswith(("data/", "models/")):
                    target[entry["path"]] = entry["md5"]
    return {**used, **produced}


def git_head(cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False, cwd=cwd)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


@dataclass(frozen=True)
class Experiment:
    """A `dvc exp run` in progress: its name and the commit it starts from."""

    name: str
    baseline: str

    def tags(self) -> dict[str, str]:
        return {"dvc.experiment": self.name, "dvc.baseline_rev": self.baseline}


def dvc_experiment(env: dict[str, str] | None = None) -> Experiment | None:
    """The DVC experiment this stage runs in, or None for a real run (`dvc repro`, the flow)."""
    env = os.environ if env is None else env
    name, baseline = env.get(EXP_NAME_ENV), env.get(EXP_BASELINE_ENV)
    if not name and not baseline:
        return None
    return Experiment(name or f"exp-{(baseline or 'unknown')[:7]}", baseline or "unknown")


def commit_tags(experiment: Experiment | None = None) -> dict[str, str]:
    """The version's commit tags at gate time: the parent (or the experiment's baseline)."""
    if experiment is not None:
        return {"git_commit": experiment.baseline, LINEAGE_TAG: EXPERIMENT, **experiment.tags()}
    return {"git_commit": git_head(), LINEAGE_TAG: PENDING}


def code_at_gate(experiment: Experiment | None = None) -> str:
    """The card's code line as the gate can write it, before the run's commit exists."""
    if experiment is not None:
        return (f"- Code: DVC experiment `{experiment.name}` on commit `{experiment.baseline}` "
                f"(its params are not in that commit: `dvc exp apply {experiment.name}` "
                "restores them)")
    return (f"- Code: the git commit that records this run, whose parent is `{git_head()}` "
            "(this file is in that commit and cannot name it: the version's `git_commit` tag "
            "and the card logged with it in MLflow do)")


def code_recorded(commit: str) -> str:
    return (f"- Code: git commit `{commit}`, the one that records this run "
            f"(`git checkout {commit[:12]} && dvc pull` gives this model back)")


def restamp(card: str, code: str) -> str:
    """The card with its code line replaced (the rest of the card as the gate wrote it)."""
    return CODE_LINE.sub(lambda _m: code, card, count=1)


def stamp_commit(ws: Path, gate_report: Path, card: Path, commit: str | None = None
                 ) -> dict[str, Any] | None:
    """Once the run is committed: point the version the gate tagged at that commit.

    Sets the version's `git_commit` tag (and its run's) to `commit` (default HEAD), logs the
    card naming that commit in place of the gate's (on the run and in the registered model's
    artifacts), and last sets `lineage` to `recorded`: a stamp that failed half-way leaves it
    `pending`. A no-op for a run that tagged no version (skipped, unchanged, experiment); safe
    to repeat (a retried record step, the next run finishing a failed stamp).
    """
    import json

    from ratchet.config import load_params
    from ratchet.registry import connect

    if not gate_report.is_file():
        return None
    record = json.loads(gate_report.read_text())
    version = record.get("version")
    if record.get("decision") not in TAGGED or not version:
        return None
    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    name = record.get("model_name") or params.registry.model_name
    commit = commit or git_head(ws)
    client.set_model_version_tag(name, version, "git_commit", commit)
    mv = client.get_model_version(name, version)
    run_id = record.get("run_id") or mv.run_id
    if run_id:
        client.set_tag(run_id, "git_commit", commit)
        client.set_tag(run_id, "mlflow.source.git.commit", commit)  # the UI's source column
    if card.is_file():
        with tempfile.TemporaryDirectory(prefix="ratchet-card-") as tmp:
            stamped = Path(tmp) / card.name
            stamped.write_text(restamp(card.read_text(), code_recorded(commit)))
            if run_id:
                client.log_artifact(run_id, str(stamped), "reports")
                client.log_artifact(run_id, str(stamped))
            model_id = getattr(mv, "model_id", None) or logged_model_id(mv.source)
            if model_id:
                client.log_model_artifact(model_id, str(stamped), "artifacts")
    client.set_model_version_tag(name, version, LINEAGE_TAG, RECORDED)
    return {"version": version, "git_commit": commit}


def logged_model_id(source: str | None) -> str | None:
    """The LoggedModel id a version's source names (`models:/m-...`; the sqlite registry
    leaves the version's own `model_id` empty)."""
    prefix = "models:/m-"
    return source[len("models:/"):].split("/")[0] if source and source.startswith(prefix) else None
