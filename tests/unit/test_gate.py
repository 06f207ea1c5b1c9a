"""The gate rule as a table of cases: cold start, ties, NaN, empty slices, forgetting, Holm,
drift-weighted drops, per-domain harm, latency, behaviour and a class the champion never saw."""

import math
from dataclasses import replace

import pytest

from ratchet.config import GateConfig
from ratchet.gate import GateInputs, decide
from ratchet.stats import Comparison

CFG = GateConfig(min_delta=0.01, max_regression=0.02, min_score=0.5, alpha=0.05,
                 max_latency_ms=100.0, min_invariance=0.9, min_probe_accuracy=0.8,
                 min_domain_rows=30)
NAN = math.nan
EMPTY = Comparison(0, NAN, NAN, NAN, NAN, NAN, NAN)
GOOD_BEHAVIOUR = {"casing": 1.0, "typos": 0.95, "probes": 1.0}


def cmp(diff, p, n=500, cand=0.9):
    """A comparison whose rule p-value is `p` (bounds are only reported, never decide)."""
    return Comparison(n, cand, cand - diff, diff, diff - 0.02, diff + 0.02, p)


WIN, SAME, LOSS = cmp(0.05, 0.001), cmp(0.0, 0.001), cmp(-0.05, 0.9)
BASE = GateInputs(True, True, 0.9, recent=WIN, reference=SAME, weighted=SAME,
                  latency_ms=10.0, behaviour=GOOD_BEHAVIOUR)


def cold(**kw):
    return replace(GateInputs(False, True, 0.8, latency_ms=10.0, behaviour=GOOD_BEHAVIOUR), **kw)


def case(**kw):
    return replace(BASE, **kw)


CASES = [
    # cold start: only the absolute checks apply
    ("cold start above floor", cold(), True, []),
    ("cold start below floor", cold(candidate_score=0.4), False, ["min_score"]),
    ("cold start exactly at floor", cold(candidate_score=0.5), True, []),
    ("cold start NaN score", cold(candidate_score=NAN), False, ["min_score"]),
    ("cold start bad data", cold(validation_passed=False), False, ["validation"]),
    ("cold start too slow", cold(latency_ms=250.0), False, ["latency"]),
    ("cold start fails probes", cold(behaviour={**GOOD_BEHAVIOUR, "probes": 0.5}), False,
     ["probes"]),
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
    ("better but bad data", case(validation_passed=False), False, ["validation"]),
    ("better but over the latency budget", case(latency_ms=100.5), False, ["latency"]),
    ("latency exactly at budget", case(latency_ms=100.0), True, []),
    ("latency not measured fails closed", case(latency_ms=NAN), False, ["latency"]),
    ("latency not part of the inputs is skipped", case(latency_ms=None), True, []),
    ("casing breaks predictions", case(behaviour={**GOOD_BEHAVIOUR, "casing": 0.5}), False,
     ["invariance_casing"]),
    ("typos break predictions", case(behaviour={**GOOD_BEHAVIOUR, "typos": 0.89}), False,
     ["invariance_typos"]),
    ("no probes apply", case(behaviour={**GOOD_BEHAVIOUR, "probes": None}), True, []),
    ("behaviour NaN fails closed", case(behaviour={**GOOD_BEHAVIOUR, "typos": NAN}), False,
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
    ("everything wrong", case(validation_passed=False, candidate_score=0.3, recent=LOSS,
                              reference=cmp(-0.1, 0.99), weighted=cmp(-0.1, 0.99),
                              latency_ms=500.0),
     False, ["validation", "min_score", "latency", "recent", "reference", "weighted"]),
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
    slow = case(latency_ms=150.0)
    assert decide(slow, CFG.model_copy(update={"max_latency_ms": 200.0})).promote
    assert not decide(case(recent=cmp(0.05, 0.03)),
                      CFG.model_copy(update={"alpha": 0.01})).promote


def test_reference_reason_tells_a_drop_from_too_little_evidence():
    drop = decide(case(reference=cmp(-0.04, 0.6)), CFG)
    unsure = decide(case(reference=cmp(-0.005, 0.2)), CFG)
    assert "regressed (forgetting)" in drop.failed[0].reason
    assert "not shown" in unsure.failed[0].reason and "forgetting" not in unsure.failed[0].reason


def test_description_fits_the_registry_column():
    from ratchet.gate import Check, Decision
    from tasks.gate import DESCRIPTION_LIMIT, description

    m = {"n/all": 900.0, "candidate/all/macro_f1": 0.9, "champion/all/macro_f1": 0.8,
         "diff/all/macro_f1": 0.1, "candidate/latency/p95_ms_bs1": 9.0}
    checks = [Check("recent", True, "recent is better " * 5)]
    small = description("promoted", Decision(True, checks), m)
    assert "| all | 900 |" in small and "latency" in small and "shortened" not in small
    for i in range(60):
        m[f"n/domain:d{i}"] = 40.0
        m[f"diff/domain:d{i}/macro_f1"] = -0.01
        checks.append(Check(f"domain:d{i}", True, f"domain d{i} is fine " * 8))
    big = description("promoted", Decision(True, checks), m)
    assert len(big) <= DESCRIPTION_LIMIT and "shortened" in big and "| all | 900 |" in big
