"""The `retrain` flow for real (Prefect, DVC, MLflow, the tiny model), run as a user runs it:
a sweep on a local Dask cluster picks the best trial, then the run fails after the gate promoted
it (a git hook refuses the run's commit) and leaves the registry as it found it; the next run
succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY

RATES = [0.0005, 0.005]


def ratchet_run(ws: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RATCHET_IO_RETRY_DELAYS": "0"}  # one immediate retry, no pauses
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "ratchet.cli", "run", "-w", str(ws)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def failed(tmp_path_factory) -> dict:
    from ratchet import workspace
    from ratchet.demo_data import all_labels, demo_batches, demo_probes, write_batch

    ws = tmp_path_factory.mktemp("flow") / "ws"
    overrides = {section: dict(values) for section, values in TINY.items()}
    overrides.update(model={"source": "tiny"}, data={"labels": all_labels()},
                     sweep={"grid": {"learning_rate": RATES}, "workers": 2})
    workspace.init(ws, overrides, probes=demo_probes(0))
    batch = demo_batches(seed=0, scale=0.5)[0]
    workspace.ingest(ws, write_batch(batch, ws / workspace.INCOMING))
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'policy: no commits during the freeze' >&2\nexit 1\n")
    hook.chmod(0o755)
    proc = ratchet_run(ws)
    return {"ws": ws, "proc": proc, "hook": hook}


def client_of(ws: Path):
    from ratchet.config import load_params
    from ratchet.registry import connect

    return connect(load_params(ws / "params.yaml").registry, ws)


def test_the_failed_run_reports_why(failed):
    proc = failed["proc"]
    assert proc.returncode != 0
    assert "no commits during the freeze" in proc.stdout + proc.stderr


def test_the_failed_run_left_no_version_and_no_alias(failed):
    from ratchet.registry import alias_history, aliases

    client = client_of(failed["ws"])
    name = "ratchet-classifier"
    assert client.search_model_versions(f"name = '{name}'") == []
    assert aliases(client, name) == {}
    moves = [(e["alias"], e["to"], e["by"], e["rollback"]) for e in alias_history(client, name)]
    # The gate promoted version 1, then the failure undid it, in the history for all to see.
    assert ("champion", "1", "gate", False) in moves and ("champion", None, "gate", True) in moves
    runs = client.search_runs([client.get_experiment_by_name("ratchet").experiment_id],
                              filter_string="tags.decision = 'failed'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "no commits during the freeze" in runs[0].data.tags["ratchet.failure"]
    ws = failed["ws"]
    assert not (ws / ".ratchet" / "inflight.json").exists()
    assert not (ws / "reports" / "gate.json").exists()


def test_the_sweep_logged_every_trial_and_adopted_the_best(failed):
    ws = failed["ws"]
    client = client_of(ws)
    exp = client.get_experiment_by_name("ratchet").experiment_id
    trials = client.search_runs([exp], filter_string="tags.`ratchet.kind` = 'sweep-trial'")
    assert sorted(float(r.data.params["finetune.learning_rate"]) for r in trials) == RATES
    parent = client.search_runs([exp], filter_string="tags.`ratchet.kind` = 'sweep'")
    assert len(parent) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent[0].info.run_id}
    scores = {float(r.data.params["finetune.learning_rate"]): r.data.metrics["best_val_macro_f1"]
              for r in trials}
    best = max(scores, key=scores.get)
    assert [r.data.tags["ratchet.best"] for r in trials
            if float(r.data.params["finetune.learning_rate"]) == best] == ["True"]
    report = json.loads((ws / "reports" / "sweep.json").read_text())
    assert report["best_overrides"] == {"learning_rate": best}
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["finetune"]["learning_rate"] == best
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["finetune"]
    assert lock["params"]["params.yaml"]["finetune"]["learning_rate"] == best
    metrics = json.loads((ws / "metrics" / "finetune.json").read_text())
    assert metrics["best_val_macro_f1"] == pytest.approx(scores[best])


def test_the_next_run_succeeds_and_promotes(failed):
    from ratchet import workspace
    from ratchet.registry import aliases

    ws = failed["ws"]
    failed["hook"].unlink()
    proc = ratchet_run(ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = client_of(ws)
    assert aliases(client, "ratchet-classifier")["champion"] == "2"
    assert not (ws / ".ratchet" / "inflight.json").exists()
    assert workspace.changed_stages(ws) == set()
    assert workspace.git(ws, "status", "--porcelain").strip() == ""
