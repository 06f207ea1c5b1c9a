"""The recent check's p-value holds alpha with rare classes: the paired permutation test.

The percentile bootstrap of macro-F1 counts a class present in a resample the same however many
copies of its rows it holds, so a class with one row in the slice is in or out of each resample
(63% / 37%) instead of varying like the data: its spread shrinks, and with many one-row classes
the bootstrap p-value of "no gain" rejects equal models more often than alpha.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from ratchet.config import Params


def _one_row_classes(n: int, wins: int, losses: int) -> tuple[list[str], list[str], list[str]]:
    """n one-row intents; both models right except on `wins` rows (only the candidate right)
    and `losses` rows (only the champion right), where the wrong one says the next intent."""
    labels = [f"intent{i:03d}" for i in range(n)]
    cand, champ = list(labels), list(labels)
    for i in range(wins):
        champ[i] = labels[(i + 1) % n]
    for i in range(wins, wins + losses):
        cand[i] = labels[(i + 1) % n]
    return labels, cand, champ


def test_a_chance_split_of_one_row_classes_is_not_promoted():
    # 11 of 100 one-row intents where the two models disagree, 8 of them won by the candidate:
    # one equal pair in nine does at least this well (exact sign test p = 0.113). Today's
    # bootstrap called it p = 0.016 and promoted on a 5-point "gain".
    from ratchet.evaluation import score
    from ratchet.gate import rule_decision

    params = Params()
    y, cand, champ = _one_row_classes(100, wins=8, losses=3)
    frame = pd.DataFrame({"label": y, "candidate": cand, "champion": champ, "slice": "recent"})
    metrics = score(frame, params)
    p = metrics["test/recent/p_value"]
    sign = binomtest(8, 11, 0.5, alternative="greater").pvalue
    assert metrics["diff/recent/macro_f1"] >= params.gate.min_delta  # a "gain" of 5 points
    assert p >= params.gate.alpha
    assert p == pytest.approx(sign, abs=0.03)
    decision = rule_decision(metrics, params)
    assert not decision.promote and "recent" in [c.name for c in decision.failed]


def test_recent_p_values_hold_alpha_with_one_row_classes():
    # Exchangeable by construction: on each draw both models err independently on 15% of 120
    # one-row intents. The project's recent test must reject at most alpha + 2 SE of the
    # draws; the bootstrap it replaced rejects about twice alpha.
    from ratchet.stats import bootstrap, paired_permutation

    alpha, draws, resamples = Params().gate.alpha, 300, 300
    n = 120
    rng = np.random.default_rng(0)
    labels = np.array([f"intent{i:03d}" for i in range(n)])
    y = np.arange(n)
    refs = labels[y].tolist()
    old = new = 0
    for d in range(draws):
        cand, champ = (labels[np.where(rng.random(n) < 0.15, (y + rng.integers(1, n, n)) % n, y)]
                       .tolist() for _ in range(2))
        old += bootstrap(refs, cand, champ, resamples=resamples, seed=d).p_below(0.0) < alpha
        new += paired_permutation(refs, cand, champ, resamples=resamples, seed=d).p_value < alpha
    limit = alpha + 2 * np.sqrt(alpha * (1 - alpha) / draws)
    assert new / draws <= limit
    assert old / draws > limit  # the defect the permutation test removes


def test_score_reports_the_permutation_test_on_recent():
    from ratchet.evaluation import score
    from ratchet.stats import bootstrap, paired_permutation

    params = Params()
    rng = np.random.default_rng(1)
    labels = np.array([f"c{i}" for i in range(8)])
    y = labels[rng.integers(0, 8, 400)]
    cand = np.where(rng.random(400) < 0.85, y, labels[rng.integers(0, 8, 400)])
    champ = np.where(rng.random(400) < 0.8, y, labels[rng.integers(0, 8, 400)])
    frame = pd.DataFrame({"label": y, "candidate": cand, "champion": champ,
                          "slice": np.where(np.arange(400) < 250, "recent", "reference")})
    metrics = score(frame, params)
    recent = frame[frame["slice"] == "recent"]
    args = [recent[c].astype(str).tolist() for c in ("label", "candidate", "champion")]
    cfg = params.evaluate
    perm = paired_permutation(*args, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    assert metrics["test/recent/p_value"] == perm.p_value
    # The reported difference and bounds stay the bootstrap's.
    boot = bootstrap(*args, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    assert metrics["diff/recent/macro_f1_low"] == boot.comparison(cfg.confidence).low
    assert metrics["diff/recent/macro_f1"] == pytest.approx(perm.diff)
