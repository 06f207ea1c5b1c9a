"""The local evaluate modules load offline by path and agree with scikit-learn."""

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from ratchet import metrics
from ratchet.stats import macro_f1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def noisy_labels(seed: int, n: int = 400) -> tuple[list[str], list[str], np.ndarray]:
    """References over a-f, predictions 60% right and otherwise over a-g (g never a reference),
    and positive importance-like weights."""
    rng = np.random.default_rng(seed)
    y = [str(x) for x in rng.choice(list("abcdef"), n)]
    p = [t if rng.random() < 0.6 else str(rng.choice(list("abcdefg"))) for t in y]
    return y, p, rng.gamma(2.0, 0.5, n)


@pytest.mark.parametrize("seed", [0, 1])
def test_modules_match_sklearn_and_the_bootstrap_metric(seed):
    y, p, _ = noisy_labels(seed)
    out = metrics.compute(p, y)
    assert set(out) == {"accuracy", "macro_f1", "micro_f1", "weighted_f1"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert out["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert out["micro_f1"] == pytest.approx(f1_score(y, p, average="micro"))
    assert out["weighted_f1"] == pytest.approx(f1_score(y, p, average="weighted"))
    assert out["macro_f1"] == pytest.approx(macro_f1(y, p))


@pytest.mark.parametrize("seed", [2, 3])
def test_weighted_metrics_match_sklearn(seed):
    y, p, w = noisy_labels(seed)
    out = metrics.compute(p, y, sample_weight=w)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, p, sample_weight=w))
    for average in ("macro", "micro", "weighted"):
        expected = f1_score(y, p, average=average, sample_weight=w)
        assert out[f"{average}_f1"] == pytest.approx(expected)
    # The weights matter: the same rows unweighted give other numbers.
    assert out["weighted_f1"] != pytest.approx(metrics.compute(p, y)["weighted_f1"])


def test_empty_input_gives_nan():
    out = metrics.compute([], [])
    assert set(out) == set(metrics.NAMES)
    assert all(math.isnan(v) for v in out.values())


def test_weights_that_sum_to_zero_give_nan():
    assert all(math.isnan(v) for v in metrics.compute(["a"], ["a"], sample_weight=[0.0]).values())


def test_a_weight_per_row_is_required():
    with pytest.raises(ValueError, match="2 values for 3 rows"):
        metrics.compute(list("abc"), list("abc"), sample_weight=[1.0, 2.0])


@pytest.mark.parametrize("weighted", [False, True])
def test_per_class_matches_sklearn(weighted):
    y, p, w = noisy_labels(4)
    weights = w if weighted else None
    out = metrics.per_class(p, y, sample_weight=weights)
    labels = sorted(set(y) | set(p))
    assert list(out) == labels == list("abcdefg")
    precision, recall, f1, support = precision_recall_fscore_support(
        y, p, labels=labels, zero_division=0, sample_weight=weights
    )
    for i, label in enumerate(labels):
        assert out[label] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )


def test_per_class_keeps_a_label_seen_only_in_the_predictions():
    out = metrics.per_class(["a", "b", "z", "z"], ["a", "b", "b", "a"])
    assert list(out) == ["a", "b", "z"]
    assert out["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0}
    assert out["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3,
                                      "support": 2.0})
    assert metrics.per_class([], []) == {}


