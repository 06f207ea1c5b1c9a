"""Bookkeeping of a workspace on real git, DVC and MLflow stores: what finetune starts from, and
what a run's commit holds when a batch lands while it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from ratchet.registry import CHAMPION, move_alias
from ratchet.workspace import INIT_FILE, fingerprint, refresh_champion, template
from tests.unit.test_history import NAME, fresh_store, register


def _batch(ws: Path, batch_id: str) -> None:
    folder = ws / "data" / "batches"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": [f"text of {batch_id}"], "label": ["a"]}).to_parquet(
        folder / f"{batch_id}.parquet")


def test_a_promotion_does_not_make_the_next_run_retrain_the_champion_on_the_same_batch(tmp_path):
    ws = tmp_path
    raw = yaml.safe_load(template("params.yaml").read_text())
    raw["finetune"]["init"] = "champion"
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    _batch(ws, "0001-aaaaaaaaaaaa")
    candidate = ws / "models" / "candidate"
    candidate.mkdir(parents=True)
    (candidate / "model.safetensors").write_bytes(b"weights trained from v1 on batch 0001")
    store = fresh_store(ws)
    register(store, 2)
    store.set_model_version_tag(NAME, "1", "fingerprint", "an-older-model")
    store.set_model_version_tag(NAME, "2", "fingerprint", fingerprint(candidate))
    move_alias(store, NAME, CHAMPION, "1", by="gate", expected=None, reason="first")

    def init() -> dict:
        return json.loads((ws / INIT_FILE).read_text())

    refresh_champion(ws)
    before = init()
    assert before["version"] == "1"
    # The run fine-tuned v1 on batch 0001 into the candidate, and the gate promoted it (v2).
    move_alias(store, NAME, CHAMPION, "2", by="gate", expected="1", reason="promoted")
    assert refresh_champion(ws)["version"] == "2"  # champion.json follows: evaluate re-runs
    assert init() == before  # but nothing new to train v2 on: finetune stays up to date
    # A new batch: the next fine-tune continues from the new champion.
    _batch(ws, "0002-bbbbbbbbbbbb")
    refresh_champion(ws)
    assert init()["version"] == "2"
    # A person moves champion back to v1, which was not trained on the current data: the
    # next fine-tune starts from their choice.
    move_alias(store, NAME, CHAMPION, "1", by="cli", expected="2", reason="rolled back")
    refresh_champion(ws)
    assert init()["version"] == "1"
