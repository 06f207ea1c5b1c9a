"""Label noise: how many of a batch's labels look wrong, judged from out-of-sample probabilities.

A model that never trained on a batch gives each row a probability for every label it knows;
cleanlab's confident learning compares those with the given labels, per class, and estimates how
many labels are wrong and which rows they are. With a champion, its probabilities on a new batch
are out-of-sample (it never saw the batch), and its rate on held-out test rows of the batches it
trained on says how much it disagrees with labels that are right: a batch is flagged when its
rate is far above that baseline. At cold start the probabilities come from a cross-validated
logistic regression on the batch's own sentence embeddings, judged against an absolute ceiling.

Everything here is a function of arrays and frames; the stage (`tasks/noise.py`) loads models.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from ratchet.data import BATCH, LABEL, TEXT, normalise

if TYPE_CHECKING:
    from ratchet.config import NoiseConfig

CHAMPION, CROSS_VALIDATED, NOT_JUDGED = "champion", "cross-validated", "not judged"
ACCEPT, DROP = "accept", "drop"
REVIEWS = (ACCEPT, DROP)
SUSPECT_COLUMNS = (BATCH, TEXT, LABEL, "suggested", "quality")


@dataclass(frozen=True)
class Estimate:
    """cleanlab's verdict on one set of rows.

    Attributes:
        rate: estimated share of the judged rows whose label is wrong (None: nothing judged).
        judged: per row, whether its label was judged (the model knows the label).
        suspect: per row, whether cleanlab names it a label issue (False where not judged).
        suggested: per row, the model's most probable label (None where not judged).
        quality: per row, the probability the model gives the row's own label (NaN: not judged).
    """

    rate: float | None
    judged: np.ndarray
    suspect: np.ndarray
    suggested: list[str | None]
    quality: np.ndarray

    @property
    def n_judged(self) -> int:
        return int(self.judged.sum())

    @property
    def n_suspects(self) -> int:
        return int(self.suspect.sum())


def estimate(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
             known: Collection[str] | None = None) -> Estimate:
    """Confident learning on rows with their given `labels` and a model's `probs` over `classes`.

    Rows whose label is not among `classes` (or not in `known`, when given: the labels the
    model learnt from examples, which a head sized for a declared label set may exceed) are not
    judged. Only the classes that occur among
    the judged labels take part (the other columns are dropped and each row renormalised): a
    class no row claims has no per-class threshold, and cleanlab asks for every class to occur.
    The suspects are the rows cleanlab names as issues (`find_label_issues`, pruned by noise
    rate) and the rate is their share of the judged rows. cleanlab's calibrated count
    (`num_label_issues`) was measured too: on batches with few rows per class it ran high
    (CLINC150 with `oos`, 300-row batches over ~120 labels, a head champion: 25% for 10%
    flipped labels, against 18% for the suspects' share; up to 26% on a clean batch).
    """
    from cleanlab.filter import find_label_issues

    labels = [str(x) for x in labels]
    n = len(labels)
    probs = np.asarray(probs, dtype=np.float64).reshape(n, len(classes))
    index = {c: i for i, c in enumerate(classes)}
    judged = np.array([lab in index and (known is None or lab in known) for lab in labels],
                      dtype=bool)
    suspect = np.zeros(n, dtype=bool)
    quality = np.full(n, np.nan)
    suggested: list[str | None] = [None] * n
    rows = np.flatnonzero(judged)
    if len(rows) == 0:
        return Estimate(None, judged, suspect, suggested, quality)
    present = sorted({index[labels[i]] for i in rows})
    sub = probs[np.ix_(rows, present)]
    total = sub.sum(axis=1, keepdims=True)
    # A row whose probability mass lies wholly on absent classes: spread it evenly.
    sub = np.where(total > 0, sub / np.where(total > 0, total, 1.0), 1.0 / len(present))
    local = {c: j for j, c in enumerate(present)}
    y = np.array([local[index[labels[i]]] for i in rows], dtype=np.int64)
    top = probs[rows].argmax(axis=1)
    for i, k in zip(rows, top, strict=True):
        suggested[i] = str(classes[k])
    quality[rows] = sub[np.arange(len(rows)), y]
    if len(present) < 2:  # one class: nothing to confuse it with
        return Estimate(0.0, judged, suspect, suggested, quality)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small classes: cleanlab warns, the estimate stands
        issues = find_label_issues(y, sub, n_jobs=1)  # one process: stages share the cores
    suspect[rows] = issues
    return Estimate(float(issues.mean()), judged, suspect, suggested, quality)


def cross_validated_probs(x: np.ndarray, labels: Sequence[str], *, folds: int, seed: int
                          ) -> tuple[np.ndarray, list[str]]:
    """Out-of-fold probabilities of a logistic regression on embeddings `x`, K-fold stratified.

    Returns the probabilities and their classes: the labels with at least `folds` rows (a
    rarer label cannot be predicted for its own rows out of fold, so its rows are not judged).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import normalize

    labels = np.asarray([str(v) for v in labels])
    values, counts = np.unique(labels, return_counts=True)
    classes = [str(v) for v, c in zip(values, counts, strict=True) if c >= folds]
    probs = np.zeros((len(labels), len(classes)))
    rows = np.flatnonzero(np.isin(labels, classes))
    if len(classes) < 2:
        return probs, classes
    xs = normalize(np.asarray(x, dtype=np.float64)[rows])
    ys = labels[rows]
    col = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(rows), len(classes)))
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(xs, ys):
        model = LogisticRegression(C=10.0, max_iter=300)
        model.fit(xs[fit], ys[fit])
        out[np.ix_(held, [col[c] for c in model.classes_])] = model.predict_proba(xs[held])
    probs[rows] = out
    return probs, classes


