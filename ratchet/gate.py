"""The promotion rule: a pure function of numbers that says promote or not, and why."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ratchet.config import GateConfig
from ratchet.stats import Comparison


@dataclass(frozen=True)
class GateInputs:
    has_champion: bool
    validation_passed: bool
    candidate_score: float
    """Candidate macro-F1 on the whole test split (the absolute floor applies to it)."""
    recent: Comparison | None = None
    reference: Comparison | None = None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"promote": self.promote, "checks": [asdict(c) for c in self.checks]}


def _bad(x: float) -> bool:
    return x is None or math.isnan(x)


def _pts(x: float) -> str:
    return f"{x * 100:+.2f} pts"


def _slice_check(
    name: str,
    c: Comparison | None,
    *,
    bound: float,
    need_gain: bool,
    if_empty: Check,
    verdicts: tuple[str, str],
) -> Check:
    """Pass when the difference's lower bound exceeds `bound` (and, if asked, the gain is > 0)."""
    if c is None or c.n == 0:
        return if_empty
    if _bad(c.diff) or _bad(c.low):
        return Check(name, False, f"{name} difference is undefined (NaN)")
    ok = c.low > bound and (c.diff > 0 or not need_gain)
    return Check(
        name,
        ok,
        f"{name} (n={c.n}): {verdicts[0] if ok else verdicts[1]}: macro-F1 {c.candidate:.4f} vs "
        f"{c.champion:.4f} ({_pts(c.diff)}, lower bound {_pts(c.low)}, needs > {_pts(bound)})",
    )


def decide(inp: GateInputs, cfg: GateConfig) -> Decision:
    """Apply the gate rule. Any NaN or missing number fails its check: the rule fails closed."""
    checks = [
        Check(
            "validation",
            inp.validation_passed,
            "data passed validation" if inp.validation_passed else "data failed validation",
        )
    ]
    floor_ok = not _bad(inp.candidate_score) and inp.candidate_score >= cfg.min_score
    checks.append(
        Check(
            "min_score",
            floor_ok,
            f"test macro-F1 {inp.candidate_score:.4f} "
            f"{'>=' if floor_ok else 'is below or not'} the floor {cfg.min_score:.4f}",
        )
    )
    if not inp.has_champion:
        checks.append(Check("cold_start", True, "no champion yet: the absolute floor decides"))
        return Decision(all(c.passed for c in checks), checks)

    checks.append(
        _slice_check(
            "recent",
            inp.recent,
            bound=cfg.min_delta,
            need_gain=True,
            if_empty=Check("recent", False, "no recent test rows: nothing shows the gain"),
            verdicts=("significantly better", "not significantly better"),
        )
    )
    checks.append(
        _slice_check(
            "reference",
            inp.reference,
            bound=-cfg.max_regression,
            need_gain=False,
            if_empty=Check("reference", True, "no reference test rows yet: nothing to forget"),
            verdicts=("non-inferior", "regressed (forgetting)"),
        )
    )
    return Decision(all(c.passed for c in checks), checks)
