"""Calibration of the gate's behaviour defaults on real data: typo and casing survival of good
intent classifiers, and how far two models of equal quality are apart on the same rows.

Data and models are the gate benchmark's (`benchmarks.gate`): CLINC150 by path, `oos` left out,
four MLP heads (seeds of one recipe, ~0.956 test macro-F1) on frozen packaged-MiniLM embeddings,
cached under benchmarks/.cache/gate/. The perturbations are the evaluate stage's own
(`ratchet.behaviour.typo` and `casing_variants`): every test text gets one typo per typo seed
(TYPO_SEEDS), and the typo'd texts are embedded by the same encoder.

Each draw takes BEHAVIOUR_ROWS test rows (the `evaluate.behaviour_rows` default), one typo seed
and an ordered pair of distinct model seeds, and measures what the gate measures: each model's
share of predictions unchanged by the typo, on the same perturbed rows. Reported:
- `typo_rate`: mean and range over draws of a model's typo survival (where the floor
  `gate.min_invariance` must sit below);
- `paired_drop`: candidate - champion typo survival for equal-quality pairs: sd, quantiles, and
  the share of draws a margin (`gate.max_invariance_drop` and smaller ones) would reject;
- `casing`: survival of upper/lower-casing (the packaged MiniLM is uncased: 1.0).
Fine-tuned MiniLM candidates' rates on CLINC150 come from the stream benchmark (the gate's
`behaviour/*` metrics of every real candidate), reported in `benchmarks/results/stream.json`.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

TYPO_SEEDS = (0, 1, 2)
BEHAVIOUR_ROWS = 300
DRAWS = 2000
MARGINS = (0.02, 0.03, 0.05)
SEED = 0


def survival(base: np.ndarray, perturbed: np.ndarray, rows: np.ndarray) -> float:
    """Share of `rows` whose prediction is unchanged by the perturbation."""
    return float(np.mean(base[rows] == perturbed[rows]))


def run(*, draws: int = DRAWS) -> dict[str, Any]:
    from benchmarks import gate as g

    if not g.DATA.is_dir():
        return {"skipped": f"CLINC150 not found at {g.DATA}"}
    import torch

    from ratchet import behaviour
    from ratchet.config import Params
    from ratchet.embed import embed, load_base_encoder

    start = time.perf_counter()
    params = Params()
    splits = g.load_splits()
    emb, _ = g.embeddings(splits)
    names = sorted(set(splits["train"]["label"]))
    index = {n: i for i, n in enumerate(names)}
    y_train = splits["train"]["label"].map(index).to_numpy()
    heads = [g.train_head(emb["train"], y_train, len(names), s, g.HEAD) for s in g.RECIPE_SEEDS]
    texts = splits["test"]["text"].tolist()
    model, tok = load_base_encoder("minilm-l6", g.ENCODER_SEED)

    def encode(batch: list[str]) -> np.ndarray:
        return embed(batch, model, tok, max_length=g.MAX_LENGTH, batch_size=g.EMBED_BATCH)

    typos = [encode([behaviour.typo(t, random.Random(f"{seed}:{i}")) for i, t in
                     enumerate(texts)]) for seed in TYPO_SEEDS]
    upper = encode([t.upper() for t in texts])

    def predict(head, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return head(torch.from_numpy(x)).argmax(-1).numpy()

    base = [predict(h, emb["test"]) for h in heads]
    typo_pred = [[predict(h, x) for x in typos] for h in heads]
    upper_pred = [predict(h, upper) for h in heads]

    rng = np.random.default_rng(SEED)
    rates, drops, casing = [], [], []
    for d in range(draws):
        rows = rng.choice(len(texts), BEHAVIOUR_ROWS, replace=False)
        variant = d % len(TYPO_SEEDS)
        i, j = rng.choice(len(heads), 2, replace=False)
        cand = survival(base[i], typo_pred[i][variant], rows)
        champ = survival(base[j], typo_pred[j][variant], rows)
        rates.append(cand)
        drops.append(cand - champ)
        casing.append(survival(base[i], upper_pred[i], rows))
    drops_a = np.array(drops)
    return {
        "typo_rate": {"mean": round(float(np.mean(rates)), 4),
                      "min": round(float(np.min(rates)), 4),
                      "max": round(float(np.max(rates)), 4)},
        "casing": {"mean": round(float(np.mean(casing)), 4),
                   "min": round(float(np.min(casing)), 4)},
        "paired_drop": {
            "sd": round(float(drops_a.std()), 4),
            "quantiles": {str(q): round(float(np.quantile(drops_a, q)), 4)
                          for q in (0.001, 0.01, 0.05, 0.5, 0.95, 0.99)},
            "rejected_by_margin": {str(m): round(float(np.mean(drops_a < -m - 1e-9)), 4)
                                   for m in MARGINS},
        },
        "defaults": {"min_invariance": params.gate.min_invariance,
                     "max_invariance_drop": params.gate.max_invariance_drop},
        "draws": draws, "behaviour_rows": BEHAVIOUR_ROWS, "typo_seeds": list(TYPO_SEEDS),
        "models": f"benchmarks.gate heads (seeds {list(g.RECIPE_SEEDS)}) on frozen MiniLM "
                  "embeddings",
        "seconds": round(time.perf_counter() - start, 1),
    }