def reference_ece(conf, correct, n_bins, weights=None) -> float:
    """ECE the textbook way, bin by bin, with bins (lo, hi] and 0 in the first one."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    w = np.ones_like(conf) if weights is None else np.asarray(weights, float)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for k in range(n_bins):
        in_bin = (conf > edges[k]) & (conf <= edges[k + 1])
        if k == 0:
            in_bin |= conf == 0
        if w[in_bin].sum() > 0:
            acc = np.average(correct[in_bin], weights=w[in_bin])
            mean_conf = np.average(conf[in_bin], weights=w[in_bin])
            total += w[in_bin].sum() / w.sum() * abs(acc - mean_conf)
    return total


def test_ece_on_a_hand_computed_case():
    conf, correct = [0.9, 0.6, 0.3], [1, 0, 1]
    # 15 bins: each row alone in its bin, |1-.9| + |0-.6| + |1-.3| over 3 rows.
    assert metrics.ece(conf, correct) == pytest.approx(1.4 / 3)
    # 2 bins: (0, .5] holds .3 (gap .7); (.5, 1] holds .9 and .6: accuracy .5, confidence .75.
    assert metrics.ece(conf, correct, n_bins=2) == pytest.approx((0.7 + 2 * 0.25) / 3)
    # Weight 2 on the last row: (2 * .7 + 2 * .25) / 4.
    assert metrics.ece(conf, [True, False, True], n_bins=2,
                       sample_weight=[1, 1, 2]) == pytest.approx(1.9 / 4)


def test_ece_puts_a_confidence_on_an_edge_in_the_bin_below():
    # .5 in (0, .5]: |1 - .5| + |0 - .9| over 2; in (.5, 1] it would be |.5 - .9| / 2 = .2.
    assert metrics.ece([0.5, 0.9], [1, 0], n_bins=2) == pytest.approx(0.7)
    assert metrics.ece([0.0, 1.0], [0, 1], n_bins=4) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_a_bin_by_bin_reference(seed):
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.2, 1.0, 300)
    correct = rng.random(300) < conf**2
    w = rng.gamma(2.0, 0.5, 300)
    assert metrics.ece(conf, correct) == pytest.approx(reference_ece(conf, correct, 15))
    assert metrics.ece(conf, correct.astype(int), n_bins=7, sample_weight=w) == pytest.approx(
        reference_ece(conf, correct, 7, w)
    )


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    # Exactly calibrated: in each bin the share right equals the stated confidence.
    conf = [0.8] * 10 + [0.3] * 10
    correct = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 7
    assert metrics.ece(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # Sampled calibration: small; 0.95 confidence at 60% accuracy: about 0.35.
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    assert metrics.ece(p, rng.random(p.size) < p) < 0.02
    over = metrics.ece(np.full(2000, 0.95), rng.random(2000) < 0.6)
    assert over == pytest.approx(0.35, abs=0.04)


def test_ece_edge_cases():
    assert math.isnan(metrics.ece([], []))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.ece([1.2], [1])
    with pytest.raises(ValueError, match="2 confidences but 1"):
        metrics.ece([0.2, 0.3], [1])


def test_confusion_counts_match_sklearn():
    y, p, _ = noisy_labels(5, n=200)
    labels, matrix = metrics.confusion(p, y)
    assert labels == sorted(set(y) | set(p))
    assert matrix.dtype.kind == "i"
    assert np.array_equal(matrix, confusion_matrix(y, p, labels=labels))
    assert matrix.sum() == len(y)
    small_labels, small = metrics.confusion(["a", "z", "a"], ["a", "a", "b"])
    assert small_labels == ["a", "b", "z"]
    assert small.tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 0]]  # rows: references


@pytest.mark.parametrize("n_labels", [0, 4, 150])
def test_confusion_png_is_written_atomically_as_a_png(tmp_path, n_labels):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(n_labels)
    names = [f"intent_{i:03d}" for i in range(n_labels)]
    y = [str(x) for x in rng.choice(names, 3 * n_labels)] if names else []
    p = [t if rng.random() < 0.7 else str(rng.choice(names)) for t in y]
    target = tmp_path / "plots" / "confusion.png"
    written = metrics.confusion_png(p, y, target, f"{n_labels} labels")
    assert written == target
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert [f.name for f in target.parent.iterdir()] == ["confusion.png"]  # no temp file left
    assert plt.get_fignums() == []  # the figure was closed


def test_confusion_png_replaces_an_existing_file(tmp_path):
    target = tmp_path / "cm.png"
    target.write_bytes(b"old")
    metrics.confusion_png(["a", "b"], ["a", "a"], str(target), "again")
    assert target.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("weighted", [False, True])
def test_compute_gives_the_numbers_of_the_modules_through_evaluate(weighted):
    """`compute` and `ece` skip `evaluate`'s Arrow round trip, not the modules' arithmetic."""
    import evaluate

    y, p, w = noisy_labels(3, 700)
    kw = {"sample_weight": w.tolist()} if weighted else {}
    through = evaluate.combine([metrics._module(n) for n in metrics.NAMES]).compute(
        predictions=p, references=y, **kw)
    direct = metrics.compute(p, y, sample_weight=w if weighted else None)
    assert set(direct) == set(through)
    for name, value in direct.items():
        assert value == pytest.approx(through[name], rel=1e-12, abs=1e-12)
        if not weighted:  # counts: exactly the same floats
            assert value == through[name]
    conf = np.random.default_rng(3).random(700)
    hit = np.asarray(p) == np.asarray(y)
    assert metrics.ece(conf, hit, sample_weight=w if weighted else None) == pytest.approx(
        metrics._module("ece").compute(confidences=conf.tolist(), correct=hit.tolist(),
                                       **kw)["ece"], rel=1e-12)
