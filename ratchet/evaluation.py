"""Evaluation in the core: both models' predictions on the test split, and the metrics and paired
statistics of every slice that the gate rule reads.

The evaluate stage (`tasks/evaluate.py`), the gate's re-evaluation when `champion` moves, the floor
and the benchmarks all call these functions, so every path judges a candidate the same way.

Slices: `all`, `recent` (the newest batch's test rows), `reference` (every earlier batch's),
`domain:<name>` for each domain, and `weighted`: the test rows the drift stage weighted (a
bounded sample of them; the others have weight 0), each weighted by its importance weight, an
estimate of how each model does on data distributed like the recent batch.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ratchet.config import Params
from ratchet.data import DOMAIN, LABEL, RECENT, REFERENCE, TEXT
from ratchet.drift import effective_sample_size
from ratchet.errors import RatchetError

SLICES = ("all", RECENT, REFERENCE)
MODELS = ("candidate", "champion")


def slice_masks(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Row masks of every unweighted slice: all, recent, reference, and each domain."""
    masks = {"all": np.ones(len(df), dtype=bool)}
    for name in (RECENT, REFERENCE):
        masks[name] = (df["slice"] == name).to_numpy() if "slice" in df else np.zeros(len(df), bool)
    if DOMAIN in df.columns:
        domains = df[DOMAIN].fillna("").astype(str)
        for d in sorted(set(domains) - {""}):
            key = f"domain:{_safe(d)}"
            if key in masks:  # two names that read alike once made safe: keep both apart
                key += "-" + hashlib.sha256(d.encode()).hexdigest()[:6]
            masks[key] = (domains == d).to_numpy()
    return masks


def _safe(name: str) -> str:
    """A domain name usable inside a metric key (MLflow metric names allow few characters)."""
    return re.sub(r"[^\w.\-]+", "_", name)[:60] or "_"


def champion_labels(model) -> list[str] | None:
    """The label set the champion can predict (None when its pyfunc does not say)."""
    try:
        return list(model.unwrap_python_model().labels)
    except Exception:  # noqa: BLE001 - a pyfunc from elsewhere: fall back to "unknown"
        return None


def load_test_weights(weights: Path, df: pd.DataFrame) -> np.ndarray:
    """The drift stage's importance weights, checked to belong to exactly these test rows."""
    table = pd.read_parquet(weights)
    if len(table) != len(df) or table["text"].astype(str).tolist() != df[TEXT].astype(str).tolist():
        raise RatchetError(
            f"{weights}: the importance weights are for {len(table)} rows that do not match the "
            f"{len(df)} rows of the test split (re-run the drift stage: `dvc repro drift`)"
        )
    w = table["weight"].to_numpy(dtype=float)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise RatchetError(f"{weights}: importance weights must be finite, non-negative and not "
                           "all zero (re-run the drift stage: `dvc repro drift`)")
    return w


def _model_metrics(out: dict[str, float], df: pd.DataFrame, name: str, mask: np.ndarray,
                   weights: np.ndarray | None = None) -> None:
    from ratchet import metrics as project_metrics

    refs = df.loc[mask, LABEL].astype(str).tolist()
    w = None if weights is None else weights[mask]
    for model in MODELS:
        if model not in df.columns:
            continue
        preds = df.loc[mask, model].astype(str).tolist()
        for metric, value in project_metrics.compute(preds, refs, sample_weight=w).items():
            out[f"{model}/{name}/{metric}"] = value
        if f"{model}_score" in df.columns:
            conf = df.loc[mask, f"{model}_score"].to_numpy(dtype=float)
            correct = (np.asarray(preds) == np.asarray(refs)).astype(int)
            out[f"{model}/{name}/ece"] = project_metrics.ece(conf, correct, sample_weight=w)


