"""Alias moves on a real MLflow SQLite store: compare-and-set, the move log, manual moves."""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ratchet.config import RegistryConfig
from ratchet.errors import AliasMoved, RegistryError
from ratchet.registry import (
    CHALLENGER,
    CHAMPION,
    MANUAL_REASON,
    MAX_TAG_VALUE,
    MOVE_TAG_PREFIX,
    actor,
    alias_history,
    alias_target,
    connect,
    detect_manual_moves,
    move_alias,
    rollback_target,
    tracking_uri,
)

NAME = "ratchet-classifier"  # the default registry.model_name, so a workspace finds it too


@functools.cache
def _template_db() -> Path:
    """An initialised store, made once per process: creating one runs MLflow's migrations
    (seconds), copying the file takes milliseconds."""
    folder = Path(tempfile.mkdtemp(prefix="ratchet-tests-store-"))
    atexit.register(shutil.rmtree, folder, True)
    connect(RegistryConfig(), folder)
    return folder / "mlflow.db"


def fresh_store(folder: Path) -> MlflowClient:
    """A client on a new, empty store at folder/mlflow.db (where a workspace keeps it)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template_db(), folder / "mlflow.db")
    return connect(RegistryConfig(), folder)


def register(client: MlflowClient, n: int, name: str = NAME) -> list[str]:
    """Register n versions; each needs a run, not a logged model, so no torch is involved."""
    client.create_registered_model(name)
    experiment = client.get_experiment_by_name(RegistryConfig().experiment)
    versions = []
    for _ in range(n):
        run = client.create_run(experiment.experiment_id)
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                         run_id=run.info.run_id)
        versions.append(str(mv.version))
    return versions


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    store = fresh_store(tmp_path)
    register(store, 3)
    return store


def other_writer(tmp_path: Path) -> MlflowClient:
    """A second client on the same store: another process, a person in the MLflow UI."""
    uri = tracking_uri(RegistryConfig(), tmp_path)
    return MlflowClient(uri, uri)


def test_move_alias_sets_the_alias_and_records_the_event(client, monkeypatch):
    monkeypatch.setenv("RATCHET_ACTOR", "alice")
    event = move_alias(client, NAME, CHAMPION, "1", by="cli", reason="first", expected=None)
    assert alias_target(client, NAME, CHAMPION) == "1"
    assert event == alias_history(client, NAME)[0]
    assert {k: event[k] for k in ("seq", "alias", "from", "to", "by", "actor", "reason")} == {
        "seq": 1, "alias": CHAMPION, "from": None, "to": "1", "by": "cli", "actor": "alice",
        "reason": "first"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", event["time"])
    tags = client.get_registered_model(NAME).tags
    assert [json.loads(v) for k, v in tags.items() if k.startswith(MOVE_TAG_PREFIX)] == [event]

    second = move_alias(client, NAME, CHAMPION, 2, by="gate", reason="better", expected="1")
    assert (second["seq"], second["from"], second["to"]) == (2, "1", "2")
    assert [e["seq"] for e in alias_history(client, NAME)] == [1, 2]


def test_cas_refuses_when_another_writer_moved_the_alias(client, tmp_path):
    move_alias(client, NAME, CHAMPION, "1", by="gate", reason="cold start", expected=None)
    other_writer(tmp_path).set_registered_model_alias(NAME, CHAMPION, "3")  # behind our back

    with pytest.raises(AliasMoved) as err:
        move_alias(client, NAME, CHAMPION, "2", by="gate", reason="better", expected="1")
    assert err.value.current == "3" and err.value.expected == "1"
    assert alias_target(client, NAME, CHAMPION) == "3"  # the other writer's move stands
    events = alias_history(client, NAME)
    assert [(e["by"], e["from"], e["to"]) for e in events] == [
        ("gate", None, "1"), ("manual", "1", "3")]  # recorded before refusing; no move to 2


def test_cas_between_two_ratchet_writers_records_only_the_winner(client, tmp_path):
    move_alias(client, NAME, CHAMPION, "1", by="gate", reason="cold start", expected=None)
    move_alias(other_writer(tmp_path), NAME, CHAMPION, "3", by="cli", reason="hotfix",
               expected="1")
    with pytest.raises(AliasMoved, match="expected version 1, it is now 3"):
        move_alias(client, NAME, CHAMPION, "2", by="gate", reason="better", expected="1")
    assert [(e["by"], e["to"]) for e in alias_history(client, NAME)] == [
        ("gate", "1"), ("cli", "3")]


def test_a_manual_move_is_detected_once(client, tmp_path, monkeypatch):
    monkeypatch.setenv("RATCHET_ACTOR", "bob")
    move_alias(client, NAME, CHAMPION, "1", by="gate", reason="cold start", expected=None)
    other_writer(tmp_path).set_registered_model_alias(NAME, CHAMPION, "2")

    found = detect_manual_moves(client, NAME)
    assert len(found) == 1
    event = found[0]
    assert (event["by"], event["from"], event["to"], event["actor"]) == ("manual", "1", "2", None)
    assert event["reason"] == MANUAL_REASON
    assert event["detected_at"] == event["time"] and event["detected_by"] == "bob"
    assert detect_manual_moves(client, NAME) == []  # the event is now the last one: nothing new
    assert len(alias_history(client, NAME)) == 2


def test_an_alias_with_no_event_and_a_removed_alias_are_manual_moves(client, tmp_path):
    direct = other_writer(tmp_path)
    direct.set_registered_model_alias(NAME, CHALLENGER, "2")  # e.g. set before the log existed
    assert [(e["alias"], e["from"], e["to"]) for e in detect_manual_moves(client, NAME)] == [
        (CHALLENGER, None, "2")]
    direct.delete_registered_model_alias(NAME, CHALLENGER)
    assert [(e["alias"], e["from"], e["to"]) for e in detect_manual_moves(client, NAME)] == [
        (CHALLENGER, "2", None)]
    assert detect_manual_moves(client, NAME) == []


def test_nothing_to_detect_before_the_first_registration(tmp_path):
    store = fresh_store(tmp_path)
    assert detect_manual_moves(store, NAME) == [] and alias_history(store, NAME) == []


def test_moving_to_where_the_alias_is_writes_nothing(client, tmp_path):
    first = move_alias(client, NAME, CHAMPION, "1", by="gate", reason="cold start", expected=None)
    again = move_alias(client, NAME, CHAMPION, "1", by="gate", reason="re-run", expected="1")
    assert again == first and len(alias_history(client, NAME)) == 1
    # someone else already made the same move: no conflict, the event that did it is returned
    other_writer(tmp_path).set_registered_model_alias(NAME, CHAMPION, "2")
    same = move_alias(client, NAME, CHAMPION, "2", by="gate", reason="better", expected="1")
    assert (same["by"], same["to"]) == ("manual", "2") and len(alias_history(client, NAME)) == 2


@pytest.mark.parametrize(
    ("version", "reason", "message"),
    [
        (None, "why", "cannot be removed"),
        ("9", "why", r"has no version 9 \(registered versions: 1, 2, 3\)"),
        ("abc", "why", "has no version abc"),
        ("1", "  ", "needs a reason"),
    ],
)
def test_move_alias_refuses_bad_requests(client, version, reason, message):
    with pytest.raises(RegistryError, match=message):
        move_alias(client, NAME, CHAMPION, version, by="cli", reason=reason, expected=None)
    assert alias_target(client, NAME, CHAMPION) is None and alias_history(client, NAME) == []


def test_manual_is_not_a_mover_a_caller_may_claim(client):
    with pytest.raises(ValueError, match="by must be"):
        move_alias(client, NAME, CHAMPION, "1", by="manual", reason="x", expected=None)


def test_an_unregistered_model_is_named_in_the_error(tmp_path):
    store = fresh_store(tmp_path)
    with pytest.raises(RegistryError, match="no model `ratchet-classifier` is registered yet"):
        move_alias(store, NAME, CHAMPION, "1", by="cli", reason="x", expected=None)


@pytest.mark.parametrize("char", ["x", "é", '"'])  # escaped characters take more than one
def test_a_long_reason_is_cut_to_fit_one_tag_value(client, char):
    move_alias(client, NAME, CHAMPION, "1", by="cli", reason=char * 9000, expected=None)
    [value] = [v for k, v in client.get_registered_model(NAME).tags.items()
               if k.startswith(f"{MOVE_TAG_PREFIX}000001")]
    assert len(value) <= MAX_TAG_VALUE
    reason = json.loads(value)["reason"]
    assert reason.endswith("[truncated]") and len(reason) > 500


def test_a_hand_edited_tag_is_skipped_and_its_seq_not_reused(client):
    client.set_registered_model_tag(NAME, f"{MOVE_TAG_PREFIX}000007", "not json")
    event = move_alias(client, NAME, CHAMPION, "1", by="cli", reason="x", expected=None)
    assert event["seq"] == 8 and alias_history(client, NAME) == [event]


def test_actor_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("RATCHET_ACTOR", "ci-bot")
    assert actor() == "ci-bot"
    monkeypatch.delenv("RATCHET_ACTOR")
    assert actor()  # the OS user name, or "unknown" where there is none


def _move(seq: int, frm: str | None, to: str, *, by: str = "gate", rollback: bool = False):
    return {"seq": seq, "alias": CHAMPION, "from": frm, "to": to, "by": by,
            "rollback": rollback}


FORWARD = [_move(1, None, "1"), _move(2, "1", "2"),
           {"seq": 3, "alias": CHALLENGER, "from": None, "to": "3"}, _move(4, "2", "3")]


@pytest.mark.parametrize(
    ("events", "current", "target"),
    [
        (FORWARD, "3", "2"),
        # rolling back again goes further back, not to the version just rolled back from
        ([*FORWARD, _move(5, "3", "2", rollback=True)], "2", "1"),
        # a move outside ratchet counts as a forward move
        ([*FORWARD, _move(5, "3", "1", by="manual")], "1", "3"),
        # a version promoted again later: its latest forward move decides
        ([*FORWARD, _move(5, "3", "1", rollback=True), _move(6, "1", "3", by="cli")], "3", "1"),
    ],
)
def test_rollback_target(events, current, target):
    assert rollback_target(events, current) == target


@pytest.mark.parametrize(
    ("events", "current", "message"),
    [
        (FORWARD, None, "no champion to roll back"),
        (FORWARD[:1], "1", "no champion before version 1"),
        ([*FORWARD, _move(5, "3", "2", rollback=True), _move(6, "2", "1", rollback=True)], "1",
         "no champion before version 1"),
        ([], "2", "no champion before version 2"),
    ],
)
def test_rollback_target_errors(events, current, message):
    with pytest.raises(RegistryError, match=message):
        rollback_target(events, current)


def test_refresh_champion_records_a_manual_move(tmp_path):
    from ratchet.workspace import CHAMPION_FILE, refresh_champion, template

    shutil.copyfile(template("params.yaml"), tmp_path / "params.yaml")
    store = fresh_store(tmp_path)
    register(store, 2)
    other_writer(tmp_path).set_registered_model_alias(NAME, CHAMPION, "2")

    assert refresh_champion(tmp_path)["version"] == "2"
    assert json.loads((tmp_path / CHAMPION_FILE).read_text())["version"] == "2"
    assert [(e["by"], e["to"]) for e in alias_history(store, NAME)] == [("manual", "2")]
    refresh_champion(tmp_path)
    assert len(alias_history(store, NAME)) == 1
