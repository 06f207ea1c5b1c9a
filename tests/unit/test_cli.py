"""The CLI: help everywhere, user errors printed without a traceback, workspaces checked."""

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ratchet.cli import app
from ratchet.registry import CHAMPION, alias_history, alias_target
from tests.unit.test_history import NAME, fresh_store, other_writer, register

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["init"], ["ingest"], ["run"], ["status"], ["demo"],
                                     ["promote"], ["rollback"], ["history"], ["serve"],
                                     ["watch"]])
def test_help_everywhere(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_ingest_help_documents_the_column_mapping_and_dry_run():
    result = runner.invoke(app, ["ingest", "--help"], terminal_width=200)
    for option in ("--text-col", "--label-col", "--domain-col", "--id-col", "--timestamp-col",
                   "--dry-run"):
        assert option in result.output


def test_commands_outside_a_workspace_say_so(tmp_path):
    for command in (["run", "-w", str(tmp_path)], ["status", "-w", str(tmp_path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1
        assert "is not a ratchet workspace" in result.output
        assert "Traceback" not in result.output


def test_init_points_a_workspace_at_servers(tmp_path):
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["init", str(ws), "--model", "tiny", "--tracking-uri",
                                 "http://mlflow:5000", "--dvc-remote", "s3://ratchet/dvc",
                                 "--dvc-endpoint", "http://minio:9000"])
    assert result.exit_code == 0, result.output
    assert "tracking_uri: http://mlflow:5000" in (ws / "params.yaml").read_text()
    config = (ws / ".dvc" / "config").read_text()
    assert "url = s3://ratchet/dvc" in config and "endpointurl = http://minio:9000" in config
    assert "remote = storage" in config and not (ws / ".ratchet" / "dvc-remote").exists()
    lone = runner.invoke(app, ["init", str(tmp_path / "b"), "--dvc-endpoint", "http://x:9"])
    assert lone.exit_code == 1 and "needs --dvc-remote" in lone.output


def test_watch_needs_a_prefect_server(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ratchet.workspace import write_probes

    # A workspace as `require` sees it (no git or DVC needed to reach the check).
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / ".dvc").mkdir()
    write_probes(tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["watch", "-w", str(tmp_path)])
    assert result.exit_code == 1 and "PREFECT_API_URL" in result.output


def test_demo_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["demo", "-w", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 1 and "not a previous demo" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_init_ingest_refusal_and_idempotence(tmp_path):
    ws = tmp_path / "ws"
    made = runner.invoke(app, ["init", str(ws), "--model", "tiny"], terminal_width=300)
    assert made.exit_code == 0 and "`tiny` is a randomly initialised" in made.output
    assert "for tests and benchmarks" in made.output
    assert runner.invoke(app, ["init", str(ws)]).exit_code == 1  # already a workspace
    good = tmp_path / "good.csv"
    pd.DataFrame({"text": [f"pay bill number {i}" for i in range(12)],
                  "label": ["pay_bill"] * 6 + ["check_balance"] * 6}).to_csv(good, index=False)
    first = runner.invoke(app, ["ingest", str(good), "-w", str(ws)])
    assert first.exit_code == 0 and "added as batch 0001-" in first.output
    again = runner.invoke(app, ["ingest", str(good), "-w", str(ws)])
    assert again.exit_code == 0 and "already ingested" in again.output
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(12)],
                  "label": ["pay_bil"] * 12}).to_csv(bad, index=False)
    refused = runner.invoke(app, ["ingest", str(bad), "-w", str(ws)])
    assert refused.exit_code == 1
    assert "did you mean `pay_bill`?" in refused.output and "Traceback" not in refused.output
    assert len(list((ws / "data" / "batches").glob("*.parquet"))) == 1


def test_init_rejects_an_unknown_model_before_touching_disk(tmp_path):
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["init", str(ws), "--model", "/no/such/model"])
    assert result.exit_code == 1
    assert "nothing is downloaded from a hub" in result.output
    assert not ws.exists()


def registry_workspace(ws: Path):
    """A workspace as the registry commands see it (params, dvc.yaml, .dvc/, an MLflow store),
    made without git or DVC so that it takes no time; returns a client on its store."""
    from ratchet.workspace import template

    client = fresh_store(ws)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copyfile(template(name), ws / name)
    (ws / ".dvc").mkdir()
    return client