def score(frame: pd.DataFrame, params: Params) -> dict[str, float]:
    """Metrics and paired statistics of every slice of a predictions frame.

    `frame` has `label`, `slice` (recent | reference), `candidate`, optionally `champion`,
    `domain`, `weight` (importance weights: the `weighted` slice) and `<model>_score` (the
    confidence, for calibration). Keys: `n/<slice>`, `<model>/<slice>/<metric>`,
    `diff/<slice>/<metric>[_low|_high|_p_value]` (p-value of "no gain"), `mcnemar/<slice>/...`,
    and `test/<slice>/p_value`: the p-value of the hypothesis the gate rule tests on that slice
    (recent: no gain; reference and weighted: a drop beyond max_regression; a domain: no drop
    beyond it).

    The recent p-value is the paired permutation test's (`ratchet.stats.paired_permutation`:
    each resample swaps the two models' predictions on a random half of the rows): exact when
    the two models are exchangeable. The percentile bootstrap it replaced rejected equal models
    at about twice alpha when the slice has many one-row classes, and more often than the
    permutation test on skewed class mixes (benchmarks/gate.py, type-I section). Its price:
    with D rows where the two models disagree p >= 2^-D, so it is conservative on small
    slices and a gain resting on fewer than 5 such rows never passes alpha 0.05. The
    reported difference and bounds stay the bootstrap's.

    A domain's p-value (`ratchet.stats.harm_p_value`) must be able to be small: the rule applies
    Holm over the judged domains, and a p-value counted from B resamples is never below
    1/(B+1), so with 2,000 resamples and 101 or more domains no domain could ever fail. It is
    the larger of (a) the normal approximation P(Z <= (diff + max_regression) / se), se the
    bootstrap's standard error (no floor; with se 0: 0 below -max_regression, else 1), and
    (b) the paired permutation p-value of "the candidate is not worse", counted with enough
    resamples to go below alpha / judged domains / 10 when it is at its floor. Harm beyond
    the margin implies worse, so (b) only adds caution; without it, a domain where a few
    discordant rows make the whole drop fails on equal models (on CLINC150, two seeds at 1,000
    recent rows: 7% of cases failed a domain with (a) alone, none with both).

    Memory grows with the rows, never with resamples x rows: the resampling statistics run a
    block of resamples at a time (`ratchet.stats.BLOCK_BYTES`); 1M test rows score in about
    1.3 GB (`benchmarks/eval_scale.py`).
    """
    from ratchet.stats import bootstraps, harm_p_value, mcnemar, paired_permutation

    cfg, margin = params.evaluate, -params.gate.max_regression
    out: dict[str, float] = {}
    has_champion = "champion" in frame.columns
    masks = slice_masks(frame)
    if "weight" in frame.columns:
        # The rows the drift stage weighted (it weights a bounded sample of the test rows and
        # gives the rest 0): a row of weight 0 adds nothing to a weighted metric.
        masks["weighted"] = frame["weight"].to_numpy(dtype=float) > 0
    judged = sum(1 for k, m in masks.items()
                 if k.startswith("domain:") and m.sum() >= params.gate.min_domain_rows)
    for name, mask in masks.items():
        weights = frame["weight"].to_numpy(dtype=float) if name == "weighted" else None
        out[f"n/{name}"] = int(mask.sum())
        if weights is not None:
            out["ess/weighted"] = effective_sample_size(weights[mask])
        _model_metrics(out, frame, name, mask, weights)
        if not has_champion:
            continue
        refs = frame.loc[mask, LABEL].astype(str).tolist()
        cand = frame.loc[mask, "candidate"].astype(str).tolist()
        champ = frame.loc[mask, "champion"].astype(str).tolist()
        boots = bootstraps(refs, cand, champ, metrics=("macro_f1", "accuracy"),
                           resamples=cfg.bootstrap_resamples, seed=cfg.seed,
                           weights=None if weights is None else weights[mask])
        for metric, boot in boots.items():
            c = boot.comparison(cfg.confidence)
            out[f"diff/{name}/{metric}"] = c.diff
            out[f"diff/{name}/{metric}_low"] = c.low
            out[f"diff/{name}/{metric}_high"] = c.high
            out[f"diff/{name}/{metric}_p_value"] = c.p_value
            if metric == "macro_f1":
                if name == RECENT:
                    out[f"test/{name}/p_value"] = paired_permutation(
                        refs, cand, champ, resamples=cfg.bootstrap_resamples, seed=cfg.seed,
                    ).p_value
                elif name in (REFERENCE, "weighted"):
                    out[f"test/{name}/p_value"] = boot.p_below(margin)
                elif name.startswith("domain:"):
                    out[f"test/{name}/p_value"] = harm_p_value(
                        refs, cand, champ, boot, margin=margin, seed=cfg.seed,
                        resamples=cfg.bootstrap_resamples,
                        resolution=params.gate.alpha / max(judged, 1) / 10,
                    )
        if weights is None and refs:
            for key, value in mcnemar(refs, cand, champ).items():
                out[f"mcnemar/{name}/{key}"] = float(value)
    served = [c for c in frame.columns if str(c).startswith(SERVED_PREFIX)]
    if has_champion and served:
        out["floor/models"] = len(served)
        out.update(floor_scores(frame, masks, served, params, judged))
    return out


