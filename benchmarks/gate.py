"""Gate decision quality on CLINC150: promotion rates of ratchet's rule, a naive rule and MLflow's.

Data: `../shared/data/clinc150/{train,val,test}.csv` (columns text, label, domain), read by path
and never copied; the `oos` rows are left out (150 intents in 10 domains).

Models (real predictions). Full fine-tuning of MiniLM was measured at ~1.5 s per batch of 32
on this shared 2-core machine (~12 min per epoch per seed), far over the budget, so every model
is a head on frozen features: the packaged MiniLM (`minilm-l6`) embeds each text once
(`ratchet.embed.embed`, mean pooling, max_length 64; ~2-4 min, cached under
benchmarks/.cache/gate/), then a dropout MLP head (HEAD) is trained on CLINC150 train with the
project's AdamW, warmup/decay schedule and batching (`ratchet.training`), once per seed of
RECIPE_SEEDS (~5 s each; top-2 predictions on val and test are cached). The seeds score
~0.956 test macro-F1 and disagree on ~1.8% of test rows. Most of the run is ratchet's rule:
~0.9 s per case (`score` computes every metric of every slice), ~9 min for 600 cases.

Scenarios. Champion and candidate are an ordered pair of distinct seeds (12 pairs, cycled over
the cases); the champion's predictions are always the champion seed's own.
- equal: the candidate is the other seed as trained (same recipe, different seed).
- better: the candidate seed with a fixed share of its errors corrected (rows in a seeded
  random order; corrected to the true label). A ~2-point better model was not on offer: larger
  heads and seed ensembles on the same frozen features saturate at the same ~0.957, and full
  fine-tuning is too slow here; correcting a fixed subset keeps the candidate's natural
  disagreements with the champion (seed churn, wins and losses) and adds real-sized gains.
- forgetting: the better candidate on recent; on reference the same candidate with a fixed
  share of its right answers turned into its own most probable wrong class.
The shares are calibrated per pair on the val pool (held out from the simulation), by bisection
on the mean gap over CALIBRATION_DRAWS fixed resamples of N_RECENT rows, so that the expected
candidate - champion macro-F1 is TARGET_GAIN (+2 pts) on recent and TARGET_FORGET (-3 pts) on
reference; the same shares are then applied to the test pool. Each modified prediction array is
a fixed model: cases resample rows, they never re-draw which rows changed.

Cases. Each case (own seed) draws a recent slice of N_RECENT and a reference slice of
N_REFERENCE rows from the test pool (4,500 rows), independently and with replacement (each
slice a fresh sample from the population the pool stands for). The realised gaps are reported
per scenario (`mean_gaps`: mean and sd over cases).

Rules, on each case:
- ratchet: the project's own code, `ratchet.evaluation.score` on the case's frame (label, slice,
  candidate, champion) then `ratchet.gate.rule_decision` with default Params (bootstrap 2000
  resamples, unchanged); latency and behaviour checks are skipped (not measurable here),
  validation passed, a champion exists. Without `domain` in the frame (see WITH_DOMAIN).
- naive: promote when the candidate's recent macro-F1 is greater (ZenML-template style).
- mlflow_threshold: `mlflow.validate_evaluation_results` with
  `MetricThreshold(threshold=gate.min_score, min_absolute_change=gate.min_delta,
  greater_is_better=True)` on recent macro-F1, the champion as baseline; MLflow checks
  `candidate >= baseline + min_absolute_change` and `candidate >= threshold`, both on point
  values. The absolute threshold (0.5, ratchet's floor) never binds here (scores ~0.95), and
  min_absolute_change must be positive, so MLflow's baseline comparison cannot express a
  non-inferiority margin on reference: this rule looks at recent only.
- mlflow_two_sided: the best a careful MLflow user writes: the same threshold on recent plus
  `MetricThreshold(threshold=champion's reference macro-F1 - gate.max_regression)` on reference
  macro-F1, both in one `validate_evaluation_results` call (the reference bound goes through the
  absolute threshold, computed from the champion's score, since min_absolute_change cannot be
  negative). Point values, against the current champion only.

Targets: promotion <= 5% (equal), >= 80% (better), <= 5% (forgetting). Output: promotion rate
per rule and scenario, `cases`, `n_recent`, `n_reference`, `mean_gaps`, the checks that failed
ratchet's rule, calibration (per pair and mean), model scores, params and phase seconds.

Long horizon (`long_horizon`; margin creep, issue "The ratchet holds"). LONG_SEQUENCES
sequences of LONG_ROUNDS gate rounds, each rule with its own champion from the same start (a
recipe seed, sequence mod 4). Every round draws fresh rows: LONG_N_RECENT recent rows from the val
pool (3,000 rows) and LONG_N_REFERENCE reference rows from the test pool (4,500 rows), both with
replacement. The adversary builds the candidate from the rule's CURRENT champion: on reference,
its predictions with right answers broken (to the seed's most probable wrong class) until the
loss on the whole test pool reaches a loss drawn uniformly in [0, max_regression] (never more);
on recent (new data, where every served model predicts as its recipe seed) the seed's
predictions with errors fixed for +TARGET_GAIN on the whole val pool. A promoted candidate is a
fixed model reused in later rounds. ratchet runs the project's path with the floor: the frame
with the pool's models as `served:<version>` columns -> `score` -> `rule_decision`, the pool
then kept as `ratchet.floor.update` keeps it (`ranking`, `next_pool`, gate.floor_models). Reported
per rule: the worst drop of the served champion below the best model served so far, macro-F1 on
the whole test pool (every served model on the same rows), per sequence (max and distribution),
and the share of rounds promoted. Target: ratchet <= max_regression + 0.5 pt in every sequence.
The sequences run in LONG_WORKERS processes (each seeded by its index: the same numbers).

Sections can be kept from the previous results file instead of re-run (`python -m benchmarks
gate --keep type1 --keep scenarios_ratchet`, KEEPABLE): the file then says which, from which
commit, and whether the re-run baselines match the kept file's (same seeded cases).

Type-I error of the recent check (`type1`, `type1_detail`). Equal quality: the champion and the
candidate are two seeds of the recipe (the ordered pairs, cycled), as in `equal`. For each size
n of TYPE1_SIZES and each kind of recent slice, TYPE1_CASES cases draw n rows:
- uniform: uniformly, with replacement, from the test pool;
- rare: a skewed class mix drawn per case: class weights ~ 1/rank (Zipf, RARE_ZIPF) in a random
  order of the classes, each class's weight spread evenly over its rows; many classes then have
  only 1-2 rows in the slice (reported as `classes_with_1_2_rows`).
On each case, with the evaluate defaults (params.evaluate.bootstrap_resamples and seed):
`bootstrap`: the recent p-value before the permutation test, `ratchet.stats.bootstrap(...)
.p_below(0.0)`; `permutation`: the one `ratchet.evaluation.score` now reports as
`test/recent/p_value`, `ratchet.stats.paired_permutation(...).p_value`. Reported: the rejection
rate at params.gate.alpha (`test`) and the recent check as the rule applies it (`check`: p <
alpha and gain >= min_delta; the rule compares Holm's adjusted p, which is never below the raw
one, so `check` is an upper bound of its rate). SE = sqrt(alpha (1 - alpha) / cases), target
<= alpha + 2 SE. `type1` = the project's check (RECENT_TEST) on uniform slices.
Two seeds are of equal quality on the pool, but not exactly on every skewed class mix (on a mix
where one seed is better on the heavy classes it is better there, by a fraction of a point), so
each cell also has a `control` (TYPE1_CONTROL_CASES of the same slices with each row's pair of
predictions put in a random order: equal quality by construction, the exact H0 of the
permutation test) and `diff_sd`, the case-to-case sd of the observed gain, beside each test's
mean spread (`boot_se`, `null_sd`). `power`: the same tests on uniform slices with the
`better` candidate (+2 pts; POWER_CASES per size). The statistics run with one BLAS thread:
on a busy 2-core machine numpy's threads made the bootstrap's products ~7x slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
CACHE = Path(__file__).resolve().parent / ".cache" / "gate"
SPLITS = ("train", "val", "test")
MAX_LENGTH = 64  # the default model.max_length
EMBED_BATCH = 128
ENCODER_SEED = 13  # the default model.seed (the packaged MiniLM has no random part to seed)

# The recipe every model shares: a one-hidden-layer head on frozen MiniLM sentence embeddings,
# trained with the project's optimizer, schedule and batching (ratchet.training).
HEAD = {"hidden": 512, "dropout": 0.3, "epochs": 6, "batch_size": 64, "learning_rate": 1e-3,
        "weight_decay": 0.01, "warmup_ratio": 0.1}
RECIPE_SEEDS = (0, 1, 2, 3)

SCENARIOS = ("equal", "better", "forgetting")
CASES = 200  # per scenario
N_RECENT = 1000
N_REFERENCE = 1000
TARGET_GAIN = 0.02  # better/forgetting: expected candidate - champion macro-F1 on recent
TARGET_FORGET = -0.03  # forgetting: expected candidate - champion macro-F1 on reference
CALIBRATION_DRAWS = 400
SEED = 0
RULES = ("ratchet", "naive", "mlflow_threshold", "mlflow_two_sided")
# Give ratchet's evaluation the `domain` column (13 slices instead of 3: its per-domain harm
# checks)? Off: it doubles the time per case, and an ablation (48 cases per scenario) gave the
# same decision on every case, as expected when the scenarios change all domains alike.
WITH_DOMAIN = False

TYPE1_SIZES = (100, 300, 1000)
TYPE1_KINDS = ("uniform", "rare")
TYPE1_CASES = 500  # per (kind, size)
TYPE1_CONTROL_CASES = 300  # per (kind, size): the first cases again, each row's pair shuffled
POWER_CASES = 200  # per size
RARE_ZIPF = 1.0
RECENT_TEST = "permutation"  # the test behind `test/recent/p_value` in ratchet.evaluation.score

LONG_SEQUENCES = 100
LONG_ROUNDS = 20
LONG_N_RECENT = 1000
LONG_N_REFERENCE = 1000
# Processes for the long horizon: ratchet's score takes ~0.8 s of CPU per round (most of it
# evaluate's per-call overhead, so fewer rows barely help) and 2,000 rounds in one process
# took over an hour of wall time on this busy 2-core machine; two workers, both niced.
LONG_WORKERS = 2


# ---------------------------------------------------------------- data, embeddings, models


def load_splits() -> dict[str, pd.DataFrame]:
    """train/val/test of CLINC150 without the `oos` rows: 150 intents in 10 domains."""
    out = {}
    for split in SPLITS:
        df = pd.read_csv(DATA / f"{split}.csv", dtype=str, keep_default_na=False)
        out[split] = df[df["label"] != "oos"].reset_index(drop=True)
    return out


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def embeddings(splits: dict[str, pd.DataFrame]) -> tuple[dict[str, np.ndarray], str]:
    """Mean-pooled MiniLM embeddings of every split (ratchet.embed), cached on disk."""
    texts = {s: df["text"].tolist() for s, df in splits.items()}
    key = _key("minilm-l6", MAX_LENGTH, texts)
    path = CACHE / f"embeddings-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {s: z[s] for s in splits}, key
    from ratchet.embed import embed, load_base_encoder

    model, tok = load_base_encoder("minilm-l6", ENCODER_SEED)
    out = {s: embed(t, model, tok, max_length=MAX_LENGTH, batch_size=EMBED_BATCH, progress=True)
           for s, t in texts.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    return out, key


def train_head(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, recipe: dict):
    """A dropout MLP head trained with the project's AdamW, warmup/decay schedule and batching.

    The seed sets the initialisation, the dropout masks and the batch order. One thread: the
    matrices are small, and on a shared machine a second OpenMP thread spin-waiting for a busy
    core made one head take minutes instead of seconds.
    """
    import torch

    from ratchet.training import Schedule, epoch_batches, make_optimizer, steps_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.LayerNorm(x.shape[1]),
            torch.nn.Linear(x.shape[1], recipe["hidden"]),
            torch.nn.GELU(),
            torch.nn.Dropout(recipe["dropout"]),
            torch.nn.Linear(recipe["hidden"], n_classes),
        )
        total = steps_for(len(x), recipe["batch_size"], recipe["epochs"])
        opt, sched = make_optimizer(model, recipe["learning_rate"], recipe["weight_decay"],
                                    Schedule(total, int(total * recipe["warmup_ratio"])))
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        rng = random.Random(seed)
        model.train()
        for _ in range(recipe["epochs"]):
            for idx in epoch_batches(len(x), recipe["batch_size"], rng):
                loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def top2(model, x: np.ndarray) -> np.ndarray:
    """(n, 2) class indices: each row's most and second most probable class."""
    import torch

    with torch.inference_mode():
        logits = model(torch.from_numpy(x))
    return torch.topk(logits, 2, dim=-1).indices.numpy().astype(np.int64)


