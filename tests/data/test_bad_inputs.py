"""The bad-input corpus against a real workspace: each file's exact outcome, and no trace left.

A refused file must leave the batch folder, git, `dvc status` and MLflow as they were, and land
in the quarantine folder with a report. An accepted file lands as one committed batch with
exactly the warnings it was made to trigger. One workspace serves the module; each case checks
the state before and after itself rather than relying on the order the cases run in.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from ratchet.data import ColumnMap
from ratchet.errors import BatchRefused
from ratchet.workspace import BATCHES, QUARANTINE, commit, ingest, init, tool_env
from tests.data.bad_inputs.make_corpus import LABELS, write_generated

CORPUS = Path(__file__).resolve().parent / "bad_inputs"


@dataclass(frozen=True)
class Case:
    file: str
    outcome: str = ""  # refused: a fragment of the refusal message
    warnings: frozenset[str] = frozenset()  # accepted: the warnings' expectation names, exactly
    columns: dict[str, str] = field(default_factory=dict)  # ColumnMap fields
    validate: dict[str, Any] = field(default_factory=dict)  # params.yaml `validate` overrides
    check: Callable[[pd.DataFrame], bool] | None = None  # on the stored batch
    generated: bool = False  # made at test time (binary, encodings, filesystem oddities)
    land: bool = True  # False: a dry run decides (the same checks; saves a DVC commit)


def refused(file: str, outcome: str, **kw: Any) -> Case:
    return Case(file, outcome, **kw)


def accepted(file: str, *warnings: str, **kw: Any) -> Case:
    return Case(file, warnings=frozenset(warnings), **kw)


REFUSED = [
    refused("empty.csv", "file is empty"),
    refused("header_only.csv", "row count: 0 rows is outside the allowed bounds [10, 1000000]"),
    refused("too_few_rows.csv", "row count: 5 rows is outside the allowed bounds"),
    refused("missing_label_column.csv", "column `label`: required column is missing"),
    refused("renamed_columns.csv", "the file has `utterance`, `intent`"),
    refused("null_texts.csv", "text: 2 of 12 rows have no text; e.g. row 3"),
    refused("blank_texts.csv", "text not blank: 1 of 12 rows are empty or whitespace only"),
    refused("null_labels.jsonl", "label: 1 of 12 rows have no label; e.g. row 4"),
    refused("numeric_labels.csv", "12 of 12 rows have a label outside the 3 known labels: `0`"),
    refused("numeric_labels.jsonl", "label type: 12 of 12 rows have a label that is not a "
            "string (int: 12)"),
    refused("label_typo.csv", "`pay_bil` (did you mean `pay_bill`?)"),
    refused("unknown_label.csv", "`weather_forecast` (validate.allow_new_labels"),
    refused("control_chars.csv", "control characters: 2 of 12 rows contain control characters"),
    refused("broken_line.jsonl", "line 3 is not valid JSON"),
    refused("array_line.jsonl", "line 5 is a JSON list, expected an object"),
    refused("mixed_types.jsonl", "text type: 3 of 12 rows have a text that is not a string"),
    refused("ragged.csv", "could not be parsed as csv: Error tokenizing data"),
    refused("unsupported.xlsx", "unsupported file type `.xlsx`"),
    refused("bad_timestamps.csv", "timestamp: 4 of 12 rows have a timestamp that does not parse",
            columns={"timestamp": "when"}),
    refused("no_domain.csv", "column `domain`: required column is missing (looked for `area`, "
            "mapped to `domain`", columns={"domain": "area"}),
    refused("pii_for_reject.csv", "PII: 1 of 12 rows contain personal data",
            validate={"pii": "reject"}),
    refused("latin1.csv", "not valid UTF-8 at byte", generated=True),
    refused("utf16.csv", "looks like UTF-16", generated=True),
    refused("binary_garbage.csv", "undecodable bytes: not valid UTF-8", generated=True),
    refused("garbage.parquet", "could not be parsed as parquet", generated=True),
    refused("huge_text.csv", "text length: 1 of 12 rows are longer than 2000 characters",
            generated=True),
    refused("token_budget.csv", "token budget: 1 of 12 rows are longer than 512 tokens",
            generated=True),
    refused("wrong_dtypes.parquet", "text type: 12 of 12 rows have a text that is not a string "
            "(int: 12)", generated=True),
    refused("directory.csv", "is a directory", generated=True),
    refused("loop_a.csv", "is a symlink that does not resolve", generated=True),
]

ACCEPTED = [
    accepted("utf8_bom.csv", generated=True,
             check=lambda b: list(b.columns) == ["text", "label"]
             and not b["text"][0].startswith("\ufeff")),
    accepted("embedded_newlines.csv",
             check=lambda b: b["text"][0] == 'pay the "upsilon" bill,\nthen the second line'
             and b["text"][1] == 'she said "hi", then\nsent money, twice'),
    accepted("extra_columns.csv", "unused columns",
             check=lambda b: list(b.columns) == ["text", "label"]),
    accepted("renamed_mapped.csv", columns={"text": "utterance", "label": "intent"}),
    accepted("duplicate_rows.csv", "duplicate texts", land=False),
    accepted("conflicting_labels.csv", "duplicate texts", "conflicting labels", land=False),
    accepted("imbalanced.csv", "class imbalance", land=False),
    accepted("short_texts.csv", "very short texts", land=False),
    accepted("history_repeat.csv", "duplicates of earlier batches", land=False),
    accepted("pii.csv", "PII",
             check=lambda b: b["text"][0].startswith("my email is <EMAIL> ")
             and "<PHONE>" in b["text"][1] and "<CARD>" in b["text"][2]
             and not b["text"].str.contains("@|4111|7946").any()),
    accepted("pii_for_allow.jsonl", "PII", validate={"pii": "allow"},
             check=lambda b: "kim@example.net" in b["text"][0]),
    accepted("new_label.csv", validate={"allow_new_labels": True}),
    accepted("with_ids.csv", columns={"text": "body", "label": "intent", "id": "ref",
                                      "timestamp": "sent"},
             check=lambda b: list(b.columns) == ["text", "label", "id", "timestamp"]
             and b["id"][0] == "T-0"),
    accepted("good.parquet", generated=True),
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    write_generated(out)
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace for the module, with a declared label set and one clean batch."""
    ws = init(tmp_path_factory.mktemp("corpus") / "ws",
              {"model": {"source": "tiny"}, "data": {"labels": LABELS}})
    ingest(ws, CORPUS / "baseline.csv")
    return ws


