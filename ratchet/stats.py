"""Paired bootstrap of the difference in macro-F1 / accuracy between two models on one set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """candidate - champion on one slice, with a one-sided lower bound and a p-value."""

    n: int
    candidate: float
    champion: float
    diff: float
    low: float
    high: float
    p_value: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _encode(*label_lists: list[str]) -> list[np.ndarray]:
    vocab = {lab: i for i, lab in enumerate(sorted({x for ls in label_lists for x in ls}))}
    return [np.array([vocab[x] for x in ls], dtype=np.int64) for ls in label_lists]


def _per_resample_counts(values: np.ndarray, n_classes: int) -> np.ndarray:
    """Count of each class in each row of a (B, n) array -> (B, C)."""
    rows = values.shape[0]
    offset = (np.arange(rows)[:, None] * n_classes + values).ravel()
    return np.bincount(offset, minlength=rows * n_classes).reshape(rows, n_classes)


def macro_f1_rows(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each row of (B, n) label arrays, over the classes present in that row.

    Matches sklearn's `f1_score(average="macro")`, whose label set is the union of references
    and predictions.
    """
    rows = y.shape[0]
    hit = np.where(y == p, y, n_classes)  # misses go to an extra, ignored bucket
    tp = _per_resample_counts(hit, n_classes + 1)[:, :n_classes]
    support = _per_resample_counts(y, n_classes) + _per_resample_counts(p, n_classes)
    present = support > 0
    f1 = np.divide(2 * tp, support, out=np.zeros((rows, n_classes)), where=present)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def macro_f1(references: list[str], predictions: list[str]) -> float:
    """Macro-F1 of one prediction list (numpy only: cheap enough for every training epoch)."""
    if not references:
        return math.nan
    y, p = _encode(references, predictions)
    n_classes = int(max(y.max(), p.max())) + 1
    return float(macro_f1_rows(y[None, :], p[None, :], n_classes)[0])


def paired_bootstrap(
    references: list[str],
    candidate: list[str],
    champion: list[str],
    *,
    metric: str = "macro_f1",
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Bootstrap the same resampled examples for both models (paired), via scipy.stats.bootstrap."""
    from scipy.stats import bootstrap

    n = len(references)
    if n == 0:
        nan = math.nan
        return Comparison(0, nan, nan, nan, nan, nan, nan)
    y, pc, pb = _encode(references, candidate, champion)
    n_classes = int(max(y.max(), pc.max(), pb.max())) + 1

    def score(idx: np.ndarray, pred: np.ndarray) -> np.ndarray:
        idx = np.atleast_2d(idx)
        if metric == "accuracy":
            return (y[idx] == pred[idx]).mean(axis=-1)
        return macro_f1_rows(y[idx], pred[idx], n_classes)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return score(idx, pc) - score(idx, pb)

    full = np.arange(n)[None, :]
    cand, champ = float(score(full, pc)[0]), float(score(full, pb)[0])
    res = bootstrap(
        (np.arange(n),),
        statistic,
        n_resamples=resamples,
        vectorized=True,
        batch=500,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    dist = np.asarray(res.bootstrap_distribution).ravel()
    low, high = np.quantile(dist, [1 - confidence, confidence])
    # One-sided: how often the resampled gain is not positive.
    p_value = float((np.sum(dist <= 0) + 1) / (dist.size + 1))
    return Comparison(n, cand, champ, cand - champ, float(low), float(high), p_value)
