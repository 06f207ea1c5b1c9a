"""The promotion rule: a pure function of numbers that says promote or not, and why.

Promote only when, on macro-F1:
- **recent** (the newest batch's test rows): the candidate is significantly better than the
  champion (paired bootstrap, one-sided, Holm-corrected) AND the gain is at least `min_delta`;
- **reference** (every earlier batch's test rows): non-inferior within `max_regression`
  (H0: the difference is at most -max_regression, rejected at `alpha` after Holm);
- **weighted** (every test row, weighted by the drift stage's importance weights toward the
  recent distribution): non-inferior within `max_regression` too: the data as it is now
  must not get worse;
- **domains**: no domain with at least `min_domain_rows` rows is significantly worse than
  -max_regression (Holm over the domains);
- the data passed validation, the test macro-F1 is at least `min_score`, the p95 latency per
  example at batch 1 is within `max_latency_ms`, and the behavioural checks pass (predictions
  invariant to casing and small typos, minimum-functionality probes per class).

Holm's correction runs over the hypotheses the promotion needs (recent, reference, weighted).
Since all of them must pass, each at `alpha` would already bound the chance of a wrong
promotion; Holm is the conservative choice the project makes, and each check's reason shows
both the raw and the adjusted p-value. Any NaN or missing number fails its check: the rule
fails closed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ratchet.config import GateConfig
from ratchet.stats import Comparison, holm


@dataclass(frozen=True)
class GateInputs:
    """Every number the rule reads. Each Comparison's p_value is for the hypothesis its slice
    tests: recent `diff <= 0`; reference and weighted `diff <= -max_regression`; a domain
    `diff >= -max_regression` (harm)."""

    has_champion: bool
    validation_passed: bool
    candidate_score: float
    """Candidate macro-F1 on the whole test split (the absolute floor applies to it)."""
    recent: Comparison | None = None
    reference: Comparison | None = None
    weighted: Comparison | None = None
    """None: no importance weights (no drift stage output), so the check has nothing to read."""
    domains: dict[str, Comparison] = field(default_factory=dict)
    latency_ms: float | None = None
    """Candidate p95 latency per example at batch 1; None: not measured (the check is skipped)."""
    behaviour: dict[str, float | None] | None = None
    """Candidate rates: `casing`, `typos` (share of predictions unchanged), `probes` (the worst
    class's probe accuracy; None without probes). None: not measured (the check is skipped)."""
    new_classes: tuple[str, ...] = ()
    """Test labels the champion cannot predict (it never saw them)."""


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


def _bad(x: float | None) -> bool:
    return x is None or math.isnan(x)


def _pts(x: float) -> str:
    return f"{x * 100:+.2f} pts"


def _p(x: float) -> str:
    return "nan" if _bad(x) else f"{x:.4f}"


def _numbers(c: Comparison) -> str:
    return (f"macro-F1 {c.candidate:.4f} vs {c.champion:.4f} ({_pts(c.diff)}, bounds "
            f"{_pts(c.low)} to {_pts(c.high)})")


def _basic_checks(inp: GateInputs, cfg: GateConfig) -> list[Check]:
    checks = [
        Check(
            "validation",
            inp.validation_passed,
            "data passed validation" if inp.validation_passed else "data failed validation",
        )
    ]
    floor_ok = not _bad(inp.candidate_score) and inp.candidate_score >= cfg.min_score
    checks.append(Check(
        "min_score",
        floor_ok,
        f"test macro-F1 {inp.candidate_score:.4f} "
        f"{'>=' if floor_ok else 'is not >='} the floor {cfg.min_score:.4f}",
    ))
    if inp.latency_ms is not None:
        ok = not _bad(inp.latency_ms) and inp.latency_ms <= cfg.max_latency_ms
        verdict = "not measured" if _bad(inp.latency_ms) else (
            f"{inp.latency_ms:.1f} ms, {'within' if ok else 'over'}")
        checks.append(Check(
            "latency",
            ok,
            f"p95 latency per example at batch 1: {verdict} (budget {cfg.max_latency_ms:.1f} ms)",
        ))
    if inp.behaviour is not None:
        checks += _behaviour_checks(inp.behaviour, cfg)
    return checks


def _behaviour_checks(b: dict[str, float | None], cfg: GateConfig) -> list[Check]:
    checks = []
    for name, what in (("casing", "changing the casing"), ("typos", "a small typo")):
        rate = b.get(name)
        ok = not _bad(rate) and rate >= cfg.min_invariance
        checks.append(Check(
            f"invariance_{name}",
            ok,
            f"{_p(rate) if _bad(rate) else f'{rate:.1%}'} of predictions survive {what} "
            f"(needs >= {cfg.min_invariance:.0%})",
        ))
    probes = b.get("probes")
    if probes is None:
        checks.append(Check("probes", True, "no probes apply (none in the probes file for "
                                             "the classes the candidate has seen)"))
    else:
        ok = not _bad(probes) and probes >= cfg.min_probe_accuracy
        checks.append(Check(
            "probes",
            ok,
            f"worst class passes {_p(probes) if _bad(probes) else f'{probes:.0%}'} of its "
            f"minimum-functionality probes (needs >= {cfg.min_probe_accuracy:.0%})",
        ))
    return checks


def decide(inp: GateInputs, cfg: GateConfig) -> Decision:
    """Apply the gate rule. Any NaN or missing number fails its check: the rule fails closed."""
    checks = _basic_checks(inp, cfg)
    if not inp.has_champion:
        checks.append(Check("cold_start", True, "no champion yet: the absolute checks decide"))
        return Decision(all(c.passed for c in checks), checks)

    # The family of hypotheses the promotion needs; Holm keeps its family-wise error at alpha.
    family: dict[str, float] = {}
    if inp.recent is not None and inp.recent.n > 0:
        family["recent"] = inp.recent.p_value
    if inp.reference is not None and inp.reference.n > 0:
        family["reference"] = inp.reference.p_value
    if inp.weighted is not None and inp.weighted.n > 0:
        family["weighted"] = inp.weighted.p_value
    adjusted = holm(family)

    checks.append(_recent(inp.recent, adjusted.get("recent", math.nan), cfg))
    checks.append(_non_inferior("reference", inp.reference, adjusted.get("reference", math.nan),
                                cfg, empty="no reference test rows yet: nothing to forget"))
    checks.append(_non_inferior("weighted", inp.weighted, adjusted.get("weighted", math.nan),
                                cfg, empty="no drift importance weights: nothing to weigh"))
    checks += _domain_checks(inp.domains, cfg)
    if inp.new_classes:
        shown = ", ".join(inp.new_classes[:5]) + (" ..." if len(inp.new_classes) > 5 else "")
        checks.append(Check(
            "new_classes", True,
            f"{len(inp.new_classes)} test class(es) the champion never saw ({shown}): their "
            "rows count as champion errors in the comparisons",
        ))
    return Decision(all(c.passed for c in checks), checks)


def _recent(c: Comparison | None, p_holm: float, cfg: GateConfig) -> Check:
    if c is None or c.n == 0:
        return Check("recent", False, "no recent test rows: nothing shows the gain")
    if any(_bad(x) for x in (c.diff, c.p_value, c.candidate, c.champion)):
        return Check("recent", False, "recent difference is undefined (NaN)")
    significant = p_holm < cfg.alpha
    large = c.diff >= cfg.min_delta
    ok = significant and large
    if ok:
        verdict = "significantly better"
    elif not significant:
        verdict = "not significantly better"
    else:
        verdict = "significant but the gain is below min_delta"
    return Check(
        "recent",
        ok,
        f"recent (n={c.n}): {verdict}: {_numbers(c)}; p={_p(c.p_value)}, Holm p={_p(p_holm)} "
        f"(needs < {cfg.alpha}) and gain >= {_pts(cfg.min_delta)}",
    )


def _non_inferior(name: str, c: Comparison | None, p_holm: float, cfg: GateConfig, *,
                  empty: str) -> Check:
    if c is None or c.n == 0:
        return Check(name, True, empty)
    if any(_bad(x) for x in (c.diff, c.p_value, c.candidate, c.champion)):
        return Check(name, False, f"{name} difference is undefined (NaN)")
    ok = p_holm < cfg.alpha
    # A failure means non-inferiority was not shown: a real drop, or too little evidence (a
    # small slice, or Holm's stricter level), so the reason says which the numbers suggest.
    if ok:
        verdict = "non-inferior"
    elif c.diff <= -cfg.max_regression:
        verdict = ("regressed (forgetting)" if name == "reference"
                   else "dropped on the data as it is now")
    else:
        verdict = "non-inferiority not shown (too little evidence at this level)"
    return Check(
        name,
        ok,
        f"{name} (n={c.n}): {verdict}: {_numbers(c)}; p={_p(c.p_value)}, Holm p={_p(p_holm)} "
        f"for a drop of more than {cfg.max_regression * 100:.2f} pts (needs < {cfg.alpha})",
    )


def _domain_checks(domains: dict[str, Comparison], cfg: GateConfig) -> list[Check]:
    """Harm per domain: fail a domain the candidate is significantly worse on, beyond the margin.

    Domains with fewer rows than `min_domain_rows` are reported, not judged.
    """
    judged = {d: c for d, c in domains.items() if c.n >= cfg.min_domain_rows}
    small = sorted(d for d, c in domains.items() if 0 < c.n < cfg.min_domain_rows)
    adjusted = holm({d: c.p_value for d, c in judged.items()})
    checks = []
    for d in sorted(judged):
        c = judged[d]
        if _bad(c.diff) or _bad(adjusted[d]):
            checks.append(Check(f"domain:{d}", False, f"domain {d}: difference is undefined"))
            continue
        harmed = adjusted[d] < cfg.alpha
        checks.append(Check(
            f"domain:{d}",
            not harmed,
            f"domain {d} (n={c.n}): {'significantly worse' if harmed else 'not harmed'}: "
            f"{_numbers(c)}; Holm p={_p(adjusted[d])} for a drop of less than "
            f"{cfg.max_regression * 100:.2f} pts",
        ))
    if small:
        checks.append(Check("domains_small", True, f"{len(small)} domain(s) with fewer than "
                            f"{cfg.min_domain_rows} test rows not judged: {', '.join(small[:8])}"))
    return checks
