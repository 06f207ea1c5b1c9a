"""`finetune.init: auto` through real runs of a real tiny workspace: which start each batch gets
and why, in metrics/finetune.json, reports/gate.json and the registry's tags, whatever the gate
decides; `ratchet run --full` on request; and a DVC pipeline that is up to date afterwards.

Five runs of the whole pipeline take minutes: `slow` (the rule and the plan are tested quickly
in tests/unit/test_continual.py and tests/unit/test_bookkeeping.py).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ratchet import workspace
from ratchet.config import load_params
from ratchet.registry import connect
from tests.conftest import TINY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORDS = {
    "balance": ["balance", "money", "account", "funds", "checking", "savings"],
    "card_lost": ["card", "lost", "stolen", "missing", "wallet", "blocked"],
    "greeting": ["hello", "hi", "morning", "hey", "greetings", "evening"],
    "weather": ["rain", "sunny", "forecast", "weather", "cold", "windy"],
}
FILLER = ["please", "now", "my", "the", "about", "what", "is", "tell", "me", "today", "can",
          "you", "quickly", "again"]


def batch(path: Path, labels: list[str], seed: int, per_label: int = 24) -> Path:
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.sample(WORDS[lab], 3) + rng.sample(FILLER, rng.randint(2, 6))
                              + [f"b{seed}n{i}"]),
             "label": lab, "domain": "bank" if lab in ("balance", "card_lost") else "chat"}
            for lab in labels for i in range(per_label)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_auto_chooses_per_batch_and_says_why(tmp_path):
    ws = tmp_path / "ws"
    overrides = {section: dict(values) for section, values in TINY.items()}
    overrides.update(
        model={"source": "tiny"}, validate={"allow_new_labels": True},
        pretrain={"enabled": False}, augment={"enabled": False},
        noise={"cold_start": "skip"}, drift={"permutations": 400, "max_rows": 200},
        finetune={**TINY["finetune"], "epochs": 3.0, "full_every": 2},
        evaluate={"bootstrap_resamples": 200, "latency_examples": 8, "behaviour_rows": 20},
        gate={**TINY["gate"], "min_score": 0.0, "min_invariance": 0.0},
    )
    workspace.init(ws, overrides)
    old = ["balance", "card_lost", "greeting"]
    steps = [  # labels of the batch, `--full`?, the start and the reason that must be chosen
        (old, False, "full", "there is no champion yet"),
        (old, False, "continual", "a routine batch: 1 batch(es) since the last full retrain"),
        (old, False, "full", "2 batch(es) since the last full retrain"),
        ([*old, "weather"], False, "full", "the label set grew: 1 label(s)"),
        ([*old, "weather"], True, "full", "a full retrain was requested"),
    ]
    records = []
    for i, (labels, full, how, why) in enumerate(steps):
        workspace.ingest(ws, batch(tmp_path / f"b{i + 1}.csv", labels, seed=i))
        if full:  # the CLI flag, as a person would ask
            proc = subprocess.run(
                [sys.executable, "-m", "ratchet.cli", "run", "--engine", "dvc", "--full",
                 "-w", str(ws)], env=workspace.tool_env(), capture_output=True, text=True,
                check=False)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            gate = json.loads((ws / "reports/gate.json").read_text())
        else:
            gate = workspace.run_pipeline(ws)
        ft = json.loads((ws / "reports/finetune/metrics.json").read_text())
        assert (ft["init"], gate["training"]["init"]) == (how, how), (i + 1, ft)
        assert why in ft["init_reason"] and gate["training"]["init_reason"] == ft["init_reason"]
        assert why in json.loads((ws / "reports/gate.json").read_text())["training"][
            "init_reason"]
        records.append((gate, ft))
    assert records[0][0]["decision"] == "promoted", records[0][0]["checks"]

    # The continual run trained on the new batch and replayed rows, not the whole history.
    (_, first), (_, routine), (_, third) = (r for r in records[:3])
    assert routine["init_from"].startswith("champion v") and routine["replay_rows"] > 0
    assert routine["new_rows"] < third["train_rows"] and routine["samples"] < third["samples"]
    # Every version says how it was trained and on which batch: what later runs count from.
    params = load_params(ws / "params.yaml")
    client, name = connect(params.registry, ws), params.registry.model_name
    ids = workspace.batch_ids(ws)
    for (gate, ft), batch_id in zip(records, ids, strict=True):
        tags = client.get_model_version(name, gate["version"]).tags
        assert tags["finetune.init"] == ft["init"] and tags["finetune.batch"] == batch_id
    # With nothing new, a refresh leaves the plan as it is: DVC finds finetune up to date.
    workspace.refresh_champion(ws)
    status = json.loads(workspace.dvc(ws, "status", "--json", "finetune") or "{}")
    assert status == {}, status
