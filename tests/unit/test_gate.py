"""The gate rule as a table of cases: cold start, ties, NaN, empty slices, forgetting."""

import math

import pytest

from ratchet.config import GateConfig
from ratchet.gate import GateInputs, decide
from ratchet.stats import Comparison

CFG = GateConfig(min_delta=0.01, max_regression=0.02, min_score=0.5)
NAN = math.nan


def cmp(diff, low, n=200, cand=0.9):
    return Comparison(n, cand, cand - diff, diff, low, diff + abs(diff - low), 0.01)


@pytest.mark.parametrize(
    ("name", "inputs", "promote", "failed"),
    [
        ("cold start above floor", GateInputs(False, True, 0.8), True, []),
        ("cold start below floor", GateInputs(False, True, 0.4), False, ["min_score"]),
        ("cold start exactly at floor", GateInputs(False, True, 0.5), True, []),
        ("cold start NaN score", GateInputs(False, True, NAN), False, ["min_score"]),
        ("cold start bad data", GateInputs(False, False, 0.9), False, ["validation"]),
        (
            "clear win, no forgetting",
            GateInputs(True, True, 0.9, cmp(0.08, 0.05), cmp(0.0, -0.01)),
            True,
            [],
        ),
        (
            "win but lower bound below min_delta",
            GateInputs(True, True, 0.9, cmp(0.03, 0.005), cmp(0.0, -0.01)),
            False,
            ["recent"],
        ),
        (
            "lower bound exactly min_delta is not enough",
            GateInputs(True, True, 0.9, cmp(0.03, 0.01), cmp(0.0, -0.01)),
            False,
            ["recent"],
        ),
        (
            "tie on recent",
            GateInputs(True, True, 0.9, cmp(0.0, 0.0), cmp(0.0, 0.0)),
            False,
            ["recent"],
        ),
        (
            "worse on recent",
            GateInputs(True, True, 0.9, cmp(-0.05, -0.09), cmp(0.0, -0.01)),
            False,
            ["recent"],
        ),
        (
            "forgetting on reference",
            GateInputs(True, True, 0.9, cmp(0.08, 0.05), cmp(-0.04, -0.06)),
            False,
            ["reference"],
        ),
        (
            "reference bound exactly -max_regression fails",
            GateInputs(True, True, 0.9, cmp(0.08, 0.05), cmp(-0.01, -0.02)),
            False,
            ["reference"],
        ),
        (
            "no reference rows yet passes that check",
            GateInputs(
                True, True, 0.9, cmp(0.08, 0.05), Comparison(0, NAN, NAN, NAN, NAN, NAN, NAN)
            ),
            True,
            [],
        ),
        (
            "no recent rows fails closed",
            GateInputs(True, True, 0.9, Comparison(0, NAN, NAN, NAN, NAN, NAN, NAN), cmp(0, -0.01)),
            False,
            ["recent"],
        ),
        (
            "NaN recent bound fails closed",
            GateInputs(True, True, 0.9, cmp(0.08, NAN), cmp(0.0, -0.01)),
            False,
            ["recent"],
        ),
        (
            "NaN reference bound fails closed",
            GateInputs(True, True, 0.9, cmp(0.08, 0.05), cmp(0.0, NAN)),
            False,
            ["reference"],
        ),
        ("missing comparisons fail closed", GateInputs(True, True, 0.9), False, ["recent"]),
        (
            "better but below floor",
            GateInputs(True, True, 0.3, cmp(0.08, 0.05), cmp(0.0, -0.01)),
            False,
            ["min_score"],
        ),
        (
            "everything wrong",
            GateInputs(True, False, 0.3, cmp(-0.1, -0.2), cmp(-0.1, -0.2)),
            False,
            ["validation", "min_score", "recent", "reference"],
        ),
    ],
)
def test_rule(name, inputs, promote, failed):
    decision = decide(inputs, CFG)
    assert decision.promote is promote, name
    assert [c.name for c in decision.failed] == failed, name
    assert len(decision.reasons) == len(decision.checks) and all(decision.reasons)


def test_reasons_carry_the_numbers():
    d = decide(GateInputs(True, True, 0.9, cmp(0.03, 0.005), cmp(0.0, -0.01)), CFG)
    recent = next(c for c in d.checks if c.name == "recent")
    assert (
        "+3.00 pts" in recent.reason and "+0.50 pts" in recent.reason and "+1.00" in recent.reason
    )


def test_thresholds_come_from_config():
    inputs = GateInputs(True, True, 0.9, cmp(0.03, 0.005), cmp(0.0, -0.01))
    assert not decide(inputs, CFG).promote
    assert decide(inputs, GateConfig(min_delta=0.0)).promote
