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


BLOCK_BYTES = 8 * 2**20
"""Memory of one block of resamples: the bootstrap and the permutation test draw and score
their resamples a block at a time, so their peak memory is this plus what grows with the rows
(never resamples x rows)."""


def _blocks(total: int, width: int, bytes_per_cell: int = 32) -> list[tuple[int, int]]:
    """(start, stop) of consecutive blocks of `total` resamples, each holding `width` cells of
    about `bytes_per_cell` bytes within BLOCK_BYTES (at least one resample a block)."""
    size = max(1, min(total, BLOCK_BYTES // max(1, width * bytes_per_cell)))
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _group_sum(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of the columns of a (B, T) array by group of each column -> (B, n_groups) float64
    (exact for integer counts)."""
    rows = values.shape[0]
    if values.shape[1] == 0:
        return np.zeros((rows, n_groups))
    index = (np.arange(rows)[:, None] * n_groups + groups[None, :]).ravel()
    return np.bincount(index, weights=values.ravel(), minlength=rows * n_groups
                       ).reshape(rows, n_groups)


class _TypeScorer:
    """Macro-F1 and accuracy of both models from counts of example types.

    A type is a (truth, candidate, champion) triple; given how much of each type a resample
    holds (a count, or a sum of weights), both models' per-class true positives and supports
    are sums over types, so scoring costs O(types) per resample, never O(types x classes).
    """

    def __init__(self, ty: np.ndarray, tc: np.ndarray, tb: np.ndarray, n_classes: int) -> None:
        self.ty, self.tc, self.tb, self.n_classes = ty, tc, tb, n_classes

    def _f1(self, mass: np.ndarray, pred: np.ndarray, dtype) -> np.ndarray:
        c = self.n_classes
        hit = pred == self.ty
        tp = _group_sum(mass[:, hit], self.ty[hit], c).astype(dtype)
        support = (_group_sum(mass, self.ty, c) + _group_sum(mass, pred, c)).astype(dtype)
        present = support > 0
        f1 = np.divide(2 * tp, support, out=np.zeros_like(tp), where=present)
        return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    def _accuracy(self, mass: np.ndarray, pred: np.ndarray) -> np.ndarray:
        right = pred == self.ty
        return mass[:, right].sum(axis=1) / mass.sum(axis=1)

    def scores(self, mass: np.ndarray, metric: str, dtype=np.float64
               ) -> tuple[np.ndarray, np.ndarray]:
        """(candidate, champion) scores of each row of a (B, types) mass array."""
        if metric == "accuracy":
            return self._accuracy(mass, self.tc), self._accuracy(mass, self.tb)
        return self._f1(mass, self.tc, dtype), self._f1(mass, self.tb, dtype)


def _types(*columns: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of the label columns in lexicographic order, their counts, and each
    row's type index (the same order as `np.unique(..., axis=0)`)."""
    if n_classes ** len(columns) >= 2**62:  # too many classes to pack a row into one integer
        uniq, inverse, freq = np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True,
                                        return_counts=True)
        return uniq, freq, inverse.ravel()
    code = np.zeros(len(columns[0]), dtype=np.int64)
    for col in columns:
        code = code * n_classes + col
    uniq, inverse, freq = np.unique(code, return_inverse=True, return_counts=True)
    out = np.empty((len(uniq), len(columns)), dtype=np.int64)
    rest = uniq.copy()
    for j in range(len(columns) - 1, -1, -1):
        out[:, j] = rest % n_classes
        rest //= n_classes
    return out, freq, inverse.ravel()


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
    labels, and a block of resamples at a time (BLOCK_BYTES), so memory grows with the rows and
    the types, never with resamples x rows; the result is exactly the usual bootstrap
    distribution, and for a seed the same numbers as drawing every resample at once.

    With `weights` (drift importance weights) rows are resampled uniformly (one multinomial
    draw over the rows per resample) and each drawn row counts with its weight: the weighted
    metric's distribution. The drawn weights are summed per type before scoring.
    """
    return bootstraps(references, candidate, champion, metrics=(metric,), resamples=resamples,
                      seed=seed, weights=weights)[metric]


def bootstraps(
    references: list[str],
    candidate: list[str],
    champion: list[str],
    *,
    metrics: tuple[str, ...] = ("macro_f1", "accuracy"),
    resamples: int = 2000,
    seed: int = 0,
    weights: np.ndarray | list[float] | None = None,
) -> dict[str, Bootstrap]:
    """`bootstrap` of each metric, each the same as its own `bootstrap` call with this seed.

    With weights every metric is scored on the same resamples of the rows (as separate calls
    with one seed would draw them), drawn once: the draws over the rows are the costly part.
    """
    unknown = sorted(set(metrics) - {"macro_f1", "accuracy"})
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (macro_f1 or accuracy)")
    n = len(references)
    if not n == len(candidate) == len(champion):
        raise ValueError("references and both prediction lists must have the same length")
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} rows")
    if n == 0:
        return {m: Bootstrap(0, math.nan, math.nan, np.empty(0)) for m in metrics}
    y, pc, pb = _encode(references, candidate, champion)
    n_classes = int(max(y.max(), pc.max(), pb.max())) + 1
    if weights is None:
        return {m: _unweighted_bootstrap(y, pc, pb, n_classes, m, resamples, seed)
                for m in metrics}
    return _weighted_bootstrap(y, pc, pb, n_classes, np.asarray(weights, dtype=np.float64),
                               metrics, resamples, seed)


def _accuracy_pair(mass: np.ndarray, right_c: np.ndarray, right_b: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    total = mass.sum(axis=1)
    return mass[:, right_c].sum(axis=1) / total, mass[:, right_b].sum(axis=1) / total


def _unweighted_bootstrap(y: np.ndarray, pc: np.ndarray, pb: np.ndarray, n_classes: int,
                          metric: str, resamples: int, seed: int) -> Bootstrap:
    n = len(y)
    rng = np.random.default_rng(seed)
    if metric == "accuracy":
        # Only (candidate right, champion right) matters: four types at most.
        types, freq, _ = _types((pc == y).astype(np.int64), (pb == y).astype(np.int64),
                                n_classes=2)
        right_c, right_b = types[:, 0] == 1, types[:, 1] == 1

        def scores(mass: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
            return _accuracy_pair(mass.astype(dtype), right_c, right_b)
    else:
        types, freq, _ = _types(y, pc, pb, n_classes=n_classes)
        scorer = _TypeScorer(*types.T, n_classes)

        def scores(mass: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
            return scorer.scores(mass, metric, dtype)
    # The observed sample in float64, so a gain of exactly min_delta is not lost to float32
    # rounding; the resamples (integer counts, exact in float32) only feed quantiles.
    cand, champ = scores(freq[None, :].astype(np.float64), np.float64)
    p = freq / n
    dist = np.empty(resamples)
    for start, stop in _blocks(resamples, len(freq)):
        draws = rng.multinomial(n, p, size=stop - start)
        per_c, per_b = scores(draws, np.float32)
        dist[start:stop] = per_c - per_b
    return Bootstrap(n, float(cand[0]), float(champ[0]), dist)


def _weighted_bootstrap(y: np.ndarray, pc: np.ndarray, pb: np.ndarray, n_classes: int,
                        w: np.ndarray, metrics: tuple[str, ...], resamples: int, seed: int
                        ) -> dict[str, Bootstrap]:
    n = len(y)
    rng = np.random.default_rng(seed)
    types, _, row_type = _types(y, pc, pb, n_classes=n_classes)
    scorer = _TypeScorer(*types.T, n_classes)
    n_types = len(types)
    point = np.bincount(row_type, weights=w, minlength=n_types)[None, :]
    observed = {m: scorer.scores(point, m) for m in metrics}
    p = np.full(n, 1 / n)
    dist = {m: np.empty(resamples) for m in metrics}
    for start, stop in _blocks(resamples, n, bytes_per_cell=24):
        draws = rng.multinomial(n, p, size=stop - start)
        mass = np.stack([np.bincount(row_type, weights=d * w, minlength=n_types)
                         for d in draws])
        del draws
        for m in metrics:
            per_c, per_b = scorer.scores(mass, m)
            dist[m][start:stop] = per_c - per_b
    return {m: Bootstrap(n, float(observed[m][0][0]), float(observed[m][1][0]), dist[m])
            for m in metrics}


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
    types, freq, _ = _types(y[diff_rows], pc[diff_rows], pb[diff_rows], n_classes=n_classes)
    # Classes no differing row touches keep their F1 on both sides: only the touched ones
    # are rescored (columns in `touched` order).
    touched = np.unique(types)
    col = np.searchsorted(touched, types)
    ty, ta, tb = (col.T if len(types) else (np.empty(0, np.int64),) * 3)
    k = len(touched)
    # Per swapped row of a type: the candidate's true positives of class t move by
    # [b == t] - [a == t], its support of b up by one and of a down by one.
    tp_step = (tb == ty).astype(np.float64) - (ta == ty)
    fixed = np.ones(n_classes, dtype=bool)
    fixed[touched] = False

    def f1(tp: np.ndarray, sup: np.ndarray, moved_tp: np.ndarray, moved_sup: np.ndarray):
        tp_m, sup_m = tp[touched] + moved_tp, sup[touched] + moved_sup
        present = sup_m > 0
        per_class = np.divide(2 * tp_m, sup_m, out=np.zeros_like(tp_m), where=present)
        still = fixed & (sup > 0)
        total = per_class.sum(axis=1) + np.sum(2 * tp[still] / sup[still])
        return total / np.maximum(present.sum(axis=1) + still.sum(), 1)

    def both(swaps: np.ndarray) -> np.ndarray:
        """candidate - champion on each row of a (B, types) array of swap counts."""
        move_tp = _group_sum(swaps * tp_step, ty, k)
        move_sup = _group_sum(swaps, tb, k) - _group_sum(swaps, ta, k)
        return f1(tp_c, sup_c, move_tp, move_sup) - f1(tp_b, sup_b, -move_tp, -move_sup)

    still = np.zeros((1, k))
    cand, champ = f1(tp_c, sup_c, still, still), f1(tp_b, sup_b, still, still)
    null = np.empty(resamples)
    # Drawn a block at a time, in the order one (resamples x types) draw would fill them.
    for start, stop in _blocks(resamples, len(types)):
        swaps = rng.binomial(freq, 0.5, size=(stop - start, len(types))).astype(np.float64)
        null[start:stop] = both(swaps)
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
