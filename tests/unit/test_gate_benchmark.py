"""The gate benchmark's case generator, calibration and baseline rules, on synthetic labels."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import gate

CLASSES = 20


def noisy(y: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on about `accuracy` of the rows, a random other class elsewhere."""
    wrong = rng.random(len(y)) > accuracy
    return np.where(wrong, (y + rng.integers(1, CLASSES, len(y))) % CLASSES, y)


def top2_of(pred: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible top-2: the prediction, then the truth when wrong or another class when right."""
    other = (pred + rng.integers(1, CLASSES, len(pred))) % CLASSES
    return np.stack([pred, np.where(pred == y, other, y)], axis=1)


def test_fix_and_break_change_exactly_the_first_k_rows_in_order():
    y = np.array([0, 1, 2, 3, 4, 5])
    pred = np.array([0, 2, 2, 0, 4, 0])  # wrong at 1, 3, 5
    order = np.array([5, 4, 3, 2, 1, 0])
    fixed = gate.fix_errors(pred, y, order, 2)
    assert fixed.tolist() == [0, 2, 2, 3, 4, 5]  # rows 5 then 3: first errors in `order`
    broken = gate.break_answers(pred, y, np.full(6, 9), order, 2)
    assert broken.tolist() == [0, 2, 9, 0, 9, 0]  # rows 4 then 2: first right answers
    assert gate.fix_errors(pred, y, order, 99).tolist() == y.tolist()
    assert pred.tolist() == [0, 2, 2, 0, 4, 0]  # inputs untouched


def test_most_likely_wrong_is_never_the_truth():
    y = np.array([0, 1, 2])
    top = np.array([[0, 5], [7, 1], [8, 9]])
    assert gate.most_likely_wrong(top, y).tolist() == [5, 7, 8]


def test_calibration_hits_the_target_gaps_on_a_held_out_pool():
    rng = np.random.default_rng(0)
    y_cal, y_sim = rng.integers(0, CLASSES, 3000), rng.integers(0, CLASSES, 3000)
    champ_cal, champ_sim = noisy(y_cal, 0.9, rng), noisy(y_sim, 0.9, rng)
    cand_cal = top2_of(noisy(y_cal, 0.9, rng), y_cal, rng)
    cand_sim = top2_of(noisy(y_sim, 0.9, rng), y_sim, rng)
    draws = rng.integers(0, 3000, (100, 1000))
    cal = gate.calibrate_pair(y_cal, champ_cal, cand_cal, draws, CLASSES, rng)
    assert cal["improved_gap"] == pytest.approx(gate.TARGET_GAIN, abs=0.002)
    assert cal["degraded_gap"] == pytest.approx(gate.TARGET_FORGET, abs=0.002)
    assert 0 < cal["fix_share"] < 1 and 0 < cal["break_share"] < 1
    # The shares carry over to another pool of the same population (up to pool noise).
    models = gate.scenario_models(cand_sim, y_sim, fix_share=cal["fix_share"],
                                  break_share=cal["break_share"], rng=rng)
    base_gap = gate.mean_gap(y_sim, models["trained"], champ_sim, draws, CLASSES)
    better = gate.mean_gap(y_sim, models["improved"], champ_sim, draws, CLASSES) - base_gap
    worse = gate.mean_gap(y_sim, models["degraded"], champ_sim, draws, CLASSES) - base_gap
    assert better == pytest.approx(gate.TARGET_GAIN - cal["trained_gap"], abs=0.01)
    assert worse == pytest.approx(gate.TARGET_FORGET - cal["trained_gap"], abs=0.01)
    assert np.sum(models["improved"] == y_sim) > np.sum(models["trained"] == y_sim)
    assert np.sum(models["degraded"] == y_sim) < np.sum(models["improved"] == y_sim)


def test_cases_are_seeded_and_sized():
    a = gate.draw_case(np.random.default_rng([0, 1]), 50, 30, 20)
    b = gate.draw_case(np.random.default_rng([0, 1]), 50, 30, 20)
    c = gate.draw_case(np.random.default_rng([0, 2]), 50, 30, 20)
    assert [len(x) for x in a] == [30, 20]
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert all(x.min() >= 0 and x.max() < 50 for x in a)


def test_naive_and_mlflow_rules():
    assert gate.naive_rule(0.901, 0.9) and not gate.naive_rule(0.9, 0.9)
    # MLflow: candidate >= baseline + min_absolute_change, and >= the absolute threshold.
    assert gate.mlflow_rule(0.93, 0.90, min_delta=0.01, floor=0.5)
    assert not gate.mlflow_rule(0.905, 0.90, min_delta=0.01, floor=0.5)
    assert not gate.mlflow_rule(0.45, 0.40, min_delta=0.01, floor=0.5)


def test_skipped_without_the_data(monkeypatch, tmp_path):
    monkeypatch.setattr(gate, "DATA", tmp_path / "absent")
    assert "skipped" in gate.run()


def test_rare_slices_leave_many_classes_with_one_or_two_rows():
    y = np.repeat(np.arange(150), 30)
    rng = np.random.default_rng(0)
    for n in (300, 1000):
        rare = np.bincount(y[gate.type1_rows(rng, y, "rare", n, 150)], minlength=150)
        uniform = np.bincount(y[gate.type1_rows(rng, y, "uniform", n, 150)], minlength=150)
        assert np.sum((rare >= 1) & (rare <= 2)) >= 30
        assert rare.max() > 3 * uniform.max()  # a skewed mix: a few heavy classes
    # At 1,000 rows a uniform slice has ~7 rows per class; the skewed mix still leaves many
    # classes with 1-2.
    assert np.sum((rare >= 1) & (rare <= 2)) > 4 * np.sum((uniform >= 1) & (uniform <= 2))
    a = gate.type1_rows(np.random.default_rng([1]), y, "rare", 50, 150)
    assert np.array_equal(a, gate.type1_rows(np.random.default_rng([1]), y, "rare", 50, 150))
    with pytest.raises(ValueError, match="kind"):
        gate.type1_rows(rng, y, "skewed", 10, 150)


def test_rates_count_rejections_of_the_test_and_of_the_check():
    from ratchet.config import Params

    params = Params()
    rows = [{"permutation": 0.01, "gain": 0.02, "null_sd": 0.01},   # rejected, large gain
            {"permutation": 0.01, "gain": 0.005, "null_sd": 0.01},  # rejected, gain too small
            {"permutation": 0.5, "gain": 0.02, "null_sd": 0.01},
            {"permutation": 0.9, "gain": -0.01, "null_sd": 0.01}]
    out = gate._rates(rows, params)
    assert out["permutation"] == {"test": 0.5, "check": 0.25}
    assert "bootstrap" not in out and out["cases"] == 4
    assert out["se"] == pytest.approx(np.sqrt(0.05 * 0.95 / 4), abs=1e-4)
    assert out["target"] == pytest.approx(0.05 + 2 * out["se"], abs=1e-4)


def test_recent_tests_are_the_p_value_score_reports():
    import pandas as pd

    from ratchet.config import Params
    from ratchet.evaluation import score

    params = Params()
    rng = np.random.default_rng(3)
    y = rng.integers(0, CLASSES, 200)
    names = np.array([f"c{i}" for i in range(CLASSES)], dtype=object)
    refs, cand, champ = (names[a].tolist() for a in (y, noisy(y, 0.9, rng), noisy(y, 0.85, rng)))
    found = gate.recent_tests(refs, cand, champ, params)
    metrics = score(pd.DataFrame({"label": refs, "candidate": cand, "champion": champ,
                                  "slice": "recent"}), params)
    assert found[gate.RECENT_TEST] == metrics["test/recent/p_value"]
    assert found["boot_gain"] == metrics["diff/recent/macro_f1"]


def test_type1_section_on_synthetic_models(monkeypatch):
    from ratchet.config import Params

    monkeypatch.setattr(gate, "TYPE1_CASES", 12)
    monkeypatch.setattr(gate, "TYPE1_CONTROL_CASES", 6)
    monkeypatch.setattr(gate, "POWER_CASES", 6)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(CLASSES), 50)
    preds = {s: {"test": top2_of(noisy(y, 0.9, rng), y, rng)} for s in range(4)}
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    candidates = {p: {"improved": gate.fix_errors(preds[p[1]]["test"][:, 0], y,
                                                  rng.permutation(len(y)), 40)} for p in pairs}
    names = np.array([f"c{i}" for i in range(CLASSES)], dtype=object)
    out = gate.type1(y, names, preds, pairs, candidates, Params())
    assert set(out["type1"]) == {"100", "300", "1000"}
    detail = out["type1_detail"]
    for kind in gate.TYPE1_KINDS:
        for n in ("100", "300", "1000"):
            cell = detail[kind][n]
            assert cell["cases"] == 12 and cell["control"]["cases"] == 6
            for test in ("bootstrap", "permutation"):
                assert 0 <= cell[test]["check"] <= cell[test]["test"] <= 1
    assert out["type1"]["300"] == detail["uniform"]["300"][gate.RECENT_TEST]["check"]
    # The better candidate is found more often than the equal ones at the largest size.
    assert (detail["power_better"]["1000"]["permutation"]["test"]
            >= detail["uniform"]["1000"]["permutation"]["test"])


def test_mlflow_two_sided_adds_a_reference_bound_at_the_champion_minus_the_margin():
    kw = {"min_delta": 0.01, "floor": 0.5, "max_regression": 0.02}
    assert gate.mlflow_two_sided_rule(0.93, 0.90, 0.89, 0.90, **kw)  # loses 1 pt: within
    assert gate.mlflow_two_sided_rule(0.93, 0.90, 0.875, 0.895, **kw)  # exactly the margin
    assert not gate.mlflow_two_sided_rule(0.93, 0.90, 0.87, 0.90, **kw)  # loses 3 pts
    assert not gate.mlflow_two_sided_rule(0.905, 0.90, 0.95, 0.90, **kw)  # recent gain too small
    assert not gate.mlflow_two_sided_rule(0.45, 0.40, 0.95, 0.90, **kw)  # below the floor
    # numpy scores, as the simulation passes them (MLflow wants a plain number as threshold).
    assert gate.mlflow_two_sided_rule(*np.array([0.93, 0.90, 0.89, 0.90]), **kw)
    # The recent half is exactly the one-sided rule's.
    assert gate.mlflow_rule(0.93, 0.90, min_delta=0.01, floor=0.5)


def test_the_adversary_loses_at_most_what_it_is_given_and_gains_what_it_is_asked():
    rng = np.random.default_rng(5)
    y = rng.integers(0, CLASSES, 2000)
    top = top2_of(noisy(y, 0.93, rng), y, rng)
    pred, runner_up = top[:, 0], gate.most_likely_wrong(top, y)
    base = gate.f1_of(y, pred, CLASSES)
    for loss in (0.0, 0.004, 0.013, 0.02):
        broken = gate.break_to_loss(pred, y, runner_up, rng.permutation(len(y)), loss, CLASSES)
        lost = base - gate.f1_of(y, broken, CLASSES)
        assert 0 <= lost <= loss + 1e-12 and lost >= loss - 0.002
        assert np.all(broken[broken != pred] != y[broken != pred])  # only right answers broken
    fixed = gate.fix_to_gain(pred, y, rng.permutation(len(y)), 0.02, CLASSES)
    assert gate.f1_of(y, fixed, CLASSES) - base == pytest.approx(0.02, abs=0.002)


def _sequence(rules, params, seq=0, rounds=6):
    rng = np.random.default_rng(11)
    y_rec, y_ref = rng.integers(0, CLASSES, 1500), rng.integers(0, CLASSES, 1500)
    top = top2_of(noisy(y_ref, 0.95, rng), y_ref, rng)
    names = np.array([f"c{i}" for i in range(CLASSES)], dtype=object)
    return gate.long_horizon_sequence(
        seq, y_recent=y_rec, y_reference=y_ref, base_recent=noisy(y_rec, 0.95, rng),
        base_reference=top[:, 0], runner_up=gate.most_likely_wrong(top, y_ref), names=names,
        params=params, rounds=rounds, n_recent=800, n_reference=800, rules=rules)


def test_long_horizon_creeps_without_a_floor_and_the_ratchet_holds():
    from ratchet.config import Params

    params = Params.model_validate({"evaluate": {"bootstrap_resamples": 300}})
    margin = params.gate.max_regression
    out = _sequence(gate.RULES, params)
    naive, ratchet = out["naive"], out["ratchet"]
    # The naive rule takes every candidate: each loses up to the margin against its own
    # champion, on the model it was built from, so the drops add up past one margin.
    assert all(naive["promoted"]) and len(naive["losses"]) == 6
    assert all(0 <= x <= margin + 1e-12 for x in naive["losses"])
    assert naive["drops"] == sorted(naive["drops"])
    assert naive["final_drop"] == pytest.approx(sum(naive["losses"]))
    assert naive["worst_drop"] > margin
    # Rules that promoted alike served the same models (one lineage, one set of predictions).
    if out["mlflow_threshold"]["promoted"] == naive["promoted"]:
        assert out["mlflow_threshold"]["drops"] == naive["drops"]
    assert sum(out["mlflow_two_sided"]["promoted"]) <= sum(naive["promoted"])
    # ratchet: the project's score and rule with the floor pool; never a margin below the best.
    assert ratchet["worst_drop"] <= margin + 0.005
    assert any(ratchet["promoted"]) and ratchet["floor_judged"] >= 1
    assert 1 <= len(ratchet["pool"]) <= params.gate.floor_models


def test_long_horizon_summary_and_seeding():
    from ratchet.config import Params

    params = Params()
    rules = ("naive", "mlflow_threshold", "mlflow_two_sided")
    runs = [_sequence(rules, params, seq) for seq in range(3)]
    assert runs[0] == _sequence(rules, params, 0)  # seeded: the same sequence again
    assert runs[0]["naive"]["drops"] != runs[1]["naive"]["drops"]
    out = gate.summarise_long_horizon(runs, params)
    for rule in rules:
        cell = out[rule]
        assert cell["worst_drop"] == max(cell["worst_drop_by_sequence"])
        assert cell["worst_drop"] == round(max(r[rule]["worst_drop"] for r in runs), 4)
        assert 0 <= cell["promoted_share"] <= 1 and len(cell["mean_drop_by_round"]) == 6
    assert out["naive"]["promoted_share"] == 1.0
    assert out["naive"]["sequences_over_target"] == 3


def test_long_horizon_gives_the_same_numbers_with_two_workers():
    from ratchet.config import Params

    rng = np.random.default_rng(2)
    y = {"val": rng.integers(0, CLASSES, 600), "test": rng.integers(0, CLASSES, 600)}
    preds = {s: {p: top2_of(noisy(y[p], 0.93, rng), y[p], rng) for p in ("val", "test")}
             for s in gate.RECIPE_SEEDS}
    names = np.array([f"c{i}" for i in range(CLASSES)], dtype=object)
    rules = ("naive", "mlflow_two_sided")
    kw = {"sequences": 3, "rounds": 4, "rules": rules}
    one = gate.long_horizon(y, names, preds, Params(), **kw)
    two = gate.long_horizon(y, names, preds, Params(), workers=2, **kw)
    assert {r: one[r] for r in rules} == {r: two[r] for r in rules}
    assert one["setup"]["workers"] == 1 and two["setup"]["workers"] == 2
