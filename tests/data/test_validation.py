"""The batch contract (great-expectations) on real and synthetic data: what is refused and why."""

from pathlib import Path

import pandas as pd
import pytest

from ratchet.config import DataConfig, ValidateConfig
from ratchet.data import canonical, read_table
from ratchet.demo_data import all_labels, demo_batches
from ratchet.errors import BatchRefused
from ratchet.validation import validate_frame

CLINC = Path(__file__).resolve().parents[3] / "shared" / "data" / "clinc150"


def _check(df, **data):
    return validate_frame(
        canonical(df), ValidateConfig(), DataConfig(**data), all_labels(), "b.csv"
    )


def test_clean_demo_batches_pass():
    for batch in demo_batches(scale=0.2)[:3]:
        report = _check(batch.frame, require_domain=True)
        assert report.passed, report.problems


def test_malformed_demo_batch_is_refused_naming_each_problem():
    report = _check(demo_batches(scale=0.2)[3].frame, require_domain=True)
    assert not report.passed
    names = {p.expectation for p in report.critical}
    assert names == {"column `domain`", "text", "text not blank", "label in known set"}
    labels = next(p for p in report.critical if p.expectation == "label in known set")
    assert labels.count == 3
    assert "`check_balanse` (did you mean `check_balance`?)" in labels.message
    assert "`weather_forecast`" in labels.message


@pytest.mark.parametrize(
    ("frame", "expectation"),
    [
        (pd.DataFrame({"txt": ["a"] * 20, "label": ["pay_bill"] * 20}), "column `text`"),
        (
            pd.DataFrame({"text": [f"t{i}" for i in range(5)], "label": ["pay_bill"] * 5}),
            "row count",
        ),
        (
            pd.DataFrame(
                {"text": ["x" * 3000] + [f"t{i}" for i in range(19)], "label": ["pay_bill"] * 20}
            ),
            "text length",
        ),
        (
            pd.DataFrame(
                {"text": [f"t{i}" for i in range(20)], "label": [None] + ["pay_bill"] * 19}
            ),
            "label",
        ),
    ],
)
def test_each_critical_expectation(frame, expectation):
    report = _check(frame)
    assert expectation in {p.expectation for p in report.critical}


def test_duplicates_are_a_warning_not_a_refusal():
    df = pd.DataFrame(
        {"text": ["same text"] * 10 + [f"text {i}" for i in range(10)],
         "label": ["pay_bill"] * 20}
    )
    report = _check(df)
    assert report.passed
    assert [p.expectation for p in report.warnings] == ["duplicate texts"]
    dup = report.warnings[0]
    assert dup.count == 10 and dup.examples[0] == "row 1: 'same text'"


def test_history_duplicates_and_conflicting_labels_are_warnings():
    df = pd.DataFrame({"text": [f"text number {i}" for i in range(20)],
                       "label": ["pay_bill"] * 10 + ["check_balance"] * 10})
    history = {"text number 0": {"pay_bill"}, "text number 15": {"pay_bill"}}
    report = validate_frame(canonical(df), ValidateConfig(), DataConfig(), all_labels(), "b.csv",
                            history=history)
    assert report.passed
    by_name = {p.expectation: p for p in report.warnings}
    assert set(by_name) == {"duplicates of earlier batches", "conflicting labels"}
    assert by_name["duplicates of earlier batches"].count == 2
    assert by_name["conflicting labels"].examples == ["row 16: 'text number 15'"]


@pytest.mark.parametrize(("policy", "severity"), [("redact", "warning"), ("allow", "warning"),
                                                  ("reject", "critical")])
def test_pii_policy_sets_the_severity(policy, severity):
    df = pd.DataFrame({"text": ["mail bob@example.com now"] + [f"text {i}" for i in range(19)],
                       "label": ["pay_bill"] * 20})
    report = validate_frame(canonical(df), ValidateConfig(pii=policy), DataConfig(),
                            all_labels(), "b.csv")
    pii = next(p for p in report.problems if p.expectation == "PII")
    assert pii.severity == severity and pii.count == 1
    assert pii.examples == ["row 1: 'mail <EMAIL> now'"]  # a report never repeats the PII


