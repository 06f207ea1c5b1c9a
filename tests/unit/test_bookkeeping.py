"""Bookkeeping of a workspace on real git, DVC and MLflow stores: what finetune starts from, and
what a run's commit holds when a batch lands while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
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


def test_by_default_a_routine_second_batch_continues_from_the_champion(tmp_path):
    """`finetune.init: auto`, the default: v1 (a full retrain on batch 1, tagged so by the
    gate) serves; batch 2 brings no new label and full_every is not reached, so finetune starts
    from v1 with the replay buffer instead of retraining on everything from base."""
    ws = tmp_path
    (ws / "params.yaml").write_text(template("params.yaml").read_text())  # as `ratchet init`
    _batch(ws, "0001-aaaaaaaaaaaa")
    store = fresh_store(ws)
    register(store, 1)
    store.set_model_version_tag(NAME, "1", "finetune.init", "full")
    store.set_model_version_tag(NAME, "1", "finetune.batch", "0001-aaaaaaaaaaaa")
    move_alias(store, NAME, CHAMPION, "1", by="gate", expected=None, reason="first")
    _batch(ws, "0002-bbbbbbbbbbbb")
    refresh_champion(ws)
    got = json.loads((ws / INIT_FILE).read_text())
    assert got.get("init") == "auto" and got.get("plan") == "continual", got
    assert got["version"] == "1" and got["batch"] == "0002-bbbbbbbbbbbb"
    assert got["batches_since_full"] == 1 and got["last_full"] == "0001-aaaaaaaaaaaa"
    assert got["reason"].startswith("a routine batch: 1 batch(es) since the last full retrain")


def _dvc_md5(text: str) -> str:
    return yaml.safe_load(text)["outs"][0]["md5"]


def _lock_md5(text: str, stage: str, path: str) -> str:
    return next(d["md5"] for d in yaml.safe_load(text)["stages"][stage]["deps"]
                if d["path"] == path)


@pytest.mark.slow  # a real stage and CLI ingest (~50 s); quick variant: the test below
def test_a_batch_landing_while_a_run_is_between_stages_is_not_in_that_runs_commit(tmp_path):
    """Today's race: `ratchet ingest` commits with `git add -A`, so it swept the run's
    half-written dvc.lock into its own commit, and the run's commit then sat on a tree whose
    data/batches.dvc names a batch nothing in the run trained on."""
    from ratchet import workspace
    from ratchet.demo_data import demo_batches

    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    frame = demo_batches(seed=0, scale=0.2)[0].frame
    files = {}
    for name, part in (("first", frame.head(40)), ("second", frame.tail(40)),
                       ("by_hand", frame.head(40).assign(text=lambda d: d["text"] + " now"))):
        files[name] = tmp_path / f"{name}.csv"
        part.to_csv(files[name], index=False)
    workspace.ingest(ws, files["first"])
    run_commit = None
    with workspace.retrain_lock(ws):  # a run
        ingest = subprocess.Popen(
            [sys.executable, "-c", "from ratchet.cli import app; app()", "ingest",
             str(files["second"]), "-w", str(ws)],
            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=workspace.tool_env())
        try:
            workspace.repro(ws, "validate")
            # Between stages: a person ingests a batch.
            first_line = ingest.stderr.readline()
            assert "waiting for the retrain in progress" in first_line, (
                first_line + ingest.communicate()[1])
            # A batch added by hand (file + `dvc add`, which stages data/batches.dvc) lands too.
            pd.read_csv(files["by_hand"]).to_parquet(
                ws / "data" / "batches" / "0002-byhand000000.parquet")
            workspace.dvc(ws, "add", "-q", "data/batches")
            workspace.finish_run(ws)
            run_commit = workspace.git(ws, "rev-parse", "HEAD").strip()
        finally:
            if run_commit is None:
                ingest.kill()
    out, err = ingest.communicate(timeout=300)
    assert ingest.returncode == 0, err

    def show(rev: str, path: str) -> str:
        return workspace.git(ws, "show", f"{rev}:{path}")

    # The run's commit names exactly the batches its stage ran on.
    used = _lock_md5(show(run_commit, "dvc.lock"), "validate", "data/batches")
    assert _dvc_md5(show(run_commit, "data/batches.dvc")) == used
    assert "metrics/validation.json" in workspace.git(ws, "show", "--name-only", run_commit)
    # The ingest waited for the run, then committed its batch alone (with the one by hand).
    assert "added as batch 0003-" in out
    assert workspace.git(ws, "log", "-1", "--format=%s").startswith("ingest second.csv")
    assert workspace.git(ws, "show", "--name-only", "--format=", "HEAD").split() == [
        "data/batches.dvc"]
    files_in = [yaml.safe_load(show(rev, "data/batches.dvc"))["outs"][0]["nfiles"]
                for rev in (run_commit, "HEAD")]
    assert files_in[1] == files_in[0] + 2
    # And the next run picks both up: validate is out of date.
    assert "validate" in workspace.changed_stages(ws)


def test_a_run_whose_stages_saw_two_versions_of_the_batches_records_nothing(tmp_path):
    """A batch added by hand before prepare but after validate: the run trained on a batch set
    its validation did not see; its commit would reproduce neither, so it is refused."""
    from ratchet.errors import WorkspaceError
    from ratchet.workspace import unused_inputs

    def lock(*md5s: str) -> str:
        return yaml.safe_dump({"schema": "2.0", "stages": {
            stage: {"cmd": "x", "deps": [{"path": "data/batches", "hash": "md5", "md5": m}]}
            for stage, m in zip(("validate", "noise", "prepare"), md5s, strict=False)}})

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "batches.dvc").write_text(yaml.safe_dump(
        {"outs": [{"md5": "new.dir", "hash": "md5", "path": "batches"}]}))
    (tmp_path / "dvc.lock").write_text(lock("new.dir", "new.dir", "new.dir"))
    assert unused_inputs(tmp_path) == []
    (tmp_path / "dvc.lock").write_text(lock("old.dir", "old.dir", "old.dir"))
    assert unused_inputs(tmp_path) == ["data/batches.dvc"]
    (tmp_path / "dvc.lock").write_text(lock("old.dir", "new.dir", "new.dir"))
    with pytest.raises(WorkspaceError, match="data/batches changed while the run"):
        unused_inputs(tmp_path)
