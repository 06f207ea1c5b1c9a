"""What `dvc metrics show` prints: a stage's metrics file holds its headline numbers only, and
its full record (texts included) sits under reports/ (a real stage run in a real workspace,
DVC's own `metrics show`). The whole pipeline's files: the e2e story."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from typer.testing import CliRunner

from ratchet.cli import app
from ratchet.config import parse_params
from ratchet.headline import HEADLINES, headline, write_metrics
from ratchet.workspace import tool_env


def numbers_only(data) -> bool:
    if isinstance(data, dict):
        return all(numbers_only(v) for v in data.values())
    return isinstance(data, (int, float)) and not isinstance(data, bool)


def dvc_width(ws: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=tool_env(),
                          capture_output=True, text=True, check=True)
    return max(len(line) for line in proc.stdout.splitlines()), proc.stdout


def test_prepares_metrics_file_is_its_headline_and_its_full_record_is_a_report(tmp_path):
    from tasks import prepare

    runner = CliRunner()
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws), "--model", "tiny"]).exit_code == 0
    src = tmp_path / "tickets.csv"
    pd.DataFrame({
        "text": [f"ticket {i} about the {w} invoice" for i in range(60)
                 for w in ("late",)],
        "label": ["billing", "refund", "login"] * 20,
        "domain": ["web", "phone"] * 30,
    }).to_csv(src, index=False)
    done = runner.invoke(app, ["ingest", str(src), "-w", str(ws), "--domain-col", "domain"])
    assert done.exit_code == 0, done.output
    params = parse_params(yaml.safe_load((ws / "params.yaml").read_text()))
    cmd = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["prepare"]["cmd"]
    assert "--all-metrics reports/prepare/metrics.json" in cmd  # what a new workspace runs
    metrics, full = ws / "metrics" / "prepare.json", ws / "reports" / "prepare" / "metrics.json"
    prepare.run(params, batches=ws / "data" / "batches", out=ws / "data" / "prepared",
                replay=ws / "data" / "replay" / "buffer.parquet", metrics=metrics,
                all_metrics=full)
    record, head = json.loads(full.read_text()), json.loads(metrics.read_text())
    assert isinstance(record["recent/batch"], str) and "domain/web" in record  # all of it
    assert numbers_only(head) and len(head) <= 8
    assert head["rows"] == record["rows_out"] == head["train"] + head["val"] + head["test"]
    width, shown = dvc_width(ws, "metrics", "show", "metrics/prepare.json")
    assert width <= 100, shown
    assert "recent/batch" not in shown and "domain/web" not in shown


def test_without_a_full_record_path_the_metrics_file_keeps_everything_as_before(tmp_path):
    """A workspace made before the headline files runs its dvc.yaml unchanged."""
    record = {"rows_out": 10, "recent/batch": "0001-a", "train/recent": 6, "val/recent": 2}
    write_metrics("prepare", record, tmp_path / "prepare.json", None)
    assert json.loads((tmp_path / "prepare.json").read_text()) == record


def test_a_headline_is_numbers_only_whatever_the_record_holds():
    record = {"drifted": True, "retrain": False, "label_jsd": math.nan, "oov_rate": "n/a",
              "mmd_p": 0.03, "weights_ess": 120}
    assert headline("drift", record) == {"drifted": 1, "retrain": 0, "mmd_p": 0.03,
                                         "weights_ess": 120}
    assert headline("finetune", {"init": "continual"})["continual"] == 1
    assert headline("finetune", {"init": "full"})["continual"] == 0
    assert headline("evaluate", {}) == {}  # a first batch: no champion, nothing to differ from
    for stage, fields in HEADLINES.items():  # DVC prints each name as a column header
        names = [name for name, _ in fields]
        assert len(names) == len(set(names)) <= 8, stage
        assert all(len(name) <= 14 for name in names), stage
