"""The project's metrics: local evaluate modules loaded by path, combined into one call.

Each metric is a folder here holding an `evaluate` module of the same name, loaded by path so
nothing is fetched from a hub. The functions below are the project's way in: plain lists in,
plain floats and dicts out, NaN (or an empty result) for an empty input.

Each metric's computation is one function here (`f1`, `accuracy`, `ece_value`), which its
module's `_compute` calls. `compute` and `ece` call those functions directly rather than through
`evaluate.Metric.compute`: that encodes every row into an Arrow table and decodes it again
(about 50 us a row per metric, ten minutes for the slices of a million test rows) before
calling the same function, and gives the same numbers. Labels go to scikit-learn as integer
codes in sorted label order, which it handles many times faster than strings, with the same
label order and so the same floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
NAMES = ("accuracy", "macro_f1", "micro_f1", "weighted_f1")
"""The label metrics `compute` returns, one key each."""
ECE_BINS = 15
ANNOTATE_MAX = 20
"""Up to this many labels the confusion PNG prints each cell's count; beyond, digits overlap."""
TICK_LABELS_MAX = 60
"""Up to this many labels the confusion PNG names them on its axes; beyond, only indices."""


def label_metric_info(description: str):
    """The MetricInfo every label metric here shares: lists of label strings in."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description="predictions and references: lists of label strings",
        features=datasets.Features(
            {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        ),
    )


@cache
def _module(name: str):
    """One local module, loaded once per process (loading copies it into the modules cache)."""
    import evaluate

    return evaluate.load(str(HERE / name))


def _codes(predictions: Sequence[str], references: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Both label lists as integer codes of their sorted union (codes sort as the labels)."""
    import pandas as pd

    both = pd.Series(list(references) + list(predictions), dtype=object)
    codes, _ = pd.factorize(both, sort=True)
    n = len(references)
    return codes[n:], codes[:n]


def f1(average: str, predictions, references, sample_weight=None) -> float:
    """sklearn's F1 with `average` (macro | micro | weighted) over string labels; NaN if empty.

    The F1 modules differ only in `average`; `sample_weight` weights rows (drift importance
    weights), None weighs them all alike.
    """
    from sklearn.metrics import f1_score

    if not len(references):
        return float("nan")
    pred, ref = _codes(predictions, references)
    return float(f1_score(ref, pred, average=average, zero_division=0,
                          sample_weight=sample_weight))


def accuracy(predictions, references, sample_weight=None) -> float:
    """Share of predictions equal to the reference (weighted by `sample_weight`); NaN if empty."""
    if not len(references):
        return float("nan")
    hit = np.asarray(list(predictions), dtype=object) == np.asarray(list(references), dtype=object)
    if len(hit) != len(references):
        raise ValueError(f"{len(hit)} predictions for {len(references)} references")
    if sample_weight is None:
        return float(hit.sum() / len(hit))
    w = np.asarray(sample_weight, dtype=float)
    return float(w[hit].sum() / w.sum())


LABEL_METRICS = {
    "accuracy": accuracy,
    "macro_f1": lambda p, r, w=None: f1("macro", p, r, w),
    "micro_f1": lambda p, r, w=None: f1("micro", p, r, w),
    "weighted_f1": lambda p, r, w=None: f1("weighted", p, r, w),
}
"""What each label module computes, by name (the module's `_compute` calls the same)."""


def _weights(sample_weight: Sequence[float] | None, n: int) -> dict[str, list[float]]:
    """The `sample_weight` keyword for a module call: none when rows weigh alike."""
    if sample_weight is None:
        return {}
    weights = [float(w) for w in sample_weight]
    if len(weights) != n:
        raise ValueError(f"sample_weight has {len(weights)} values for {n} rows")
    return {"sample_weight": weights}


def compute(predictions: list[str], references: list[str],
            sample_weight: Sequence[float] | None = None) -> dict[str, float]:
    """Every metric of NAMES for one set of predictions; NaN for an empty set.

    `sample_weight` weights the rows (drift-weighted metrics); None weighs them all alike. Rows
    whose weights sum to zero carry no evidence either, so they give NaN too. The same numbers
    as the modules' `evaluate.combine(...).compute(...)`, without its Arrow round trip.
    """
    if sample_weight is not None:
        weights = np.asarray(sample_weight, dtype=float).ravel()
        if len(weights) != len(references):
            raise ValueError(f"sample_weight has {len(weights)} values for {len(references)} rows")
    else:
        weights = None
    if not len(references) or (weights is not None and weights.sum() <= 0):
        return {name: math.nan for name in NAMES}
    return {name: float(LABEL_METRICS[name](predictions, references, weights))
            for name in NAMES}


