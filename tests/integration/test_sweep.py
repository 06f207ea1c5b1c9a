"""The finetune sweep for real: a local Dask cluster of 2 worker processes runs the trials as
Prefect tasks on the tiny model; every trial is an MLflow run; the best is adopted into
params.yaml, the stage's outputs and dvc.lock."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from tests.unit.test_training import frame

RATES = [0.0005, 0.005]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    """A workspace holding just the finetune stage's inputs, then `run_sweep` on it."""
    from flows.sweep import run_sweep
    from ratchet import workspace
    from ratchet.models import load_base_mlm

    ws = workspace.init(tmp_path_factory.mktemp("sweep") / "ws", {
        "model": {"source": "tiny", "max_length": 32},
        "finetune": {"epochs": 3.0, "batch_size": 16, "patience": 0},
        "sweep": {"grid": {"learning_rate": RATES}, "workers": 2}})
    for path, df in (("data/augmented/train.parquet", frame(160, 0)),
                     ("data/prepared/val.parquet", frame(40, 1)),
                     ("data/replay/buffer.parquet", frame(40, 2))):
        (ws / path).parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(ws / path)
    model, tok = load_base_mlm("tiny", 0)
    model.save_pretrained(ws / "models/pretrained")
    tok.save_pretrained(ws / "models/pretrained")
    return {"ws": ws, "report": run_sweep(ws)}


def test_every_trial_is_a_nested_mlflow_run(swept):
    from ratchet.config import load_params
    from ratchet.registry import connect

    ws, report = swept["ws"], swept["report"]
    client = connect(load_params(ws / "params.yaml").registry, ws)
    exp = client.get_experiment_by_name("ratchet").experiment_id
    trials = client.search_runs([exp], filter_string="tags.`ratchet.kind` = 'sweep-trial'")
    assert sorted(float(r.data.params["finetune.learning_rate"]) for r in trials) == RATES
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {report["mlflow_parent_run"]}
    assert all(client.list_artifacts(r.info.run_id, "") for r in trials)  # the curve PNG
    scores = {float(r.data.params["finetune.learning_rate"]): r.data.metrics["best_val_macro_f1"]
              for r in trials}
    best = max(scores, key=scores.get)
    assert report["best_overrides"] == {"learning_rate": best}
    assert [float(r.data.params["finetune.learning_rate"]) for r in trials
            if r.data.tags["ratchet.best"] == "True"] == [best]
    assert report["workers"] == 2 and len(report["trials"]) == 2


def test_the_best_trial_becomes_the_stage_output_and_its_params_the_lock(swept):
    from ratchet import workspace

    ws, best = swept["ws"], swept["report"]["best_overrides"]["learning_rate"]
    assert yaml.safe_load((ws / "params.yaml").read_text())["finetune"]["learning_rate"] == best
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["finetune"]
    assert lock["params"]["params.yaml"]["finetune"]["learning_rate"] == best
    assert (ws / "models/candidate/model.safetensors").is_file()
    metrics = json.loads((ws / "reports/finetune/metrics.json").read_text())
    chosen = next(t for t in swept["report"]["trials"] if t["index"] == swept["report"]["best"])
    assert metrics["best_val_macro_f1"] == chosen["stats"]["best_val_macro_f1"]
    headline = json.loads((ws / "metrics/finetune.json").read_text())  # what DVC shows
    assert headline["val_f1"] == chosen["stats"]["best_val_macro_f1"]
    assert len(pd.read_csv(ws / "reports/finetune/curve.csv")) == chosen["stats"]["steps"]
    assert (ws / "reports/finetune/curve.png").is_file()
    assert "finetune" not in workspace.changed_stages(ws)  # DVC sees the output as its own
    assert not list((ws / ".ratchet" / "sweep").glob("*"))  # trial folders cleaned up
    assert json.loads((ws / "reports/sweep.json").read_text())["best"] == swept["report"]["best"]


def test_a_bad_grid_value_is_refused_before_any_trial(swept, tmp_path):
    from flows.sweep import run_sweep
    from ratchet import workspace
    from ratchet.errors import ConfigError

    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"},
                                          "sweep": {"grid": {"batch_size": [16, 0]}}})
    with pytest.raises(ConfigError, match="batch_size"):
        run_sweep(ws)
    assert not (ws / ".ratchet" / "sweep").exists()
