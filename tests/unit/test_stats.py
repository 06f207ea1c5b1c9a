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


# ---------------------------------------------------------------- paired permutation test


def _scipy_permutation_p(y, a, b, metric, resamples):
    """scipy's paired ("samples") permutation test of the same statistic, one-sided."""
    from scipy.stats import permutation_test

    yy, aa, bb = _encode(y, a, b)
    classes = int(max(yy.max(), aa.max(), bb.max())) + 1

    def statistic(x, z, axis=-1):
        x, z = np.atleast_2d(x).astype(np.int64), np.atleast_2d(z).astype(np.int64)
        truth = np.broadcast_to(yy, x.shape)
        if metric == "accuracy":
            out = np.mean(x == truth, axis=-1) - np.mean(z == truth, axis=-1)
        else:
            out = macro_f1_rows(truth, x, classes) - macro_f1_rows(truth, z, classes)
        return out if out.size > 1 else out[0]

    res = permutation_test((aa, bb), statistic, permutation_type="samples", vectorized=True,
                           n_resamples=resamples, alternative="greater", random_state=0)
    return float(res.statistic), float(res.pvalue)


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_permutation_matches_scipy(metric):
    # 40 rows, 4 classes: scipy swaps each pair with probability 1/2 (permutation_type
    # "samples"), ours draws the same swaps per type; the p-values agree within MC error.
    from ratchet.stats import paired_permutation

    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "d"]
    y = [str(x) for x in rng.choice(labels, 40)]
    a, b = _noisy(y, 0.8, rng, labels), _noisy(y, 0.6, rng, labels)
    resamples = 20000
    ours = paired_permutation(y, a, b, metric=metric, resamples=resamples, seed=3)
    observed, p_scipy = _scipy_permutation_p(y, a, b, metric, resamples)
    assert ours.diff == pytest.approx(observed, abs=1e-12)
    assert 0.02 < p_scipy < 0.5  # a p-value in the range where a wrong null would show
    se = np.sqrt(2 * p_scipy * (1 - p_scipy) / resamples)
    assert ours.p_value == pytest.approx(p_scipy, abs=4 * se)


def test_permutation_matches_scipy_exactly_on_a_tiny_set():
    # 12 rows: scipy enumerates all 2^12 swap patterns (its exact p-value counts the
    # observed pattern among them), so only our Monte Carlo error remains.
    from ratchet.stats import paired_permutation

    y = list("aabbccaabbcc")
    a = list("aabbccaabbca")
    b = list("abbcccaaabcc")
    ours = paired_permutation(y, a, b, resamples=40000, seed=1)
    _, exact = _scipy_permutation_p(y, a, b, "macro_f1", 4096)
    assert ours.p_value == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 40000))


def test_permutation_finds_a_clear_gain_and_not_a_loss():
    from ratchet.stats import paired_permutation

    rng = np.random.default_rng(0)
    labels = [f"c{i}" for i in range(10)]
    y = [str(x) for x in rng.choice(labels, 500)]
    strong, weak = _noisy(y, 0.9, rng, labels), _noisy(y, 0.75, rng, labels)
    for metric in ("macro_f1", "accuracy"):
        win = paired_permutation(y, strong, weak, metric=metric, resamples=999)
        assert win.diff > 0.1 and win.p_value == pytest.approx(1 / 1000)
        assert paired_permutation(y, weak, strong, metric=metric, resamples=999).p_value > 0.99


def test_permutation_is_symmetric():
    # Swapping every pair negates the statistic, so the null is symmetric about 0, and the
    # two one-sided p-values of (a, b) and (b, a) add up to 1 plus the chance of a tie.
    from ratchet.stats import paired_permutation

    rng = np.random.default_rng(4)
    labels = [f"c{i}" for i in range(6)]
    y = [str(x) for x in rng.choice(labels, 300)]
    a, b = _noisy(y, 0.8, rng, labels), _noisy(y, 0.78, rng, labels)
    ab = paired_permutation(y, a, b, resamples=20000, seed=1)
    ba = paired_permutation(y, b, a, resamples=20000, seed=2)
    assert ab.diff == pytest.approx(-ba.diff)
    assert abs(np.mean(ab.null)) < 0.1 * np.std(ab.null)
    assert np.quantile(ab.null, 0.05) == pytest.approx(-np.quantile(ab.null, 0.95),
                                                      abs=0.1 * np.std(ab.null))
    tie = np.mean(np.isclose(ab.null, ab.diff))
    assert ab.p_value + ba.p_value == pytest.approx(1 + tie, abs=0.02)


