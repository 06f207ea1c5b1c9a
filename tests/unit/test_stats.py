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


# ---------------------------------------------------------------- bounded memory


def _whole_matrix_bootstrap(y, a, b, *, metric, resamples, seed, weights=None):
    """The bootstrap as it was before it ran in blocks (48e5dc0): every resample drawn at once
    as one (resamples x types) matrix, scored by (types x classes) one-hot products."""
    yy, pc, pb = _encode(y, a, b)
    n, n_classes = len(yy), int(max(yy.max(), pc.max(), pb.max())) + 1
    rng = np.random.default_rng(seed)

    def onehot(v):
        out = np.zeros((len(v), n_classes), dtype=np.float32)
        out[np.arange(len(v)), v] = 1
        return out

    def f1(counts, ty, tp_):
        truth, pred = onehot(ty), onehot(tp_)
        tp = counts @ (truth * (ty == tp_)[:, None])
        support = counts @ truth + counts @ pred
        present = support > 0
        f = np.divide(2 * tp, support, out=np.zeros_like(tp), where=present)
        return f.sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    if weights is None:
        keys = np.stack([pc == yy, pb == yy] if metric == "accuracy" else [yy, pc, pb], axis=1)
        types, freq = np.unique(keys.astype(np.int64), axis=0, return_counts=True)
        ty, tc, tb = (types[:, 0], types[:, 1], None) if metric == "accuracy" else types.T
        type_w = np.ones(len(types), dtype=np.float32)
    else:
        ty, tc, tb = yy, pc, pb
        freq, type_w = np.ones(n, dtype=np.int64), np.asarray(weights, dtype=np.float32)
    counts = rng.multinomial(n, freq / n, size=resamples).astype(np.float32) * type_w
    if metric == "accuracy":
        if weights is None:
            right_c, right_b = ty.astype(np.float32), tc.astype(np.float32)
        else:
            right_c, right_b = (pc == yy).astype(np.float32), (pb == yy).astype(np.float32)
        total = counts.sum(axis=1)
        return (counts @ right_c / total - counts @ right_b / total).astype(np.float64)
    return (f1(counts, ty, tc) - f1(counts, ty, tb)).astype(np.float64)


def _data(seed, n, classes):
    rng = np.random.default_rng(seed)
    labels = [f"c{i}" for i in range(classes)]
    y = [str(x) for x in rng.choice(labels, n)]
    return y, _noisy(y, 0.8, rng, labels), _noisy(y, 0.7, rng, labels), rng


@pytest.mark.parametrize("block_bytes", [64, 4096, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_bootstrap_gives_the_numbers_of_the_whole_matrix_one(seed, block_bytes,
                                                                      monkeypatch):
    """Drawn a block at a time, the resamples are the ones drawing them all at once gave (the
    same seed, the same stream): unweighted exactly the same numbers, weighted the same to
    float32 rounding (the old code summed float32 weights, the new one float64)."""
    import ratchet.stats as stats

    if block_bytes is not None:
        monkeypatch.setattr(stats, "BLOCK_BYTES", block_bytes)
    y, a, b, rng = _data(seed, 300, 7)
    w = rng.random(300) * 3
    for metric in ("macro_f1", "accuracy"):
        new = bootstrap(y, a, b, metric=metric, resamples=250, seed=seed)
        assert np.array_equal(new.dist, _whole_matrix_bootstrap(
            y, a, b, metric=metric, resamples=250, seed=seed))
        weighted = stats.bootstraps(y, a, b, resamples=250, seed=seed, weights=w)[metric]
        old = _whole_matrix_bootstrap(y, a, b, metric=metric, resamples=250, seed=seed,
                                      weights=w)
        assert np.allclose(weighted.dist, old, atol=1e-5)
        assert weighted.diff == pytest.approx(
            bootstrap(y, a, b, metric=metric, resamples=10, seed=seed, weights=w).diff)


def _whole_matrix_permutation_null(y, a, b, *, resamples, seed):
    """The macro-F1 permutation null as one (resamples x rows) swap matrix, scored directly."""
    yy, pc, pb = _encode(y, a, b)
    n_classes = int(max(yy.max(), pc.max(), pb.max())) + 1
    rng = np.random.default_rng(seed)
    diff = pc != pb
    types, inverse, freq = np.unique(np.stack([yy, pc, pb], axis=1)[diff], axis=0,
                                     return_inverse=True, return_counts=True)
    swaps = rng.binomial(freq, 0.5, size=(resamples, len(types)))
    null = np.empty(resamples)
    for r in range(resamples):
        # Swap the first swaps[r, t] rows of each type t (rows of a type are interchangeable).
        x, z = pc.copy(), pb.copy()
        rows = np.flatnonzero(diff)
        for t in range(len(types)):
            members = rows[inverse.ravel() == t][: swaps[r, t]]
            x[members], z[members] = pb[members], pc[members]
        null[r] = (macro_f1_rows(yy[None], x[None], n_classes)
                   - macro_f1_rows(yy[None], z[None], n_classes))[0]
    return null


@pytest.mark.parametrize("block_bytes", [64, None])
def test_blocked_permutation_gives_the_numbers_of_the_whole_matrix_one(block_bytes, monkeypatch):
    import ratchet.stats as stats

    if block_bytes is not None:
        monkeypatch.setattr(stats, "BLOCK_BYTES", block_bytes)
    y, a, b, _ = _data(4, 120, 5)
    perm = stats.paired_permutation(y, a, b, resamples=60, seed=4)
    assert np.allclose(perm.null, _whole_matrix_permutation_null(y, a, b, resamples=60, seed=4),
                       atol=1e-12)


@pytest.mark.parametrize("kind", ["weighted", "macro_f1", "permutation"])
def test_resampling_memory_grows_with_rows_not_resamples_x_rows(kind):
    """300 resamples of 40,000 rows: one (resamples x rows) or (resamples x types) array of
    int64 is 96 MB (2,000 x 200k was 3.2 GB); the blocked code stays under a quarter of it,
    numpy's allocations counted by tracemalloc (the label lists exist before it starts)."""
    import tracemalloc

    import ratchet.stats as stats

    n, resamples, budget = 40_000, 300, 20 * 2**20
    rng = np.random.default_rng(0)
    labels = [f"c{i}" for i in range(40)]
    # Random predictions: tens of thousands of (truth, candidate, champion) types.
    y, a, b = ([str(x) for x in rng.choice(labels, n)] for _ in range(3))
    w = rng.random(n) + 0.5
    assert resamples * n * 8 >= 4 * budget
    tracemalloc.start()
    try:
        if kind == "weighted":
            out = stats.bootstrap(y, a, b, resamples=resamples, weights=w)
            assert out.dist.shape == (resamples,)
        elif kind == "macro_f1":
            assert stats.bootstrap(y, a, b, resamples=resamples).dist.shape == (resamples,)
        else:
            assert stats.paired_permutation(y, a, b, resamples=resamples).null.shape == (
                resamples,)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < budget, f"{kind}: peak {peak / 2**20:.0f} MB"
    print(f"{kind}: peak {peak / 2**20:.1f} MB")
