"""The gate rule as a table of cases: cold start, ties, NaN, empty slices, forgetting, Holm,
drift-weighted drops, per-domain harm, latency and behaviour beside the champion's, label
noise, and a class the champion never saw."""

import math
from dataclasses import replace

import pytest

from ratchet.config import GateConfig
from ratchet.gate import Behaviour, GateInputs, Latency, decide
from ratchet.stats import Comparison

CFG = GateConfig(min_delta=0.01, max_regression=0.02, min_score=0.5, alpha=0.05,
                 max_latency_ms=100.0, max_latency_ratio=1.5, min_invariance=0.6,
                 max_invariance_drop=0.05, min_probe_accuracy=0.8, min_domain_rows=30)
NAN = math.nan
EMPTY = Comparison(0, NAN, NAN, NAN, NAN, NAN, NAN)
GOOD_BEHAVIOUR = Behaviour(casing=1.0, typos=0.8, probes=1.0, champion_casing=1.0,
                           champion_typos=0.8)
COLD_BEHAVIOUR = Behaviour(casing=1.0, typos=0.8, probes=1.0)
FAST = Latency(best_ms=10.0, worst_ms=30.0, ratio=1.0, champion_best_ms=10.0)


def beh(**kw):
    return replace(GOOD_BEHAVIOUR, **kw)


def lat(**kw):
    return replace(FAST, **kw)


def cmp(diff, p, n=500, cand=0.9):
    """A comparison whose rule p-value is `p` (bounds are only reported, never decide)."""
    return Comparison(n, cand, cand - diff, diff, diff - 0.02, diff + 0.02, p)


WIN, SAME, LOSS = cmp(0.05, 0.001), cmp(0.0, 0.001), cmp(-0.05, 0.9)
BASE = GateInputs(has_champion=True, candidate_score=0.9, recent=WIN, reference=SAME,
                  weighted=SAME, latency=FAST, behaviour=GOOD_BEHAVIOUR,
                  label_noise={"flagged": False, "summary": "est. 3% label issues: not flagged"})


def cold(**kw):
    return replace(GateInputs(has_champion=False, candidate_score=0.8,
                              latency=Latency(10.0, 30.0), behaviour=COLD_BEHAVIOUR), **kw)


def case(**kw):
    return replace(BASE, **kw)


