"""`finetune.init: auto` (the default): the rule, and the plan a workspace's refresh writes into
finetune-init.json from a real MLflow store's tags and real batch files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ratchet.continual import (
    BATCH_TAG,
    CONTINUAL,
    FULL,
    INIT_TAG,
    LABEL_CACHE,
    REQUESTED,
    Facts,
    choose,
    start,
)
from ratchet.registry import CHAMPION, move_alias
from ratchet.workspace import INIT_FILE, fingerprint, refresh_champion, template
from tests.unit.test_history import NAME, fresh_store, register

B1, B2, B3, B4 = "0001-aaaaaaaaaaaa", "0002-bbbbbbbbbbbb", "0003-cccccccccccc", "0004-dddddddddddd"


@pytest.mark.parametrize("facts, want, why", [
    (Facts("3", 1, B1, [], B2, requested=True), FULL, "was requested"),
    (Facts(None, None, None), FULL, "there is no champion yet"),
    (Facts("3", 1, B1, ["weather"], B2), FULL, "the label set grew: 1 label(s)"),
    (Facts("3", None, None, [], B2), FULL, "no full retrain is on record"),
    (Facts("3", 1, B1, [], None), FULL, "has no `finetune.batch` tag"),
    (Facts("3", 3, B1, [], B3), FULL, "3 batch(es) since the last full retrain"),
    (Facts("3", 2, B1, [], B3), CONTINUAL, "a routine batch: 2 batch(es)"),
    (Facts("3", 0, B1, None, B1), CONTINUAL, "a routine batch: 0 batch(es)"),
])
def test_the_rule(facts, want, why):
    how, reason = choose(3, facts)
    assert how == want and why in reason, reason


def test_finetune_follows_the_file_and_params_that_changed_after_it():
    plan = {"init": "auto", "plan": CONTINUAL, "version": "3", "batches_since_full": 2,
            "last_full": B1, "champion_batch": B3}
    assert start("auto", 3, plan)[0] == CONTINUAL
    assert start("auto", 2, plan)[0] == FULL  # full_every lowered by `dvc exp run -S`
    assert start("base", 3, plan)[0] == FULL
    assert start("champion", 3, plan)[0] == FULL  # written under another mode: safe side
    assert start("auto", 3, {"init": "base"})[0] == FULL
    assert start("auto", 3, {**plan, "plan": FULL, "reason": REQUESTED}) == (FULL, REQUESTED)
    assert start("champion", 3, {"init": "champion", "version": "3"})[0] == CONTINUAL


def _batch(ws: Path, batch_id: str, labels=("a", "b")) -> None:
    folder = ws / "data" / "batches"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": [f"text {i} of {batch_id}" for i in range(len(labels))],
                  "label": list(labels)}).to_parquet(folder / f"{batch_id}.parquet")


@pytest.fixture
def ws(tmp_path):
    """A workspace's params.yaml as `ratchet init` copies it (the defaults), batch 1, and v1 in a
    real store: a full retrain on batch 1, the champion."""
    (tmp_path / "params.yaml").write_text(template("params.yaml").read_text())
    _batch(tmp_path, B1)
    store = fresh_store(tmp_path)
    register(store, 1)
    trained(store, "1", FULL, B1)
    move_alias(store, NAME, CHAMPION, "1", by="gate", expected=None, reason="first")
    return tmp_path


def trained(store, version: str, how: str, batch: str) -> None:
    """What the gate tags a version with (from the finetune stage's metrics)."""
    store.set_model_version_tag(NAME, version, INIT_TAG, how)
    store.set_model_version_tag(NAME, version, BATCH_TAG, batch)


def plan(ws: Path, **kw) -> dict:
    refresh_champion(ws, **kw)
    return json.loads((ws / INIT_FILE).read_text())


def set_full_every(ws: Path, n: int) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["finetune"]["full_every"] = n
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))


def test_a_new_label_means_a_full_retrain(ws):
    _batch(ws, B2, labels=("a", "c"))
    got = plan(ws)
    assert got["plan"] == FULL and got["new_labels"] == ["c"]
    assert got["reason"].startswith("the label set grew: 1 label(s) champion version 1 never")
    # Each batch's labels were read once: a second refresh reads the cache, not the batches.
    assert json.loads((ws / LABEL_CACHE).read_text()) == {B1: ["a", "b"], B2: ["a", "c"]}


