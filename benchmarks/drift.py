"""Drift detection on CLINC150: power and false-alarm rate of ratchet's detector vs a baseline.

Data: `../shared/data/clinc150/{train,val,test}.csv` (columns text, label, domain; 10 domains of
15 intents, plus `oos`, left out here), read by path and never copied. The two
alphabetically last domains (`utility`, `work`) are held out; the other eight form the
in-domain pool.

Each trial draws a reference of REFERENCE_ROWS in-domain rows and a disjoint batch of n rows:
- "no drift": the batch is in-domain too (same domains as the reference);
- "drift": one or two held-out domains (chosen at random) make up a share drawn uniformly from
  20-50% of the batch, the rest is in-domain.
False-alarm rate = share of no-drift trials flagged; power = share of drift trials flagged.

ratchet: `ratchet.drift.detect`, the function the drift stage calls, with the stage's default
alpha (Holm over the label, length, OOV and MMD tests). Two deliberate differences from the
stage, both for speed: the domain classifier is off (it does not vote in the verdict), and the
MMD test uses BENCH_PERMUTATIONS permutations instead of the default. Embeddings of a fixed
pool are computed once with the packaged MiniLM (`minilm-l6`, the base model the stage uses
before a champion exists) and reused across trials.

baseline: three per-feature tests in plain scipy, each at the same alpha without correction,
"drift" when any rejects: chi-square on label counts, KS on words per text, KS on per-text OOV
rate (against the vocabulary of half the reference; the other half is the comparison sample).

Extra keys: `*_without_labels` (the same detectors without their label test: held-out domains
bring new labels, which make any label test trivially powerful), `ratchet_tests` (each of
ratchet's tests alone at alpha), `setup` and `seconds`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
SIZES = (100, 300, 1000)
TRIALS = 100
REFERENCE_ROWS = 1000
IN_POOL_ROWS = 6000
HELD_OUT_POOL_ROWS = 2000
BENCH_PERMUTATIONS = 499
SEED = 0
# The two required detectors, then both without the label test: CLINC's held-out domains bring
# new intents, which any label test flags, so these show what text and embeddings alone catch.
VARIANTS = ("ratchet", "baseline", "ratchet_without_labels", "baseline_without_labels")


def load_pool(rng: np.random.Generator) -> tuple[pd.DataFrame, list[str]]:
    """In-domain and held-out rows to draw trials from, and the held-out domain names."""
    frames = [pd.read_csv(DATA / f"{s}.csv", dtype=str, keep_default_na=False)
              for s in ("train", "val", "test")]
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["domain"] != "oos"].drop_duplicates("text").reset_index(drop=True)
    domains = sorted(rows["domain"].unique())
    held_out = domains[-2:]
    is_held = rows["domain"].isin(held_out)
    inside = rows[~is_held].sample(IN_POOL_ROWS, random_state=int(rng.integers(2**31)))
    outside = rows[is_held].sample(HELD_OUT_POOL_ROWS, random_state=int(rng.integers(2**31)))
    pool = pd.concat([inside.assign(held=False), outside.assign(held=True)], ignore_index=True)
    return pool, held_out


def embed_pool(texts: list[str]) -> np.ndarray:
    from ratchet.config import ModelConfig
    from ratchet.embed import embed, load_base_encoder

    cfg = ModelConfig()
    model, tok = load_base_encoder("minilm-l6", cfg.seed)
    return embed(texts, model, tok, max_length=cfg.max_length, batch_size=128, progress=True)


def baseline_p_values(ref: pd.DataFrame, batch: pd.DataFrame, rng: np.random.Generator
                      ) -> dict[str, float]:
    """Plain per-feature scipy tests on simple text statistics (the caller does not correct)."""
    from scipy.stats import chi2_contingency, ks_2samp

    labels = sorted(set(ref["label"]) | set(batch["label"]))
    table = np.vstack([ref["label"].value_counts().reindex(labels, fill_value=0).to_numpy(),
                       batch["label"].value_counts().reindex(labels, fill_value=0).to_numpy()])
    p_label = chi2_contingency(table)[1] if len(labels) > 1 else 1.0

    def words(texts: pd.Series) -> list[list[str]]:
        return [t.lower().split() for t in texts]

    ref_w, batch_w = words(ref["text"]), words(batch["text"])
    p_len = ks_2samp([len(t) for t in ref_w], [len(t) for t in batch_w]).pvalue
    order = rng.permutation(len(ref_w))
    half = len(order) // 2
    vocab = {w for i in order[:half] for w in ref_w[i]}

    def oov(ts: list[list[str]]) -> list[float]:
        return [sum(w not in vocab for w in t) / len(t) for t in ts if t]

    p_oov = ks_2samp(oov([ref_w[i] for i in order[half:]]), oov(batch_w)).pvalue
    return {"label": float(p_label), "length": float(p_len), "oov": float(p_oov)}


def draw(pool: pd.DataFrame, n: int, drift: bool, rng: np.random.Generator, held_out: list[str]
         ) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of a reference and a batch for one trial."""
    inside = np.flatnonzero(~pool["held"].to_numpy())
    picked = rng.choice(inside, size=REFERENCE_ROWS + n, replace=False)
    ref, batch = picked[:REFERENCE_ROWS], picked[REFERENCE_ROWS:]
    if drift:
        domains = rng.choice(held_out, size=int(rng.integers(1, 3)), replace=False)
        outside = np.flatnonzero(pool["domain"].isin(domains).to_numpy())
        k = int(round(rng.uniform(0.2, 0.5) * n))
        batch = np.concatenate([batch[: n - k], rng.choice(outside, size=k, replace=False)])
    return ref, batch


