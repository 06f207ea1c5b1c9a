"""The per-domain harm guard can fail: 150 judged domains, one of them wrecked by the candidate.

Through the project's code (`ratchet.evaluation.score` then `ratchet.gate.rule_decision`): a p-value
counted from 2,000 bootstrap resamples is at least 1/2001, and Holm over 150 domains multiplies
the smallest one by 150 (0.075 > alpha), so a guard built on it could never fire.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ratchet.config import Params

DOMAINS = 150
ROWS = 30  # per domain: gate.min_domain_rows
LABELS = np.array(["a", "b", "c", "d", "e"])


def _frame(wrecked: str | None, seed: int = 0) -> pd.DataFrame:
    """Two models of equal quality (independent errors on 10% of rows) on 150 domains; the
    candidate is wrong on every row of domain `wrecked` (where the champion is as usual)."""
    rng = np.random.default_rng(seed)
    n = DOMAINS * ROWS
    y = LABELS[rng.integers(0, len(LABELS), n)]

    def model() -> np.ndarray:
        wrong = rng.random(n) < 0.1
        shifted = LABELS[(np.searchsorted(LABELS, y) + rng.integers(1, len(LABELS), n))
                         % len(LABELS)]
        return np.where(wrong, shifted, y)

    domain = np.repeat([f"d{i:03d}" for i in range(DOMAINS)], ROWS)
    cand, champ = model(), model()
    if wrecked is not None:
        hit = domain == wrecked
        cand[hit] = LABELS[(np.searchsorted(LABELS, y[hit]) + 1) % len(LABELS)]
    return pd.DataFrame({"label": y, "domain": domain, "candidate": cand, "champion": champ,
                         "slice": np.where(np.arange(n) % 2 == 0, "recent", "reference")})


def _failed_domains(frame: pd.DataFrame) -> list[str]:
    from ratchet.evaluation import score
    from ratchet.gate import rule_decision

    params = Params()
    assert params.gate.min_domain_rows <= ROWS
    decision = rule_decision(score(frame, params), params)
    judged = [c.name for c in decision.checks if c.name.startswith("domain:")]
    assert len(judged) == DOMAINS  # every domain is judged
    return [c.name for c in decision.failed if c.name.startswith("domain:")]


def test_a_domain_the_candidate_wrecks_fails_among_150():
    assert _failed_domains(_frame("d042")) == ["domain:d042"]


@pytest.mark.slow  # ~40 s (153 slices scored); harm_p_value's null behaviour is unit-tested
def test_no_domain_fails_when_the_models_are_equal():
    assert _failed_domains(_frame(None)) == []
