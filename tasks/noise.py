"""noise: estimate each batch's label noise once, flag a batch far noisier than it should be.

With a champion, its probabilities on a batch it never trained on are out-of-sample; cleanlab
(`ratchet.noise.estimate`) turns them into an estimated share of wrong labels and the suspect
rows. The champion's own rate on held-out rows (earlier batches' test split) is the baseline the
rule compares with. Without a champion, each new batch is judged by a cross-validated logistic
regression on its own base-encoder embeddings (or not at all: `noise.cold_start: skip`).

Each batch is judged once, when it is new: the measurements and suspects are kept in a
persistent folder keyed by batch id and content, so a later run neither re-judges an old batch
with a champion that has since trained on it nor pays for it again. The rule and the review
(`labels-review.yaml`) are applied anew every run; prepare reads the report and the suspects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ratchet.config import Params
from ratchet.data import (
    BATCH,
    LABEL,
    TEXT,
    assign_splits,
    content_hash,
    load_batches,
    write_parquet_atomic,
)
from ratchet.errors import WorkspaceError
from ratchet.noise import (
    CHAMPION,
    CROSS_VALIDATED,
    NOT_JUDGED,
    SUSPECT_COLUMNS,
    Estimate,
    cross_validated_probs,
    estimate,
    flag,
    quarantined,
    read_review,
    summary,
)
from ratchet.runtime import read_json, write_json
from ratchet.stage import stage_main

JUDGED, SUSPECTS = "judged.json", "suspects.parquet"


def batch_keys(rows: pd.DataFrame) -> dict[str, str]:
    """batch id -> a key of its id and content: a batch judged once is known by it."""
    return {str(b): f"{b}:{content_hash(part)[:16]}"
            for b, part in rows.groupby(BATCH, sort=False)}


def load_store(store: Path, keys: dict[str, str]) -> tuple[dict[str, dict], pd.DataFrame]:
    """The earlier runs' judgements of the batches that are still here with the same content."""
    entries = read_json(store / JUDGED) if (store / JUDGED).is_file() else {}
    kept = {b: e for b, e in entries.items() if keys.get(b) == e.get("key")}
    if (store / SUSPECTS).is_file():
        suspects = pd.read_parquet(store / SUSPECTS)
        suspects = suspects[suspects[BATCH].astype(str).isin(list(kept))]
    else:
        suspects = pd.DataFrame({c: pd.Series(dtype="string") for c in SUSPECT_COLUMNS[:4]}
                                ).assign(quality=pd.Series(dtype="float64"))
    return kept, suspects


def suspect_rows(batch_id: str, part: pd.DataFrame, est: Estimate) -> pd.DataFrame:
    idx = np.flatnonzero(est.suspect)
    return pd.DataFrame({
        BATCH: pd.Series([batch_id] * len(idx), dtype="string"),
        TEXT: part[TEXT].astype("string").to_numpy()[idx],
        LABEL: part[LABEL].astype("string").to_numpy()[idx],
        "suggested": pd.Series([est.suggested[i] for i in idx], dtype="string"),
        "quality": est.quality[idx].astype("float64"),
    }).sort_values("quality", kind="stable")


def _entry(est: Estimate, rows: int, method: str, baseline: float | None,
           champion: str | None, key: str) -> dict[str, Any]:
    return {"key": key, "rate": est.rate, "baseline": baseline, "judged": est.n_judged,
            "rows": rows, "suspects": est.n_suspects, "method": method, "champion": champion}


def load_champion(params: Params, champion: dict):
    """The registered champion's pyfunc and its label set (the order of its probabilities)."""
    from ratchet.registry import load_champion as load

    model = load(params, champion)
    return model, [str(c) for c in model.unwrap_python_model().labels]


def held_splits(rows: pd.DataFrame, new: list[str], params: Params) -> pd.DataFrame:
    """The earlier batches' labelled rows with the split prepare gave them before `new` came
    (groups and texts decide it together, so it is assigned over those batches alone)."""
    old = rows[~rows[BATCH].isin(new)]
    old = old.assign(split=assign_splits(old, params.prepare))
    return old.dropna(subset=[TEXT, LABEL])