@pytest.fixture
def ws(tmp_path) -> Path:
    """A registry workspace with three versions, the third rejected by the gate."""
    ws = tmp_path / "ws"
    client = registry_workspace(ws)
    register(client, 3)
    for key, value in {"decision": "rejected",
                       "failed": "recent: not significantly better (CI lower bound -0.01)"}.items():
        client.set_model_version_tag(NAME, "3", key, value)
    return ws


def cli(ws: Path, *args: str):
    return runner.invoke(app, [*args, "-w", str(ws)], terminal_width=200)


def champion(ws: Path) -> str | None:
    return alias_target(other_writer(ws), NAME, CHAMPION)


def test_promote_rollback_and_history(ws, monkeypatch):
    monkeypatch.setenv("RATCHET_ACTOR", "alice")
    for version in ("1", "2"):
        result = cli(ws, "promote", version, "--reason", f"serve {version}")
        assert result.exit_code == 0, result.output
    assert "champion: 1 -> 2 (history #2, by cli as alice)" in result.output
    rejected = cli(ws, "promote", "3", "-r", "override the gate")
    assert rejected.exit_code == 0 and champion(ws) == "3"
    assert "the gate rejected version 3" in rejected.output
    assert "recent: not significantly better" in rejected.output
    same = cli(ws, "promote", "3", "-r", "again")
    assert same.exit_code == 0 and "already the champion; nothing changed" in same.output

    assert cli(ws, "rollback", "--reason", "3 misbehaves").exit_code == 0
    assert champion(ws) == "2"
    assert cli(ws, "rollback", "--reason", "2 too").exit_code == 0
    assert champion(ws) == "1"  # further back, not forward to 3
    last = cli(ws, "rollback", "--reason", "and 1?")
    assert last.exit_code == 1 and "no champion before version 1" in last.output
    assert "Traceback" not in last.output and champion(ws) == "1"
    assert cli(ws, "rollback", "--to", "3", "-r", "it was fine").exit_code == 0
    assert champion(ws) == "3"

    events = alias_history(other_writer(ws), NAME)
    assert [(e["from"], e["to"], e.get("rollback")) for e in events] == [
        (None, "1", False), ("1", "2", False), ("2", "3", False), ("3", "2", True),
        ("2", "1", True), ("1", "3", True)]
    assert {e["by"] for e in events} == {"cli"} and {e["actor"] for e in events} == {"alice"}

    shown = cli(ws, "history")
    assert shown.exit_code == 0
    for text in ("alias moves", "2 -> 1", "cli (rollback)", "alice", "3 misbehaves"):
        assert text in shown.output
    none = cli(ws, "history", "--alias", "challenger")
    assert none.exit_code == 0 and "no alias moves recorded yet" in none.output
    other_writer(ws).set_model_version_tag(NAME, "2", "finetune.init", "continual")
    status = cli(ws, "status")
    assert status.exit_code == 0 and "champion 3 since" in status.output
    assert "trained" in status.output and "continual" in status.output


def test_a_move_in_the_mlflow_ui_shows_as_manual(ws):
    assert cli(ws, "promote", "1", "-r", "first").exit_code == 0
    other_writer(ws).set_registered_model_alias(NAME, CHAMPION, "2")
    status = cli(ws, "status")  # status notices and records the move, as history does
    assert status.exit_code == 0 and "champion 2 since" in status.output
    assert "(manual)" in status.output and "not yet recorded" not in status.output
    shown = cli(ws, "history", "--alias", "champion")
    assert shown.exit_code == 0 and "manual*" in shown.output
    assert "moved outside ratchet" in shown.output
    assert [e["by"] for e in alias_history(other_writer(ws), NAME)] == ["cli", "manual"]
    # a rollback undoes the manual move: back to what ratchet last set
    assert cli(ws, "rollback", "-r", "not approved").exit_code == 0 and champion(ws) == "1"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["promote", "9", "-r", "x"], 1, "has no version 9 (registered versions: 1, 2, 3)"),
        (["promote", "1"], 2, "Missing option '--reason'"),
        (["promote", "1", "-r", " "], 1, "needs a reason"),
        (["rollback", "-r", "x"], 1, "there is no champion to roll back"),
        (["rollback", "--to", "7", "-r", "x"], 1, "has no version 7"),
    ],
)
def test_registry_command_errors(ws, args, code, message):
    result = cli(ws, *args)
    assert result.exit_code == code
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert champion(ws) is None