FLOOR = "floor:"
"""Prefix of the floor's comparisons: `floor:reference`, `floor:domain:<name>`."""


def floor_scores(frame: pd.DataFrame, masks: dict[str, np.ndarray], served: list[str],
                 params: Params, judged: int) -> dict[str, float]:
    """The candidate against the best model the registry has served, slice by slice.

    For reference and every judged domain: each floor model's macro-F1 on the slice
    (`served:<v>/<slice>/macro_f1`); when the best of them beats the champion there, the
    candidate is compared with that model exactly as with the champion (`floor:<slice>`: the
    bootstrap's difference and bounds, `test/floor:<slice>/p_value` of the same hypothesis as
    the champion's check, `floor/model/floor:<slice>` the version). Where the champion is the
    best served model, its own check already covers the slice and nothing is added.
    """
    from ratchet.stats import bootstrap, harm_p_value, macro_f1

    cfg, margin = params.evaluate, -params.gate.max_regression
    out: dict[str, float] = {}
    least = params.gate.min_domain_rows
    names = [REFERENCE] + sorted(k for k, m in masks.items()
                                 if k.startswith("domain:") and m.sum() >= least)
    for name in names:
        mask = masks.get(name)
        if mask is None or not mask.any():
            continue
        refs = frame.loc[mask, LABEL].astype(str).tolist()
        best, best_f1 = None, macro_f1(refs, frame.loc[mask, "champion"].astype(str).tolist())
        for col in served:
            f1 = macro_f1(refs, frame.loc[mask, col].astype(str).tolist())
            out[f"{col}/{name}/macro_f1"] = f1
            if f1 > best_f1 + 1e-12:
                best, best_f1 = col, f1
        if best is None:
            continue
        key = f"{FLOOR}{name}"
        cand = frame.loc[mask, "candidate"].astype(str).tolist()
        floor = frame.loc[mask, best].astype(str).tolist()
        boot = bootstrap(refs, cand, floor, metric="macro_f1",
                         resamples=cfg.bootstrap_resamples, seed=cfg.seed)
        c = boot.comparison(cfg.confidence)
        out[f"n/{key}"] = int(mask.sum())
        out[f"floor/model/{key}"] = float(best[len(SERVED_PREFIX):])
        out[f"candidate/{key}/macro_f1"] = c.candidate
        out[f"champion/{key}/macro_f1"] = c.champion  # the floor model's, in Comparison's place
        out[f"diff/{key}/macro_f1"] = c.diff
        out[f"diff/{key}/macro_f1_low"] = c.low
        out[f"diff/{key}/macro_f1_high"] = c.high
        out[f"test/{key}/p_value"] = boot.p_below(margin) if name == REFERENCE else harm_p_value(
            refs, cand, floor, boot, margin=margin, seed=cfg.seed,
            resamples=cfg.bootstrap_resamples, resolution=params.gate.alpha / max(judged, 1) / 10)
    return out


SERVED_PREFIX = "served:"
"""Prediction columns of the floor's models (`served:<version>`), beside `champion`."""


def _pyfunc_predict(model) -> Any:
    def predict(texts: list[str]) -> tuple[list[str], list[float]]:
        out = model.predict(pd.DataFrame({"text": texts}))
        return out["label"].astype(str).tolist(), out["score"].astype(float).tolist()

    return predict


