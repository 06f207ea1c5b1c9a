"""Paired comparisons of two models on one set: bootstrap and permutation tests of
macro-F1/accuracy, McNemar, Holm."""

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


def _onehot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(classes), n_classes), dtype=np.float32)
    out[np.arange(len(classes)), classes] = 1
    return out


def _macro_f1_counts(counts: np.ndarray, y: np.ndarray, p: np.ndarray, n_classes: int):
    """Macro-F1 per row of (B, T) counts of example types whose truth/prediction are y/p."""
    truth, pred = _onehot(y, n_classes), _onehot(p, n_classes)
    tp = counts @ (truth * (y == p)[:, None])
    support = counts @ truth + counts @ pred
    present = support > 0
    f1 = np.divide(2 * tp, support, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


@dataclass(frozen=True)
class Bootstrap:
    """The point values of both models and the bootstrap distribution of their difference."""

    n: int
    candidate: float
    champion: float
    dist: np.ndarray
    """candidate - champion on each resample."""

    @property
    def diff(self) -> float:
        return self.candidate - self.champion

    def p_below(self, margin: float) -> float:
        """One-sided p-value against H0 `diff <= margin` (how often a resample is not above it)."""
        if self.n == 0:
            return math.nan
        return float((np.sum(self.dist <= margin) + 1) / (self.dist.size + 1))

    def p_above(self, margin: float) -> float:
        """One-sided p-value against H0 `diff >= margin`."""
        if self.n == 0:
            return math.nan
        return float((np.sum(self.dist >= margin) + 1) / (self.dist.size + 1))

    @property
    def se(self) -> float:
        """Bootstrap standard error of the difference."""
        return float(np.std(self.dist, ddof=1)) if self.dist.size > 1 else math.nan

    def p_above_normal(self, margin: float) -> float:
        """One-sided p-value against H0 `diff >= margin` from the normal approximation with the
        bootstrap's standard error: P(Z <= (diff - margin) / se).

        The resample count `p_above` has a floor of 1/(B+1), so under a multiplicity
        correction over many tests it can never be small enough; this one can. With no spread
        (se 0: every resample gives the same difference) it is 0 below the margin, else 1.
        """
        if self.n == 0 or math.isnan(self.diff):
            return math.nan
        se = self.se
        if math.isnan(se) or se <= 1e-12:
            return 0.0 if self.diff < margin else 1.0
        return float(0.5 * math.erfc(-(self.diff - margin) / (se * math.sqrt(2))))

    def comparison(self, confidence: float, p_value: float | None = None) -> Comparison:
        """Summary at `confidence`: one-sided bounds, and by default the p-value of `diff <= 0`."""
        if self.n == 0:
            nan = math.nan
            return Comparison(0, nan, nan, nan, nan, nan, nan)
        low, high = np.quantile(self.dist, [1 - confidence, confidence])
        p = self.p_below(0.0) if p_value is None else p_value
        return Comparison(self.n, self.candidate, self.champion, self.diff, float(low),
                          float(high), p)


def bootstrap(
    references: list[str],
    candidate: list[str],
    champion: list[str],
    *,
    metric: str = "macro_f1",
    resamples: int = 2000,
    seed: int = 0,
    weights: np.ndarray | list[float] | None = None,
) -> Bootstrap:
    """Paired bootstrap of candidate - champion: both models scored on the same resamples.

    Examples with the same (truth, candidate, champion) labels are interchangeable, so a resample
    is fully described by how many of each such type it holds, and those counts are one
    multinomial draw. Scoring works on (resamples x types) counts instead of (resamples x n)
    labels: 10,000 resamples of 5,000 examples take about a second, and the result is exactly
    the usual bootstrap distribution.

    With `weights` (drift importance weights) every row is its own type, rows are resampled
    uniformly and each drawn row counts with its weight: the weighted metric's distribution.
    """
    if metric not in {"macro_f1", "accuracy"}:
        raise ValueError(f"unknown metric {metric!r} (macro_f1 or accuracy)")
    n = len(references)
    if not n == len(candidate) == len(champion):
        raise ValueError("references and both prediction lists must have the same length")
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} rows")
    if n == 0:
        return Bootstrap(0, math.nan, math.nan, np.empty(0))
    y, pc, pb = _encode(references, candidate, champion)
    n_classes = int(max(y.max(), pc.max(), pb.max())) + 1
    rng = np.random.default_rng(seed)
    if weights is None:
        # For accuracy only (candidate right, champion right) matters: four types at most.
        keys = np.stack([pc == y, pb == y] if metric == "accuracy" else [y, pc, pb], axis=1)
        types, freq = np.unique(keys.astype(np.int64), axis=0, return_counts=True)
        ty, tc, tb = (types[:, 0], types[:, 1], None) if metric == "accuracy" else types.T
        type_w = np.ones(len(types), dtype=np.float32)
    else:
        ty, tc, tb = y, pc, pb
        freq = np.ones(n, dtype=np.int64)
        type_w = np.asarray(weights, dtype=np.float32)
    draws = rng.multinomial(n, freq / n, size=resamples)
    counts = np.vstack([freq, draws]).astype(np.float32) * type_w[None, :]
    # Row 0 is the observed sample: its point values in float64, so a gain of exactly
    # min_delta is not lost to float32 rounding (the resamples only feed quantiles).
    point = (freq.astype(np.float64) * type_w.astype(np.float64))[None, :]
    def scores(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if metric == "accuracy":
            if weights is None:  # types are (candidate right, champion right)
                right_c, right_b = ty.astype(c.dtype), tc.astype(c.dtype)
            else:
                right_c, right_b = (pc == y).astype(c.dtype), (pb == y).astype(c.dtype)
            total = c.sum(axis=1)
            return c @ right_c / total, c @ right_b / total
        return (_macro_f1_counts(c, ty, tc, n_classes), _macro_f1_counts(c, ty, tb, n_classes))

    per_c, per_b = scores(counts[1:])
    cand, champ = scores(point)
    dist = (per_c - per_b).astype(np.float64)
    return Bootstrap(n, float(cand[0]), float(champ[0]), dist)


def paired_bootstrap(
    references: list[str],
    candidate: list[str],
    champion: list[str],
    *,
    metric: str = "macro_f1",
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | list[float] | None = None,
) -> Comparison:
    """`bootstrap` summarised: percentile bounds at `confidence` and the p-value of `diff <= 0`."""
    return bootstrap(references, candidate, champion, metric=metric, resamples=resamples,
                     seed=seed, weights=weights).comparison(confidence)


@dataclass(frozen=True)
class Permutation:
    """The point values of both models and the null distribution of their difference under
    swaps (paired permutation / approximate randomization)."""

    n: int
    candidate: float
    champion: float
    null: np.ndarray
    """candidate - champion on each resample with the pair swapped on a random half of rows."""

    @property
    def diff(self) -> float:
        return self.candidate - self.champion

    @property
    def p_value(self) -> float:
        """One-sided p-value against H0 "the candidate is not better": (k + 1) / (B + 1), k the
        resamples whose difference is at least the observed one (1.0 when nothing differs)."""
        if self.n == 0:
            return math.nan
        tol = 1e-12 * max(1.0, abs(self.diff))  # a swap that changes nothing is a tie
        return float((np.sum(self.null >= self.diff - tol) + 1) / (self.null.size + 1))


def paired_permutation(
    references: list[str],
    candidate: list[str],
    champion: list[str],
    *,
    metric: str = "macro_f1",
    resamples: int = 2000,
    seed: int = 0,
) -> Permutation:
    """Paired permutation test of candidate - champion: is the candidate better?

    Under H0 the two models' predictions on each example are exchangeable, so each resample
    swaps the pair on each example with probability 1/2 and rescores both sides. Unlike the
    bootstrap's tail, the null distribution is centred on no difference by construction, and
    every resample keeps every row (swaps move predictions, never references), so a rare class
    is never dropped from the classes macro-F1 averages over.

    Vectorised like `bootstrap`: examples of one (truth, candidate, champion) type are
    interchangeable, so a resample is described by how many of each type are swapped, one
    binomial draw per type; only types where the two predictions differ move the counts, and
    both sides are scored from (resamples x classes) counts.
    """
    if metric not in {"macro_f1", "accuracy"}:
        raise ValueError(f"unknown metric {metric!r} (macro_f1 or accuracy)")
    n = len(references)
    if not n == len(candidate) == len(champion):
        raise ValueError("references and both prediction lists must have the same length")
    if n == 0:
        return Permutation(0, math.nan, math.nan, np.empty(0))
    y, pc, pb = _encode(references, candidate, champion)
    rng = np.random.default_rng(seed)
    if metric == "accuracy":
        # Only rows exactly one model gets right move the difference: a swap flips its sign.
        wins, losses = int(np.sum((pc == y) & (pb != y))), int(np.sum((pc != y) & (pb == y)))
        flips = rng.binomial(wins, 0.5, resamples) - rng.binomial(losses, 0.5, resamples)
        null = (wins - losses - 2 * flips) / n
        return Permutation(n, float(np.mean(pc == y)), float(np.mean(pb == y)),
                           null.astype(np.float64))
    n_classes = int(max(y.max(), pc.max(), pb.max())) + 1
    # Per class: true positives and support (truth + predicted count) of each side as observed.
    truth = np.bincount(y, minlength=n_classes).astype(np.float64)
    tp_c = np.bincount(y[pc == y], minlength=n_classes).astype(np.float64)
    tp_b = np.bincount(y[pb == y], minlength=n_classes).astype(np.float64)
    sup_c = truth + np.bincount(pc, minlength=n_classes)
    sup_b = truth + np.bincount(pb, minlength=n_classes)
    # Only rows where the predictions differ move anything. A swapped row of type (t, a, b)
    # moves a prediction a -> b on the candidate's side and b -> a on the champion's: the
    # change of each side's counts is linear in the swap counts of the types.
    diff_rows = pc != pb
    types, freq = np.unique(np.stack([y, pc, pb], axis=1)[diff_rows], axis=0,
                            return_counts=True)
    # Classes no differing row touches keep their F1 on both sides: only the touched ones
    # are rescored (columns in `touched` order).
    touched = np.unique(types)
    col = np.searchsorted(touched, types)
    ty, ta, tb = (col.T if len(types) else (np.empty(0, np.int64),) * 3)
    hot_t, hot_a, hot_b = (_onehot(v, len(touched)).astype(np.float64) for v in (ty, ta, tb))
    d_tp = hot_t * ((tb == ty).astype(np.float64) - (ta == ty))[:, None]
    d_sup = hot_b - hot_a
    swaps = rng.binomial(freq, 0.5, size=(resamples, len(types))).astype(np.float64)
    swaps = np.vstack([np.zeros((1, len(types))), swaps])  # row 0: the observed sample
    move_tp, move_sup = swaps @ d_tp, swaps @ d_sup
    fixed = np.ones(n_classes, dtype=bool)
    fixed[touched] = False

    def f1(tp: np.ndarray, sup: np.ndarray, moved_tp: np.ndarray, moved_sup: np.ndarray):
        tp_m, sup_m = tp[touched] + moved_tp, sup[touched] + moved_sup
        present = sup_m > 0
        per_class = np.divide(2 * tp_m, sup_m, out=np.zeros_like(tp_m), where=present)
        still = fixed & (sup > 0)
        total = per_class.sum(axis=1) + np.sum(2 * tp[still] / sup[still])
        return total / np.maximum(present.sum(axis=1) + still.sum(), 1)

    cand = f1(tp_c, sup_c, move_tp, move_sup)
    champ = f1(tp_b, sup_b, -move_tp, -move_sup)
    null = cand[1:] - champ[1:]
    return Permutation(n, float(cand[0]), float(champ[0]), null)


def harm_p_value(
    references: list[str],
    candidate: list[str],
    champion: list[str],
    boot: Bootstrap,
    *,
    margin: float,
    resolution: float,
    resamples: int = 2000,
    seed: int = 0,
) -> float:
    """One-sided p-value against H0 `diff >= margin` (no harm beyond the margin, margin < 0),
    small enough to survive a correction over many domains when the harm is clear.

    The larger of two p-values: (a) the normal tail from the bootstrap's standard error
    (`Bootstrap.p_above_normal`), which has no 1/(B+1) floor; (b) the paired permutation test
    of "the candidate is not worse" (the roles swapped). Harm beyond the margin implies worse,
    so (b) only adds caution (the maximum is at least (a)), and it is needed: when a few
    discordant rows make the whole difference the bootstrap's distribution is far from
    normal, and (a) alone can be far smaller than the chance that equal models split those
    rows so unevenly (k rows all lost: 2^-k). (b) is counted again with ceil(1 / resolution)
    resamples when its count sits at the floor 1/(B+1) and that floor is above `resolution`
    (the smallest p-value the caller must tell apart, e.g. alpha / domains / 10 under Holm).
    """
    if boot.n == 0:
        return math.nan
    normal = boot.p_above_normal(margin)
    worse = paired_permutation(references, champion, candidate, resamples=resamples, seed=seed)
    floor = 1 / (resamples + 1)
    if worse.p_value <= floor and floor > resolution:
        worse = paired_permutation(references, champion, candidate,
                                   resamples=math.ceil(1 / resolution), seed=seed)
    return max(normal, worse.p_value)


def mcnemar(references: list[str], candidate: list[str], champion: list[str]) -> dict[str, float]:
    """Exact McNemar test on accuracy: among examples only one model gets right, does the
    candidate win more than half? One-sided p-value (candidate better), from the binomial."""
    from scipy.stats import binomtest

    y, pc, pb = (np.asarray(x, dtype=object) for x in (references, candidate, champion))
    wins = int(np.sum((pc == y) & (pb != y)))
    losses = int(np.sum((pc != y) & (pb == y)))
    p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p_value": float(p)}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm step-down adjusted p-values (family-wise error over the tests the rule uses).

    NaN p-values stay NaN and do not count towards the family.
    """
    finite = sorted((p, k) for k, p in p_values.items() if not math.isnan(p))
    m, running, out = len(finite), 0.0, {k: math.nan for k in p_values}
    for i, (p, k) in enumerate(finite):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out
