"""validate: re-check every stored batch against the current data contract (great-expectations)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from ratchet.config import Params
from ratchet.data import LABEL, batch_files, canonical
from ratchet.errors import BatchRefused
from ratchet.runtime import atomic_path, write_json
from ratchet.stage import stage_main
from ratchet.stagecache import StageCache, code_digest, digest, file_digest

# Bump when an entry's layout changes; the code that decides a verdict is in the key already.
ENTRY_VERSION = 1
NORM = "norm"  # the history snapshot's column of normalised texts
VERDICT_CODE = ("ratchet.validation", "ratchet.pii", "ratchet.data")


def chain_keys(files: list[Path], params: Params) -> list[str]:
    """Each batch's cache key: its bytes and name, the params and code that decide its verdict,
    and the key of the batch before it (its history: the texts and labels it is checked
    against). A change of any of these re-validates that batch and every later one."""
    import great_expectations as gx

    base = digest(ENTRY_VERSION, gx.__version__, code_digest(VERDICT_CODE),
                  params.data.model_dump(), params.validate_.model_dump(), params.model.source)
    keys, prev = [], base
    for f in files:
        prev = digest(prev, f.name, file_digest(f))
        keys.append(prev)
    return keys


def _read(f: Path) -> pd.DataFrame:
    return canonical(pd.read_parquet(f))


class History:
    """Normalised text -> labels of the batches so far, and the known label set: what a batch is
    checked against. Built only when some batch must be validated, from the snapshot the last run
    left after the batch before it, else by reading the batches before it."""

    def __init__(self, params: Params, cache: StageCache) -> None:
        self.params, self.cache = params, cache
        self.texts: dict[str, set[str]] | None = None
        self.known: list[str] = sorted(params.data.labels)

    def load(self, files: list[Path], keys: list[str], entries: list[dict | None], i: int
             ) -> None:
        """Materialise the history before batch `i` (every batch before it has an entry)."""
        self.texts = {}
        if i == 0:
            return
        prev = entries[i - 1]
        snapshot = self.cache.path(keys[i - 1], ".history.parquet") if self.cache.root else None
        if prev is not None and snapshot is not None and snapshot.is_file():
            try:
                pairs = pd.read_parquet(snapshot)
                for norm, label in zip(pairs[NORM].tolist(), pairs[LABEL].tolist(), strict=True):
                    entry = self.texts.setdefault(norm, set())
                    if isinstance(label, str):
                        entry.add(label)
                self.known = list(prev["known_after"])
                return
            except Exception:  # noqa: BLE001 - a damaged snapshot: read the batches instead
                self.texts = {}
        for f in files[:i]:
            self.add(_read(f))

    def add(self, df: pd.DataFrame) -> None:
        from ratchet.validation import remember

        assert self.texts is not None
        if not self.params.data.labels:  # learned label set: grows with the batches
            self.known = sorted(set(self.known) | set(df[LABEL].dropna()))
        remember(self.texts, df)

    def save(self, key: str) -> None:
        """Leave the history after the newest batch for the next run (one snapshot is kept)."""
        if self.cache.root is None or self.texts is None:
            return
        path = self.cache.path(key, ".history.parquet")
        if not path.is_file():
            norms, labels = [], []
            for norm, seen in self.texts.items():
                for label in sorted(seen) or [None]:
                    norms.append(norm)
                    labels.append(label)
            with atomic_path(path) as tmp:
                pd.DataFrame({NORM: pd.array(norms, dtype="string"),
                              LABEL: pd.array(labels, dtype="string")}).to_parquet(tmp)
        for old in self.cache.root.glob("*.history.parquet"):
            if old != path:
                old.unlink(missing_ok=True)


def run(params: Params, *, batches: Path, report: Path, metrics: Path, docs: Path,
        cache: Path | None = None) -> dict:
    """Validate each batch against the labels and texts known before it; refuse on any critical.

    Each batch meets the contract as it stands now (params may have tightened since it was
    ingested), with the batches before it as its history, exactly as at ingest. Data Docs of every
    batch go to `docs`; the summary names its index so the gate and the flow can link it.

    With `cache` (a folder), a batch validated by an earlier run under the same params, code and
    history is not validated again: its verdict, GX result and pages come from the cache
    (`chain_keys`), and the Data Docs index is rebuilt over every batch. The metrics count the
    batches validated now and those reused.
    """
    from ratchet.validation import Validator

    files = batch_files(batches)
    if not files:
        raise BatchRefused(str(batches), ["no batches yet: run `ratchet ingest FILE` first"])
    shutil.rmtree(docs, ignore_errors=True)  # a stale page of a removed batch must not linger
    store = StageCache(cache)
    keys = chain_keys(files, params)
    entries: list[dict[str, Any] | None] = []
    for key in keys:
        entry = store.read_json(key)
        ok = entry is not None and entry.get("version") == ENTRY_VERSION and "gx" in entry
        entries.append(entry if ok else None)
    validator = Validator(params.validate_, params.data, model_source=params.model.source,
                          docs=docs)
    history = History(params, store)
    results, fresh = [], []
    for i, (f, entry) in enumerate(zip(files, entries, strict=True)):
        if entry is not None:
            validator.restore(entry["gx"])
            results.append(entry["report"])
            if history.texts is not None:  # a later batch must be checked against this one
                history.add(_read(f))
            continue
        if history.texts is None:
            history.load(files, keys, entries, i)
        df = _read(f)
        name = f"{i + 1:03d}-{f.name}"
        rep = validator.validate(df, history.known, f.name, history=history.texts, name=name)
        results.append(rep.to_dict())
        history.add(df)
        fresh.append((i, name, list(history.known)))
    validator.build_docs()
    for i, name, known_after in fresh:
        store.write_json(keys[i], {"version": ENTRY_VERSION, "report": results[i],
                                   "known_after": known_after, "gx": validator.export(name)})
    if fresh:
        history.save(keys[-1])
    if store.root is not None:
        store.keep([store.path(k, ".json.gz") for k in keys]
                   + [store.path(keys[-1], ".history.parquet")])
    failed = [r for r in results if not r["passed"]]
    summary = {
        "passed": not failed,
        "batches": results,
        "warnings": [f"{r['source']}: {w['expectation']}: {w['message']}"
                     for r in results for w in r["warnings"]],
        "data_docs": str(docs / "index.html"),
    }
    write_json(report, summary)
    # The counts go to the metrics only: summary.json is a dependency of prepare and the gate,
    # which must not re-run because a verdict came from the cache.
    write_json(metrics, {
        "batches": len(results),
        "rows": sum(r["rows"] for r in results),
        "warnings": len(summary["warnings"]),
        "critical": sum(len(r["critical"]) for r in results),
        "validated_now": len(fresh),
        "reused": len(results) - len(fresh),
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
        "cache": "folder of per-batch results kept between runs (.ratchet/cache/validation)",
    }, run, optional=("cache",))


if __name__ == "__main__":
    main()
