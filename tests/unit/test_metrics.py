"""The local evaluate modules load offline by path and agree with scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from ratchet import metrics
from ratchet.stats import macro_f1


@pytest.mark.parametrize("seed", [0, 1])
def test_modules_match_sklearn_and_the_bootstrap_metric(seed):
    rng = np.random.default_rng(seed)
    y = [str(x) for x in rng.choice(list("abcdef"), 400)]
    p = [t if rng.random() < 0.6 else str(rng.choice(list("abcdefg"))) for t in y]
    out = metrics.compute(p, y)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert out["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert out["macro_f1"] == pytest.approx(macro_f1(y, p))


def test_empty_input_gives_nan():
    assert all(math.isnan(v) for v in metrics.compute([], []).values())