def per_class(predictions: list[str], references: list[str],
              sample_weight: Sequence[float] | None = None) -> dict[str, dict[str, float]]:
    """Precision, recall, f1 and support of every label in either list, in sorted label order.

    A label only in the predictions appears with support 0: a model predicting a class the test
    set lacks is a finding, not something to drop. Empty input gives an empty dict.
    """
    if not references and not predictions:
        return {}
    out = _module("per_class").compute(predictions=list(predictions),
                                       references=list(references),
                                       **_weights(sample_weight, len(references)))
    keys = ("precision", "recall", "f1", "support")
    return {label: {k: float(out[k][i]) for k in keys} for i, label in enumerate(out["labels"])}


def ece(confidences: Sequence[float], correct: Sequence[bool | int], n_bins: int = ECE_BINS,
        sample_weight: Sequence[float] | None = None) -> float:
    """Expected calibration error over `n_bins` equal-width confidence bins; NaN on empty input.

    `confidences` are the probabilities the model gave its predicted label, `correct` whether
    that label was right; a model that says 0.9 and is right 90% of the time scores 0.
    """
    conf = np.asarray(confidences, dtype=float).ravel()
    hit = np.asarray(correct).astype(bool).ravel()
    if conf.size != hit.size:
        raise ValueError(f"{conf.size} confidences but {hit.size} correct flags")
    if conf.size == 0:
        return math.nan
    return ece_value(conf, hit, n_bins, sample_weight)


def ece_value(confidences, correct, n_bins: int = ECE_BINS, sample_weight=None) -> float:
    """The ECE module's computation (see `ece`); the module's `_compute` calls it."""
    conf = np.asarray(confidences, dtype=float)
    if conf.size == 0:
        return float("nan")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, not {n_bins}")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must lie in [0, 1] (probabilities of the prediction)")
    hit = np.asarray(correct, dtype=float)
    w = np.ones_like(conf) if sample_weight is None else np.asarray(sample_weight, float)
    if w.shape != conf.shape:
        raise ValueError(f"sample_weight has {w.size} values for {conf.size} rows")
    total = w.sum()
    if total <= 0:
        return float("nan")
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    # side="left": a confidence equal to an edge belongs to the bin below it, (lo, hi].
    bins = np.searchsorted(inner_edges, conf, side="left")
    # Per bin, share * |acc - conf| = |sum of w * (hit - conf)| / total weight.
    gap = np.bincount(bins, weights=w * (hit - conf), minlength=n_bins)
    return float(np.abs(gap).sum() / total)


def confusion(predictions: list[str], references: list[str]) -> tuple[list[str], np.ndarray]:
    """(labels, counts): rows are reference labels, columns predicted ones, both in label order.

    Labels are the sorted union of both lists; empty input gives ([], a 0x0 matrix).
    """
    if not references and not predictions:
        return [], np.zeros((0, 0), dtype=np.int64)
    out = _module("confusion").compute(predictions=list(predictions),
                                       references=list(references))
    n = len(out["labels"])
    return list(out["labels"]), np.asarray(out["matrix"], dtype=np.int64).reshape(n, n)


def confusion_png(predictions: list[str], references: list[str], path: Path | str,
                  title: str) -> Path:
    """Draw the confusion matrix to a PNG, atomically; returns the path written.

    Colours are row-normalised (the share of each reference label's rows predicted as each
    label), so rare classes are as visible as frequent ones; counts are printed in the cells
    only for a few labels, and label names on the axes only while they stay legible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ratchet.runtime import atomic_path

    path = Path(path)
    labels, matrix = confusion(predictions, references)
    n, total = len(labels), int(matrix.sum())
    side = min(4.0 + 0.3 * n, 16.0)  # inches: grows with the labels, capped for 150 and more
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        if n == 0:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center")
            ax.set_axis_off()
            ax.set_title(title, fontsize=10)
        else:
            _draw_confusion(fig, ax, labels, matrix)
            accuracy = np.trace(matrix) / total
            ax.set_title(f"{title}\n{n} labels, {total} rows, accuracy {accuracy:.3f}",
                         fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            # The temp name ends in .tmp, so the format is given rather than guessed.
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _draw_confusion(fig, ax, labels: list[str], matrix: np.ndarray) -> None:
    n = len(labels)
    rows = matrix.sum(axis=1, keepdims=True)
    # A label only ever predicted has an empty row: all zeros rather than 0/0.
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="share of the reference label's rows")
    if n <= ANNOTATE_MAX:
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    if n <= TICK_LABELS_MAX:
        fontsize = 9 if n <= ANNOTATE_MAX else 6
        ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), labels, fontsize=fontsize)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("reference label")
    else:
        # Names would be unreadable; indices into the sorted labels (the per-class report's
        # order) keep the picture navigable.
        ax.set_xlabel("predicted label (index in sorted label order)")
        ax.set_ylabel("reference label (index in sorted label order)")
