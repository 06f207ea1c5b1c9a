"""The promotion rule: a pure function of numbers that says promote or not, and why.

Promote only when, on macro-F1:
- **recent** (the newest batch's test rows): the candidate is significantly better than the
  champion (one-sided test of "no gain", Holm-corrected) AND the gain is at least `min_delta`;
- **reference** (every earlier batch's test rows): non-inferior within `max_regression`
  (H0: the difference is at most -max_regression, rejected at `alpha` after Holm);
- **weighted** (every test row, weighted by the drift stage's importance weights toward the
  recent distribution): non-inferior within `max_regression` too: the data as it is now
  must not get worse;
- **domains**: no domain with at least `min_domain_rows` rows is shown to be worse than
  -max_regression (harm shown: Holm over the judged domains at `alpha`);
- **the floor** (no creep over promotions): where one of the best models the registry has
  served (`gate.floor_models` of them, see `ratchet.floor`) beats the champion on reference or
  a judged domain, the candidate passes the same test against it there, so the served model
  never ends more than `max_regression` below the best one served on the same rows;
- the test macro-F1 is at least `min_score`;
- **label noise**: the newest batch is not flagged as noisy (an estimated label-error rate far
  above the champion's own, from the noise stage) unless a person has reviewed it;
- **serving and behaviour**, judged against the champion, because absolute figures follow the
  data and the machine more than the model:
  - latency: the candidate's batch-1 time over the champion's, timed interleaved in one process,
    is at most `max_latency_ratio`; the absolute `max_latency_ms` fails only when even the
    fastest of several rounds is over it (other processes slow a round down, never speed it up)
    and, with a champion, the candidate is the slower of the two;
  - invariance to casing and to a small typo: the candidate keeps at most `max_invariance_drop`
    fewer predictions than the champion on the same perturbed rows, and at least the floor
    `min_invariance` (waived when the candidate is no less robust than the champion: it cannot
    make serving worse);
  - the team's minimum-functionality probes: at least `min_probe_accuracy` on every class.

With no champion yet (cold start) the absolute floor decides: a model that meets `min_score`
(and the probes and latency budget) is promoted; its invariance is recorded and a warning says
where it is below the floor. Holm's correction runs over the hypotheses the promotion needs
(recent, reference, weighted); each reason shows the estimate, the raw and adjusted p-value and
what was shown. Any NaN or missing number fails its check: the rule fails closed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ratchet.config import GateConfig
from ratchet.data import RECENT, REFERENCE
from ratchet.stats import Comparison, holm


@dataclass(frozen=True)
class Latency:
    """Batch-1 latency as measured by `ratchet.latency.compare` (milliseconds per example)."""

    best_ms: float
    """The candidate's p95 in the fastest round (the nearest to a quiet machine)."""
    worst_ms: float = math.nan
    """The candidate's p95 in the slowest round (how much the load moved it)."""
    ratio: float | None = None
    """Candidate time / champion time, timed back to back (median); None at cold start."""
    champion_best_ms: float | None = None


@dataclass(frozen=True)
class Behaviour:
    """Shares of predictions unchanged by casing / a small typo, on the same perturbed rows for
    both models, and the candidate's worst class's probe accuracy (None: no probes apply)."""

    casing: float
    typos: float
    probes: float | None = None
    champion_casing: float | None = None
    champion_typos: float | None = None
    """None: no champion (cold start), or its behaviour was not measured."""
    predicted_classes: int | None = None
    """How many classes the candidate predicts over the test split; with `test_classes` (the
    classes in it), 1 of several is a collapsed model, which every perturbation leaves
    unchanged: its invariance is trivially 100% and says nothing. None: not measured."""
    test_classes: int | None = None


@dataclass(frozen=True)
class Floor:
    """The candidate against a model the registry has served, on one slice: `comparison.champion`
    holds that model's score; its p-value is for the same hypothesis as the champion's check."""

    version: str
    comparison: Comparison