def predictions(emb: dict[str, np.ndarray], y_train: np.ndarray, n_classes: int, emb_key: str
                ) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, float]]:
    """Top-2 predictions on val and test of one model per recipe seed (cached), and seconds."""
    path = CACHE / f"predictions-{_key(emb_key, HEAD, RECIPE_SEEDS)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return ({s: {p: z[f"{s}/{p}"] for p in ("val", "test")} for s in RECIPE_SEEDS},
                    json.loads(str(z["seconds"])))
    out, seconds = {}, {}
    for seed in RECIPE_SEEDS:
        t0 = time.perf_counter()
        model = train_head(emb["train"], y_train, n_classes, seed, HEAD)
        out[seed] = {p: top2(model, emb[p]) for p in ("val", "test")}
        seconds[str(seed)] = round(time.perf_counter() - t0, 1)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, seconds=json.dumps(seconds),
                        **{f"{s}/{p}": a for s, d in out.items() for p, a in d.items()})
    return out, seconds


# ---------------------------------------------------------------- scenario models, calibration


def macro_f1_rows(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    from ratchet.stats import macro_f1_rows as rows

    return rows(y, p, n_classes)


def fix_errors(pred: np.ndarray, y: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """`pred` with the first k of its errors (in the fixed `order` of rows) set to the truth."""
    wrong = order[pred[order] != y[order]]
    out = pred.copy()
    out[wrong[:k]] = y[wrong[:k]]
    return out


def break_answers(pred: np.ndarray, y: np.ndarray, runner_up: np.ndarray, order: np.ndarray,
                  k: int) -> np.ndarray:
    """`pred` with the first k of its correct answers (in `order`) set to `runner_up`."""
    right = order[pred[order] == y[order]]
    out = pred.copy()
    out[right[:k]] = runner_up[right[:k]]
    return out


def most_likely_wrong(top: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row, the model's most probable class that is not the truth."""
    return np.where(top[:, 0] == y, top[:, 1], top[:, 0])


def mean_gap(y: np.ndarray, cand: np.ndarray, champ: np.ndarray, draws: np.ndarray,
             n_classes: int) -> float:
    """Mean candidate - champion macro-F1 over row resamples `draws` (draws x n positions)."""
    yy = y[draws]
    return float(np.mean(macro_f1_rows(yy, cand[draws], n_classes)
                         - macro_f1_rows(yy, champ[draws], n_classes)))


def calibrate(gap_of: Callable[[int], float], k_max: int, target: float, increasing: bool
              ) -> tuple[int, float]:
    """The k in [0, k_max] whose expected gap is closest to `target` (bisection; the gap is
    monotone in k up to resampling noise, and the draws are fixed, so it is deterministic)."""
    lo, hi = 0, k_max
    while hi - lo > 1:
        mid = (lo + hi) // 2
        below = gap_of(mid) < target
        if below == increasing:
            lo = mid
        else:
            hi = mid
    return min(((k, gap_of(k)) for k in (lo, hi)), key=lambda kg: abs(kg[1] - target))


def scenario_models(cand_top: np.ndarray, y: np.ndarray, *, fix_share: float,
                    break_share: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The candidate's predictions on one pool: as trained, improved, improved then degraded.

    `fix_share` of the candidate's errors are corrected (in a random order fixed by `rng`), then
    `break_share` of the improved candidate's correct answers become its most likely wrong
    class. Each array is a fixed model: cases resample rows, never re-draw which rows changed.
    """
    base = cand_top[:, 0]
    better = fix_errors(base, y, rng.permutation(len(y)), round(fix_share * np.sum(base != y)))
    worse = break_answers(better, y, most_likely_wrong(cand_top, y), rng.permutation(len(y)),
                          round(break_share * np.sum(better == y)))
    return {"trained": base, "improved": better, "degraded": worse}


def calibrate_pair(y: np.ndarray, champ: np.ndarray, cand_top: np.ndarray, draws: np.ndarray,
                   n_classes: int, rng: np.random.Generator) -> dict[str, float]:
    """Shares of errors to fix and of right answers to break so that, on resamples of this
    (held-out) pool, the expected gaps to the champion are TARGET_GAIN and TARGET_FORGET."""
    base = cand_top[:, 0]
    fix_order, break_order = rng.permutation(len(y)), rng.permutation(len(y))
    errors = int(np.sum(base != y))
    k, gain = calibrate(lambda k: mean_gap(y, fix_errors(base, y, fix_order, k), champ, draws,
                                           n_classes), errors, TARGET_GAIN, increasing=True)
    better = fix_errors(base, y, fix_order, k)
    wrong_label, right = most_likely_wrong(cand_top, y), int(np.sum(better == y))
    m, loss = calibrate(lambda m: mean_gap(y, break_answers(better, y, wrong_label, break_order,
                                                            m), champ, draws, n_classes),
                        right, TARGET_FORGET, increasing=False)
    return {"trained_gap": mean_gap(y, base, champ, draws, n_classes), "fix_share": k / errors,
            "improved_gap": gain, "break_share": m / right, "degraded_gap": loss}


# ---------------------------------------------------------------- the rules


def naive_rule(candidate_recent: float, champion_recent: float) -> bool:
    """ZenML-template style: promote when the candidate's recent macro-F1 is greater."""
    return candidate_recent > champion_recent


def _mlflow_validates(thresholds: dict, candidate: dict[str, float],
                      baseline: dict[str, float]) -> bool:
    """`mlflow.validate_evaluation_results` on point metrics, the champion as baseline; a raised
    ModelValidationFailedException means not promoted."""
    import mlflow
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    # One INFO line per call otherwise ("Validating candidate model metrics against baseline").
    logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)
    try:
        mlflow.validate_evaluation_results(
            thresholds,
            EvaluationResult(metrics=candidate, artifacts={}),
            EvaluationResult(metrics=baseline, artifacts={}),
        )
    except ModelValidationFailedException:
        return False
    return True


def mlflow_rule(candidate_recent: float, champion_recent: float, *, min_delta: float,
                floor: float) -> bool:
    """MLflow's own validation: MetricThreshold(threshold=floor, min_absolute_change=min_delta)
    on recent macro-F1, candidate against the champion as baseline."""
    from mlflow.models import MetricThreshold

    thresholds = {"macro_f1": MetricThreshold(threshold=floor, min_absolute_change=min_delta,
                                              greater_is_better=True)}
    return _mlflow_validates(thresholds, {"macro_f1": candidate_recent},
                             {"macro_f1": champion_recent})


def mlflow_two_sided_rule(candidate_recent: float, champion_recent: float,
                          candidate_reference: float, champion_reference: float, *,
                          min_delta: float, floor: float, max_regression: float) -> bool:
    """The careful MLflow user: `mlflow_rule`'s threshold on recent, plus reference macro-F1 at
    least the champion's minus max_regression, both in one `validate_evaluation_results` call.

    MLflow's baseline comparison cannot say "not worse by more than m": `min_absolute_change`
    must be positive and means "better by at least". So the reference bound goes through the
    absolute `threshold`, computed from the champion's reference score as a user would from
    the champion run's logged metric. Point values, as MLflow compares them.
    """
    from mlflow.models import MetricThreshold

    thresholds = {
        "recent/macro_f1": MetricThreshold(threshold=floor, min_absolute_change=min_delta,
                                           greater_is_better=True),
        "reference/macro_f1": MetricThreshold(threshold=float(champion_reference - max_regression),
                                              greater_is_better=True),
    }
    return _mlflow_validates(
        thresholds,
        {"recent/macro_f1": candidate_recent, "reference/macro_f1": candidate_reference},
        {"recent/macro_f1": champion_recent, "reference/macro_f1": champion_reference})


def ratchet_rule(frame: pd.DataFrame, params) -> tuple[bool, list[str], dict[str, float]]:
    """The project's own evaluate metrics and gate rule on one case's frame."""
    from ratchet.evaluation import score
    from ratchet.gate import rule_decision

    metrics = score(frame, params)
    decision = rule_decision(metrics, params, has_champion=True)
    return bool(decision.promote), [c.name for c in decision.failed], metrics


# ---------------------------------------------------------------- cases


def draw_case(rng: np.random.Generator, pool_size: int, n_recent: int, n_reference: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of one case's recent and reference slices (independent, with replacement:
    each slice is a fresh sample of size n from the population the pool stands for)."""
    return rng.integers(0, pool_size, n_recent), rng.integers(0, pool_size, n_reference)


# Which of the candidate's fixed prediction arrays each scenario shows on each slice.
SLICE_MODELS = {"equal": ("trained", "trained"), "better": ("improved", "improved"),
                "forgetting": ("improved", "degraded")}


# ---------------------------------------------------------------- type-I error of the recent check


def type1_rows(rng: np.random.Generator, y: np.ndarray, kind: str, n: int, n_classes: int
               ) -> np.ndarray:
    """Row positions of one recent slice: uniform from the pool, or a skewed class mix (class
    weights 1/rank**RARE_ZIPF in a random class order, spread evenly over each class's rows)."""
    if kind == "uniform":
        return rng.integers(0, len(y), n)
    if kind != "rare":
        raise ValueError(f"unknown kind of slice {kind!r}")
    weight = np.empty(n_classes)
    weight[rng.permutation(n_classes)] = 1.0 / np.arange(1, n_classes + 1) ** RARE_ZIPF
    rows_of = np.bincount(y, minlength=n_classes)
    p = weight[y] / rows_of[y]
    return rng.choice(len(y), n, p=p / p.sum())


def recent_tests(refs: list[str], cand: list[str], champ: list[str], params,
                 with_bootstrap: bool = True) -> dict[str, float]:
    """The recent p-values of one case, as the project computes them: the bootstrap's (before
    the permutation test) and the permutation test's, with the evaluate defaults."""
    from ratchet.stats import bootstrap, paired_permutation

    cfg = params.evaluate
    perm = paired_permutation(refs, cand, champ, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    out = {"permutation": perm.p_value, "gain": perm.diff, "null_sd": float(np.std(perm.null))}
    if with_bootstrap:
        boot = bootstrap(refs, cand, champ, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
        out.update(bootstrap=boot.p_below(0.0), boot_gain=boot.diff, boot_se=boot.se)
    return out


def _rates(results: list[dict[str, float]], params) -> dict[str, Any]:
    """Rejection rates of both tests (`test`) and of the recent check (`check`), with SE."""
    alpha, min_delta = params.gate.alpha, params.gate.min_delta
    cases = len(results)
    out: dict[str, Any] = {"cases": cases}
    for test, gain in (("bootstrap", "boot_gain"), ("permutation", "gain")):
        if test not in results[0]:
            continue
        p = np.array([r[test] for r in results])
        g = np.array([r[gain] for r in results])
        out[test] = {"test": round(float(np.mean(p < alpha)), 4),
                     "check": round(float(np.mean((p < alpha) & (g >= min_delta))), 4)}
    se = float(np.sqrt(alpha * (1 - alpha) / cases))
    out["se"], out["target"] = round(se, 4), round(alpha + 2 * se, 4)
    out["diff_sd"] = round(float(np.std([r["gain"] for r in results])), 4)
    out["null_sd"] = round(float(np.mean([r["null_sd"] for r in results])), 4)
    if "boot_se" in results[0]:
        out["boot_se"] = round(float(np.mean([r["boot_se"] for r in results])), 4)
    return out


def type1(y: np.ndarray, names: np.ndarray, preds: dict, pairs: list[tuple[int, int]],
          candidates: dict, params) -> dict[str, Any]:
    """Rejection rates of the recent tests with equal-quality pairs, and their power."""
    n_classes = len(names)
    detail: dict[str, Any] = {}
    for k_idx, kind in enumerate(TYPE1_KINDS):
        detail[kind] = {}
        for n in TYPE1_SIZES:
            pairs_res, control_res, few = [], [], []
            for c in range(TYPE1_CASES):
                i, j = pairs[c % len(pairs)]
                rows = type1_rows(np.random.default_rng([SEED, 6, k_idx, n, c]), y, kind, n,
                                  n_classes)
                per_class = np.bincount(y[rows], minlength=n_classes)
                few.append(int(np.sum((per_class >= 1) & (per_class <= 2))))
                refs = names[y[rows]].tolist()
                champ, cand = preds[i]["test"][rows, 0], preds[j]["test"][rows, 0]
                pairs_res.append(recent_tests(refs, names[cand].tolist(), names[champ].tolist(),
                                              params))
                if c < TYPE1_CONTROL_CASES:
                    flip = np.random.default_rng([SEED, 7, k_idx, n, c]).random(n) < 0.5
                    control_res.append(recent_tests(
                        refs, names[np.where(flip, champ, cand)].tolist(),
                        names[np.where(flip, cand, champ)].tolist(), params))
            cell = _rates(pairs_res, params)
            cell["classes_with_1_2_rows"] = round(float(np.mean(few)), 1)
            cell["control"] = _rates(control_res, params)
            detail[kind][str(n)] = cell
            print(f"gate benchmark type-I {kind} n={n}: bootstrap {cell['bootstrap']} "
                  f"permutation {cell['permutation']} (SE {cell['se']}; control "
                  f"{cell['control']['bootstrap']['test']} / "
                  f"{cell['control']['permutation']['test']})", flush=True)
    power: dict[str, Any] = {}
    for n in TYPE1_SIZES:
        res = []
        for c in range(POWER_CASES):
            i, j = pairs[c % len(pairs)]
            rows = type1_rows(np.random.default_rng([SEED, 8, n, c]), y, "uniform", n, n_classes)
            res.append(recent_tests(names[y[rows]].tolist(),
                                    names[candidates[(i, j)]["improved"][rows]].tolist(),
                                    names[preds[i]["test"][rows, 0]].tolist(), params))
        power[str(n)] = {k: v for k, v in _rates(res, params).items()
                         if k in ("cases", "bootstrap", "permutation")}
    alpha = params.gate.alpha
    return {
        "type1": {str(n): detail["uniform"][str(n)][RECENT_TEST]["check"] for n in TYPE1_SIZES},
        "type1_detail": {
            "recent_test": RECENT_TEST, "alpha": alpha, "min_delta": params.gate.min_delta,
            "resamples": params.evaluate.bootstrap_resamples,
            "target": "rate <= alpha + 2 SE, SE = sqrt(alpha (1 - alpha) / cases)",
            "rare_zipf": RARE_ZIPF, **detail, "power_better": power,
        },
    }


# ---------------------------------------------------------------- long horizon (margin creep)


def f1_of(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 of one prediction array on all its rows."""
    return float(macro_f1_rows(y[None], pred[None], n_classes)[0])


def fix_to_gain(pred: np.ndarray, y: np.ndarray, order: np.ndarray, gain: float,
                n_classes: int) -> np.ndarray:
    """`pred` with the first k of its errors in `order` corrected, k such that its macro-F1 on
    all rows of the pool rises by about `gain` (the closest k; bisection)."""
    base = f1_of(y, pred, n_classes)
    k, _ = calibrate(lambda k: f1_of(y, fix_errors(pred, y, order, k), n_classes) - base,
                     int(np.sum(pred != y)), gain, increasing=True)
    return fix_errors(pred, y, order, k)


def break_to_loss(pred: np.ndarray, y: np.ndarray, runner_up: np.ndarray, order: np.ndarray,
                  loss: float, n_classes: int) -> np.ndarray:
    """`pred` with the first k of its right answers in `order` set to `runner_up`, k the largest
    whose macro-F1 loss on all rows of the pool is at most `loss` (the adversary stays inside
    the margin it is given; bisection on a loss that grows with k)."""
    base = f1_of(y, pred, n_classes)

    def lost(k: int) -> float:
        return base - f1_of(y, break_answers(pred, y, runner_up, order, k), n_classes)

    lo, hi = 0, int(np.sum(pred == y))
    if lost(hi) <= loss:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if lost(mid) <= loss:
            lo = mid
        else:
            hi = mid
    return break_answers(pred, y, runner_up, order, lo)


def _version(lineage: tuple[int, ...]) -> str:
    """A served model's registry version: "1" for the first champion, round + 2 for the
    candidate promoted in that round (each round promotes at most one model per rule)."""
    return str(lineage[-1] + 2) if lineage else "1"


def long_horizon_sequence(seq: int, *, y_recent: np.ndarray, y_reference: np.ndarray,
                          base_recent: np.ndarray, base_reference: np.ndarray,
                          runner_up: np.ndarray, names: np.ndarray, params, rounds: int,
                          n_recent: int, n_reference: int, rules: tuple[str, ...]
                          ) -> dict[str, dict[str, Any]]:
    """One sequence of gate rounds under the creep adversary, each rule with its own champion.

    Every rule starts from the same champion (a recipe seed: `base_*`). Each round draws fresh
    recent rows from the recent pool and fresh reference rows from the reference pool (with
    replacement), a loss in [0, max_regression] and the orders of rows to change; these are
    shared by the rules (common random numbers). The candidate is built from the rule's CURRENT
    champion: on reference, its predictions with right answers broken until the macro-F1 loss
    on the whole reference pool reaches that loss (`break_to_loss`); on recent (new data that
    no served model was trained on, so every one predicts as the recipe does) the recipe's
    predictions with errors fixed for +TARGET_GAIN on the whole recent pool. A model is fixed
    by its lineage (the rounds in which it and its ancestors were promoted), so a promoted
    candidate's predictions are reused in later rounds, and rules that promoted alike share it.

    The ratchet arm runs the project's path: the frame with the floor pool's models as
    `served:<version>` columns -> `ratchet.evaluation.score` -> `ratchet.gate.rule_decision`,
    then the pool as `ratchet.floor.update` keeps it (`ranking` of the judged champion and the
    served models on this round's reference rows, `next_pool` of size gate.floor_models).
    Drops are measured on the whole reference pool: best served so far - served now.
    """
    from ratchet.floor import next_pool, ranking

    n_classes, margin = len(names), params.gate.max_regression
    size = params.gate.floor_models
    models: dict[tuple[int, ...], np.ndarray] = {(): base_reference}
    full: dict[tuple[int, ...], float] = {(): f1_of(y_reference, base_reference, n_classes)}
    state = {rule: {"lineage": (), "pool": [], "served": {"1": ()}, "best": full[()],
                    "drops": [], "promoted": [], "losses": [], "failed": Counter(),
                    "floor_judged": 0} for rule in rules}
    for r in range(rounds):
        rng = np.random.default_rng([SEED, 9, seq, r])
        rec, ref = rng.integers(0, len(y_recent), n_recent), rng.integers(0, len(y_reference),
                                                                          n_reference)
        loss = float(rng.uniform(0.0, margin))
        fix_order, break_order = rng.permutation(len(y_recent)), rng.permutation(len(y_reference))
        cand_recent = fix_to_gain(base_recent, y_recent, fix_order, TARGET_GAIN, n_classes)
        yr, yf = y_recent[rec], y_reference[ref]
        recent_f1 = macro_f1_rows(yr[None].repeat(2, axis=0),
                                  np.stack([cand_recent[rec], base_recent[rec]]), n_classes)
        for rule in rules:
            st = state[rule]
            champ = st["lineage"]
            lineage = (*champ, r)
            if lineage not in models:
                models[lineage] = break_to_loss(models[champ], y_reference, runner_up,
                                                break_order, loss, n_classes)
                full[lineage] = f1_of(y_reference, models[lineage], n_classes)
            cand_ref, champ_ref = models[lineage], models[champ]
            if rule == "ratchet":
                version = _version(champ)
                frame = pd.DataFrame({
                    "label": names[np.concatenate([yr, yf])],
                    "slice": ["recent"] * n_recent + ["reference"] * n_reference,
                    "candidate": names[np.concatenate([cand_recent[rec], cand_ref[ref]])],
                    "champion": names[np.concatenate([base_recent[rec], champ_ref[ref]])],
                })
                for v in [v for v in st["pool"] if v != version][:size]:
                    frame[f"served:{v}"] = names[np.concatenate(
                        [base_recent[rec], models[st["served"][v]][ref]])]
                promote, failed, metrics = ratchet_rule(frame, params)
                st["failed"].update(failed)
                st["floor_judged"] += int("n/floor:reference" in metrics)
                st["pool"] = next_pool(st["pool"], ranking(metrics, {"version": version}), size)
            else:
                reference_f1 = macro_f1_rows(yf[None].repeat(2, axis=0),
                                             np.stack([cand_ref[ref], champ_ref[ref]]), n_classes)
                if rule == "naive":
                    promote = naive_rule(*recent_f1)
                elif rule == "mlflow_threshold":
                    promote = mlflow_rule(*recent_f1, min_delta=params.gate.min_delta,
                                          floor=params.gate.min_score)
                elif rule == "mlflow_two_sided":
                    promote = mlflow_two_sided_rule(
                        *recent_f1, *reference_f1, min_delta=params.gate.min_delta,
                        floor=params.gate.min_score, max_regression=margin)
                else:
                    raise ValueError(f"unknown rule {rule!r}")
            if promote:
                st["losses"].append(full[champ] - full[lineage])
                st["lineage"] = lineage
                st["served"][_version(lineage)] = lineage
                st["best"] = max(st["best"], full[lineage])
            st["promoted"].append(bool(promote))
            st["drops"].append(st["best"] - full[st["lineage"]])
    out = {}
    for rule, st in state.items():
        out[rule] = {"worst_drop": max(0.0, *st["drops"]), "final_drop": st["drops"][-1],
                     "drops": st["drops"], "promoted": st["promoted"], "losses": st["losses"]}
        if rule == "ratchet":
            out[rule]["failed"] = dict(st["failed"])
            out[rule]["floor_judged"] = st["floor_judged"]
            out[rule]["pool"] = st["pool"]
    return out


def _distribution(values: list[float]) -> dict[str, float]:
    q = np.quantile(values, [0.5, 0.9, 0.95])
    return {"mean": round(float(np.mean(values)), 4), "p50": round(float(q[0]), 4),
            "p90": round(float(q[1]), 4), "p95": round(float(q[2]), 4),
            "max": round(float(np.max(values)), 4)}


def summarise_long_horizon(runs: list[dict[str, dict[str, Any]]], params) -> dict[str, Any]:
    """Per rule: the worst drop over sequences, its distribution, the share of rounds
    promoted, and the detail (per-round mean drop, loss per promotion, per-sequence drops)."""
    target = params.gate.max_regression + 0.005
    out: dict[str, Any] = {}
    for rule in runs[0]:
        worst = [s[rule]["worst_drop"] for s in runs]
        promoted = [p for s in runs for p in s[rule]["promoted"]]
        losses = [x for s in runs for x in s[rule]["losses"]]
        drops = np.array([s[rule]["drops"] for s in runs])
        cell: dict[str, Any] = {
            "worst_drop": round(float(max(worst)), 4),
            "promoted_share": round(float(np.mean(promoted)), 4),
            "worst_drop_per_sequence": _distribution(worst),
            "sequences_over_target": int(np.sum(np.array(worst) > target + 1e-12)),
            "final_drop": _distribution([s[rule]["final_drop"] for s in runs]),
            "mean_drop_by_round": [round(float(x), 4) for x in drops.mean(axis=0)],
            "promotions_per_sequence": _mean_sd([float(np.sum(s[rule]["promoted"]))
                                                 for s in runs]),
            "loss_per_promotion": _mean_sd(losses) if losses else None,
            "worst_drop_by_sequence": [round(float(x), 4) for x in worst],
        }
        if rule == "ratchet":
            failed: Counter = Counter()
            for s in runs:
                failed.update(s[rule]["failed"])
            cell["failed_checks"] = dict(sorted(failed.items()))
            cell["rounds_floor_judged"] = int(sum(s[rule]["floor_judged"] for s in runs))
        out[rule] = cell
    out["target"] = f"ratchet worst_drop <= max_regression + 0.005 = {target:.3f} in every sequence"
    return out


def _sequence_task(task: tuple[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One sequence in a worker process, with one BLAS thread (see the module docstring)."""
    from threadpoolctl import threadpool_limits

    seq, kwargs = task
    with threadpool_limits(1):
        return long_horizon_sequence(seq, **kwargs)


def long_horizon(y: dict[str, np.ndarray], names: np.ndarray, preds: dict, params, *,
                 sequences: int, rounds: int, rules: tuple[str, ...], workers: int = 1
                 ) -> dict[str, Any]:
    """`sequences` sequences of `rounds` gate rounds under the creep adversary, on real
    predictions: sequence s starts from recipe seed s mod 4; recent rows from the val pool,
    reference rows and every drop from the test pool. Each sequence is seeded by its index,
    so `workers` processes give the same numbers as one."""
    def task(seq: int) -> tuple[int, dict[str, Any]]:
        seed = RECIPE_SEEDS[seq % len(RECIPE_SEEDS)]
        top = preds[seed]["test"]
        return seq, dict(
            y_recent=y["val"], y_reference=y["test"], base_recent=preds[seed]["val"][:, 0],
            base_reference=top[:, 0], runner_up=most_likely_wrong(top, y["test"]), names=names,
            params=params, rounds=rounds, n_recent=LONG_N_RECENT, n_reference=LONG_N_REFERENCE,
            rules=rules)

    runs = []
    tasks = (task(seq) for seq in range(sequences))
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        done = pool.map(_sequence_task, tasks) if pool else map(_sequence_task, tasks)
        for out in done:  # in sequence order, whatever the number of workers
            runs.append(out)
            if len(runs) % 10 == 0 or len(runs) == sequences:
                worst = {r: round(max(s[r]["worst_drop"] for s in runs), 4) for r in rules}
                print(f"gate benchmark long horizon: {len(runs)}/{sequences} sequences, worst "
                      f"drop {worst}", flush=True)
    out = summarise_long_horizon(runs, params)
    out["setup"] = {
        "sequences": sequences, "rounds": rounds, "n_recent": LONG_N_RECENT,
        "n_reference": LONG_N_REFERENCE, "workers": workers,
        "first_champion": "recipe seed (sequence mod 4), as trained",
        "recent": "fresh each round: n_recent rows with replacement from the val pool "
                  "(3,000 rows); every served model predicts there as its recipe seed (new "
                  "data), the candidate as that with errors fixed for +TARGET_GAIN macro-F1 on "
                  "the whole val pool",
        "reference": "fresh each round: n_reference rows with replacement from the test pool "
                     "(4,500 rows); the candidate = the rule's current champion with right "
                     "answers broken (to the seed's most probable wrong class) for a loss drawn "
                     "uniformly in [0, max_regression] on the whole test pool",
        "drop": "best served model so far minus the served champion after each round, macro-F1 "
                "on the whole test pool (every served model on the same 4,500 rows); "
                "worst_drop = max over rounds and sequences",
        "ratchet": "score -> rule_decision on the frame with the floor pool as served:<v> "
                   "columns; pool = next_pool(pool, ranking(metrics, champion), floor_models)",
        "target_gain": TARGET_GAIN,
    }
    return out


# ---------------------------------------------------------------- the benchmark


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4)}


def _results_commit(path: Path) -> str | None:
    """The last commit that wrote `path` (where kept sections come from), if git knows it."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%H", "--", path.name],
                             cwd=path.parent, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def kept_sections(keep: frozenset[str], previous: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sections of an earlier results file that this run keeps instead of re-running them
    (KEEPABLE), and the seconds they took then."""
    unknown = sorted(set(keep) - set(KEEPABLE))
    if unknown:
        raise SystemExit(f"error: unknown section(s) to keep: {', '.join(unknown)} "
                         f"(known: {', '.join(KEEPABLE)})")
    if not previous.is_file():
        raise SystemExit(f"error: {previous} not found: run the whole benchmark once before "
                         "keeping sections of it")
    prev = json.loads(previous.read_text())
    out, seconds = {}, {}
    for section in sorted(keep):
        missing = [k for k in KEEPABLE[section] if k not in prev]
        if missing:
            raise SystemExit(f"error: {previous} has no {', '.join(missing)}: run the whole "
                             f"benchmark instead of keeping {section}")
        out.update({k: prev[k] for k in KEEPABLE[section]})
        for k in SECONDS_OF[section]:
            if k in prev.get("seconds", {}):
                seconds[k] = prev["seconds"][k]
    return out, seconds


# Sections an expensive run may keep from the previous results file (`--keep`), the keys they
# hold and their timings.
KEEPABLE = {"type1": ("type1", "type1_detail"),
            "scenarios_ratchet": ("ratchet", "ratchet_vs_mlflow_disagreements",
                                  "ratchet_failed_checks")}
SECONDS_OF = {"type1": ("type1",), "scenarios_ratchet": ("ratchet_rule", "simulation")}
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "gate.json"


KEEP_WHY = {  # why a section may be kept from an earlier run (`--keep`)
    "type1": "type1 (the recent test's type-I error: ratchet.stats and the recent check are "
             "unchanged since it was measured)",
    "scenarios_ratchet": "ratchet's scenario arm (its frames carry no served:<v> columns, so "
                         "the floor does not engage)",
}


def run(*, with_ratchet: bool = True, cases: int = CASES, with_type1: bool = True,
        with_long_horizon: bool = True, keep: frozenset[str] = frozenset(),
        previous: Path = RESULTS_FILE, params=None) -> dict[str, Any]:
    """The whole benchmark; `keep` names sections (KEEPABLE) taken from `previous` instead of
    being re-run, so a run that would take too long on a busy machine can add what is new."""
    if not DATA.is_dir():
        return {"skipped": f"CLINC150 not found at {DATA}"}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask a hub
    # A metrics cache of this process's own: `evaluate` names its lock file alike in every
    # process, so in the default cache each call waited up to a second for other processes'.
    os.environ.setdefault("HF_METRICS_CACHE", str(CACHE / "evaluate-metrics"))
    from ratchet.config import Params

    params = params or Params()
    keep = frozenset(keep)
    kept, kept_seconds = kept_sections(keep, previous) if keep else ({}, {})
    scenario_ratchet = with_ratchet and "scenarios_ratchet" not in keep
    with_type1 = with_type1 and "type1" not in keep
    start = time.perf_counter()
    seconds: dict[str, Any] = {}
    splits = load_splits()
    names = np.array(sorted(set(splits["train"]["label"])), dtype=object)
    n_classes = len(names)
    index = {name: i for i, name in enumerate(names)}
    y = {s: df["label"].map(index).to_numpy(dtype=np.int64) for s, df in splits.items()}

    t0 = time.perf_counter()
    emb, emb_key = embeddings(splits)
    seconds["embedding"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    preds, train_seconds = predictions(emb, y["train"], n_classes, emb_key)
    seconds["training"] = round(time.perf_counter() - t0, 1)
    seconds["training_when_not_cached"] = train_seconds

    def score_of(p: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        return {"macro_f1": round(float(macro_f1_rows(truth[None], p[None], n_classes)[0]), 4),
                "accuracy": round(float(np.mean(p == truth)), 4)}

    models_report = {str(s): {pool: score_of(preds[s][pool][:, 0], y[pool])
                              for pool in ("val", "test")} for s in RECIPE_SEEDS}

    # Calibration on val (held out from the simulation), one candidate per ordered seed pair.
    t0 = time.perf_counter()
    pairs = [(i, j) for i in RECIPE_SEEDS for j in RECIPE_SEEDS if i != j]
    val_draws = np.random.default_rng([SEED, 1]).integers(
        0, len(y["val"]), (CALIBRATION_DRAWS, N_RECENT))
    test_draws = np.random.default_rng([SEED, 2]).integers(
        0, len(y["test"]), (CALIBRATION_DRAWS, N_RECENT))
    calibration, candidates = {}, {}
    for p, (i, j) in enumerate(pairs):
        cal = calibrate_pair(y["val"], preds[i]["val"][:, 0], preds[j]["val"], val_draws,
                             n_classes, np.random.default_rng([SEED, 3, p]))
        cand = scenario_models(preds[j]["test"], y["test"], fix_share=cal["fix_share"],
                               break_share=cal["break_share"],
                               rng=np.random.default_rng([SEED, 4, p]))
        candidates[(i, j)] = cand
        champ = preds[i]["test"][:, 0]
        calibration[f"{i}->{j}"] = {
            "val": {k: round(v, 4) for k, v in cal.items()},
            "test": {f"{m}_gap": round(mean_gap(y["test"], a, champ, test_draws, n_classes), 4)
                     for m, a in cand.items()},
        }
    seconds["calibration"] = round(time.perf_counter() - t0, 1)

    # The simulation: each case draws its own recent and reference slices from the test pool.
    # One BLAS thread from here on (see the docstring); the heads trained above set their own.
    from threadpoolctl import threadpool_limits

    blas = threadpool_limits(1)
    t0 = time.perf_counter()
    decisions: dict[str, dict[str, list[bool]]] = {r: {s: [] for s in SCENARIOS} for r in RULES}
    gaps = {s: {"recent": [], "reference": []} for s in SCENARIOS}
    failed: dict[str, Counter] = {s: Counter() for s in SCENARIOS}
    ratchet_seconds = 0.0
    domains = splits["test"]["domain"].to_numpy(dtype=object)
    for s_idx, scenario in enumerate(SCENARIOS):
        for c in range(cases):
            i, j = pairs[c % len(pairs)]
            rec, ref = draw_case(np.random.default_rng([SEED, 5, s_idx, c]), len(y["test"]),
                                 N_RECENT, N_REFERENCE)
            champ = preds[i]["test"][:, 0]
            on_recent, on_reference = (candidates[(i, j)][m] for m in SLICE_MODELS[scenario])
            f1 = {}
            for slice_name, rows, cand in (("recent", rec, on_recent),
                                           ("reference", ref, on_reference)):
                both = macro_f1_rows(y["test"][rows][None].repeat(2, axis=0),
                                     np.stack([cand[rows], champ[rows]]), n_classes)
                f1[slice_name] = both
                gaps[scenario][slice_name].append(float(both[0] - both[1]))
            decisions["naive"][scenario].append(naive_rule(*f1["recent"]))
            decisions["mlflow_threshold"][scenario].append(mlflow_rule(
                *f1["recent"], min_delta=params.gate.min_delta, floor=params.gate.min_score))
            decisions["mlflow_two_sided"][scenario].append(mlflow_two_sided_rule(
                *f1["recent"], *f1["reference"], min_delta=params.gate.min_delta,
                floor=params.gate.min_score, max_regression=params.gate.max_regression))
            if scenario_ratchet:
                rows = np.concatenate([rec, ref])
                frame = pd.DataFrame({
                    "label": names[y["test"][rows]],
                    "slice": ["recent"] * len(rec) + ["reference"] * len(ref),
                    "candidate": names[np.concatenate([on_recent[rec], on_reference[ref]])],
                    "champion": names[champ[rows]],
                })
                if WITH_DOMAIN:
                    frame["domain"] = domains[rows]
                r0 = time.perf_counter()
                promote, failed_checks, _ = ratchet_rule(frame, params)
                ratchet_seconds += time.perf_counter() - r0
                decisions["ratchet"][scenario].append(promote)
                failed[scenario].update(failed_checks)
        rates = {r: round(float(np.mean(d[scenario])), 3) for r, d in decisions.items()
                 if d[scenario]}
        print(f"gate benchmark {scenario}: {rates} "
              f"(recent gap {_mean_sd(gaps[scenario]['recent'])['mean']:+.4f})", flush=True)
    seconds["simulation"] = round(time.perf_counter() - t0, 1)
    if scenario_ratchet:
        seconds["ratchet_rule"] = round(ratchet_seconds, 1)
    t0 = time.perf_counter()
    errors = type1(y["test"], names, preds, pairs, candidates, params) if with_type1 else {}
    if with_type1:
        seconds["type1"] = round(time.perf_counter() - t0, 1)
    long = {}
    if with_long_horizon:
        t0 = time.perf_counter()
        long = long_horizon(y, names, preds, params, sequences=LONG_SEQUENCES, rounds=LONG_ROUNDS,
                            rules=tuple(r for r in RULES if with_ratchet or r != "ratchet"),
                            workers=LONG_WORKERS)
        seconds["long_horizon"] = round(time.perf_counter() - t0, 1)
    blas.restore_original_limits()
    seconds["total"] = round(time.perf_counter() - start, 1)

    result: dict[str, Any] = {
        rule: {s: round(float(np.mean(d[s])), 4) for s in SCENARIOS}
        for rule, d in decisions.items() if rule != "ratchet" or scenario_ratchet
    }
    if "ratchet" in kept:
        result = {"ratchet": kept["ratchet"], **result}
    result["targets"] = {"equal": "<= 0.05", "better": ">= 0.80", "forgetting": "<= 0.05"}
    result.update(errors)
    if scenario_ratchet:
        result["ratchet_vs_mlflow_disagreements"] = {
            s: int(np.sum(np.array(decisions["ratchet"][s])
                          != np.array(decisions["mlflow_threshold"][s]))) for s in SCENARIOS}
    result["cases"] = {s: cases for s in SCENARIOS}
    result["n_recent"], result["n_reference"] = N_RECENT, N_REFERENCE
    result["mean_gaps"] = {s: {k: _mean_sd(v) for k, v in g.items()} for s, g in gaps.items()}
    if scenario_ratchet:
        result["ratchet_failed_checks"] = {s: dict(sorted(f.items())) for s, f in failed.items()}
    if long:
        result["long_horizon"] = long
    cal_vals = [c["val"] for c in calibration.values()]
    result["calibration"] = {
        "summary": {k: round(float(np.mean([c[k] for c in cal_vals])), 4) for k in cal_vals[0]},
        "per_pair": calibration,
    }
    result["models"] = {
        "recipe": "frozen packaged MiniLM (minilm-l6) mean-pooled embeddings "
                  f"(ratchet.embed, max_length {MAX_LENGTH}) + MLP head "
                  "(LayerNorm, Linear, GELU, Dropout, Linear) trained with ratchet.training's "
                  "AdamW/warmup-decay/batching on CLINC150 train (150 intents, oos left out)",
        "head": HEAD,
        "seeds": list(RECIPE_SEEDS),
        "scores": models_report,
        "test_disagreement": {
            f"{i}-{j}": round(float(np.mean(preds[i]["test"][:, 0] != preds[j]["test"][:, 0])), 4)
            for i, j in pairs if i < j},
    }
    result["params"] = {"gate": params.gate.model_dump(), "evaluate": params.evaluate.model_dump()}
    result["setup"] = {
        "data": "CLINC150 by path; val (3000 rows) = calibration pool, test (4500 rows) = "
                "simulation pool; oos left out",
        "slices": "recent and reference drawn independently, with replacement, from the test "
                  "pool, each case with its own seed",
        "pairs": "champion/candidate = ordered pairs of distinct recipe seeds, cycled over cases",
        "calibration_draws": CALIBRATION_DRAWS,
        "target_gain": TARGET_GAIN, "target_forget": TARGET_FORGET, "seed": SEED,
    }
    result["seconds"] = seconds
    if keep:
        result.update({k: v for k, v in kept.items() if k not in result})
        result["seconds"].update({f"{k}_kept": v for k, v in kept_seconds.items()})
        prev = json.loads(previous.read_text())
        result["kept_from_previous_run"] = {
            "sections": sorted(keep),
            "keys": sorted(kept),
            "from": f"{previous.name} as of commit {_results_commit(previous)}",
            "why": "the whole run would exceed the time budget on this busy machine; the "
                   "kept sections are seeded and computed on the same cases (the baselines "
                   "re-run here match the kept file). Not re-run: "
                   + ", ".join(KEEP_WHY.get(k, k) for k in sorted(keep)),
            # The baselines re-run here on the same seeded cases: equal to the kept file's,
            # they show the kept sections were computed on the same cases.
            "baselines_match_previous": {
                r: result[r] == prev[r] for r in ("naive", "mlflow_threshold") if r in prev},
        }
    return result