def baseline_rows(rows: pd.DataFrame, new: list[str], entries: dict[str, dict],
                  suspects: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Held-out rows the champion served: earlier batches' test split, quarantined suspects
    left out, a seeded sample of at most `noise.baseline_rows`."""
    from ratchet.data import normalise

    cfg = params.noise
    old = held_splits(rows, new, params)
    test = old[old["split"] == "test"].drop(columns="split")
    away = {(str(b), normalise(str(t))) for b, t in zip(suspects[BATCH], suspects[TEXT],
                                                        strict=True)
            if quarantined(entries.get(str(b), {}))}
    if away:
        test = test[[(str(b), normalise(str(t))) not in away
                     for b, t in zip(test[BATCH], test[TEXT], strict=True)]]
    if len(test) > cfg.baseline_rows:
        test = test.sample(n=cfg.baseline_rows, random_state=cfg.seed).sort_index()
    return test


def judge_with_champion(params: Params, champion: dict, rows: pd.DataFrame, new: list[str],
                        entries: dict[str, dict], suspects: pd.DataFrame, keys: dict[str, str]
                        ) -> tuple[dict[str, dict], list[pd.DataFrame]]:
    model, classes = load_champion(params, champion)
    # What the champion learnt from: the labels of the earlier batches' train split. Its head
    # may hold more (a declared `data.labels` set), whose probabilities mean nothing yet.
    old = held_splits(rows, new, params)
    known = {str(lab) for lab in old.loc[old["split"] == "train", LABEL]}
    base = baseline_rows(rows, new, entries, suspects, params)
    parts = {b: rows[rows[BATCH] == b].dropna(subset=[TEXT, LABEL]) for b in new}
    texts = base[TEXT].astype(str).tolist()
    for part in parts.values():
        texts += part[TEXT].astype(str).tolist()
    probs = (np.array(model.predict(pd.DataFrame({"text": texts}))["probabilities"].tolist())
             if texts else np.zeros((0, len(classes))))
    b_est = estimate(base[LABEL].astype(str).tolist(), probs[: len(base)], classes, known)
    baseline = b_est.rate if b_est.n_judged else None
    out, found, at = {}, [], len(base)
    for b, part in parts.items():
        est = estimate(part[LABEL].astype(str).tolist(), probs[at: at + len(part)], classes,
                       known)
        at += len(part)
        out[b] = _entry(est, int((rows[BATCH] == b).sum()), CHAMPION, baseline,
                        str(champion["version"]), keys[b])
        out[b]["baseline_rows"] = b_est.n_judged
        found.append(suspect_rows(b, part, est))
    return out, found


def judge_cold(params: Params, rows: pd.DataFrame, new: list[str], keys: dict[str, str]
               ) -> tuple[dict[str, dict], list[pd.DataFrame]]:
    cfg = params.noise
    out: dict[str, dict] = {}
    found = []
    if cfg.cold_start == "skip":
        for b in new:
            out[b] = {"key": keys[b], "rate": None, "baseline": None, "judged": 0,
                      "rows": int((rows[BATCH] == b).sum()), "suspects": 0,
                      "method": NOT_JUDGED, "champion": None,
                      "reason": "no champion yet, and noise.cold_start is skip"}
        return out, found
    from ratchet.embed import embed, load_base_encoder

    model, tok = load_base_encoder(params.model.source, params.model.seed)
    for b in new:
        part = rows[rows[BATCH] == b].dropna(subset=[TEXT, LABEL])
        x = embed(part[TEXT].astype(str).tolist(), model, tok,
                  max_length=params.model.max_length, batch_size=cfg.batch_size)
        labels = part[LABEL].astype(str).tolist()
        probs, classes = cross_validated_probs(x, labels, folds=cfg.folds, seed=cfg.seed)
        est = estimate(labels, probs, classes)
        out[b] = _entry(est, int((rows[BATCH] == b).sum()), CROSS_VALIDATED, None, None, keys[b])
        found.append(suspect_rows(b, part, est))
    return out, found


def run(params: Params, *, batches: Path, champion: Path, store: Path, report: Path,
        review: Path | None = None) -> dict[str, Any]:
    cfg = params.noise
    rows = load_batches(batches)
    order = list(dict.fromkeys(rows[BATCH].astype(str)))
    keys = batch_keys(rows)
    reviews = read_review(review)
    unknown = sorted(set(reviews) - set(order))
    if unknown:
        raise WorkspaceError(f"{review}: batch `{unknown[0]}` is not a batch of this workspace "
                             f"(known: {', '.join(order)})")
    entries, suspects = load_store(store, keys)
    new = [b for b in order if b not in entries]
    for b, e in entries.items():  # the rule and the review as they are now
        e.update(flagged=flag(e, cfg), review=reviews.get(b))
    if new:
        champ = read_json(champion)
        if champ.get("version"):
            judged, found = judge_with_champion(params, champ, rows, new, entries, suspects, keys)
        else:
            judged, found = judge_cold(params, rows, new, keys)
        entries.update(judged)
        suspects = pd.concat([suspects, *found], ignore_index=True) if found else suspects
    # Rewritten only when something changed: an unchanged store leaves prepare up to date.
    kept = {b: {k: v for k, v in entries[b].items() if k not in ("flagged", "review")}
            for b in order}
    before = read_json(store / JUDGED) if (store / JUDGED).is_file() else None
    if before != kept:
        write_json(store / JUDGED, kept)
    if before != kept or not (store / SUSPECTS).is_file():
        suspects = suspects.sort_values([BATCH, "quality"], kind="stable").reset_index(drop=True)
        write_parquet_atomic(suspects[list(SUSPECT_COLUMNS)], store / SUSPECTS)
    table: dict[str, dict] = {}
    for b in order:
        e = entries[b]
        table[b] = {"rate": e["rate"], "baseline": e["baseline"], "judged": e["judged"],
                    "rows": e["rows"], "suspects": e["suspects"], "flagged": flag(e, cfg),
                    "review": reviews.get(b), "method": e["method"], "champion": e["champion"]}
    newest = order[-1]
    out = {
        "newest": newest,
        "flagged": bool(table[newest]["flagged"] and table[newest]["review"] is None),
        "summary": summary(newest, {**entries[newest], **table[newest]}, cfg),
        "batches": table,
    }
    write_json(report, out)
    return out


def main() -> None:
    stage_main("noise", __doc__.split("\n")[0], {
        "batches": "folder of batch parquet files",
        "champion": "champion.json (resolved `champion` alias): its probabilities judge labels",
        "review": "labels-review.yaml: batch id -> accept | drop",
        "store": "persistent folder of per-batch judgements and suspect rows (read and written)",
        "report": "label-noise report JSON to write",
    }, run, optional=("review",))


if __name__ == "__main__":
    main()
