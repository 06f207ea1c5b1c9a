"""validate: re-check every stored batch against the current data contract (great-expectations)."""

from __future__ import annotations

from pathlib import Path

from ratchet.config import Params
from ratchet.data import batch_files, canonical
from ratchet.errors import BatchRefused
from ratchet.runtime import write_json
from ratchet.stage import stage_main


def run(params: Params, *, batches: Path, report: Path, metrics: Path) -> dict:
    """Validate each batch with the labels known before it; refuse the pipeline on any critical."""
    import pandas as pd

    from ratchet.data import LABEL
    from ratchet.validation import validate_frame

    files = batch_files(batches)
    if not files:
        raise BatchRefused(str(batches), ["no batches yet: run `ratchet ingest FILE` first"])
    known = sorted(params.data.labels)
    results = []
    for f in files:
        df = canonical(pd.read_parquet(f))
        rep = validate_frame(df, params.validate_, params.data, known, f.name)
        results.append(rep.to_dict())
        if not params.data.labels:  # learned label set: grows with the batches that passed
            known = sorted(set(known) | set(df[LABEL].dropna()))
    failed = [r for r in results if not r["passed"]]
    summary = {
        "passed": not failed,
        "batches": results,
        "warnings": [f"{r['source']}: {w['expectation']}: {w['message']}"
                     for r in results for w in r["warnings"]],
    }
    write_json(report, summary)
    write_json(metrics, {
        "batches": len(results),
        "rows": sum(r["rows"] for r in results),
        "warnings": len(summary["warnings"]),
        "critical": sum(len(r["critical"]) for r in results),
    })
    if failed:
        problems = [f"{r['source']}: {c['expectation']}: {c['message']}"
                    for r in failed for c in r["critical"]]
        raise BatchRefused("data/batches", problems)
    return summary


def main() -> None:
    stage_main("validate", __doc__, {
        "batches": "folder of batch parquet files",
        "report": "validation report JSON to write",
        "metrics": "flat validation metrics JSON to write",
    }, run)


if __name__ == "__main__":
    main()