CASES = [
    # cold start: only the absolute checks apply
    ("cold start above floor", cold(), True, []),
    ("cold start below floor", cold(candidate_score=0.4), False, ["min_score"]),
    ("cold start exactly at floor", cold(candidate_score=0.5), True, []),
    ("cold start NaN score", cold(candidate_score=NAN), False, ["min_score"]),
    ("cold start: robustness below the floor is only warned about",
     cold(behaviour=Behaviour(casing=0.5, typos=0.3, probes=1.0)), True, []),
    ("cold start too slow even in the fastest round", cold(latency=Latency(250.0, 400.0)), False,
     ["latency"]),
    ("cold start: a slow round does not decide", cold(latency=Latency(40.0, 900.0)), True, []),
    ("cold start fails probes", cold(behaviour=replace(COLD_BEHAVIOUR, probes=0.5)), False,
     ["probes"]),
    ("cold start noisy batch", cold(label_noise={"flagged": True, "summary": "noisy"}), False,
     ["label_noise"]),
    # the comparisons
    ("clear win, no forgetting", BASE, True, []),
    ("gain significant but below min_delta", case(recent=cmp(0.005, 0.001)), False, ["recent"]),
    ("gain exactly min_delta passes", case(recent=cmp(0.01, 0.001)), True, []),
    ("large gain not significant", case(recent=cmp(0.05, 0.2)), False, ["recent"]),
    ("p exactly alpha is not significant", case(recent=cmp(0.05, 0.05), reference=EMPTY,
                                                weighted=None), False, ["recent"]),
    ("tie on recent", case(recent=cmp(0.0, 1.0)), False, ["recent"]),
    ("worse on recent", case(recent=LOSS), False, ["recent"]),
    ("forgetting on reference", case(reference=cmp(-0.04, 0.6)), False, ["reference"]),
    ("drift-weighted drop", case(weighted=cmp(-0.03, 0.7)), False, ["weighted"]),
    ("no weights: weighted check has nothing to read", case(weighted=None), True, []),
    ("no reference rows yet passes that check", case(reference=EMPTY), True, []),
    ("no recent rows fails closed", case(recent=EMPTY), False, ["recent"]),
    ("NaN recent p fails closed", case(recent=cmp(0.05, NAN)), False, ["recent"]),
    ("NaN reference p fails closed", case(reference=cmp(0.0, NAN)), False, ["reference"]),
    ("NaN weighted diff fails closed", case(weighted=cmp(NAN, 0.001)), False, ["weighted"]),
    ("NaN champion score fails closed", case(reference=Comparison(500, 0.9, NAN, 0.0, -0.02,
                                                                  0.02, 0.001)),
     False, ["reference"]),
    ("missing comparisons fail closed", case(recent=None, reference=None, weighted=None), False,
     ["recent"]),
    ("better but below floor", case(candidate_score=0.3), False, ["min_score"]),
    ("better but the newest batch is flagged noisy",
     case(label_noise={"flagged": True, "summary": "noisy"}), False, ["label_noise"]),
    ("no noise report: nothing to check", case(label_noise=None), True, []),
    ("better but much slower than the champion", case(latency=lat(ratio=1.6)), False,
     ["latency"]),
    ("latency ratio exactly at the limit", case(latency=lat(ratio=1.5)), True, []),
    ("slower and over the budget", case(latency=lat(best_ms=100.5, ratio=1.2)), False,
     ["latency"]),
    ("over the budget but no slower than the champion (a busy machine)",
     case(latency=lat(best_ms=130.0, ratio=0.98, champion_best_ms=133.0)), True, []),
    ("latency exactly at budget", case(latency=lat(best_ms=100.0, ratio=1.2)), True, []),
    ("latency not measured fails closed", case(latency=lat(best_ms=NAN)), False, ["latency"]),
    ("latency ratio not measured fails closed", case(latency=lat(ratio=NAN)), False,
     ["latency"]),
    ("latency not part of the inputs is skipped", case(latency=None), True, []),
    ("casing breaks predictions", case(behaviour=beh(casing=0.5)), False,
     ["invariance_casing"]),
    ("less typo-robust than the champion beyond the margin",
     case(behaviour=beh(typos=0.74, champion_typos=0.8)), False, ["invariance_typos"]),
    ("slightly less typo-robust: within the margin",
     case(behaviour=beh(typos=0.76, champion_typos=0.8)), True, []),
    ("below the floor and below the champion",
     case(behaviour=beh(typos=0.55, champion_typos=0.58)), False, ["invariance_typos"]),
    ("below the floor but no less robust than the champion",
     case(behaviour=beh(typos=0.55, champion_typos=0.52)), True, []),
    ("champion behaviour not measured fails closed",
     case(behaviour=beh(champion_typos=NAN)), False, ["invariance_typos"]),
    ("no probes apply", case(behaviour=beh(probes=None)), True, []),
    ("a collapsed model (one class for every row) is not robust, whatever its invariance",
     case(behaviour=beh(predicted_classes=1, test_classes=7)), False,
     ["invariance_casing", "invariance_typos"]),
    ("a collapsed model fails at a cold start too",
     cold(behaviour=replace(COLD_BEHAVIOUR, predicted_classes=1, test_classes=7)), False,
     ["invariance_casing", "invariance_typos"]),
    ("two predicted classes is not a collapse",
     case(behaviour=beh(predicted_classes=2, test_classes=7)), True, []),
    ("a one-class test split cannot show a collapse",
     case(behaviour=beh(predicted_classes=1, test_classes=1)), True, []),
    ("behaviour NaN fails closed", case(behaviour=beh(typos=NAN)), False,
     ["invariance_typos"]),
    # Holm over recent/reference/weighted: p=0.03 passes alone, not as the largest of three
    # where the others are also near the edge (0.02 * 3 = 0.06 > alpha stops the step-down).
    ("Holm: alone at p=0.03 passes", case(recent=cmp(0.05, 0.03), reference=EMPTY,
                                          weighted=None), True, []),
    ("Holm: three borderline tests fail", case(recent=cmp(0.05, 0.03),
                                               reference=cmp(0.0, 0.02),
                                               weighted=cmp(0.0, 0.025)),
     False, ["recent", "reference", "weighted"]),
    ("Holm: strong others leave recent its full alpha", case(recent=cmp(0.05, 0.04)), True, []),
    # domains: harm beyond the margin fails; small domains are not judged
    ("a domain significantly harmed", case(domains={"travel": cmp(-0.1, 0.001, n=80),
                                                    "home": cmp(0.0, 0.9, n=80)}), False,
     ["domain:travel"]),
    ("a small harmed domain is only reported", case(domains={"travel": cmp(-0.1, 0.001, n=10)}),
     True, []),
    ("Holm over domains: one borderline of several passes",
     case(domains={f"d{i}": cmp(-0.03, 0.02 if i == 0 else 0.9, n=60) for i in range(4)}),
     True, []),
    # a class the champion never saw: reported, the comparisons decide
    ("new class, candidate better", case(new_classes=("file_claim",)), True, []),
    ("new class does not rescue a loss", case(new_classes=("file_claim",), recent=LOSS), False,
     ["recent"]),
    ("everything wrong", case(label_noise={"flagged": True, "summary": "noisy"},
                              candidate_score=0.3, recent=LOSS, reference=cmp(-0.1, 0.99),
                              weighted=cmp(-0.1, 0.99), latency=lat(best_ms=500.0, ratio=3.0)),
     False, ["min_score", "label_noise", "latency", "recent", "reference", "weighted"]),
]