def test_full_every_counts_batches_since_any_registered_full_retrain(ws):
    set_full_every(ws, 2)
    store = fresh_store_client(ws)
    _batch(ws, B2)
    assert plan(ws)["plan"] == CONTINUAL
    # v2: continual on batch 2, promoted. Batch 3 is the second since the full retrain.
    register_next(store, "2", CONTINUAL, B2, champion=True)
    _batch(ws, B3)
    got = plan(ws)
    assert got["plan"] == FULL and got["reason"] == (
        f"2 batch(es) since the last full retrain (on batch {B1}): finetune.full_every is 2")
    # v3: that full retrain, rejected by the gate (v2 stays). It counts all the same, so the
    # next batch continues from v2 instead of retraining from base on every batch.
    register_next(store, "3", FULL, B3, champion=False)
    _batch(ws, B4)
    got = plan(ws)
    assert got["plan"] == CONTINUAL and got["version"] == "2" and got["last_full"] == B3


def test_a_requested_full_retrain_holds_for_its_batch(ws):
    _batch(ws, B2)
    got = plan(ws, full=True)
    assert got["plan"] == FULL and got["reason"] == REQUESTED
    # Nothing new: the next run keeps the file (finetune stays up to date, trains nothing).
    assert plan(ws) == got
    _batch(ws, B3)
    assert plan(ws)["plan"] == CONTINUAL


def test_no_champion_or_one_without_a_record_means_a_full_retrain(ws):
    store = fresh_store_client(ws)
    register_next(store, "2", None, None, champion=True)  # registered before auto existed
    _batch(ws, B2)
    got = plan(ws)
    assert got["plan"] == FULL and "has no `finetune.batch` tag" in got["reason"]
    store.delete_registered_model_alias(NAME, CHAMPION)
    got = plan(ws)
    assert got["plan"] == FULL and got["reason"] == "there is no champion yet"


def test_a_promoted_candidate_is_not_trained_again_on_its_own_batch(ws):
    """The run continued v1 on batch 2 into the candidate; the gate promoted it (v2): the next
    run, with no new batch, keeps the plan (finetune is up to date) instead of continuing v2 on
    the batch it was trained on."""
    _batch(ws, B2)
    before = plan(ws)
    candidate = ws / "models" / "candidate"
    candidate.mkdir(parents=True)
    (candidate / "model.safetensors").write_bytes(b"v1 continued on batch 2")
    store = fresh_store_client(ws)
    register_next(store, "2", CONTINUAL, B2, champion=True)
    store.set_model_version_tag(NAME, "2", "fingerprint", fingerprint(candidate))
    assert plan(ws) == before
    # A person promotes v3 by hand (not trained on the current data): the plan is made again.
    register_next(store, "3", FULL, B1, champion=False)
    move_alias(store, NAME, CHAMPION, "3", by="cli", expected="2", reason="by hand")
    assert plan(ws)["version"] == "3"


def test_base_and_champion_modes_write_what_they_did(ws):
    _batch(ws, B2)
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for mode, want in (("base", {"init": "base"}), ("champion", None)):
        raw["finetune"]["init"] = mode
        (ws / "params.yaml").write_text(yaml.safe_dump(raw))
        got = plan(ws)
        if want is not None:
            assert got == want
        else:
            assert got["init"] == "champion" and got["version"] == "1" and "plan" not in got
    assert plan(ws, full=True)["plan"] == FULL  # a request holds in champion mode too


def fresh_store_client(ws: Path):
    from ratchet.config import RegistryConfig
    from ratchet.registry import connect

    return connect(RegistryConfig(), ws)


def register_next(store, version: str, how: str | None, batch: str | None, *,
                  champion: bool) -> None:
    experiment = store.get_experiment_by_name("ratchet")
    run = store.create_run(experiment.experiment_id)
    mv = store.create_model_version(NAME, source=f"{run.info.artifact_uri}/model",
                                    run_id=run.info.run_id)
    assert str(mv.version) == version
    if how is not None:
        trained(store, version, how, batch)
    if champion:
        current = store.get_registered_model(NAME).aliases.get(CHAMPION)
        move_alias(store, NAME, CHAMPION, version, by="gate",
                   expected=str(current) if current else None, reason="promoted")
