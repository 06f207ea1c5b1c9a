"""The batch data contract as a great-expectations suite, with critical and warning severities."""

from __future__ import annotations

import difflib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from ratchet.config import DataConfig, ValidateConfig
from ratchet.data import DOMAIN, LABEL, TEXT

CRITICAL, WARNING = "critical", "warning"


@dataclass(frozen=True)
class Problem:
    expectation: str
    severity: str
    message: str
    count: int = 0
    examples: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        ex = f"; e.g. {self.examples}" if self.examples else ""
        return f"{self.expectation}: {self.message}{ex}"


@dataclass
class ValidationReport:
    source: str
    rows: int
    problems: list[Problem]

    @property
    def critical(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == CRITICAL]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def passed(self) -> bool:
        return not self.critical

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "passed": self.passed,
            "critical": [asdict(p) for p in self.critical],
            "warnings": [asdict(p) for p in self.warnings],
        }


def _suggest(label: str, known: list[str]) -> str:
    close = difflib.get_close_matches(label, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _build_suite(df: pd.DataFrame, vcfg: ValidateConfig, dcfg: DataConfig, known: list[str]):
    import great_expectations as gx
    import great_expectations.expectations as gxe

    def crit(name: str) -> dict[str, str]:
        return {"severity": CRITICAL, "name": name}

    def warn(name: str) -> dict[str, str]:
        return {"severity": WARNING, "name": name}

    suite = gx.ExpectationSuite(name="batch_contract")
    required = [TEXT, LABEL] + ([DOMAIN] if dcfg.require_domain else [])
    for col in required:
        suite.add_expectation(gxe.ExpectColumnToExist(column=col, meta=crit(f"column `{col}`")))
    suite.add_expectation(
        gxe.ExpectTableRowCountToBeBetween(
            min_value=vcfg.min_rows, max_value=vcfg.max_rows, meta=crit("row count")
        )
    )
    if TEXT in df.columns:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=TEXT, meta=crit("text")))
        suite.add_expectation(
            gxe.ExpectColumnValuesToNotMatchRegex(
                column=TEXT, regex=r"^\s*$", meta=crit("text not blank")
            )
        )
        suite.add_expectation(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=TEXT, min_value=1, max_value=vcfg.max_chars, meta=crit("text length")
            )
        )
        suite.add_expectation(
            gxe.ExpectColumnValuesToBeUnique(column=TEXT, mostly=1 - vcfg.max_duplicate_frac,
                                             meta=warn("duplicate texts"))
        )
    if LABEL in df.columns:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=LABEL, meta=crit("label")))
        if known and not vcfg.allow_new_labels:
            suite.add_expectation(
                gxe.ExpectColumnValuesToBeInSet(
                    column=LABEL, value_set=known, meta=crit("label in known set")
                )
            )
    if DOMAIN in df.columns and dcfg.require_domain:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=DOMAIN, meta=crit("domain")))
    return suite


def _message(name: str, etype: str, result: dict[str, Any], rows: int, known: list[str]) -> str:
    count = result.get("unexpected_count")
    if etype == "expect_column_to_exist":
        return "required column is missing"
    if etype == "expect_table_row_count_to_be_between":
        return f"{result.get('observed_value')} rows is outside the allowed bounds"
    if etype == "expect_column_values_to_be_in_set":
        bad = sorted({str(v) for v in result.get("partial_unexpected_list") or []})
        hints = "; ".join(f"`{b}`{_suggest(b, known)}" for b in bad[:5])
        return f"{count} of {rows} rows have a label outside the {len(known)} known labels: {hints}"
    if etype == "expect_column_values_to_not_be_null":
        return f"{count} of {rows} rows are missing a value"
    if etype == "expect_column_values_to_not_match_regex":
        return f"{count} of {rows} rows are empty or whitespace only"
    if etype == "expect_column_value_lengths_to_be_between":
        return f"{count} of {rows} rows are longer than allowed"
    if etype == "expect_column_values_to_be_unique":
        return f"{count} of {rows} rows repeat a text of the same batch"
    return f"{name} failed"


def validate_frame(
    df: pd.DataFrame,
    vcfg: ValidateConfig,
    dcfg: DataConfig,
    known_labels: list[str],
    source: str,
) -> ValidationReport:
    """Run the batch contract on a frame with canonical columns and return every problem."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # cosmetics only: an older or newer GX without this switch still validates
        pass
    asset = ctx.data_sources.add_pandas("incoming").add_dataframe_asset("batch")
    batch_def = asset.add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add(_build_suite(df, vcfg, dcfg, known_labels))
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="batch_contract", data=batch_def, suite=suite)
    )
    # GX's pandas engine needs object-free, plain columns; a copy keeps the caller's frame intact.
    result = vd.run(batch_parameters={"dataframe": df.copy()}, result_format="SUMMARY")
    problems = []
    for r in result.results:
        if r.success:
            continue
        meta = r.expectation_config.meta or {}
        etype = r.expectation_config.type
        res = r.result or {}
        name = meta.get("name", etype)
        examples = [str(x) for x in (res.get("partial_unexpected_list") or [])[:3]]
        problems.append(
            Problem(
                expectation=name,
                severity=meta.get("severity", CRITICAL),
                message=_message(name, etype, res, len(df), known_labels),
                count=int(res.get("unexpected_count") or 0),
                examples=examples,
            )
        )
    return ValidationReport(source=source, rows=len(df), problems=problems)