@pytest.mark.parametrize(("name", "inputs", "promote", "failed"), CASES,
                         ids=[c[0] for c in CASES])
def test_rule(name, inputs, promote, failed):
    decision = decide(inputs, CFG)
    assert decision.promote is promote, (name, decision.failed)
    assert [c.name for c in decision.failed] == failed, name
    assert len(decision.reasons) == len(decision.checks) and all(decision.reasons)


def test_reasons_carry_the_numbers():
    d = decide(case(recent=cmp(0.005, 0.001)), CFG)
    recent = next(c for c in d.checks if c.name == "recent")
    assert "+0.50 pts" in recent.reason and "+1.00 pts" in recent.reason
    assert "p=0.0010" in recent.reason and "Holm p=0.0030" in recent.reason


def test_new_classes_are_named():
    d = decide(case(new_classes=("file_claim", "renew_policy")), CFG)
    check = next(c for c in d.checks if c.name == "new_classes")
    assert "file_claim" in check.reason and "2 test class" in check.reason


def test_thresholds_come_from_config():
    inputs = case(recent=cmp(0.005, 0.001))
    assert not decide(inputs, CFG).promote
    assert decide(inputs, CFG.model_copy(update={"min_delta": 0.0})).promote
    slow = case(latency=lat(best_ms=150.0, ratio=1.2))
    assert not decide(slow, CFG).promote
    assert decide(slow, CFG.model_copy(update={"max_latency_ms": 200.0})).promote
    less_robust = case(behaviour=beh(typos=0.7))
    assert not decide(less_robust, CFG).promote
    assert decide(less_robust, CFG.model_copy(update={"max_invariance_drop": 0.1})).promote
    assert not decide(case(recent=cmp(0.05, 0.03)),
                      CFG.model_copy(update={"alpha": 0.01})).promote


def test_reference_reason_tells_a_drop_from_too_little_evidence():
    drop = decide(case(reference=cmp(-0.04, 0.6)), CFG)
    unsure = decide(case(reference=cmp(-0.005, 0.2)), CFG)
    assert "(forgetting)" in drop.failed[0].reason and "down 4.00 pts" in drop.failed[0].reason
    assert "not shown" in unsure.failed[0].reason and "forgetting" not in unsure.failed[0].reason


def test_description_fits_the_registry_column():
    from ratchet.gate import Check, Decision
    from tasks.gate import DESCRIPTION_LIMIT, description

    m = {"n/all": 900.0, "candidate/all/macro_f1": 0.9, "champion/all/macro_f1": 0.8,
         "diff/all/macro_f1": 0.1, "candidate/latency/best_p95_ms_bs1": 9.0}
    checks = [Check("recent", True, "recent is better " * 5)]
    small = description("promoted", Decision(True, checks), m)
    assert "| all&emsp; | 900&emsp; |" in small and "latency" in small and "shortened" not in small
    for i in range(60):
        m[f"n/domain:d{i}"] = 40.0
        m[f"diff/domain:d{i}/macro_f1"] = -0.01
        checks.append(Check(f"domain:d{i}", True, f"domain d{i} is fine " * 8))
    big = description("promoted", Decision(True, checks), m)
    assert len(big) <= DESCRIPTION_LIMIT and "shortened" in big
    assert "| all&emsp; | 900&emsp; |" in big


def test_a_collapsed_model_is_named_as_such():
    from ratchet.gate import gate_inputs

    m = {"behaviour/candidate/casing": 1.0, "behaviour/candidate/typos": 1.0,
         "behaviour/candidate/predicted_classes": 1.0, "behaviour/test_classes": 7.0}
    b = gate_inputs(m, {}, require_measured=False).behaviour
    assert (b.predicted_classes, b.test_classes) == (1, 7)
    d = decide(cold(behaviour=b), CFG)
    [casing] = [c for c in d.checks if c.name == "invariance_casing"]
    assert not casing.passed and "one class for every test row" in casing.reason
    assert "collapsed" in casing.reason and "7 classes" in casing.reason