def flag(entry: Mapping[str, Any], cfg: NoiseConfig) -> bool:
    """The rule: is this batch's estimated label-issue rate far above what it should be?

    With a champion: the rate must exceed the champion's own rate on held-out rows (the
    baseline) by `margin` and be more than `ratio` times it. Cross-validated (cold start): the
    rate must exceed `max_rate`. Fewer than `min_rows` judged rows are never flagged.
    """
    rate, judged = entry.get("rate"), int(entry.get("judged") or 0)
    if rate is None or judged < cfg.min_rows or not np.isfinite(rate):
        return False
    if entry.get("method") == CHAMPION:
        base = entry.get("baseline")
        if base is None or not np.isfinite(base):
            return False
        return bool(rate > base + cfg.margin and rate > cfg.ratio * base)
    if entry.get("method") == CROSS_VALIDATED:
        return bool(rate > cfg.max_rate)
    return False


def summary(batch_id: str, entry: Mapping[str, Any], cfg: NoiseConfig) -> str:
    """One line about a batch's entry, for the report, the flow's artifact and the CLI."""
    method = entry.get("method")
    if method == NOT_JUDGED or entry.get("rate") is None:
        why = entry.get("reason") or (
            "no row has a label the champion learnt" if method == CHAMPION
            else "no label has enough rows to cross-validate")
        return f"batch {batch_id}: label noise not judged ({why})"
    rate, judged, rows = entry["rate"], int(entry["judged"]), int(entry["rows"])
    rest = ""
    if rows > judged:
        why = ("labels the champion does not know" if method == CHAMPION
               else "labels too rare to cross-validate")
        rest = f"; {rows - judged} of {rows} rows not judged: {why}"
    counted = f"({entry['suspects']} of {judged} judged rows{rest})"
    if method == CHAMPION:
        against = (f"vs the champion's {entry['baseline']:.1%} on held-out rows"
                   if entry.get("baseline") is not None else "(no held-out rows for a baseline)")
    else:
        against = f"(cross-validated at cold start; ceiling {cfg.max_rate:.0%})"
    if entry.get("review") == ACCEPT:
        verdict = "flagged, labels accepted by review" if entry["flagged"] else "ok (accepted)"
    elif entry.get("review") == DROP:
        verdict = "suspect rows dropped by review"
    elif entry["flagged"]:
        verdict = "flagged"
    else:
        verdict = "ok"
    few = f"; fewer than {cfg.min_rows} judged rows: not flagged" if judged < cfg.min_rows else ""
    return f"batch {batch_id}: est. {rate:.1%} label issues {counted} {against}: {verdict}{few}"


def quarantined(entry: Mapping[str, Any]) -> bool:
    """Whether a batch's suspects are kept apart: flagged and not accepted, or dropped."""
    review = entry.get("review")
    return review == DROP or (bool(entry.get("flagged")) and review != ACCEPT)


def exclusion_mask(rows: pd.DataFrame, suspects: pd.DataFrame, batches: Mapping[str, Any],
                   *, train: str, splits: pd.Series) -> pd.Series:
    """Which rows prepare keeps out, from the noise report's batches and the suspect rows.

    A suspect of a batch reviewed `drop` leaves every split. A suspect of a flagged batch that
    is not reviewed leaves val and test (so neither the recent nor the reference comparison
    judges models on it) and, with `train: exclude`, training too; with `train: keep` it stays
    where its hash puts it when that is train. Suspects of other batches stay: dropping a
    champion's disagreements from the test split would tilt every comparison toward it.

    Args:
        rows: batch rows with `batch_id` and `text`.
        suspects: the noise stage's suspect rows (batch id, text, ...).
        batches: batch id -> its entry in the noise report (flagged, review).
        splits: each row's split (as prepare assigns it).
    """
    keyed = {(str(b), normalise(str(t)))
             for b, t in zip(suspects[BATCH], suspects[TEXT], strict=True)}
    out = np.zeros(len(rows), dtype=bool)
    for i, (b, t, split) in enumerate(zip(rows[BATCH], rows[TEXT], splits, strict=True)):
        entry = batches.get(str(b))
        if entry is None or not quarantined(entry) or (str(b), normalise(str(t))) not in keyed:
            continue
        if entry.get("review") == DROP or train == "exclude" or split != "train":
            out[i] = True
    return pd.Series(out, index=rows.index)


REVIEW_HEADER = """\
# Label-noise review: batch id -> accept | drop, written by `ratchet labels accept|drop BATCH`.
# accept: the batch's labels are right; its rows are used as normal and it is no longer flagged.
# drop: the batch's suspect rows (`ratchet labels --batch ID`) leave every split.
# A flagged batch not listed here keeps its suspects out of val and test (and of training with
# noise.train: exclude). The noise and prepare stages apply this file at the next run.
"""


def read_review(path: Path | None) -> dict[str, str]:
    """The review file's decisions (absent file: none); a bad entry fails naming it."""
    from ratchet.errors import ConfigError

    if path is None or not path.is_file():
        return {}
    from ratchet.runtime import read_yaml_mapping

    raw = read_yaml_mapping(path, "batch ids to accept or drop")
    bad = {str(k): v for k, v in raw.items() if v not in REVIEWS}
    if bad:
        key, value = next(iter(bad.items()))
        raise ConfigError(f"{path}: batch `{key}`: review must be accept or drop, got {value!r}")
    return {str(k): str(v) for k, v in raw.items()}


def write_review(path: Path, reviews: Mapping[str, str]) -> None:
    """Write the review file: the header, then one `batch: decision` line per batch, sorted."""
    from ratchet.runtime import write_text_atomic

    body = yaml.safe_dump(dict(sorted(reviews.items())), sort_keys=False) if reviews else ""
    write_text_atomic(path, REVIEW_HEADER + body)
