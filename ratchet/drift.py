"""Drift statistics between a reference and a recent sample: pure functions of rows and arrays.

Every test returns its raw statistic and p-value; `detect` runs them all and combines the
p-values with Holm's step-down procedure, so the verdict "drift" has a family-wise false-alarm
rate of at most `alpha` however many tests run. The drift stage and the drift benchmark call
the same `detect`, so the benchmark measures exactly the detector the pipeline uses.

Which tests vote. The label chi-square test, the length KS test, the OOV test and the embedding
MMD permutation test have valid p-values under "recent is drawn like reference" and are combined.
The domain classifier's AUC is reported (with its weights it steers evaluation) but does not
vote: its cross-fitted out-of-fold scores are not independent, so a p-value from them would be
approximate, and the MMD test already covers the embedding space with an exact one.

Degenerate inputs. An empty sample raises `DriftInputError` naming it; a test whose p-value is
undefined (e.g. no tokens at all, fewer than two embedded rows) reports NaN, and a NaN p-value
never votes for drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ratchet.config import DriftConfig, TriggerConfig
from ratchet.data import normalise
from ratchet.errors import RatchetError

# Cochran's rule for the chi-square approximation: no expected count below 1 and at most 20%
# below 5. Sparser tables (many labels, small batches) get a Monte Carlo p-value instead.
_COCHRAN_MIN, _COCHRAN_LOW, _COCHRAN_SHARE = 1.0, 5.0, 0.2
# Out-of-fold probabilities are clipped away from 0 and 1 before the odds are taken.
_PROB_EPS = 1e-6
VOTING_TESTS = ("label", "length", "oov", "mmd")


class DriftInputError(RatchetError, ValueError):
    """A drift statistic got inputs it cannot be computed from (empty sample, bad shape)."""


def _require_rows(name: str, n: int, minimum: int = 1) -> None:
    if n < minimum:
        raise DriftInputError(f"drift: the {name} sample has {n} rows; needs at least {minimum}")


# --- label shift -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelShift:
    chi2: float
    p_value: float
    jsd: float
    """Jensen-Shannon distance (base 2) between the label distributions: 0 same, 1 disjoint."""
    method: str
    """`asymptotic` or `monte-carlo` (sparse tables, see Cochran's rule above)."""
    labels: list[str]
    reference_counts: list[int]
    recent_counts: list[int]
    new_labels: list[str]


def label_shift(
    reference: Sequence[str], recent: Sequence[str], *, resamples: int = 999, seed: int = 0
) -> LabelShift:
    """Chi-square test of homogeneity of the label distributions, and their JS distance.

    A single label on both sides means there is nothing to test: chi2 0, p-value 1.
    """
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import MonteCarloMethod, chi2_contingency

    _require_rows("reference labels", len(reference))
    _require_rows("recent labels", len(recent))
    labels = sorted(set(reference) | set(recent))
    index = {lab: i for i, lab in enumerate(labels)}
    ref = np.bincount([index[x] for x in reference], minlength=len(labels))
    rec = np.bincount([index[x] for x in recent], minlength=len(labels))
    jsd = float(jensenshannon(ref / ref.sum(), rec / rec.sum(), base=2))
    new = sorted(set(recent) - set(reference))
    common = dict(jsd=jsd, labels=labels, reference_counts=ref.tolist(),
                  recent_counts=rec.tolist(), new_labels=new)
    if len(labels) < 2:
        return LabelShift(chi2=0.0, p_value=1.0, method="trivial", **common)
    table = np.vstack([ref, rec])
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    sparse = expected.min() < _COCHRAN_MIN or (expected < _COCHRAN_LOW).mean() > _COCHRAN_SHARE
    if sparse:
        method = MonteCarloMethod(n_resamples=resamples, rng=np.random.default_rng(seed))
        res = chi2_contingency(table, correction=False, method=method)
    else:
        res = chi2_contingency(table, correction=False)
    return LabelShift(chi2=float(res.statistic), p_value=float(res.pvalue),
                      method="monte-carlo" if sparse else "asymptotic", **common)


# --- text length ----------------------------------------------------------------------------


def word_counts(texts: Sequence[str]) -> np.ndarray:
    """Words per text (whitespace tokens of the normalised text)."""
    return np.array([len(normalise(t).split()) for t in texts], dtype=np.int64)


@dataclass(frozen=True)
class LengthShift:
    ks: float
    p_value: float
    mean_reference: float
    mean_recent: float


def length_shift(reference: Sequence[int], recent: Sequence[int]) -> LengthShift:
    """Two-sample Kolmogorov-Smirnov test on words per text."""
    from scipy.stats import ks_2samp

    _require_rows("reference lengths", len(reference))
    _require_rows("recent lengths", len(recent))
    ref, rec = np.asarray(reference, dtype=float), np.asarray(recent, dtype=float)
    res = ks_2samp(ref, rec)
    return LengthShift(float(res.statistic), float(res.pvalue), float(ref.mean()),
                       float(rec.mean()))


# --- vocabulary -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OovShift:
    oov_rate: float
    """Share of recent tokens never seen in the whole reference (NaN: recent has no tokens)."""
    heldout_oov_rate: float
    """The same rate for held-out reference texts against the other half: the no-drift level."""
    p_value: float


def _oov_per_text(texts: Sequence[list[str]], vocab: set[str]) -> np.ndarray:
    """Per-text share of tokens outside `vocab`; texts without tokens are left out."""
    return np.array([sum(w not in vocab for w in t) / len(t) for t in texts if t], dtype=float)


def oov_shift(reference: Sequence[str], recent: Sequence[str], *, seed: int = 0) -> OovShift:
    """Out-of-vocabulary rate of recent texts, tested against a held-out half of the reference.

    The reference is split at random into halves A and B; the per-text OOV rate against A's
    vocabulary is compared between B and recent texts with a one-sided Mann-Whitney U test
    (recent higher). Under no drift, B and recent are exchangeable with respect to A, so the
    test is valid; against the whole reference the recent rate would always look higher.
    The p-value is NaN when the reference has fewer than 2 texts or either side has no tokens.
    """
    from scipy.stats import mannwhitneyu

    _require_rows("reference texts", len(reference))
    _require_rows("recent texts", len(recent))
    ref_tokens = [normalise(t).split() for t in reference]
    rec_tokens = [normalise(t).split() for t in recent]
    full_vocab = {w for t in ref_tokens for w in t}
    flat = [w for t in rec_tokens for w in t]
    rate = float(np.mean([w not in full_vocab for w in flat])) if flat else math.nan
    order = np.random.default_rng(seed).permutation(len(ref_tokens))
    half = len(order) // 2
    if half < 1:
        return OovShift(rate, math.nan, math.nan)
    vocab_a = {w for i in order[:half] for w in ref_tokens[i]}
    held = [ref_tokens[i] for i in order[half:]]
    b, r = _oov_per_text(held, vocab_a), _oov_per_text(rec_tokens, vocab_a)
    held_flat = [w for t in held for w in t]
    held_rate = float(np.mean([w not in vocab_a for w in held_flat])) if held_flat else math.nan
    if len(b) == 0 or len(r) == 0:
        return OovShift(rate, held_rate, math.nan)
    if np.ptp(np.concatenate([b, r])) == 0:
        return OovShift(rate, held_rate, 1.0)  # all rates equal: no evidence either way
    p = float(mannwhitneyu(r, b, alternative="greater").pvalue)
    return OovShift(rate, held_rate, p)


# --- embedding MMD ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MmdResult:
    mmd2: float
    """Unbiased estimate of the squared MMD (can be slightly negative under no drift)."""
    p_value: float
    bandwidth: float
    """RBF sigma: k(x, y) = exp(-|x-y|^2 / (2 sigma^2)), sigma^2 = median |x-y|^2 / 2."""
    null: np.ndarray
    """The permutation distribution of mmd2 (for the plot)."""


def _sq_dists(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    d = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def median_heuristic(sq_dists: np.ndarray) -> float:
    """sigma from the median of the off-diagonal squared distances; 1.0 if all points coincide."""
    n = sq_dists.shape[0]
    off = sq_dists[~np.eye(n, dtype=bool)] if n > 1 else np.empty(0)
    med = float(np.median(off)) if off.size else 0.0
    return math.sqrt(med / 2.0) if med > 0 else 1.0


def _mmd2_from_sums(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, n: int, m: int
                    ) -> np.ndarray:
    """Unbiased MMD^2 from kernel sums (diagonal of ones already removed from kxx, kyy)."""
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (n * m)


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, *, permutations: int = 1000, seed: int = 0, block: int = 250
) -> MmdResult:
    """MMD^2 with an RBF kernel (median-heuristic bandwidth) and a permutation p-value.

    The kernel matrix of the pooled sample is computed once; each permutation's statistic is
    then a quadratic form in a 0/1 group indicator, so `block` permutations at a time cost one
    matrix product. p = (1 + #{null >= observed}) / (1 + permutations).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise DriftInputError(
            f"drift: embeddings must be 2-D with the same width, got {x.shape} and {y.shape}"
        )
    _require_rows("reference embedding", len(x), 2)
    _require_rows("recent embedding", len(y), 2)
    if permutations < 1:
        raise DriftInputError(f"drift: permutations must be >= 1, got {permutations}")
    n, m = len(x), len(y)
    z = np.vstack([x, y])
    d = _sq_dists(z)
    sigma = median_heuristic(d)
    k = np.exp(-d / (2.0 * sigma**2)).astype(np.float32)
    del d
    row = k.sum(axis=1, dtype=np.float64)
    total = float(row.sum())
    diag = float(np.trace(k))  # the kernel's diagonal, all ones up to rounding

    def stat(ind: np.ndarray) -> np.ndarray:
        """mmd2 for each row of a (P, n+m) 0/1 matrix marking the 'reference' group."""
        a_k_a = np.einsum("pj,pj->p", ind @ k, ind, dtype=np.float64)
        a_r = ind.astype(np.float64) @ row
        kxx = a_k_a - n * diag / (n + m)
        kxy = a_r - a_k_a
        kyy = total - 2.0 * a_r + a_k_a - m * diag / (n + m)
        return _mmd2_from_sums(kxx, kyy, kxy, n, m)

    observed_ind = np.zeros((1, n + m), dtype=np.float32)
    observed_ind[0, :n] = 1.0
    observed = float(stat(observed_ind)[0])
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    base = observed_ind[0]
    for start in range(0, permutations, block):
        size = min(block, permutations - start)
        ind = rng.permuted(np.broadcast_to(base, (size, n + m)), axis=1)
        null[start : start + size] = stat(ind)
    # A tolerance keeps float32 rounding from counting an equal statistic as smaller.
    exceed = int(np.sum(null >= observed - 1e-7 * max(1.0, abs(observed))))
    return MmdResult(observed, (1 + exceed) / (1 + permutations), sigma, null)


# --- domain classifier and importance weights ---------------------------------------------------


@dataclass(frozen=True)
class DomainClassifier:
    auc: float
    """Cross-validated ROC AUC of telling recent from reference: 0.5 means indistinguishable."""
    prob_reference: np.ndarray
    """Out-of-fold P(recent | x) for each reference row."""
    prob_recent: np.ndarray
    """Out-of-fold P(recent | x) for each recent row."""
    model: Any
    """The pipeline refitted on all rows, for rows that were not in the sample."""


def domain_classifier(
    reference: np.ndarray, recent: np.ndarray, *, folds: int = 5, seed: int = 0
) -> DomainClassifier:
    """Logistic regression on standardised embeddings: reference (0) vs recent (1).

    No class weighting: the probabilities keep the sample's prior, which `importance_weights`
    then removes with the n_reference / n_recent factor.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference, recent = np.asarray(reference, dtype=float), np.asarray(recent, dtype=float)
    _require_rows("reference embedding", len(reference), 2)
    _require_rows("recent embedding", len(recent), 2)
    x = np.vstack([reference, recent])
    y = np.r_[np.zeros(len(reference), dtype=int), np.ones(len(recent), dtype=int)]
    k = max(2, min(folds, len(reference), len(recent)))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    prob = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    model.fit(x, y)
    return DomainClassifier(float(roc_auc_score(y, prob)), prob[: len(reference)],
                            prob[len(reference) :], model)


def importance_weights(
    prob_recent: np.ndarray, *, n_reference: int, n_recent: int, clip: tuple[float, float]
) -> np.ndarray:
    """Density-ratio weights w(x) ~ p_recent(x) / p_reference(x) from a domain classifier.

    w = p / (1 - p) * n_reference / n_recent (the factor removes the classifier's class prior),
    clipped to `clip` so a few confident rows cannot dominate, then scaled to mean 1 (so after
    scaling the bounds hold for the ratio max/min, not for each weight). Weighting test rows by
    w makes their metrics estimate performance on data distributed like the recent batch.
    """
    p = np.asarray(prob_recent, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise DriftInputError(
            f"drift: importance weights need a non-empty 1-D array, got shape {p.shape}"
        )
    if np.isnan(p).any():
        raise DriftInputError("drift: importance weights got NaN probabilities")
    lo, hi = clip
    if not 0 < lo <= hi:
        raise DriftInputError(f"drift: weight clip must satisfy 0 < low <= high, got {clip}")
    _require_rows("reference (for weights)", n_reference)
    _require_rows("recent (for weights)", n_recent)
    p = np.clip(p, _PROB_EPS, 1 - _PROB_EPS)
    w = np.clip(p / (1 - p) * (n_reference / n_recent), lo, hi)
    return w / w.mean()


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size: how many unweighted rows the weighted ones are worth."""
    w = np.asarray(weights, dtype=float)
    return float(w.sum() ** 2 / np.sum(w**2)) if w.size else 0.0


# --- combining the tests and the trigger -----------------------------------------------------


def holm(p_values: Mapping[str, float], alpha: float) -> dict[str, bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level alpha.

    NaN p-values are not tests: they are never rejected and do not count in the family.
    """
    valid = sorted(((p, k) for k, p in p_values.items() if not math.isnan(p)))
    rejected = dict.fromkeys(p_values, False)
    m = len(valid)
    for i, (p, key) in enumerate(valid):
        if p > alpha / (m - i):
            break
        rejected[key] = True
    return rejected


def should_retrain(trigger: TriggerConfig, *, drifted: bool, new_rows: int, has_champion: bool
                   ) -> tuple[bool, str]:
    """The trigger policy: retrain or not, and the reason in words."""
    if not has_champion:
        return True, "no champion yet: the first model is always trained"
    enough = new_rows >= trigger.min_new_rows
    rows = f"{new_rows} new rows ({'>=' if enough else '<'} min_new_rows {trigger.min_new_rows})"
    drift = "drift is significant" if drifted else "no significant drift"
    if trigger.mode == "always":
        return True, "trigger mode `always`"
    if trigger.mode == "drift":
        return drifted, f"trigger mode `drift`: {drift}"
    if trigger.mode == "rows":
        return enough, f"trigger mode `rows`: {rows}"
    return drifted or enough, f"trigger mode `drift_or_rows`: {drift}; {rows}"


# --- all together -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One side of the comparison. `embeddings` may be a subsample (row i of it is not text i)."""

    texts: Sequence[str]
    labels: Sequence[str]
    embeddings: np.ndarray | None = None


def detect(reference: Sample, recent: Sample, cfg: DriftConfig, *, classifier: bool = True
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every test; return (flat report of numbers and verdicts, arrays for plots/weights).

    The verdict `drifted` is Holm's procedure over the voting tests at `cfg.alpha`; tests that
    could not run (no embeddings) are absent from the family.
    """
    lab = label_shift(reference.labels, recent.labels, resamples=cfg.permutations, seed=cfg.seed)
    ref_len, rec_len = word_counts(reference.texts), word_counts(recent.texts)
    length = length_shift(ref_len, rec_len)
    oov = oov_shift(reference.texts, recent.texts, seed=cfg.seed)
    out: dict[str, Any] = {
        "n_reference": len(reference.texts), "n_recent": len(recent.texts),
        "label_chi2": lab.chi2, "label_p": lab.p_value, "label_jsd": lab.jsd,
        "label_method": lab.method, "new_labels": lab.new_labels,
        "length_ks": length.ks, "length_p": length.p_value,
        "mean_len_reference": length.mean_reference, "mean_len_recent": length.mean_recent,
        "oov_rate": oov.oov_rate, "oov_heldout_rate": oov.heldout_oov_rate, "oov_p": oov.p_value,
    }
    arrays: dict[str, Any] = {"label": lab, "ref_len": ref_len, "rec_len": rec_len}
    p_values = {"label": lab.p_value, "length": length.p_value, "oov": oov.p_value}
    if reference.embeddings is not None and recent.embeddings is not None:
        mmd = mmd_permutation_test(reference.embeddings, recent.embeddings,
                                   permutations=cfg.permutations, seed=cfg.seed)
        out.update(mmd2=mmd.mmd2, mmd_p=mmd.p_value, mmd_bandwidth=mmd.bandwidth,
                   n_embedded_reference=len(reference.embeddings),
                   n_embedded_recent=len(recent.embeddings))
        p_values["mmd"] = mmd.p_value
        arrays["mmd"] = mmd
        if classifier:
            dc = domain_classifier(reference.embeddings, recent.embeddings, folds=cfg.folds,
                                   seed=cfg.seed)
            out["domain_auc"] = dc.auc
            arrays["domain"] = dc
    rejected = holm(p_values, cfg.alpha)
    for name, rej in rejected.items():
        out[f"{name}_drift"] = rej
    out["tests"] = sorted(p_values)
    out["drifted"] = any(rejected.values())
    out["drifted_by"] = sorted(k for k, v in rejected.items() if v)
    return out, arrays


def summary(report: Mapping[str, Any]) -> str:
    """One line for the gate record and the CLI table; starts with `DRIFT` when drift is found."""
    parts = [f"labels JSD {report['label_jsd']:.2f} (p={report['label_p']:.1g})",
             f"length KS {report['length_ks']:.2f} (p={report['length_p']:.1g})",
             f"OOV {report['oov_rate']:.0%} (p={report['oov_p']:.1g})"]
    if "mmd2" in report:
        parts.append(f"MMD² {report['mmd2']:.3g} (p={report['mmd_p']:.1g})")
    if "domain_auc" in report:
        parts.append(f"domain AUC {report['domain_auc']:.2f}")
    if report.get("new_labels"):
        parts.append(f"{len(report['new_labels'])} new labels")
    head = (f"DRIFT ({', '.join(report['drifted_by'])}): " if report["drifted"]
            else "no drift: ")
    return head + ", ".join(parts)