@dataclass(frozen=True)
class GateInputs:
    """Every number the rule reads. Each Comparison's p_value is for the hypothesis its slice
    tests: recent `diff <= 0`; reference and weighted `diff <= -max_regression`; a domain
    `diff >= -max_regression` (harm)."""

    has_champion: bool
    candidate_score: float
    """Candidate macro-F1 on the whole test split (the absolute floor applies to it)."""
    recent: Comparison | None = None
    reference: Comparison | None = None
    weighted: Comparison | None = None
    """None: no importance weights (no drift stage output), so the check has nothing to read."""
    domains: dict[str, Comparison] = field(default_factory=dict)
    latency: Latency | None = None
    """None: not measured (the check is skipped)."""
    behaviour: Behaviour | None = None
    """None: not measured (the checks are skipped)."""
    label_noise: dict | None = None
    """The noise stage's verdict on the newest batch: `flagged` (and not reviewed), `summary`.
    None: no noise report (the check is skipped)."""
    new_classes: tuple[str, ...] = ()
    """Test labels the champion cannot predict (it never saw them)."""
    floor: dict[str, Floor] = field(default_factory=dict)
    """Slice (`reference`, `domain:<name>`) -> the candidate against the best model the
    registry has served there, where that model beats the champion (see `ratchet.floor`)."""
    floor_models: int = 0
    """How many served models the floor held beside the champion (0: no floor judged)."""


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    reason: str
    warning: bool = False
    """Passed, but worth a person's look (e.g. robustness below the floor at cold start)."""


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

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.passed and c.warning]

    def to_dict(self) -> dict:
        return {"promote": self.promote, "checks": [asdict(c) for c in self.checks]}


def _bad(x: float | None) -> bool:
    return x is None or math.isnan(x)


def _pts(x: float) -> str:
    return f"{x * 100:+.2f} pts"


def _p(x: float) -> str:
    return "nan" if _bad(x) else f"{x:.4f}"


def _moved(diff: float) -> str:
    """The estimate in words: `up 1.20 pts`, `down 2.53 pts`, `level`."""
    if _bad(diff):
        return "change undefined"
    if round(abs(diff) * 100, 2) == 0:
        return "level"
    return f"{'up' if diff > 0 else 'down'} {abs(diff) * 100:.2f} pts"


def _numbers(c: Comparison) -> str:
    return (f"macro-F1 {c.candidate:.4f} vs {c.champion:.4f} ({_pts(c.diff)}, bounds "
            f"{_pts(c.low)} to {_pts(c.high)})")


def _floor_check(inp: GateInputs, cfg: GateConfig) -> Check:
    ok = not _bad(inp.candidate_score) and inp.candidate_score >= cfg.min_score
    return Check(
        "min_score",
        ok,
        f"test macro-F1 {inp.candidate_score:.4f} "
        f"{'>=' if ok else 'is not >='} the floor {cfg.min_score:.4f}",
    )


LATENCY_TIE = 1.1
"""Within 10% of the champion's time counts as no slower (two timings of one model differ by a
few percent even interleaved)."""


def _latency_check(lat: Latency, cfg: GateConfig) -> Check:
    """Ratio to the champion (timed interleaved), and the absolute budget on the fastest round.

    With a champion, being over the budget counts only when the candidate is also the slower
    of the two (by more than LATENCY_TIE): a machine busy for the whole measurement slows both
    alike, and the candidate cannot make serving slower than it is.
    """
    if _bad(lat.best_ms):
        return Check("latency", False, "batch-1 latency not measured")
    over_budget = lat.best_ms > cfg.max_latency_ms
    spread = "" if _bad(lat.worst_ms) else f" (slowest round {lat.worst_ms:.1f} ms)"
    budget = (f"p95 {lat.best_ms:.1f} ms in the fastest round{spread}, "
              f"{'over' if over_budget else 'within'} the budget {cfg.max_latency_ms:.1f} ms")
    if lat.ratio is None:  # cold start: nothing to compare with
        return Check("latency", not over_budget, f"batch-1 latency: {budget}")
    if _bad(lat.ratio):
        return Check("latency", False, f"batch-1 latency ratio to the champion not measured; "
                                       f"{budget}")
    slower = lat.ratio > cfg.max_latency_ratio
    budget_fails = over_budget and lat.ratio > LATENCY_TIE
    champ = ("" if _bad(lat.champion_best_ms)
             else f"; champion p95 {lat.champion_best_ms:.1f} ms in its fastest round")
    if over_budget and not budget_fails:
        budget += " (not held against a candidate no slower than the champion)"
    return Check(
        "latency",
        not (slower or budget_fails),
        f"batch-1 latency: {lat.ratio:.2f}x the champion's, timed interleaved "
        f"({'over' if slower else 'within'} {cfg.max_latency_ratio:.2f}x){champ}; {budget}",
    )