def predict_frame(params: Params, candidate: Path, test: Path, champion: dict,
                  weights: Path | None = None, *, cache: Path | None = None
                  ) -> tuple[pd.DataFrame, Any, Any]:
    """Every model's predictions on the test split: (frame, candidate classifier, champion).

    Besides the candidate and the champion, the floor's models (`champion["floor"]`: the best
    models the registry has served, see `ratchet.floor`) get a `served:<version>` column. With
    `cache` (a folder), each model predicts only the texts it has not predicted before
    (`ratchet.cache`), and a floor model is loaded only when it has such texts.
    """
    from ratchet.cache import PredictionCache
    from ratchet.models import Classifier
    from ratchet.registry import load_champion, load_version
    from ratchet.workspace import fingerprint

    store = PredictionCache(cache)
    df = pd.read_parquet(test)
    texts = df[TEXT].astype(str).tolist()
    clf = Classifier(candidate, batch_size=params.evaluate.batch_size)

    def predict_candidate(batch: list[str]) -> tuple[list[str], Any]:
        labels, probs = clf.predict(batch)
        return labels, probs.max(axis=1).astype(float)

    predicted: dict[str, int] = {}
    labels, scores, predicted["candidate"] = store.predict(fingerprint(candidate), texts,
                                                           predict_candidate)
    df["candidate"] = labels
    df["candidate_score"] = scores
    champ = load_champion(params, champion)
    if champ is not None:
        labels, scores, predicted["champion"] = store.predict(
            champion.get("fingerprint"), texts, _pyfunc_predict(champ))
        df["champion"] = labels
        df["champion_score"] = scores
        for member in champion.get("floor") or []:
            version = str(member["version"])
            if version == str(champion.get("version")):
                continue
            loaded: list[Any] = []

            def predict_member(batch: list[str], version: str = version, loaded=loaded):
                if not loaded:
                    loaded.append(load_version(params, champion["name"], version))
                return _pyfunc_predict(loaded[0])(batch)

            column = f"{SERVED_PREFIX}{version}"
            labels, _, predicted[column] = store.predict(member.get("fingerprint"), texts,
                                                         predict_member)
            df[column] = labels
    if weights is not None:
        df["weight"] = load_test_weights(weights, df)
    df.attrs["predicted"] = predicted  # rows each model predicted now (the rest were cached)
    return df, clf, champ


class _PyfuncPredictor:
    """A pyfunc that is not ratchet's, as `latency.compare` and `behaviour` need it."""

    def __init__(self, model) -> None:
        self.model, self.batch_size = model, 64

    def predict_proba(self, texts: list[str]):
        out = self.model.predict(pd.DataFrame({"text": texts}))
        return np.asarray(out["probabilities"].tolist(), dtype=float)

    def predict(self, texts: list[str]) -> tuple[list[str], Any]:
        out = self.model.predict(pd.DataFrame({"text": texts}))
        return out["label"].astype(str).tolist(), None


def champion_predictor(champ):
    """The champion's classifier (ratchet's pyfunc: its Classifier; otherwise the pyfunc)."""
    if champ is None:
        return None
    try:
        return champ.unwrap_python_model().classifier
    except Exception:  # noqa: BLE001 - a pyfunc from elsewhere
        return _PyfuncPredictor(champ)


def serving(df: pd.DataFrame, params: Params, clf, champ) -> tuple[dict[str, float], dict]:
    """Latency and invariance of the candidate and the champion, measured side by side.

    Both models are timed interleaved in this process (`ratchet.latency.compare`) and perturbed
    on the same rows with the same typos, so the gate can judge the candidate against the
    champion rather than against absolute figures that follow the machine and the data.
    Returns (flat metrics, the invariance details of both models).
    """
    from ratchet import behaviour
    from ratchet.latency import compare

    cfg = params.evaluate
    texts = df[TEXT].astype(str).tolist()
    rng = np.random.default_rng(cfg.seed)
    sample = [texts[i] for i in sorted(rng.permutation(len(texts))[: cfg.latency_examples])]
    rows = [texts[i] for i in sorted(rng.permutation(len(texts))[: cfg.behaviour_rows])]
    champion = champion_predictor(champ)
    flat = compare(clf, champion, sample) if cfg.latency_examples else {}
    found: dict[str, Any] = {}
    for name, model in (("candidate", clf), ("champion", champion)):
        if model is None:
            continue

        def predict(batch: list[str], model=model) -> list[str]:
            return model.predict(batch)[0] if batch else []

        inv = behaviour.invariance(predict, rows, seed=cfg.seed)
        flat[f"behaviour/{name}/casing"] = float(inv["casing"])
        flat[f"behaviour/{name}/typos"] = float(inv["typos"])
        found[name] = inv
    return flat, found