def source(case: Case, generated: Path) -> Path:
    return (generated if case.generated else CORPUS) / case.file


@contextmanager
def validate_params(ws: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """Change `validate` in the workspace's params for one case, then put it back as it was."""
    if not overrides:
        yield
        return
    path = ws / "params.yaml"
    original = path.read_bytes()
    raw = yaml.safe_load(original)
    raw["validate"].update(overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield
    finally:
        path.write_bytes(original)
        commit(ws, "test: restore params")  # an accepted batch committed the changed params


def _run(ws: Path, *args: str) -> str:
    return subprocess.run(args, cwd=ws, capture_output=True, text=True, check=True,
                          env=tool_env()).stdout


def dvc_status(ws: Path) -> dict[str, Any]:
    from dvc.repo import Repo

    with Repo(str(ws)) as repo:
        return repo.status()


def state(ws: Path) -> dict[str, Any]:
    """Everything a refused batch must leave alone."""
    return {
        "batches": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                          for p in (ws / BATCHES).iterdir()),
        "git_head": _run(ws, "git", "rev-parse", "HEAD"),
        "git_status": _run(ws, "git", "status", "--porcelain", "--untracked-files=all"),
        "dvc_status": dvc_status(ws),
        "mlflow_store": (ws / "mlflow.db").exists(),
    }


def quarantined(ws: Path) -> set[Path]:
    root = ws / QUARANTINE
    return {p for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.file)
def test_refused_input_leaves_no_trace(ws: Path, generated: Path, case: Case) -> None:
    path = source(case, generated)
    before, held = state(ws), quarantined(ws)
    with validate_params(ws, case.validate), pytest.raises(BatchRefused) as err:
        ingest(ws, path, ColumnMap(**case.columns))
    message = str(err.value)
    assert case.outcome in message, message
    assert f"batch `{case.file}` refused" in message
    assert state(ws) == before
    new = quarantined(ws) - held
    assert len(new) == 1, new
    entry = new.pop()
    assert entry.name.endswith(f"-{case.file}") and err.value.quarantine
    report = json.loads((entry / "report.json").read_text())
    assert report["problems"] == err.value.problems
    assert case.file in (entry / "report.md").read_text()
    if path.is_file():
        assert (entry / case.file).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("case", ACCEPTED, ids=lambda c: c.file)
def test_accepted_input_lands_with_its_warnings(ws: Path, generated: Path, case: Case) -> None:
    before = len(list((ws / BATCHES).glob("*.parquet")))
    with validate_params(ws, case.validate):
        res = ingest(ws, source(case, generated), ColumnMap(**case.columns), dry_run=not case.land)
    assert {w.split(":", 1)[0] for w in res.warnings} == case.warnings, res.warnings
    if not case.land:
        assert res.dry_run and not res.path.exists()
        return
    assert res.created and res.path.is_file()
    assert len(list((ws / BATCHES).glob("*.parquet"))) == before + 1
    assert not _run(ws, "git", "status", "--porcelain")  # the batch is versioned and committed
    if case.check:
        assert case.check(pd.read_parquet(res.path))


def test_the_same_content_twice_is_one_batch(ws: Path) -> None:
    from typer.testing import CliRunner

    from ratchet.cli import app

    first = ingest(ws, CORPUS / "same_batch.csv")
    before = state(ws)
    again = CliRunner().invoke(app, ["ingest", str(CORPUS / "same_batch.jsonl"), "-w", str(ws)])
    assert again.exit_code == 0, again.output
    output = " ".join(again.output.split())  # the console wraps long lines
    assert f"already ingested as batch {first.batch_id}; nothing changed" in output
    assert state(ws) == before


def test_dry_run_changes_nothing(ws: Path) -> None:
    from typer.testing import CliRunner

    from ratchet.cli import app

    before, held = state(ws), quarantined(ws)
    planned = ingest(ws, CORPUS / "dry_run.csv", dry_run=True)
    assert planned.dry_run and not planned.created and not planned.path.exists()
    refusal = CliRunner().invoke(app, ["ingest", str(CORPUS / "label_typo.csv"), "-w", str(ws),
                                       "--dry-run"])
    output = " ".join(refusal.output.split())
    assert refusal.exit_code == 1 and "did you mean `pay_bill`?" in output
    assert "nothing was changed or quarantined" in output
    assert "Traceback" not in refusal.output
    assert state(ws) == before and quarantined(ws) == held
    assert ingest(ws, CORPUS / "dry_run.csv").batch_id == planned.batch_id


def test_a_missing_file_is_refused_without_quarantine(ws: Path) -> None:
    held = quarantined(ws)
    with pytest.raises(BatchRefused, match="file not found"):
        ingest(ws, CORPUS / "no-such-file.csv")
    assert quarantined(ws) == held


def test_no_model_version_was_registered(ws: Path) -> None:
    """Ingest never touches MLflow: after the whole corpus the registry holds no version."""
    import sqlite3

    store = ws / "mlflow.db"  # registry.tracking_uri of the workspace: sqlite:///mlflow.db
    if store.exists():
        with sqlite3.connect(store) as db:
            assert db.execute("select count(*) from model_versions").fetchone() == (0,)
    assert not (ws / "mlartifacts").exists()