def _behaviour_checks(b: Behaviour, cfg: GateConfig, has_champion: bool) -> list[Check]:
    checks = []
    collapsed = (b.predicted_classes is not None and b.test_classes is not None
                 and b.predicted_classes <= 1 < b.test_classes)
    for name, what, rate, champ in (
        ("casing", "changing the casing", b.casing, b.champion_casing),
        ("typos", "a small typo", b.typos, b.champion_typos),
    ):
        key = f"invariance_{name}"
        if _bad(rate):
            checks.append(Check(key, False, f"invariance to {what} not measured"))
            continue
        if collapsed:
            checks.append(Check(
                key, False,
                f"the candidate predicts one class for every test row ({b.test_classes} "
                f"classes in the test split): a collapsed model, so its {rate:.0%} of "
                f"predictions surviving {what} says nothing about robustness"))
            continue
        below_floor = rate < cfg.min_invariance
        shown = f"{rate:.1%} of predictions survive {what}"
        floor = f"floor {cfg.min_invariance:.0%}"
        if not has_champion:
            checks.append(Check(
                key, True,
                f"{shown}; cold start: recorded, not judged"
                + (f" (WARNING: below the {floor})" if below_floor else f" (>= the {floor})"),
                warning=below_floor,
            ))
            continue
        if _bad(champ):
            checks.append(Check(key, False, f"{shown}; the champion's rate on the same rows was "
                                            "not measured"))
            continue
        drop = champ - rate
        less_robust = drop > cfg.max_invariance_drop + 1e-9  # shares of counts: no float dust
        floor_fails = below_floor and rate < champ  # the floor is waived at or above the champion
        verdict = ("less robust than the champion beyond the margin" if less_robust else
                   f"below the {floor}" if floor_fails else "robust enough")
        checks.append(Check(
            key, not (less_robust or floor_fails),
            f"{shown} vs the champion's {champ:.1%} on the same rows ({_pts(-drop)}; margin "
            f"{cfg.max_invariance_drop * 100:.2f} pts, {floor}): {verdict}",
        ))
    if b.probes is None:
        checks.append(Check("probes", True, "no probes apply (none in the probes file for "
                                            "the classes the candidate has seen)"))
    else:
        ok = not _bad(b.probes) and b.probes >= cfg.min_probe_accuracy
        checks.append(Check(
            "probes",
            ok,
            f"worst class passes {_p(b.probes) if _bad(b.probes) else f'{b.probes:.0%}'} of its "
            f"minimum-functionality probes (needs >= {cfg.min_probe_accuracy:.0%})",
        ))
    return checks


def _noise_check(noise: dict) -> Check:
    summary = noise.get("summary") or "no summary"
    if noise.get("flagged"):
        return Check("label_noise", False,
                     f"{summary}; review its suspect rows with `ratchet labels` (accept or drop), "
                     "then re-run")
    return Check("label_noise", True, summary)


def decide(inp: GateInputs, cfg: GateConfig) -> Decision:
    """Apply the gate rule. Any NaN or missing number fails its check: the rule fails closed."""
    checks = [_floor_check(inp, cfg)]
    if inp.label_noise is not None:
        checks.append(_noise_check(inp.label_noise))
    if inp.latency is not None:
        checks.append(_latency_check(inp.latency, cfg))
    if inp.behaviour is not None:
        checks += _behaviour_checks(inp.behaviour, cfg, inp.has_champion)
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
    checks += _floor_checks(inp, cfg)
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
        verdict = "gain shown"
    elif not significant:
        verdict = f"gain not shown at alpha {cfg.alpha:g}"
    else:
        verdict = f"gain shown but below min_delta {_pts(cfg.min_delta)}"
    return Check(
        "recent",
        ok,
        f"recent (n={c.n}): {_moved(c.diff)}; {verdict}: {_numbers(c)}; p={_p(c.p_value)}, "
        f"Holm p={_p(p_holm)} (needs < {cfg.alpha}) and gain >= {_pts(cfg.min_delta)}",
    )


def _non_inferior(name: str, c: Comparison | None, p_holm: float, cfg: GateConfig, *,
                  empty: str) -> Check:
    if c is None or c.n == 0:
        return Check(name, True, empty)
    if any(_bad(x) for x in (c.diff, c.p_value, c.candidate, c.champion)):
        return Check(name, False, f"{name} difference is undefined (NaN)")
    ok = p_holm < cfg.alpha
    margin = f"{cfg.max_regression * 100:.2f} pts"
    # A failure means non-inferiority was not shown: a real drop, or too little evidence (a
    # small slice, or Holm's stricter level), so the reason says which the numbers suggest.
    if ok:
        verdict = f"no drop beyond {margin} shown (non-inferior)"
    elif c.diff <= -cfg.max_regression:
        verdict = ("regressed beyond the margin (forgetting)" if name == "reference"
                   else "dropped beyond the margin on the data as it is now")
    else:
        verdict = (f"non-inferiority within {margin} not shown at alpha {cfg.alpha:g} "
                   "(too little evidence)")
    return Check(
        name,
        ok,
        f"{name} (n={c.n}): {_moved(c.diff)}; {verdict}: {_numbers(c)}; p={_p(c.p_value)}, "
        f"Holm p={_p(p_holm)} for a drop of more than {margin} (needs < {cfg.alpha})",
    )