def test_registry_commands_before_any_model_is_registered(tmp_path):
    ws = tmp_path / "ws"
    registry_workspace(ws)
    promoted = cli(ws, "promote", "1", "-r", "x")
    assert promoted.exit_code == 1 and "is registered yet" in promoted.output
    shown = cli(ws, "history")
    assert shown.exit_code == 0 and "no alias moves recorded yet" in shown.output


def test_a_stage_runs_without_its_optional_paths_and_refuses_without_a_required_one(
        tmp_path, monkeypatch, capsys):
    """The `dvc.yaml` of a workspace made by an older ratchet lacks paths added since (say
    pretrain's `--curve`): the stage runs with its defaults for them."""
    from ratchet.stage import stage_main

    (tmp_path / "params.yaml").write_text("model: {source: tiny}\n")
    monkeypatch.chdir(tmp_path)  # a stage leaves its timing in the workspace it runs in
    calls = []

    def fn(params, **paths):
        calls.append(paths)

    params = str(tmp_path / "params.yaml")
    monkeypatch.setattr(sys, "argv", ["x", "--out", "o", "--params", params])
    stage_main("demo", "doc", {"out": "the output", "curve": "a curve"}, fn, optional=("curve",))
    assert calls == [{"out": Path("o")}]  # left out, not passed as None

    monkeypatch.setattr(sys, "argv", ["x", "--curve", "c"])
    with pytest.raises(SystemExit) as stop:
        stage_main("demo", "doc", {"out": "the output", "curve": "a curve"}, fn,
                   optional=("curve",))
    assert stop.value.code == 2 and "--out" in capsys.readouterr().err


def test_version_flag():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ratchet {version('ratchet')}"


def test_a_first_decision_prints_no_python_none(capsys):
    from ratchet.cli import _print_gate

    _print_gate({"decision": "promoted", "version": "1", "champion_before": None,
                 "champion_after": "1", "checks": []})
    out = capsys.readouterr().out
    assert "None" not in out and "champion (none) -> 1" in out


def test_short_cells_end_at_a_word_not_inside_a_number():
    from ratchet.cli import _short

    reason = ("recent: not significantly better than the champion, CI lower bound -0.0123456 "
              "(p 0.31)")
    cut = _short(reason, 70)
    assert len(cut) <= 70 and cut.endswith("…")
    kept = cut.removesuffix("…").rstrip()
    assert reason.startswith(kept) and reason[len(kept)] == " "  # a whole word was dropped


def test_piped_tables_follow_columns(ws, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    status = runner.invoke(app, ["status", "-w", str(ws)])  # not a terminal: piped
    assert status.exit_code == 0
    assert max(len(line) for line in status.output.splitlines()) <= 100


def test_ingest_suggests_the_text_column_by_its_role_not_its_spelling(tmp_path):
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws), "--model", "tiny"]).exit_code == 0
    src = tmp_path / "tickets.csv"
    pd.DataFrame({"body": [f"my card number {i} was declined" for i in range(12)],
                  "intent": ["card_declined"] * 12}).to_csv(src, index=False)
    refused = runner.invoke(app, ["ingest", str(src), "-w", str(ws)], terminal_width=300)
    assert refused.exit_code == 1
    assert "--text-col body" in refused.output and "--text-col intent" not in refused.output
    assert "--label-col intent" in refused.output


def test_the_demo_table_gives_a_refused_batch_its_reasons(capsys, monkeypatch):
    from ratchet.cli import print_story

    monkeypatch.setenv("COLUMNS", "200")
    print_story([{"batch": "04-malformed.csv", "story": "a broken export", "rows": 40,
                  "decision": "refused at ingest",
                  "reasons": ["text: required column is missing (looked for `text`)",
                              "text not blank: 7 rows (17.5%) have an empty text; e.g. row 3"]}])
    out = capsys.readouterr().out
    assert "required column is missing" in out and "7 rows (17.5%) have an empty text" in out
    assert "e.g. row 3" not in out  # the examples are in the quarantine report


def test_the_flow_artifact_of_a_first_decision_prints_no_python_none():
    from flows.retrain import decision_markdown

    text = decision_markdown({"decision": "promoted", "version": "1", "model_name": "m",
                              "champion_before": None, "champion_after": "1", "checks": []}, {})
    assert "None" not in text and "Champion before: (none); after: 1" in text
