"""prepare: dedup, stable hash splits, and the `reference` / `recent` slices."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ratchet.config import Params, PrepareConfig
from ratchet.data import (
    LABEL,
    SPLITS,
    TEXT,
    load_batches,
    normalise,
    split_of,
    write_parquet_atomic,
)
from ratchet.runtime import write_json
from ratchet.stage import stage_main

RECENT, REFERENCE = "recent", "reference"


def prepare_frame(rows: pd.DataFrame, cfg: PrepareConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Pure core: rows of all batches (oldest first) -> deduplicated rows with split and slice."""
    rows = rows.dropna(subset=[TEXT, LABEL]).copy()
    rows["norm"] = rows[TEXT].map(normalise)
    labels_per_text = rows.groupby("norm")[LABEL].nunique()
    conflicts = int((labels_per_text > 1).sum())
    before = len(rows)
    # The latest occurrence wins: a newer batch corrects an older label for the same text.
    rows = rows.drop_duplicates(subset="norm", keep="last")
    newest = rows["batch_order"].max()
    rows["slice"] = [RECENT if o == newest else REFERENCE for o in rows["batch_order"]]
    rows["split"] = [
        split_of(t, val_frac=cfg.val_frac, test_frac=cfg.test_frac, salt=cfg.salt)
        for t in rows[TEXT]
    ]
    stats = {"rows_in": before, "duplicates_dropped": before - len(rows),
             "conflicting_texts": conflicts}
    return rows.drop(columns=["norm"]).reset_index(drop=True), stats


def run(params: Params, *, batches: Path, out: Path, metrics: Path) -> dict[str, int]:
    rows, stats = prepare_frame(load_batches(batches), params.prepare)
    for split in SPLITS:
        part = rows[rows["split"] == split].drop(columns=["split"])
        write_parquet_atomic(part, out / f"{split}.parquet")
        for sl in (RECENT, REFERENCE):
            stats[f"{split}/{sl}"] = int((part["slice"] == sl).sum())
    stats["labels"] = int(rows[LABEL].nunique())
    write_json(metrics, stats)
    return stats


def main() -> None:
    stage_main("prepare", __doc__, {
        "batches": "folder of batch parquet files",
        "out": "folder for train/val/test parquet files",
        "metrics": "prepare metrics JSON to write",
    }, run)


if __name__ == "__main__":
    main()