def _floor_checks(inp: GateInputs, cfg: GateConfig) -> list[Check]:
    """No creep: non-inferior within the margin to the best model ever served, not only to the
    champion.

    Each promotion may lose up to `max_regression` against the champion; without a floor, k
    promotions could lose k times that against a model the registry once served. Where one of
    the floor's models beats the champion on reference or a judged domain, the candidate faces
    it with the champion's own test there: non-inferiority shown on reference, no harm shown
    per domain (Holm over the domains the floor judges). The promotion needs every one of its
    tests (an intersection-union test), so each runs at `alpha`.
    """
    if not inp.floor_models:
        return []
    margin = f"{cfg.max_regression * 100:.2f} pts"
    checks = []
    domains = {s: f for s, f in inp.floor.items() if s.startswith("domain:")}
    adjusted = holm({s: f.comparison.p_value for s, f in domains.items()})
    for name in sorted(inp.floor, key=lambda s: (s != "reference", s)):
        f = inp.floor[name]
        c = f.comparison
        what = (f"{name} vs version {f.version}, the best model served on these rows "
                f"(macro-F1 {c.champion:.4f})")
        if any(_bad(x) for x in (c.diff, c.p_value, c.candidate, c.champion)):
            checks.append(Check(f"floor:{name}", False, f"{what}: difference is undefined"))
            continue
        if name == "reference":
            ok = c.p_value < cfg.alpha
            verdict = (f"no drop beyond {margin} shown (non-inferior)" if ok else
                       "regressed beyond the margin" if c.diff <= -cfg.max_regression else
                       f"non-inferiority within {margin} not shown at alpha {cfg.alpha:g}")
            p = f"p={_p(c.p_value)} for a drop of more than {margin} (needs < {cfg.alpha})"
        else:
            ok = not adjusted[name] < cfg.alpha
            verdict = (f"harm beyond {margin} shown at alpha {cfg.alpha:g}" if not ok else
                       "no harm" if c.diff >= 0 else f"harm beyond {margin} not shown")
            p = f"p={_p(c.p_value)}, Holm p={_p(adjusted[name])} over {len(domains)} domain(s)"
        checks.append(Check(
            f"floor:{name}", ok,
            f"{what}: {_moved(c.diff)}; {verdict}: candidate {c.candidate:.4f} "
            f"({_pts(c.diff)}, bounds {_pts(c.low)} to {_pts(c.high)}); {p}",
        ))
    if not checks:
        kept = inp.floor_models + 1
        checks.append(Check("floor", True, f"the champion is the best of the {kept} served "
                                           "models kept as the floor on reference and on every "
                                           "judged domain: its checks cover the floor"))
    return checks


def _domain_checks(domains: dict[str, Comparison], cfg: GateConfig) -> list[Check]:
    """Harm per domain: fail a domain where harm beyond the margin is shown (Holm at alpha over
    the judged domains). Not being shown harmed is not being shown unharmed: a domain down by
    more than the margin without enough evidence passes, and its reason says so.

    Domains with fewer rows than `min_domain_rows` are reported, not judged.
    """
    judged = {d: c for d, c in domains.items() if c.n >= cfg.min_domain_rows}
    small = sorted(d for d, c in domains.items() if 0 < c.n < cfg.min_domain_rows)
    adjusted = holm({d: c.p_value for d, c in judged.items()})
    margin = f"{cfg.max_regression * 100:.2f} pts"
    checks = []
    for d in sorted(judged):
        c = judged[d]
        if _bad(c.diff) or _bad(adjusted[d]):
            checks.append(Check(f"domain:{d}", False, f"domain {d}: difference is undefined"))
            continue
        harmed = adjusted[d] < cfg.alpha
        if harmed:
            verdict = f"harm beyond {margin} shown at alpha {cfg.alpha:g}"
        elif c.diff < 0:
            verdict = f"harm beyond {margin} not shown at alpha {cfg.alpha:g}"
        else:
            verdict = "no harm"
        checks.append(Check(
            f"domain:{d}",
            not harmed,
            f"domain {d} (n={c.n}): {_moved(c.diff)}; {verdict}: {_numbers(c)}; "
            f"p={_p(c.p_value)}, Holm p={_p(adjusted[d])} over {len(judged)} judged domain(s)",
        ))
    if small:
        checks.append(Check("domains_small", True, f"{len(small)} domain(s) with fewer than "
                            f"{cfg.min_domain_rows} test rows not judged: {', '.join(small[:8])}"))
    return checks


