"""The CLI: help everywhere, user errors printed without a traceback, workspaces checked."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from ratchet.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["init"], ["ingest"], ["run"], ["status"], ["demo"]])
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


def test_demo_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["demo", "-w", str(tmp_path), "--model", "tiny"])
    assert result.exit_code == 1 and "not a previous demo" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_init_ingest_refusal_and_idempotence(tmp_path):
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws), "--model", "tiny"]).exit_code == 0
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
