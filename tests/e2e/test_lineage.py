"""Lineage that reproduces, and DVC experiments that stay experiments, in a real tiny workspace.

Two real runs (the first through `dvc repro` alone, the second through the Prefect flow with a
params override, as `ratchet run` and a flow parameter change params.yaml), then each
version's tags are checked against the run that made it, and its `git_commit` is checked out
in a fresh clone: `dvc pull` must give a pipeline with nothing to reproduce and the version's
model. Then a real `dvc exp run -S finetune.epochs=1` must log an MLflow run and register
nothing. Together these take minutes: `slow` (quick variants: tests/unit/test_lineage.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ratchet import workspace
from ratchet.config import load_params
from ratchet.registry import alias_history, aliases, connect
from ratchet.workspace import fingerprint, tool_env
from tests.conftest import TINY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, env=tool_env(), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def finetune_out(lock_text: str) -> str:
    [out] = [o for o in yaml.safe_load(lock_text)["stages"]["finetune"]["outs"]
             if o["path"] == "models/candidate"]
    return out["md5"]


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> dict[str, Any]:
    """A tiny workspace, one batch, run 1 by `dvc repro`, run 2 by the flow with more epochs."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain
    from ratchet.demo_data import all_labels, demo_batches, write_batch

    ws = tmp_path_factory.mktemp("lineage") / "ws"
    overrides = {section: dict(values) for section, values in TINY.items()}
    overrides.update(
        model={"source": "tiny"}, data={"labels": all_labels()},
        pretrain={"enabled": False}, augment={"enabled": False},
        noise={"cold_start": "skip"}, drift={"permutations": 400, "max_rows": 200},
        finetune={**TINY["finetune"], "epochs": 3.0},
        evaluate={"bootstrap_resamples": 200, "latency_examples": 8, "behaviour_rows": 20},
        # A cold start on a few seconds of training must promote, so that run 2 and the
        # experiment have a champion to be judged against.
        gate={**TINY["gate"], "min_score": 0.0, "min_invariance": 0.0},
    )
    workspace.init(ws, overrides)
    workspace.ingest(ws, write_batch(demo_batches(seed=0, scale=0.3)[0], ws / "data/incoming"))
    first = workspace.run_pipeline(ws)
    lock1 = (ws / "dvc.lock").read_text()
    with prefect_test_harness(server_startup_timeout=90):
        second = retrain(str(ws), overrides={"finetune": {"epochs": 5.0}})
    lock2 = (ws / "dvc.lock").read_text()
    return {"ws": ws, "records": [first, second], "locks": [lock1, lock2]}


def test_each_version_names_its_own_run_and_a_commit_that_reproduces_it(story, tmp_path):
    ws, records, locks = story["ws"], story["records"], story["locks"]
    assert records[0]["decision"] == "promoted", records[0]["checks"]
    params = load_params(ws / "params.yaml")
    client, name = connect(params.registry, ws), params.registry.model_name
    # The runs trained different models, and the second run's commit holds its new params.
    assert finetune_out(locks[0]) != finetune_out(locks[1])
    for i, (record, lock) in enumerate(zip(records, locks, strict=True)):
        tags = client.get_model_version(name, record["version"]).tags
        # This run's candidate, not the previous run's (the gate's own stale dvc.lock deps).
        assert tags["data_hash.models/candidate"] == finetune_out(lock), f"run {i + 1}"
        commit = tags["git_commit"]
        # The version's commit is the run's own: its dvc.lock is the one the run left.
        assert sh(ws, "git", "show", f"{commit}:dvc.lock") == lock, f"run {i + 1}"
        epochs = yaml.safe_load(sh(ws, "git", "show", f"{commit}:params.yaml"))["finetune"]
        assert epochs["epochs"] == (3.0, 5.0)[i]
        # The card logged with the version names that commit (the workspace's names its parent).
        card = Path(client.download_artifacts(record["run_id"], "reports/model_card.md",
                                              str(tmp_path / f"card{i}")))
        assert f"git commit `{commit}`" in card.read_text()
        # A fresh clone at that commit: pull, nothing to reproduce, the version's model.
        clone = tmp_path / f"clone{i}"
        sh(tmp_path, "git", "clone", "-q", str(ws), str(clone))
        sh(clone, "git", "checkout", "-q", commit)
        dvc(clone, "pull", "-q")
        assert json.loads(dvc(clone, "status", "--json") or "{}") == {}, f"run {i + 1}"
        assert fingerprint(clone / "models/candidate") == tags["fingerprint"], f"run {i + 1}"
        assert tags["lineage"] == "recorded"
        if i == 1:
            # Training the tiny model on CPU with its seed is deterministic: rebuilding the
            # candidate from the commit's data and params gives the same weights.
            dvc(clone, "repro", "-q", "-f", "--single-item", "finetune")
            assert fingerprint(clone / "models/candidate") == tags["fingerprint"]


def test_dvc_exp_run_logs_an_experiment_and_registers_nothing(story):
    ws = story["ws"]
    params = load_params(ws / "params.yaml")
    client, name = connect(params.registry, ws), params.registry.model_name
    versions = sorted(mv.version for mv in client.search_model_versions(f"name = '{name}'"))
    before, history = aliases(client, name), alias_history(client, name)
    head = sh(ws, "git", "rev-parse", "HEAD").strip()

    dvc(ws, "exp", "run", "-S", "finetune.epochs=1")

    assert sorted(mv.version for mv in client.search_model_versions(
        f"name = '{name}'")) == versions
    assert aliases(client, name) == before and alias_history(client, name) == history
    gate = json.loads((ws / "reports/gate.json").read_text())
    assert gate["decision"] == "experiment" and gate["version"] is None
    assert gate["would_be"] in ("promoted", "rejected")
    exp = gate["experiment"]["name"]
    assert gate["experiment"]["baseline"] == head
    # `dvc exp show` and the MLflow UI show the same experiment, params and metrics.
    shown = json.loads(dvc(ws, "exp", "show", "--json"))
    [row] = [e for rev in shown for e in (rev.get("experiments") or [])
             if e.get("name") == exp]
    [exp_data] = [r["data"] for r in row["revs"]]
    assert exp_data["params"]["params.yaml"]["data"]["finetune"]["epochs"] == 1
    dvc_metrics = exp_data["metrics"]["metrics/eval.json"]["data"]
    [run] = client.search_runs([client.get_experiment_by_name(params.registry.experiment)
                                .experiment_id], f"attributes.run_name = '{exp}'")
    assert run.data.tags["dvc.experiment"] == exp and run.data.tags["dvc.baseline_rev"] == head
    assert run.data.tags["decision"] == "experiment"
    assert run.data.tags["would_be"] == gate["would_be"]
    assert float(run.data.params["finetune.epochs"]) == 1.0
    for key, shown in (("candidate/all/macro_f1", "f1"), ("diff/recent/macro_f1", "recent_diff")):
        assert run.data.metrics[key] == pytest.approx(dvc_metrics[shown])

    # Applied and run for real, the experiment is gated and registered like any run.
    dvc(ws, "exp", "apply", exp)
    real = workspace.run_pipeline(ws)
    assert real["decision"] in ("promoted", "rejected") and real["version"] not in versions
    tags = client.get_model_version(name, real["version"]).tags
    assert tags["git_commit"] == sh(ws, "git", "rev-parse", "HEAD").strip()
    assert yaml.safe_load(sh(ws, "git", "show", f"{tags['git_commit']}:params.yaml"))[
        "finetune"]["epochs"] == 1