# --- from evaluation metrics ---------------------------------------------------------------

def comparison(m: dict[str, float], name: str) -> Comparison | None:
    """The macro-F1 comparison on one slice, its p-value the one the rule tests there."""
    if f"diff/{name}/macro_f1" not in m:
        return None
    nan = math.nan
    return Comparison(
        n=int(m.get(f"n/{name}", 0)),
        candidate=m.get(f"candidate/{name}/macro_f1", nan),
        champion=m.get(f"champion/{name}/macro_f1", nan),
        diff=m[f"diff/{name}/macro_f1"],
        low=m.get(f"diff/{name}/macro_f1_low", nan),
        high=m.get(f"diff/{name}/macro_f1_high", nan),
        p_value=m.get(f"test/{name}/p_value", nan),
    )


def _measured(m: dict[str, float], key: str, required: bool) -> float | None:
    """A measurement: NaN (fails) when required and absent, else None (skipped)."""
    if key in m:
        return m[key]
    return math.nan if required else None


def _count(value: float | None) -> int | None:
    return None if value is None or _bad(value) else int(value)


def gate_inputs(m: dict[str, float], champion: dict, *, noise: dict | None = None,
                new_classes: list[str] | tuple[str, ...] = (),
                require_measured: bool = True) -> GateInputs:
    """The rule's inputs from the evaluation metrics (and the noise stage's report).

    `require_measured`: latency and behaviour must be in `m` (the pipeline always measures
    them); False lets a caller that cannot measure them (the gate benchmark) skip those checks.
    """
    has_champion = bool(champion.get("version"))
    domains = {}
    for key in m:
        if key.startswith("n/domain:"):
            name = key[len("n/"):]
            c = comparison(m, name)
            if c is not None:
                domains[name[len("domain:"):]] = c
    behaviour = None
    casing = _measured(m, "behaviour/candidate/casing", require_measured)
    if casing is not None:
        behaviour = Behaviour(
            casing=casing, typos=_measured(m, "behaviour/candidate/typos", True),
            probes=m.get("behaviour/candidate/probes"),
            champion_casing=_measured(m, "behaviour/champion/casing", True)
            if has_champion else None,
            champion_typos=_measured(m, "behaviour/champion/typos", True)
            if has_champion else None,
            predicted_classes=_count(m.get("behaviour/candidate/predicted_classes")),
            test_classes=_count(m.get("behaviour/test_classes")),
        )
    latency = None
    best = _measured(m, "candidate/latency/best_p95_ms_bs1", require_measured)
    if best is not None:
        latency = Latency(
            best_ms=best, worst_ms=m.get("candidate/latency/worst_p95_ms_bs1", math.nan),
            ratio=_measured(m, "latency/ratio_bs1", True) if has_champion else None,
            champion_best_ms=m.get("champion/latency/best_p95_ms_bs1"),
        )
    floor = {}
    for key in m:
        if key.startswith("n/floor:"):
            name = key[len("n/"):]
            c = comparison(m, name)
            version = m.get(f"floor/model/{name}")
            if c is not None and version is not None:
                floor[name[len("floor:"):]] = Floor(f"{version:g}", c)
    label_noise = None
    if noise:
        label_noise = {"flagged": bool(noise.get("flagged")), "summary": noise.get("summary")}
    return GateInputs(
        has_champion=has_champion,
        candidate_score=m.get("candidate/all/macro_f1", math.nan),
        recent=comparison(m, RECENT),
        reference=comparison(m, REFERENCE),
        weighted=comparison(m, "weighted"),
        domains=domains,
        latency=latency,
        behaviour=behaviour,
        label_noise=label_noise,
        new_classes=tuple(new_classes),
        floor=floor,
        floor_models=int(m.get("floor/models", 0)) if has_champion else 0,
    )


def rule_decision(metrics: dict[str, float], params, *,
                  has_champion: bool = True) -> Decision:
    """The rule on a metrics dict from `ratchet.evaluation.score` (latency/behaviour optional)."""
    inputs = gate_inputs(metrics, {"version": "champion" if has_champion else None},
                         require_measured=False)
    return decide(inputs, params.gate)
