"""Each stage's headline: the few numbers `dvc metrics show` prints for it.

A stage measures more than a table can show: evaluate alone records some two hundred numbers
(every slice, both models, the statistics, latency, behaviour), finetune and pretrain record
texts (why a full retrain, why pretraining was skipped) beside their numbers. All of that goes
to the stage's full record under `reports/<stage>/metrics.json`, which the gate reads and MLflow
logs. The stage's DVC metrics file, `metrics/<stage>.json`, holds only its headline: numbers,
short names, a handful per stage, so that `dvc metrics show` fits a 100-column terminal per
stage and `dvc metrics diff` and `dvc exp show --only-changed` read at a glance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ratchet.runtime import write_json

Record = Mapping[str, Any]


def _key(name: str) -> Callable[[Record], Any]:
    return lambda r: r.get(name)


def _split(name: str) -> Callable[[Record], Any]:
    """Rows of a prepared split: its recent and reference rows together."""
    return lambda r: _sum(r.get(f"{name}/recent"), r.get(f"{name}/reference"))


def _sum(*values: Any) -> float | None:
    numbers = [v for v in values if _number(v) is not None]
    return sum(numbers) if numbers else None


def _flag(name: str, true: str) -> Callable[[Record], Any]:
    """1 where a text field says `true`, 0 where it says something else."""
    return lambda r: None if r.get(name) is None else int(str(r[name]) == true)


# stage -> (headline name, how to read it from the full record); the names stay short, since
# DVC prints each as a column header.
HEADLINES: dict[str, tuple[tuple[str, Callable[[Record], Any]], ...]] = {
    "prepare": (
        ("rows", _key("rows_out")), ("train", _split("train")), ("val", _split("val")),
        ("test", _split("test")), ("recent", _key("recent/rows")),
        ("replay", _key("replay/rows")), ("labels", _key("labels")),
    ),
    "drift": (
        ("drifted", _key("drifted")), ("retrain", _key("retrain")),
        ("label_jsd", _key("label_jsd")), ("oov", _key("oov_rate")),
        ("mmd_p", _key("mmd_p")), ("domain_auc", _key("domain_auc")),
        ("weights_ess", _key("weights_ess")),
    ),
    "pretrain": (
        ("trained", _key("trained")), ("steps", _key("steps")),
        ("ppl_before", _key("perplexity_before")), ("ppl_after", _key("perplexity_after")),
    ),
    "augment": (
        ("rows", _key("rows_original")), ("added", _key("rows_augmented")),
        ("leak_dropped", _key("leak/dropped")),
    ),
    "finetune": (
        ("continual", _flag("init", "continual")), ("train_rows", _key("train_rows")),
        ("epochs", _key("epochs")), ("steps", _key("steps")),
        ("val_f1", _key("best_val_macro_f1")), ("samples_s", _key("samples_per_s")),
    ),
    "evaluate": (
        ("f1", _key("candidate/all/macro_f1")), ("recent_diff", _key("diff/recent/macro_f1")),
        ("reference_diff", _key("diff/reference/macro_f1")),
        ("weighted_diff", _key("diff/weighted/macro_f1")),
        ("p95_ms", _key("candidate/latency/best_p95_ms_bs1")),
    ),
}


def _number(value: Any) -> float | int | None:
    """A finite number as JSON holds it (a bool as 0 or 1); None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def headline(stage: str, record: Record) -> dict[str, float | int]:
    """The stage's headline numbers from its full record; a number the record lacks (a first
    batch has no champion to differ from, a skipped pretrain no perplexity) is left out."""
    out: dict[str, float | int] = {}
    for name, read in HEADLINES[stage]:
        value = _number(read(record))
        if value is not None:
            out[name] = value
    return out


FULL_HELP = ("the stage's full record JSON to write (every number and text it measured); "
             "`--metrics` then gets its headline numbers only")


def write_metrics(stage: str, record: Record, metrics: Path, full: Path | None) -> None:
    """Write the full record to `full` and the headline to `metrics` (the DVC metrics file).

    Without `full` (the dvc.yaml of a workspace made before the headline files), `metrics` gets
    the full record, as it did then.
    """
    if full is None:
        write_json(metrics, dict(record))
        return
    write_json(full, dict(record))
    write_json(metrics, headline(stage, record))
