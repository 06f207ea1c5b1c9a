"""A failed retrain leaves the registry as it found it (real MLflow SQLite store, no torch)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ratchet import promotion
from ratchet.config import RegistryConfig
from ratchet.promotion import JOURNALS, Journal
from ratchet.registry import (
    CHALLENGER,
    CHAMPION,
    RUN_TOKEN_ENV,
    RUN_TOKEN_TAG,
    alias_history,
    aliases,
    move_alias,
)
from ratchet.workspace import GATE_REPORT, run_guard, template
from tests.unit.test_history import NAME, fresh_store, register


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace's registry side: params.yaml and a store with v1 (champion) and v2."""
    monkeypatch.delenv(RUN_TOKEN_ENV, raising=False)
    shutil.copyfile(template("params.yaml"), tmp_path / "params.yaml")
    client = fresh_store(tmp_path)
    register(client, 2)
    move_alias(client, NAME, CHAMPION, "1", by="gate", expected=None, reason="first")
    move_alias(client, NAME, CHALLENGER, "2", by="gate", expected=None, reason="latest")
    (tmp_path / GATE_REPORT).parent.mkdir()
    return tmp_path, client


def register_as_this_run(client, ws: Path) -> str:
    """What the gate does: notes in the run's journal that it is about to register, then a run
    tagged with the token from the environment, then a version."""
    Journal.of_run(ws).about_to("register")
    experiment = client.get_experiment_by_name(RegistryConfig().experiment)
    run = client.create_run(experiment.experiment_id,
                            tags={RUN_TOKEN_TAG: os.environ[RUN_TOKEN_ENV]})
    mv = client.create_model_version(NAME, source=f"{run.info.artifact_uri}/model",
                                     run_id=run.info.run_id)
    return str(mv.version)


def gate_move(path, client, alias: str, version: str, expected: str | None) -> None:
    """What the gate does: a compare-and-set move under the registry lock, in the run's journal."""
    promotion.move_alias(client, NAME, alias, version, ws=path, by="gate", expected=expected,
                         reason="gate", journal=Journal.of_run(path))


def test_a_failure_after_promotion_restores_the_aliases_and_deletes_the_version(ws):
    path, client = ws
    with pytest.raises(RuntimeError, match="dvc push"), run_guard(path, log=lambda m: None):
        assert Journal.of_run(path).model_name == NAME  # begun, found by the run's token
        version = register_as_this_run(client, path)
        gate_move(path, client, CHAMPION, version, expected="1")
        gate_move(path, client, CHALLENGER, version, expected="2")
        (path / GATE_REPORT).write_text("{}")
        raise RuntimeError("dvc push: remote unreachable")

    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "2"}
    kept = {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")}
    assert kept == {"1", "2"}
    undo = [e for e in alias_history(client, NAME) if e["rollback"]]
    # the run's moves, reverted newest first
    assert [(e["alias"], e["from"], e["to"]) for e in undo] == [(CHALLENGER, "3", "2"),
                                                                (CHAMPION, "3", "1")]
    assert all("dvc push: remote unreachable" in e["reason"] for e in undo)
    failed = client.search_runs([client.get_experiment_by_name("ratchet").experiment_id],
                                filter_string="attributes.status = 'FAILED'")
    assert [r.data.tags["decision"] for r in failed] == ["failed"]
    assert not list((path / JOURNALS).glob("*"))
    assert not (path / GATE_REPORT).exists()  # so the gate runs again instead of replaying
    assert RUN_TOKEN_ENV not in os.environ


def test_an_alias_moved_by_someone_else_since_is_left_alone(ws):
    path, client = ws
    with pytest.raises(KeyboardInterrupt), run_guard(path, log=lambda m: None):
        version = register_as_this_run(client, path)
        gate_move(path, client, CHAMPION, version, expected="1")
        move_alias(client, NAME, CHAMPION, "2", by="cli", expected=version, reason="a person")
        raise KeyboardInterrupt
    assert aliases(client, NAME)[CHAMPION] == "2"
    assert "3" not in {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")}


def test_a_killed_run_is_undone_when_the_next_run_starts(ws, monkeypatch):
    path, client = ws
    killed = run_guard(path, log=lambda m: None)
    killed.__enter__()  # never exited: the process died here (kept referenced until the end)
    half = register_as_this_run(client, path)  # registered, never tagged, no alias moved
    monkeypatch.delenv(RUN_TOKEN_ENV)
    (path / GATE_REPORT).write_text("{}")
    said = []
    with run_guard(path, log=said.append):
        assert half not in {str(mv.version) for mv in
                            client.search_model_versions(f"name = '{NAME}'")}
        kept = register_as_this_run(client, path)
    assert said and "killed" in said[0] and f"'deleted_versions': ['{half}']" in said[0]
    assert not (path / GATE_REPORT).exists()
    # A run that ends normally keeps what it registered.
    assert kept in {str(mv.version) for mv in client.search_model_versions(f"name = '{NAME}'")}
    assert not list((path / JOURNALS).glob("*"))
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "2"}
    del killed


def test_a_retrains_own_run_left_open_by_a_killed_gate_is_marked_failed(ws, monkeypatch):
    """The gate opens the retrain's run, then logs the candidate's under it: killed between
    the two, the retrain's run has no child for the undo to find it by, and would show as
    running for ever."""
    import time

    from ratchet.registry import open_retrain_run

    path, client = ws
    monkeypatch.chdir(path)
    killed = run_guard(path, log=lambda m: None)
    killed.__enter__()  # the process died in the gate (kept referenced until the end)
    Journal.of_run(path).about_to("register")  # as the gate does before it logs
    opened = open_retrain_run(RegistryConfig().experiment, batch="0003-cccccccccccc",
                              start=time.time() - 60, tags={"batch": "0003-cccccccccccc"})
    assert client.get_run(opened).info.status == "RUNNING"
    monkeypatch.delenv(RUN_TOKEN_ENV)
    with run_guard(path, log=lambda m: None):
        run = client.get_run(opened)
        assert run.info.status == "FAILED" and run.data.tags["decision"] == "failed"
        assert "stopped before it was recorded" in run.data.tags["ratchet.failure"]
    del killed


def test_a_failure_before_the_gate_keeps_the_previous_gate_report(ws):
    path, client = ws
    (path / GATE_REPORT).write_text('{"decision": "promoted"}')
    with pytest.raises(ValueError), run_guard(path, log=lambda m: None):
        raise ValueError("finetune diverged")
    assert (path / GATE_REPORT).is_file()
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "2"}
