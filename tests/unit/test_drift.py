"""Drift statistics: quiet on same-source samples, loud on real shifts, calibrated, well-defined."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest

from ratchet.config import DriftConfig, TriggerConfig, parse_params
from ratchet.drift import (
    DriftInputError,
    Sample,
    detect,
    domain_classifier,
    effective_sample_size,
    holm,
    importance_weights,
    label_shift,
    length_shift,
    mmd_permutation_test,
    oov_shift,
    should_retrain,
    summary,
)
from ratchet.errors import ConfigError

WORDS = [f"w{i}" for i in range(300)]
NEW_WORDS = [f"new{i}" for i in range(300)]


def texts(rng: random.Random, n: int, words: list[str], length: tuple[int, int] = (4, 10)
          ) -> list[str]:
    return [" ".join(rng.choices(words, k=rng.randint(*length))) for _ in range(n)]


def labels(rng: random.Random, n: int, names: str, weights: list[float] | None = None
           ) -> list[str]:
    return rng.choices(list(names), weights=weights, k=n)


# --- label shift --------------------------------------------------------------------------


def test_label_shift_quiet_for_same_source_and_loud_for_a_shift():
    rng = random.Random(1)
    ref = labels(rng, 600, "abcdef")
    same = labels(rng, 300, "abcdef")
    shifted = labels(rng, 300, "abcdef", weights=[6, 1, 1, 1, 1, 1])
    quiet, loud = label_shift(ref, same), label_shift(ref, shifted)
    assert quiet.p_value > 0.05 and quiet.method == "asymptotic"
    assert loud.p_value < 1e-6
    assert 0 <= quiet.jsd < loud.jsd <= 1
    assert quiet.new_labels == [] and sum(loud.recent_counts) == 300


def test_label_shift_jsd_bounds_and_new_labels():
    assert label_shift(list("aabb"), list("abab")).jsd == pytest.approx(0.0)
    disjoint = label_shift(list("aabb"), list("ccdd"))
    assert disjoint.jsd == pytest.approx(1.0)
    assert disjoint.new_labels == ["c", "d"]


def test_sparse_label_tables_use_a_monte_carlo_p_value():
    rng = random.Random(2)
    names = [f"l{i}" for i in range(60)]
    ref, rec = rng.choices(names, k=400), rng.choices(names, k=30)
    res = label_shift(ref, rec, resamples=199, seed=0)
    assert res.method == "monte-carlo"
    assert 1 / 200 <= res.p_value <= 1
    assert res.p_value == label_shift(ref, rec, resamples=199, seed=0).p_value  # seeded


def test_label_shift_single_label_and_empty_inputs():
    one = label_shift(["a"] * 5, ["a"] * 3)
    assert (one.chi2, one.p_value, one.jsd) == (0.0, 1.0, 0.0)
    with pytest.raises(DriftInputError, match="recent labels sample has 0 rows"):
        label_shift(["a"], [])


# --- length and vocabulary --------------------------------------------------------------------


def test_length_shift():
    rng = np.random.default_rng(0)
    ref = rng.integers(3, 12, 500)
    assert length_shift(ref, rng.integers(3, 12, 200)).p_value > 0.05
    loud = length_shift(ref, rng.integers(10, 25, 200))
    assert loud.p_value < 1e-10 and loud.mean_recent > loud.mean_reference
    with pytest.raises(DriftInputError, match="reference lengths"):
        length_shift([], [1, 2])


def test_oov_quiet_for_same_vocabulary_and_loud_for_new_words():
    rng = random.Random(3)
    ref = texts(rng, 400, WORDS)
    quiet = oov_shift(ref, texts(rng, 200, WORDS))
    loud = oov_shift(ref, texts(rng, 100, WORDS) + texts(rng, 100, NEW_WORDS))
    assert quiet.p_value > 0.01
    assert loud.p_value < 1e-6
    assert loud.oov_rate > 0.4 > quiet.oov_rate
    assert quiet.heldout_oov_rate < 0.2


def test_oov_degenerate_inputs_give_nan():
    no_tokens = oov_shift(["a b", "c d"], ["", "   "])
    assert math.isnan(no_tokens.oov_rate) and math.isnan(no_tokens.p_value)
    one_ref = oov_shift(["a b"], ["a z"])
    assert one_ref.oov_rate == 0.5 and math.isnan(one_ref.p_value)
    with pytest.raises(DriftInputError, match="reference texts"):
        oov_shift([], ["a"])


# --- MMD ------------------------------------------------------------------------------------


def brute_mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """The unbiased estimator written out term by term, to check the vectorised one."""
    def k(a, b):
        return math.exp(-float(np.sum((a - b) ** 2)) / (2 * sigma**2))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_matches_the_unbiased_estimator_written_out():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    res = mmd_permutation_test(x, y, permutations=50, seed=0)
    assert res.mmd2 == pytest.approx(brute_mmd2(x, y, res.bandwidth), abs=1e-5)
    assert res.null.shape == (50,)


def test_mmd_quiet_for_same_source_and_loud_for_a_shift():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(150, 8))
    quiet = mmd_permutation_test(ref, rng.normal(size=(100, 8)), permutations=199, seed=0)
    loud = mmd_permutation_test(ref, rng.normal(0.6, 1.0, size=(100, 8)), permutations=199,
                                seed=0)
    assert quiet.p_value > 0.05
    assert loud.p_value == pytest.approx(1 / 200)
    assert loud.mmd2 > quiet.null.max()


def test_mmd_p_values_are_roughly_uniform_under_no_drift():
    rng = np.random.default_rng(2)
    ps = np.array([
        mmd_permutation_test(rng.normal(size=(25, 4)), rng.normal(size=(20, 4)),
                             permutations=99, seed=s).p_value
        for s in range(200)
    ])
    # Calibrated: about 10% below 0.1 and 50% below 0.5 (binomial noise of 200 trials allowed).
    assert 0.03 <= np.mean(ps <= 0.1) <= 0.17
    assert 0.38 <= np.mean(ps <= 0.5) <= 0.62


def test_mmd_is_seeded_and_handles_identical_points():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(15, 3))
    a = mmd_permutation_test(x, y, permutations=99, seed=7)
    b = mmd_permutation_test(x, y, permutations=99, seed=7)
    assert a.p_value == b.p_value and np.array_equal(a.null, b.null)
    same = mmd_permutation_test(np.ones((5, 2)), np.ones((4, 2)), permutations=20)
    assert same.bandwidth == 1.0 and same.mmd2 == pytest.approx(0.0, abs=1e-6)
    assert same.p_value == 1.0


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((1, 3)), np.zeros((5, 3)), "reference embedding sample has 1 rows"),
        (np.zeros((5, 3)), np.zeros((5, 4)), "same width"),
        (np.zeros(5), np.zeros(5), "2-D"),
    ],
)
def test_mmd_rejects_degenerate_inputs(x, y, match):
    with pytest.raises(DriftInputError, match=match):
        mmd_permutation_test(x, y, permutations=10)


# --- domain classifier and weights ------------------------------------------------------------


def test_domain_classifier_separates_shifted_embeddings_and_not_same_ones():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(200, 6))
    far = domain_classifier(ref, rng.normal(1.5, 1.0, size=(100, 6)), seed=0)
    near = domain_classifier(ref, rng.normal(size=(100, 6)), seed=0)
    assert far.auc > 0.95
    assert 0.3 < near.auc < 0.7
    assert far.prob_reference.shape == (200,) and far.prob_recent.shape == (100,)
    assert far.prob_recent.mean() > far.prob_reference.mean()


def test_weights_are_clipped_and_have_mean_one():
    p = np.array([1e-9, 0.01, 0.2, 0.5, 0.8, 0.99, 1.0])
    w = importance_weights(p, n_reference=100, n_recent=100, clip=(0.1, 10.0))
    assert w.mean() == pytest.approx(1.0)
    assert w.max() / w.min() == pytest.approx(100.0)  # both clips bind
    assert np.all(np.diff(w) >= 0)  # monotone in P(recent)
    assert effective_sample_size(w) < len(w)


def test_weights_remove_the_class_prior():
    # p equal to the recent share everywhere means no information: every weight is 1.
    w = importance_weights(np.full(10, 0.25), n_reference=300, n_recent=100, clip=(0.1, 10))
    assert np.allclose(w, 1.0)
    assert effective_sample_size(w) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("p", "clip", "match"),
    [
        (np.array([]), (0.1, 10), "non-empty"),
        (np.array([0.5, np.nan]), (0.1, 10), "NaN"),
        (np.array([0.5]), (0.0, 10), "weight clip"),
        (np.array([0.5]), (2.0, 1.0), "weight clip"),
    ],
)
def test_weights_reject_bad_inputs(p, clip, match):
    with pytest.raises(DriftInputError, match=match):
        importance_weights(p, n_reference=10, n_recent=10, clip=clip)


# --- combining and triggering -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("p_values", "rejected"),
    [
        ({"a": 0.01, "b": 0.04, "c": 0.03}, {"a"}),
        ({"a": 0.01, "b": 0.02, "c": 0.04}, {"a", "b", "c"}),
        ({"a": 0.2, "b": 0.3}, set()),
        ({"a": 0.03, "b": math.nan}, {"a"}),  # NaN is not a test: the family has one member
        ({"a": math.nan}, set()),
    ],
)
def test_holm(p_values, rejected):
    out = holm(p_values, 0.05)
    assert set(out) == set(p_values)
    assert {k for k, v in out.items() if v} == rejected


@pytest.mark.parametrize(
    ("mode", "drifted", "rows", "expected"),
    [
        ("always", False, 0, True),
        ("drift", True, 0, True),
        ("drift", False, 10_000, False),
        ("rows", True, 10, False),
        ("rows", False, 500, True),
        ("drift_or_rows", False, 10, False),
        ("drift_or_rows", True, 10, True),
        ("drift_or_rows", False, 500, True),
    ],
)
def test_trigger_policy(mode, drifted, rows, expected):
    trigger = TriggerConfig(mode=mode, min_new_rows=500)
    retrain, why = should_retrain(trigger, drifted=drifted, new_rows=rows, has_champion=True)
    assert retrain is expected and mode in why


def test_without_a_champion_the_trigger_always_retrains():
    retrain, why = should_retrain(TriggerConfig(mode="drift"), drifted=False, new_rows=0,
                                  has_champion=False)
    assert retrain and "no champion" in why


def test_trigger_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="drift.trigger.mode"):
        parse_params({"drift": {"trigger": {"mode": "sometimes"}}})
    with pytest.raises(ConfigError, match="did you mean `min_new_rows`"):
        parse_params({"drift": {"trigger": {"min_rows": 3}}})
    with pytest.raises(ConfigError, match="weight_min must not exceed weight_max"):
        parse_params({"drift": {"weight_min": 5.0, "weight_max": 2.0}})
    with pytest.raises(ConfigError, match="permutations must be at least 399 for alpha 0.01"):
        parse_params({"drift": {"permutations": 100}})


# --- all together -----------------------------------------------------------------------------


def test_detect_combines_tests_and_summary_says_drift():
    rng, nrng = random.Random(5), np.random.default_rng(5)
    cfg = DriftConfig(permutations=499)
    ref = Sample(texts(rng, 300, WORDS), labels(rng, 300, "abc"), nrng.normal(size=(300, 5)))
    same = Sample(texts(rng, 150, WORDS), labels(rng, 150, "abc"), nrng.normal(size=(150, 5)))
    moved = Sample(texts(rng, 150, WORDS), labels(rng, 150, "abc"),
                   nrng.normal(0.8, 1.0, size=(150, 5)))
    quiet, _ = detect(ref, same, cfg)
    loud, arrays = detect(ref, moved, cfg)
    assert quiet["tests"] == ["label", "length", "mmd", "oov"]
    assert not quiet["drifted"] and summary(quiet).startswith("no drift")
    # Only the embeddings moved: the MMD test alone carries the verdict.
    assert loud["drifted"] and loud["drifted_by"] == ["mmd"] and loud["domain_auc"] > 0.8
    assert summary(loud).startswith("DRIFT (mmd)")
    assert set(arrays) >= {"mmd", "domain", "label"}
    without, _ = detect(Sample(ref.texts, ref.labels), Sample(moved.texts, moved.labels), cfg)
    assert "mmd" not in without["tests"] and "domain_auc" not in without


def test_drift_stage_writes_report_plot_and_weights(tmp_path):
    """The stage end to end with the tiny encoder: weights for every test row, mean 1."""
    from tasks.drift import run

    rng = random.Random(6)
    data = tmp_path / "prepared"
    data.mkdir()
    for split, n in (("train", 120), ("val", 30), ("test", 40)):
        n_rec = n // 3
        pd.DataFrame({
            "text": texts(rng, n - n_rec, WORDS) + texts(rng, n_rec, NEW_WORDS),
            "label": labels(rng, n - n_rec, "ab") + labels(rng, n_rec, "bc"),
            "slice": ["reference"] * (n - n_rec) + ["recent"] * n_rec,
        }).to_parquet(data / f"{split}.parquet")
    champion = tmp_path / "champion.json"
    champion.write_text('{"name": null, "version": null, "fingerprint": null}')
    params = parse_params({"model": {"source": "tiny"},
                           "drift": {"permutations": 399, "max_rows": 60,
                                     "trigger": {"mode": "drift"}}})
    out = tmp_path / "out"
    report = run(params, data=data, champion=champion, report=out / "drift.json",
                 plot_path=out / "drift.png", weights=out / "weights.parquet")
    assert report["drifted"] and report["summary"].startswith("DRIFT")
    assert report["retrain"] and "no champion" in report["retrain_reason"]
    assert report["encoder"] == "base model `tiny`"
    weights = pd.read_parquet(out / "weights.parquet")
    test = pd.read_parquet(data / "test.parquet")
    assert weights["text"].tolist() == test["text"].tolist()
    assert weights["weight"].mean() == pytest.approx(1.0)
    assert weights.groupby("slice")["weight"].mean()["recent"] > 1
    assert (out / "drift.png").stat().st_size > 10_000


def _prepared(folder, rng, sizes, recent_words=NEW_WORDS, start=0):
    folder.mkdir(exist_ok=True)
    for split, n in sizes.items():
        n_rec = n // 3
        pd.DataFrame({
            "text": [f"{t} r{start}x{i}" for i, t in enumerate(
                texts(rng, n - n_rec, WORDS) + texts(rng, n_rec, recent_words))],
            "label": labels(rng, n - n_rec, "ab") + labels(rng, n_rec, "bc"),
            "slice": ["reference"] * (n - n_rec) + ["recent"] * n_rec,
        }).to_parquet(folder / f"{split}.parquet")


def test_drift_embeds_a_bounded_sample_and_each_text_once_across_runs(tmp_path):
    """With the tiny encoder: at most 2 x max_rows + weight_rows rows embedded, only sampled
    test rows weighted; a second run over the same rows embeds nothing and gives the same
    numbers; a new batch costs only its own rows."""
    from tasks.drift import run

    rng = random.Random(8)
    data, cache, out = tmp_path / "prepared", tmp_path / "cache", tmp_path / "out"
    _prepared(data, rng, {"train": 300, "val": 60, "test": 150})
    champion = tmp_path / "champion.json"
    champion.write_text('{"name": null, "version": null, "fingerprint": null}')
    params = parse_params({"model": {"source": "tiny"},
                           "drift": {"permutations": 399, "max_rows": 40, "weight_rows": 50}})

    def once() -> tuple[dict, pd.DataFrame]:
        report = run(params, data=data, champion=champion, report=out / "drift.json",
                     plot_path=out / "drift.png", weights=out / "weights.parquet", cache=cache)
        return report, pd.read_parquet(out / "weights.parquet")

    first, w1 = once()
    assert first["embedding"]["rows"] <= 2 * 40 + 50
    assert first["embedding"]["embedded"] == first["embedding"]["rows"] > 0
    assert len(w1) == 150 and (w1["weight"] > 0).sum() == 50 == first["weights_n"]
    assert w1.loc[w1["weight"] > 0, "weight"].mean() == pytest.approx(1.0)
    assert w1.loc[w1["weight"] == 0, "prob_recent"].isna().all()
    second, w2 = once()
    assert second["embedding"] == {**first["embedding"], "embedded": 0,
                                   "cached": first["embedding"]["rows"]}
    pd.testing.assert_frame_equal(w1, w2)
    assert second["mmd_p"] == first["mmd_p"] and second["domain_auc"] == first["domain_auc"]

    # A new batch: the old recent rows join reference, 60 new rows arrive (20 recent in test).
    old = {s: pd.read_parquet(data / f"{s}.parquet").assign(slice="reference")
           for s in ("train", "val", "test")}
    _prepared(tmp_path / "new", rng, {"train": 90, "val": 30, "test": 60}, start=1)
    new_rows = 0
    for s in ("train", "val", "test"):
        fresh = pd.read_parquet(tmp_path / "new" / f"{s}.parquet")
        fresh = fresh[fresh["slice"] == "recent"]
        new_rows += len(fresh)
        pd.concat([old[s], fresh], ignore_index=True).to_parquet(data / f"{s}.parquet")
    third, _ = once()
    assert 0 < third["embedding"]["embedded"] <= new_rows < third["embedding"]["rows"]


def test_embeddings_of_a_fallback_encoder_are_cached_as_the_base_models(tmp_path, monkeypatch):
    """A champion whose encoder cannot be loaded: drift embeds with the base model, and the
    cache files those embeddings under the base model's key, never under the champion's."""
    from ratchet.embed import encoder_key
    from tasks.drift import embed_rows

    monkeypatch.chdir(tmp_path)
    # A tracking server that does not answer: the champion cannot be downloaded.
    params = parse_params({"model": {"source": "tiny"},
                           "registry": {"tracking_uri": "http://127.0.0.1:9", "timeout_s": 0.2}})
    champ = {"name": "absent-model", "version": "7", "fingerprint": "f00d"}
    sentences = ["book a flight", "what is my balance", "play jazz"]
    vectors, encoder, counts = embed_rows(params, champ, sentences, tmp_path / "cache")
    assert "not loadable" in encoder and counts["embedded"] == 3
    assert counts["encoder_key"] == encoder_key(params, {}) != encoder_key(params, champ)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [encoder_key(params, {})]
    again, _, counts = embed_rows(params, champ, sentences, tmp_path / "cache")
    assert counts["embedded"] == 0 and np.array_equal(again, vectors)


# --- evaluate: drift-weighted metrics ---------------------------------------------------------


def test_weighted_scores_follow_the_weights():
    from ratchet.metrics import compute

    def weighted_scores(refs, preds, w):
        return compute(preds, refs, sample_weight=w)

    refs, preds = ["a", "a", "b", "b"], ["a", "b", "b", "b"]
    even = weighted_scores(refs, preds, np.ones(4))
    assert even["accuracy"] == pytest.approx(0.75)
    # All weight on the row the model gets wrong and one it gets right: accuracy 1/2.
    tilted = weighted_scores(refs, preds, np.array([0.0, 1.0, 1.0, 0.0]))
    assert tilted["accuracy"] == pytest.approx(0.5)
    assert tilted["macro_f1"] < even["macro_f1"]
    assert all(math.isnan(v) for v in weighted_scores([], [], np.array([])).values())


def test_the_weighted_slice_is_the_rows_the_drift_stage_weighted():
    """Drift weights a sample of the test rows and gives the rest 0: the weighted slice and its
    bootstrap are those rows, the same numbers as a frame holding only them."""
    from ratchet.evaluation import score

    rng = np.random.default_rng(2)
    n = 400
    y = rng.choice(list("abcd"), n)
    frame = pd.DataFrame({
        "label": y, "slice": np.where(np.arange(n) < 300, "reference", "recent"),
        "candidate": np.where(rng.random(n) < 0.8, y, rng.choice(list("abcd"), n)),
        "champion": np.where(rng.random(n) < 0.7, y, rng.choice(list("abcd"), n)),
        "weight": np.where(rng.random(n) < 0.4, rng.gamma(2.0, 0.5, n), 0.0),
    })
    params = parse_params({"evaluate": {"bootstrap_resamples": 300}})
    out = score(frame, params)
    kept = score(frame[frame["weight"] > 0].reset_index(drop=True), params)
    assert out["n/weighted"] == (frame["weight"] > 0).sum() < n
    for key in ("candidate/weighted/macro_f1", "diff/weighted/macro_f1",
                "diff/weighted/macro_f1_low", "diff/weighted/accuracy_high",
                "test/weighted/p_value", "ess/weighted"):
        assert out[key] == kept[key], key


def test_weights_must_belong_to_the_test_rows(tmp_path):
    from ratchet.errors import RatchetError
    from ratchet.evaluation import load_test_weights

    test = pd.DataFrame({"text": ["x", "y"], "label": ["a", "b"]})
    path = tmp_path / "weights.parquet"
    pd.DataFrame({"row": [0, 1], "text": ["x", "y"], "weight": [0.5, 1.5]}).to_parquet(path)
    assert load_test_weights(path, test).tolist() == [0.5, 1.5]
    pd.DataFrame({"row": [0], "text": ["x"], "weight": [1.0]}).to_parquet(path)
    with pytest.raises(RatchetError, match="re-run the drift stage"):
        load_test_weights(path, test)


def test_a_saved_classifier_directory_embeds_with_its_own_encoder(tmp_path):
    """The champion path: the encoder inside a classifier directory, head dropped, same numbers."""
    import torch

    from ratchet.embed import embed, load_dir_encoder
    from ratchet.models import load_tokenizer
    from tests.conftest import save_tiny_classifier

    clf = save_tiny_classifier(tmp_path)
    tok = load_tokenizer("tiny")
    encoder, tok2 = load_dir_encoder(tmp_path)
    sentences = ["book a flight to paris", "what is my balance", "hi"]
    ours = embed(sentences, encoder, tok2, max_length=16, batch_size=2)
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = clf.eval().bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = ((states * mask).sum(1) / mask.sum(1)).numpy()
    assert ours.shape == (3, 64)
    assert np.allclose(ours, expected, atol=1e-5)


def test_a_skipped_run_records_why_and_registers_nothing():
    from flows.retrain import skipped_markdown
    from ratchet.workspace import skipped_decision

    drift = {"retrain": False, "summary": "no drift: labels JSD 0.01",
             "retrain_reason": "trigger mode `drift`: no significant drift"}
    record = skipped_decision(drift, {"name": "m", "version": "3"}, ["augment", "gate"])
    assert record["decision"] == "skipped" and record["version"] is None
    assert record["champion_before"] == record["champion_after"] == "3"
    assert "no significant drift" in record["checks"][0]["reason"]
    text = skipped_markdown(record, {"drift": 1.5})
    assert "Gate decision: **skipped**" in text and "augment, gate" in text
