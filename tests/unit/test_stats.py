"""Paired bootstrap: macro-F1 matches sklearn; real gains are found, null ones are not."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ratchet.stats import _encode, bootstrap, macro_f1, macro_f1_rows, paired_bootstrap


def _noisy(y, acc, rng, labels):
    return [t if rng.random() < acc else str(rng.choice(labels)) for t in y]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = [f"c{i}" for i in range(7)]
    y = [str(x) for x in rng.choice(labels, 300)]
    p = _noisy(y, 0.7, rng, labels + ["never_true"])
    assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"))
    yy, pp = _encode(y, p)
    rows = macro_f1_rows(np.vstack([yy, yy]), np.vstack([pp, yy]), int(max(yy.max(), pp.max())) + 1)
    assert rows[1] == pytest.approx(1.0)


def test_real_gain_is_significant_and_null_is_not():
    rng = np.random.default_rng(0)
    labels = [f"c{i}" for i in range(10)]
    y = [str(x) for x in rng.choice(labels, 1000)]
    strong, weak = _noisy(y, 0.9, rng, labels), _noisy(y, 0.7, rng, labels)
    win = paired_bootstrap(y, strong, weak, resamples=1000)
    assert win.diff > 0.1 and win.low > 0.1 and win.p_value < 0.01
    same = paired_bootstrap(y, strong, strong, resamples=1000)
    assert same.diff == 0 and same.low == 0 and same.p_value == 1.0
    lose = paired_bootstrap(y, weak, strong, resamples=1000)
    assert lose.high < 0


def test_bootstrap_is_seeded_and_handles_empty():
    y, a, b = ["x", "y", "x", "y"] * 20, ["x"] * 80, ["y", "y", "x", "x"] * 20
    assert paired_bootstrap(y, a, b, seed=3) == paired_bootstrap(y, a, b, seed=3)
    empty = paired_bootstrap([], [], [])
    assert empty.n == 0 and np.isnan(empty.diff)


def test_accuracy_bootstrap():
    y = ["a", "b"] * 100
    res = paired_bootstrap(y, y, ["a"] * 200, metric="accuracy", resamples=500)
    assert res.candidate == 1.0 and res.champion == 0.5 and res.low > 0.4


def test_bootstrap_matches_the_index_resampling_it_replaces():
    # The type-count bootstrap must give the distribution of plain index resampling.
    rng = np.random.default_rng(5)
    labels = [f"c{i}" for i in range(5)]
    y = [str(x) for x in rng.choice(labels, 400)]
    a, b = _noisy(y, 0.8, rng, labels), _noisy(y, 0.75, rng, labels)
    fast = paired_bootstrap(y, a, b, resamples=4000, seed=1)
    yy, aa, bb = _encode(y, a, b)
    idx = np.random.default_rng(2).integers(0, 400, (4000, 400))
    diffs = macro_f1_rows(yy[idx], aa[idx], 5) - macro_f1_rows(yy[idx], bb[idx], 5)
    assert fast.diff == pytest.approx(f1_score(y, a, average="macro")
                                      - f1_score(y, b, average="macro"), abs=1e-6)
    assert fast.low == pytest.approx(np.quantile(diffs, 0.05), abs=0.006)
    assert fast.high == pytest.approx(np.quantile(diffs, 0.95), abs=0.006)


def test_mcnemar_counts_discordant_pairs():
    from ratchet.stats import mcnemar

    y = ["a"] * 100
    cand = ["a"] * 90 + ["b"] * 10
    champ = ["b"] * 30 + ["a"] * 70
    res = mcnemar(y, cand, champ)
    assert (res["wins"], res["losses"]) == (30, 10) and res["p_value"] < 0.01
    assert mcnemar(y, champ, cand)["p_value"] > 0.99
    assert mcnemar(y, y, y) == {"wins": 0, "losses": 0, "p_value": 1.0}


def test_holm_adjusts_step_down_and_skips_nan():
    from ratchet.stats import holm

    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06)
    assert adj["b"] == pytest.approx(0.06)  # monotone: never below an earlier step
    assert np.isnan(adj["d"])
    assert holm({}) == {}


def test_weighted_bootstrap_matches_weighted_sklearn_and_duplication():
    rng = np.random.default_rng(3)
    labels = [f"c{i}" for i in range(6)]
    y = [str(x) for x in rng.choice(labels, 400)]
    a, b = _noisy(y, 0.85, rng, labels), _noisy(y, 0.7, rng, labels)
    w = rng.integers(1, 4, size=400).astype(float)
    boot = bootstrap(y, a, b, weights=w, resamples=500)
    assert boot.candidate == pytest.approx(f1_score(y, a, average="macro", sample_weight=w))
    assert boot.champion == pytest.approx(f1_score(y, b, average="macro", sample_weight=w))
    acc = bootstrap(y, a, b, metric="accuracy", weights=w, resamples=500)
    assert acc.candidate == pytest.approx(np.average(np.array(a) == np.array(y), weights=w))
    # Integer weights are the same point estimate as repeating rows.
    rep = np.repeat(np.arange(400), w.astype(int))
    dup = bootstrap([y[i] for i in rep], [a[i] for i in rep], [b[i] for i in rep],
                    resamples=100)
    assert dup.diff == pytest.approx(boot.diff)
    # A clear gain is found with weights too, and p-values at margins are ordered.
    assert boot.p_below(0.0) < 0.01 and boot.p_below(0.5) > 0.99
    assert boot.p_above(0.0) > 0.99 and boot.p_below(-0.05) <= boot.p_below(0.0)


def test_bootstrap_refuses_mismatched_weights():
    with pytest.raises(ValueError, match="weights"):
        bootstrap(["a", "b"], ["a", "b"], ["a", "a"], weights=[1.0])