def run() -> dict[str, Any]:
    if not DATA.is_dir():
        return {"skipped": f"CLINC150 not found at {DATA}"}
    from ratchet.config import DriftConfig
    from ratchet.drift import VOTING_TESTS, Sample, detect, holm

    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    pool, held_out = load_pool(rng)
    emb = embed_pool(pool["text"].tolist())
    embed_s = time.perf_counter() - start
    cfg = DriftConfig(permutations=BENCH_PERMUTATIONS, seed=SEED)
    texts, labels = pool["text"].to_numpy(), pool["label"].to_numpy()

    def sample(idx: np.ndarray) -> Sample:
        return Sample(texts[idx].tolist(), labels[idx].tolist(), emb[idx])

    result: dict[str, Any] = {k: {} for k in VARIANTS}
    result["ratchet_tests"] = {}
    trial_s = {}
    for n in SIZES:
        t0 = time.perf_counter()
        flags: dict[str, dict[bool, list[bool]]] = {
            k: {False: [], True: []} for k in VARIANTS}
        single = {t: {False: [], True: []} for t in VOTING_TESTS}  # each test alone
        for drift in (False, True):
            for trial in range(TRIALS):
                trng = np.random.default_rng([SEED, n, int(drift), trial])
                ref, batch = draw(pool, n, drift, trng, held_out)
                out, _ = detect(sample(ref), sample(batch), cfg, classifier=False)
                flags["ratchet"][drift].append(bool(out["drifted"]))
                p = {t: out[f"{t}_p"] for t in VOTING_TESTS}
                flags["ratchet_without_labels"][drift].append(
                    any(holm({t: v for t, v in p.items() if t != "label"}, cfg.alpha).values()))
                for t in VOTING_TESTS:
                    single[t][drift].append(bool(p[t] < cfg.alpha))
                base = baseline_p_values(pool.iloc[ref], pool.iloc[batch], trng)
                flags["baseline"][drift].append(min(base.values()) < cfg.alpha)
                flags["baseline_without_labels"][drift].append(
                    min(base["length"], base["oov"]) < cfg.alpha)
        for name, f in flags.items():
            result[name][str(n)] = {"power": float(np.mean(f[True])),
                                    "false_alarm": float(np.mean(f[False]))}
        result["ratchet_tests"][str(n)] = {
            t: {"power": float(np.mean(f[True])), "false_alarm": float(np.mean(f[False]))}
            for t, f in single.items()}
        trial_s[str(n)] = round(time.perf_counter() - t0, 1)
        print(f"drift benchmark n={n}: ratchet {result['ratchet'][str(n)]}, "
              f"baseline {result['baseline'][str(n)]} ({trial_s[str(n)]}s)", flush=True)
    result["setup"] = {
        "data": "CLINC150 (train+val+test, oos left out)", "held_out_domains": held_out,
        "reference_rows": REFERENCE_ROWS, "trials_per_size_and_condition": TRIALS,
        "drift_share": [0.2, 0.5], "alpha": cfg.alpha, "mmd_permutations": cfg.permutations,
        "embedding_model": "minilm-l6 (mean-pooled, computed once for the pool)",
        "pool_rows": len(pool), "seed": SEED,
    }
    result["seconds"] = {"embedding": round(embed_s, 1), "trials": trial_s,
                         "total": round(time.perf_counter() - start, 1)}
    return result
