"""Paired bootstrap: macro-F1 matches sklearn; real gains are found, null ones are not."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from ratchet.stats import _encode, macro_f1, macro_f1_rows, paired_bootstrap


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
