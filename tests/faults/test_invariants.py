"""The invariant checker reports each invariant broken by hand in a real workspace (git, DVC,
an SQLite MLflow store), and nothing in the workspace as a recorded run leaves it.

The recorded run is made by hand, as the gate and the record step make one (a version tagged
by `tasks.gate.version_tags`, `champion` moved through `ratchet.promotion`, the `retrain:`
commit, the lineage stamp), so these tests take seconds, not a pipeline run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from ratchet import workspace
from tests.faults import harness, invariants

NAME = "ratchet-classifier"


def _register(ws: Path, decision: str, *, token: str | None = None) -> str:
    """A version registered and tagged as the gate does it; returns the version."""
    import mlflow

    from ratchet.config import load_params
    from ratchet.gate import Decision
    from ratchet.registry import RUN_TOKEN_TAG, connect
    from tasks.gate import version_tags

    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    with mlflow.start_run() as run:
        mlflow.set_tags({RUN_TOKEN_TAG: token or uuid.uuid4().hex, "decision": decision})
        mlflow.log_dict({"labels": []}, "model/label_map.json")
    if not _exists(client):
        client.create_registered_model(NAME)
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id)
    tags = version_tags(Decision(decision == "promoted", []), decision, fingerprint="f" * 16,
                        compared_with=None, params=params, drift={}, validation={},
                        lock=ws / "dvc.lock")
    for key, value in tags.items():
        client.set_model_version_tag(NAME, mv.version, key, value)
    return str(mv.version)


def _exists(client) -> bool:
    from ratchet.registry import registered_model

    return registered_model(client, NAME) is not None


def _record(ws: Path, decision: str, version: str) -> str:
    """The record step: the `retrain:` commit and the lineage stamp; returns the commit."""
    from ratchet.config import load_params
    from ratchet.registry import connect

    workspace.git(ws, "commit", "-q", "--allow-empty", "-m",
                  f"retrain: {decision} (version {version})")
    sha = workspace.git(ws, "rev-parse", "HEAD").strip()
    client = connect(load_params(ws / "params.yaml").registry, ws)
    client.set_model_version_tag(NAME, version, "git_commit", sha)
    client.set_model_version_tag(NAME, version, "lineage", "recorded")
    return sha


def _client(ws: Path):
    from ratchet.config import load_params
    from ratchet.registry import connect

    return connect(load_params(ws / "params.yaml").registry, ws)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, str]:
    """A workspace with one accepted batch and one promoted, recorded version."""
    from ratchet.promotion import move_alias

    ws = harness.make_workspace(tmp_path_factory.mktemp("inv") / "ws")
    batch = workspace.ingest(ws, harness.batch_file(ws, 0)).batch_id
    version = _register(ws, "promoted")
    move_alias(_client(ws), NAME, "champion", version, ws=ws, by="gate", expected=None,
               reason="gate promoted it")
    _record(ws, "promoted", version)
    return ws, batch


@pytest.fixture
def ws(recorded, tmp_path) -> Path:
    """A copy of the recorded workspace for one test to break."""
    base, _batch = recorded
    copy = tmp_path / "ws"
    shutil.copytree(base, copy, symlinks=True)
    return copy


def _only(problems: list[str], tag: str) -> list[str]:
    return [p for p in problems if p.startswith(f"[{tag}]")]


def test_a_recorded_run_holds_every_invariant(ws, recorded):
    assert invariants.check(ws, accepted={recorded[1]}) == []


def test_a_version_without_its_decision_tags(ws):
    _client(ws).delete_model_version_tag(NAME, "1", "fingerprint")
    _client(ws).delete_model_version_tag(NAME, "1", "decision")
    found = _only(invariants.check(ws), "tags")
    assert any("lacks the decision tag(s)" in p and "fingerprint" in p for p in found), found
    assert any("has decision None" in p for p in found), found


def test_a_commit_naming_a_missing_version(ws):
    workspace.git(ws, "commit", "-q", "--allow-empty", "-m", "retrain: promoted (version 7)")
    found = _only(invariants.check(ws), "history")
    assert any("names version 7, which the registry does not have" in p for p in found), found


def test_a_commit_marked_undone_is_not_a_broken_invariant(ws):
    workspace.git(ws, "commit", "-q", "--allow-empty", "-m", "retrain: promoted (version 7)")
    workspace.git(ws, "commit", "-q", "--allow-empty", "-m",
                  "retrain undone: version 7 was deleted by the run's undo")
    assert _only(invariants.check(ws), "history") == []


def test_a_version_no_commit_names(ws):
    version = _register(ws, "rejected")
    found = _only(invariants.check(ws), "history")
    assert any(f"version {version} " in p and "named by no" in p for p in found), found


def test_champion_at_a_rejected_version_moved_without_a_log_entry(ws):
    version = _register(ws, "rejected")
    _record(ws, "rejected", version)
    _client(ws).set_registered_model_alias(NAME, "champion", version)
    found = _only(invariants.check(ws), "champion")
    assert any("an unlogged move" in p for p in found), found
    assert any("whose decision is 'rejected'" in p for p in found), found


def test_champion_moved_by_a_person_is_fine(ws):
    from ratchet.promotion import move_alias

    version = _register(ws, "rejected")
    _record(ws, "rejected", version)
    move_alias(_client(ws), NAME, "champion", version, ws=ws, by="cli", expected="1",
               reason="a person chose it")
    assert invariants.check(ws) == []


def test_a_version_of_an_undone_run(ws):
    from ratchet.registry import fail_run

    fail_run(_client(ws), _client(ws).get_model_version(NAME, "1").run_id, "killed")
    found = _only(invariants.check(ws), "failed-run")
    assert any("version 1 remains" in p for p in found), found


def test_a_version_of_a_dead_runs_unfinished_journal(ws):
    dead = subprocess.Popen(["true"])
    dead.wait()
    token = uuid.uuid4().hex
    journal = ws / ".ratchet" / "runs" / f"{token}.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(json.dumps({"op": "start", "model": NAME, "by": f"x@y pid {dead.pid}"})
                       + "\n")
    version = _register(ws, "rejected", token=token)
    _record(ws, "rejected", version)
    found = _only(invariants.check(ws), "failed-run")
    assert any(f"version {version} belongs to run {token}" in p for p in found), found


def test_a_deleted_batch_file_and_a_stray_one(ws, recorded):
    batch = recorded[1]
    (ws / "data" / "batches" / f"{batch}.parquet").unlink()
    found = _only(invariants.check(ws, accepted={batch}), "batches")
    assert any("in the committed data/batches.dvc but missing on disk" in p for p in found)
    assert any("reported accepted but is not in data/batches" in p for p in found), found


def test_a_batch_recorded_that_no_ingest_accepted_and_a_reused_sequence_number(ws, recorded):
    batch = recorded[1]
    folder = ws / "data" / "batches"
    twin = folder / f"{batch.split('-')[0]}-0123456789ab.parquet"
    shutil.copyfile(folder / f"{batch}.parquet", twin)
    workspace.dvc(ws, "add", "-q", "data/batches")
    workspace.git(ws, "add", "data/batches.dvc")
    workspace.git(ws, "commit", "-q", "-m", f"ingest x.csv as batch {twin.stem} (1 rows)")
    found = invariants.check(ws, accepted={batch})
    assert any("sequence number 0001 is used by 2 batches" in p for p in found), found
    assert any(f"batch {twin.stem} is in data/batches but no ingest" in p for p in found)
    assert any(f"git history records batch {twin.stem}" in p for p in found), found


def test_an_ingest_commit_that_folds_in_another_batch(ws, recorded):
    folder = ws / "data" / "batches"
    for seq in ("0002", "0003"):
        shutil.copyfile(folder / f"{recorded[1]}.parquet", folder / f"{seq}-aaaaaaaaaaaa.parquet")
    workspace.dvc(ws, "add", "-q", "data/batches")
    workspace.git(ws, "add", "data/batches.dvc")
    workspace.git(ws, "commit", "-q", "-m", "ingest b.csv as batch 0002-aaaaaaaaaaaa (1 rows)")
    found = _only(invariants.check(ws), "batches")
    assert any("adds ['0002-aaaaaaaaaaaa', '0003-aaaaaaaaaaaa']" in p for p in found), found


def test_an_uncommitted_batch_set_and_a_tmp_file(ws, recorded):
    folder = ws / "data" / "batches"
    shutil.copyfile(folder / f"{recorded[1]}.parquet", folder / "0002-bbbbbbbbbbbb.parquet")
    workspace.dvc(ws, "add", "-q", "data/batches")
    (ws / "reports").mkdir(exist_ok=True)
    (ws / "reports" / ".gate.json.x1y2.tmp").write_text("{")
    found = invariants.check(ws)
    assert any("differs from its committed version" in p for p in found), found
    assert any("on disk but not in the committed" in p for p in found), found
    assert any(p.startswith("[tmp]") and ".gate.json.x1y2.tmp" in p for p in found), found


def test_a_missing_store_is_reported_and_not_created(ws):
    (ws / "mlflow.db").unlink()
    found = invariants.check(ws)
    assert any(p.startswith("[store]") and "missing" in p for p in found), found
    assert not (ws / "mlflow.db").exists()


def test_a_dvc_output_committed_to_git(ws):
    out = ws / "models" / "candidate" / "config.json"
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    workspace.git(ws, "add", "-f", str(out))
    workspace.git(ws, "commit", "-q", "-m", "retrain: promoted (version 1)")
    found = _only(invariants.check(ws), "outputs")
    assert found and "models/candidate/config.json" in found[0], found