def test_new_labels_allowed_when_configured():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["brand_new"] * 20})
    assert not _check(df).passed
    cfg = ValidateConfig(allow_new_labels=True)
    assert validate_frame(canonical(df), cfg, DataConfig(), all_labels(), "b").passed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty"),
        (b"\xff\xfe\x00bad", "not valid UTF-8 at byte 0 \\(line 1\\).*UTF-16"),
        (b"text,label\ncaf\xe9 au lait,x\n", "byte 14 \\(line 2\\).*Latin-1"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(BatchRefused, match=message):
        read_table(path)


def test_directory_and_unknown_suffix_are_refused(tmp_path):
    with pytest.raises(BatchRefused, match="is a directory"):
        read_table(tmp_path)
    (tmp_path / "x.xlsx").write_text("a")
    with pytest.raises(BatchRefused, match="unsupported file type"):
        read_table(tmp_path / "x.xlsx")


@pytest.mark.skipif(not CLINC.is_dir(), reason="shared CLINC150 data not present")
def test_clinc150_validation_split_passes_the_contract():
    df = read_table(CLINC / "val.csv")
    report = validate_frame(
        canonical(df),
        ValidateConfig(),
        DataConfig(require_domain=True),
        sorted(set(df["label"])),
        "clinc150/val.csv",
    )
    assert report.passed and report.rows == 3100


def test_validate_stage_writes_data_docs_and_history_warnings(tmp_path):
    from ratchet.config import parse_params
    from tasks.validate import run

    batches = tmp_path / "batches"
    batches.mkdir()
    first = pd.DataFrame({"text": [f"pay bill number {i}" for i in range(12)],
                          "label": ["pay_bill"] * 6 + ["check_balance"] * 6})
    first.to_parquet(batches / "0001-aaaaaaaaaaaa.parquet")
    first.iloc[:10].to_parquet(batches / "0002-bbbbbbbbbbbb.parquet")
    docs = tmp_path / "docs"
    summary = run(parse_params({}), batches=batches, report=tmp_path / "summary.json",
                  metrics=tmp_path / "metrics.json", docs=docs)
    assert summary["passed"] and summary["data_docs"] == str(docs / "index.html")
    assert (docs / "index.html").is_file()
    assert len(list((docs / "validations").rglob("*.html"))) == 2  # one page per batch
    assert summary["warnings"] == [
        "0002-bbbbbbbbbbbb.parquet: duplicates of earlier batches: 10 of 10 rows repeat a text "
        "of an earlier batch"
    ]


def test_data_docs_read_offline_their_index_lists_every_validation_without_a_script(tmp_path):
    """No page loads anything from a CDN: the libraries sit in the site, and the index's tables
    (which bootstrap-table, absent offline, would draw from JSON) are plain rows, one per batch,
    each linking to its page. The rendered pages: tests/e2e/test_browser.py."""
    import re

    from ratchet.config import parse_params
    from ratchet.offline import VENDOR
    from tasks.validate import run

    batches = tmp_path / "batches"
    batches.mkdir()
    for i, batch in enumerate(("0001-aaaaaaaaaaaa", "0002-bbbbbbbbbbbb")):
        pd.DataFrame({"text": [f"pay bill {batch} {j}" for j in range(12)],
                      "label": ["pay_bill", "check_balance"] * 6}).to_parquet(
            batches / f"{batch}.parquet")
        docs = tmp_path / "docs"
        run(parse_params({}), batches=batches, report=tmp_path / "summary.json",
            metrics=tmp_path / "metrics.json", docs=docs, cache=tmp_path / "cache")
        pages = sorted(docs.rglob("*.html"))
        assert len(pages) == 1 + 2 * (i + 1)  # the index, a validation and a suite per batch
        for page in pages:
            text = page.read_text()
            loaded = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?:[^"]+)"', text)
            assert not loaded, (page, loaded)
            for ref in re.findall(r'(?:src|href)="([^"#]*static/vendor/[^"]+)"', text):
                assert (page.parent / ref).resolve().is_file(), (page, ref)
        index = (docs / "index.html").read_text()
        rows = re.findall(r'<tr class="clickable-row"[^>]*data-href="(validations/[^"]+)"', index)
        assert len(rows) == i + 1 and all((docs / r).is_file() for r in rows)
    assert (docs / VENDOR / "jquery" / "jquery.min.js").is_file()
