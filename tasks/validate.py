"""validate: re-check every stored batch against the current data contract (great-expectations)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ratchet.config import Params
from ratchet.data import batch_files, canonical
from ratchet.errors import BatchRefused
from ratchet.runtime import write_json
from ratchet.stage import stage_main


def run(params: Params, *, batches: Path, report: Path, metrics: Path, docs: Path) -> dict:
    """Validate each batch against the labels and texts known before it; refuse on any critical.

    Each batch meets the contract as it stands now (params may have tightened since it was
    ingested), with the batches before it as its history, exactly as at ingest. Data Docs of every
    batch go to `docs`; the summary names its index so the gate and the flow can link it.
    """
    import pandas as pd

    from ratchet.data import LABEL
    from ratchet.validation import Validator, remember

    files = batch_files(batches)
    if not files:
        raise BatchRefused(str(batches), ["no batches yet: run `ratchet ingest FILE` first"])
    shutil.rmtree(docs, ignore_errors=True)  # a stale page of a removed batch must not linger
    validator = Validator(params.validate_, params.data, model_source=params.model.source,
                          docs=docs)
    known = sorted(params.data.labels)
    history: dict[str, set[str]] = {}
    results = []
    for f in files:
        df = canonical(pd.read_parquet(f))
        rep = validator.validate(df, known, f.name, history=history)
        results.append(rep.to_dict())
        if not params.data.labels:  # learned label set: grows with the batches that passed
            known = sorted(set(known) | set(df[LABEL].dropna()))
        remember(history, df)
    failed = [r for r in results if not r["passed"]]
    summary = {
        "passed": not failed,
        "batches": results,
        "warnings": [f"{r['source']}: {w['expectation']}: {w['message']}"
                     for r in results for w in r["warnings"]],
        "data_docs": str(docs / "index.html"),
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
        "docs": "folder for the great-expectations Data Docs site (HTML)",
    }, run)


if __name__ == "__main__":
    main()