def test_permutation_p_values_are_uniform_under_exchangeable_predictions():
    # Both predictions of each row drawn from one noisy process: exactly the permutation
    # test's H0. Its p-values must then be (close to) uniform: P(p <= a) ~ a.
    from ratchet.stats import paired_permutation

    rng = np.random.default_rng(7)
    labels = [f"c{i}" for i in range(12)]
    draws = 400
    p = np.empty(draws)
    for i in range(draws):
        y = [str(x) for x in rng.choice(labels, 150)]
        p[i] = paired_permutation(y, _noisy(y, 0.7, rng, labels), _noisy(y, 0.7, rng, labels),
                                  resamples=199, seed=i).p_value
    for level in (0.05, 0.2, 0.5):
        se = np.sqrt(level * (1 - level) / draws)
        assert np.mean(p <= level) == pytest.approx(level, abs=3 * se)


def test_permutation_handles_empty_identical_and_bad_input():
    from ratchet.stats import paired_permutation

    empty = paired_permutation([], [], [])
    assert empty.n == 0 and np.isnan(empty.p_value) and np.isnan(empty.diff)
    y = ["a", "b", "c"] * 10
    pred = ["a", "a", "c"] * 10
    for metric in ("macro_f1", "accuracy"):
        same = paired_permutation(y, pred, pred, metric=metric, resamples=200)
        assert same.diff == 0 and same.p_value == 1.0
    assert paired_permutation(y, y, y).p_value == 1.0
    with pytest.raises(ValueError, match="same length"):
        paired_permutation(["a"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_permutation(y, y, y, metric="f2")


def test_permutation_is_seeded():
    from ratchet.stats import paired_permutation

    rng = np.random.default_rng(2)
    labels = ["a", "b", "c"]
    y = [str(x) for x in rng.choice(labels, 100)]
    a, b = _noisy(y, 0.8, rng, labels), _noisy(y, 0.7, rng, labels)
    one, two = (paired_permutation(y, a, b, seed=5) for _ in range(2))
    assert np.array_equal(one.null, two.null) and one.p_value == two.p_value


# ---------------------------------------------------------------- normal-approximation tail


def test_normal_tail_p_value_follows_the_bootstrap_se_and_can_go_below_the_floor():
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    labels = [f"c{i}" for i in range(5)]
    y = [str(x) for x in rng.choice(labels, 300)]
    good, bad = _noisy(y, 0.9, rng, labels), _noisy(y, 0.5, rng, labels)
    boot = bootstrap(y, bad, good, resamples=500)
    expected = norm.cdf((boot.diff + 0.02) / np.std(boot.dist, ddof=1))
    assert boot.p_above_normal(-0.02) == pytest.approx(expected)
    assert boot.p_above_normal(-0.02) < 1e-6 < boot.p_above(-0.02)  # below 1/(B+1)
    # Far inside the margin it says "no evidence of harm".
    assert bootstrap(y, good, bad, resamples=500).p_above_normal(-0.02) > 0.99


def test_normal_tail_without_spread_and_empty():
    y = ["a", "b"] * 20
    wrong = ["b", "a"] * 20
    boot = bootstrap(y, wrong, y, resamples=200)  # candidate always wrong: diff -1, no spread
    assert boot.se == 0 and boot.p_above_normal(-0.02) == 0.0
    same = bootstrap(y, y, y, resamples=200)
    assert same.p_above_normal(-0.02) == 1.0
    assert np.isnan(bootstrap([], [], []).p_above_normal(-0.02))


def test_harm_p_value_needs_more_than_a_few_lost_rows_and_can_go_below_holm():
    from ratchet.stats import harm_p_value

    labels = list("abcde")
    y = [labels[i % 5] for i in range(30)]

    def lost(k):  # the candidate wrong on k of 30 rows the champion gets right
        cand = [labels[(i + 1) % 5] if i < k else t for i, t in enumerate(y)]
        boot = bootstrap(y, cand, y, resamples=2000)
        return boot, harm_p_value(y, cand, y, boot, margin=-0.02, resolution=0.05 / 150 / 10)

    boot, p = lost(10)
    # Equal models lose all of 10 discordant rows with chance 2^-10: the p-value says so,
    # though the bootstrap's normal tail alone is below it.
    assert p == pytest.approx(2.0**-10, rel=0.5) and boot.p_above_normal(-0.02) < p
    boot, p = lost(30)  # wrong everywhere: clear harm, resolved below alpha / 150 domains
    assert p < 0.05 / 150 and p > 0
    assert lost(0)[1] == 1.0
    assert np.isnan(harm_p_value([], [], [], bootstrap([], [], []), margin=-0.02,
                                 resolution=1e-4))
