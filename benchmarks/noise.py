"""Label-noise detection on CLINC150 and the demo's batches: the rates that set `noise:` defaults.

Data: `../shared/data/clinc150/{train,val,test}.csv` read by path, `oos` left out (150 intents
in 10 domains, see `load`); `utility` and `work` are held out as the "new domains". The earlier
batches are the train rows of the other eight domains; prepare's stable split
(`ratchet.data.split_of` with the default `prepare` settings) divides them into the champion's
training rows and the held-out `test` rows its baseline is measured on (a seeded sample of
`noise.baseline_rows`).
New batches are drawn from the val and test files (rows no champion trained on): clean, with
10/20/50% of labels flipped to another known label, and clean with 40% of rows from the held-out
domains (labels the champion does not know: not judged).

Champions:
- head: a dropout MLP on frozen MiniLM sentence embeddings (`benchmarks.gate.train_head`, the
  project's optimizer and schedule), trained on the earlier batches' train rows.
- finetune (`NOISE_FINETUNE=1`): MiniLM fine-tuned by the project's finetune stage on the same
  rows (FINETUNE_EPOCHS epochs); slow on a shared 2-core machine, so off by default.
Cold start: `ratchet.noise.cross_validated_probs` (5-fold logistic regression) on the batch's
own base-MiniLM embeddings. Every estimate is `ratchet.noise.estimate` (cleanlab).

Demo: `ratchet.demo_data.demo_batches(seed=0)` at scale 1 with MiniLM (and batch 1 at scale 0.5
with the tests' tiny random encoder): cold start on each batch, and a head champion trained on
the train rows of the batches before it, baseline on their test rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ratchet.config import NoiseConfig, PrepareConfig
from ratchet.data import split_of
from ratchet.noise import CHAMPION, CROSS_VALIDATED, cross_validated_probs, estimate, flag

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
CACHE = Path(__file__).resolve().parent / ".cache" / "noise"
SPLITS = ("train", "val", "test")
HELD = ("utility", "work")
MAX_LENGTH = 64
FLIPS = (0.0, 0.1, 0.2, 0.5)
SIZES = (300, 1000)
TRIALS = 20
COLD_TRIALS = 5
NEW_DOMAIN_SHARE = 0.4
FINETUNE_EPOCHS = 1.0
SEED = 0


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load() -> pd.DataFrame:
    """Every row of the three files but `oos` (150 intents): the test file holds 1,000 of its
    1,200 `oos` rows, so with them new batches would differ from the earlier ones by far more
    than their labels."""
    frames = []
    for split in SPLITS:
        df = pd.read_csv(DATA / f"{split}.csv", dtype=str, keep_default_na=False)
        frames.append(df.assign(file=split))
    return pd.concat(frames, ignore_index=True)


def embed_texts(texts: list[str], source: str = "minilm-l6", seed: int = 13) -> np.ndarray:
    """Mean-pooled base-encoder embeddings (`ratchet.embed`), cached on disk."""
    path = CACHE / f"emb-{source}-{_key(source, seed, MAX_LENGTH, texts)}.npy"
    if path.is_file():
        return np.load(path)
    from ratchet.embed import embed, load_base_encoder

    model, tok = load_base_encoder(source, seed)
    out = embed(texts, model, tok, max_length=MAX_LENGTH, batch_size=128, progress=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def head_probs(x_train: np.ndarray, y_train: list[str], x: np.ndarray) -> tuple[np.ndarray, list]:
    import torch

    from benchmarks.gate import HEAD, train_head

    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    model = train_head(x_train, np.array([index[c] for c in y_train]), len(classes), 0, HEAD)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=-1).numpy()
    return probs, classes


def finetune_probs(train: pd.DataFrame, texts: list[str], work: Path) -> tuple[np.ndarray, list]:
    """MiniLM fine-tuned by the project's finetune stage on `train`; probabilities on `texts`
    (its first 5% by text hash are its validation rows)."""
    path = CACHE / f"ft-{_key(FINETUNE_EPOCHS, train['text'].tolist(), texts)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["probs"], [str(c) for c in z["classes"]]
    from ratchet.config import parse_params
    from ratchet.models import Classifier, minilm_dir
    from tasks import finetune

    work.mkdir(parents=True, exist_ok=True)
    classes = sorted(set(train["label"]))
    cut = np.array([split_of(t, val_frac=0.0001, test_frac=0.05, salt="val") == "test"
                    for t in train["text"]])
    train[~cut][["text", "label"]].to_parquet(work / "train.parquet")
    train[cut][["text", "label"]].to_parquet(work / "val.parquet")
    params = parse_params({"data": {"labels": classes},
                           "finetune": {"epochs": FINETUNE_EPOCHS, "patience": 0}})
    finetune.run(params, train=work / "train.parquet", val=work / "val.parquet",
                 pretrained=minilm_dir(), out=work / "model", metrics=work / "metrics.json",
                 curve=work / "curve.csv")
    clf = Classifier(work / "model", max_length=MAX_LENGTH)
    probs = clf.predict_proba(texts)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, probs=probs, classes=np.array(clf.labels))
    return probs, clf.labels


def flip(labels: np.ndarray, share: float, known: list[str], rng: np.random.Generator
         ) -> np.ndarray:
    """`share` of the labels replaced by another label of `known`, uniformly."""
    out = labels.copy()
    idx = rng.choice(len(out), size=int(round(share * len(out))), replace=False)
    for i in idx:
        choices = [k for k in known if k != out[i]]
        out[i] = choices[rng.integers(len(choices))]
    return out


def _stats(values: list[float]) -> dict[str, float]:
    a = np.array([v for v in values if v is not None], dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std()), "min": float(a.min()),
            "max": float(a.max())}


def champion_trials(name: str, probs: np.ndarray, classes: list[str], pool: pd.DataFrame,
                    base_rows: np.ndarray, new_rows: np.ndarray, held_rows: np.ndarray,
                    cfg: NoiseConfig) -> dict[str, Any]:
    """Rates of clean / flipped / new-domain batches and of the baseline, over TRIALS draws."""
    rng = np.random.default_rng(SEED)
    labels = pool["label"].to_numpy()
    out: dict[str, Any] = {}
    baselines = []
    for _ in range(TRIALS):
        pick = rng.choice(base_rows, size=min(cfg.baseline_rows, len(base_rows)), replace=False)
        baselines.append(estimate(labels[pick], probs[pick], classes).rate)
    out["baseline"] = _stats(baselines)
    for n in SIZES:
        for share in FLIPS:
            rates, flagged = [], []
            for t in range(TRIALS):
                pick = rng.choice(new_rows, size=n, replace=False)
                y = flip(labels[pick], share, classes, rng)
                est = estimate(y, probs[pick], classes)
                rates.append(est.rate)
                flagged.append(flag({"rate": est.rate, "baseline": baselines[t],
                                     "judged": est.n_judged, "method": CHAMPION}, cfg))
            out[f"n{n}/flip{int(share * 100)}"] = {**_stats(rates),
                                                   "flagged": float(np.mean(flagged))}
        rates, flagged, judged = [], [], []
        for t in range(TRIALS):
            n_held = int(NEW_DOMAIN_SHARE * n)
            pick = np.concatenate([rng.choice(held_rows, size=n_held, replace=False),
                                   rng.choice(new_rows, size=n - n_held, replace=False)])
            est = estimate(labels[pick], probs[pick], classes)
            rates.append(est.rate)
            judged.append(est.n_judged)
            flagged.append(flag({"rate": est.rate, "baseline": baselines[t],
                                 "judged": est.n_judged, "method": CHAMPION}, cfg))
        out[f"n{n}/new_domains"] = {**_stats(rates), "judged": float(np.mean(judged)),
                                    "flagged": float(np.mean(flagged))}
    print(name, json.dumps(out, indent=1))
    return out


def cold_trials(x: np.ndarray, labels: np.ndarray, rows: np.ndarray, cfg: NoiseConfig
                ) -> dict[str, Any]:
    rng = np.random.default_rng(SEED + 1)
    known = sorted(set(labels[rows]))
    out: dict[str, Any] = {}
    for n in SIZES:
        for share in FLIPS:
            rates, flagged = [], []
            for _ in range(COLD_TRIALS):
                pick = rng.choice(rows, size=n, replace=False)
                y = flip(labels[pick], share, known, rng)
                probs, classes = cross_validated_probs(x[pick], y, folds=cfg.folds, seed=cfg.seed)
                est = estimate(y, probs, classes)
                rates.append(est.rate)
                flagged.append(flag({"rate": est.rate, "judged": est.n_judged,
                                     "method": CROSS_VALIDATED}, cfg))
            out[f"n{n}/flip{int(share * 100)}"] = {**_stats(rates),
                                                   "flagged": float(np.mean(flagged))}
    print("cold start", json.dumps(out, indent=1))
    return out


def demo(cfg: NoiseConfig) -> dict[str, Any]:
    """The demo's batches: cold start on each, and a head champion on the batches before."""
    from ratchet.demo_data import demo_batches

    out: dict[str, Any] = {}
    prep = PrepareConfig()
    for source, scale in (("minilm-l6", 1.0), ("tiny", 0.5)):
        batches = [b.frame for b in demo_batches(seed=0, scale=scale)[:3]]
        for i, b in enumerate(batches, start=1):
            x = embed_texts(b["text"].tolist(), source)
            probs, classes = cross_validated_probs(x, b["label"], folds=cfg.folds, seed=cfg.seed)
            est = estimate(b["label"].tolist(), probs, classes)
            entry = {"rate": est.rate, "judged": est.n_judged, "rows": len(b),
                     "method": CROSS_VALIDATED}
            out[f"{source}/batch{i}/cold_start"] = {**entry, "flagged": flag(entry, cfg)}
            if i == 1 or source == "tiny":
                continue
            before = pd.concat(batches[: i - 1], ignore_index=True)
            split = np.array([split_of(t, val_frac=prep.val_frac, test_frac=prep.test_frac,
                                       salt=prep.salt) for t in before["text"]])
            xb = embed_texts(before["text"].tolist(), source)
            train = split == "train"
            test = np.flatnonzero(split == "test")
            p_all, classes = head_probs(xb[train], before["label"][train].tolist(),
                                        np.concatenate([xb[test], x]))
            base = estimate(before["label"].to_numpy()[test], p_all[: len(test)], classes)
            est = estimate(b["label"].tolist(), p_all[len(test):], classes)
            entry = {"rate": est.rate, "baseline": base.rate, "judged": est.n_judged,
                     "rows": len(b), "suspects": est.n_suspects, "method": CHAMPION}
            out[f"{source}/batch{i}/head_champion"] = {**entry, "flagged": flag(entry, cfg)}
    print("demo", json.dumps(out, indent=1))
    return out


def run() -> dict[str, Any]:
    if not DATA.is_dir():
        return {"skipped": f"{DATA} not found"}
    start = time.perf_counter()
    cfg = NoiseConfig()
    df = load()
    x = embed_texts(df["text"].tolist())  # every row, so the cache serves any subset
    keep = (df["label"] != "oos").to_numpy()
    df, x = df[keep].reset_index(drop=True), x[keep]
    prep = PrepareConfig()
    held = df["domain"].isin(HELD).to_numpy()
    earlier = (df["file"] == "train").to_numpy() & ~held
    split = np.array([split_of(t, val_frac=prep.val_frac, test_frac=prep.test_frac,
                               salt=prep.salt) for t in df["text"]])
    champ_train = np.flatnonzero(earlier & (split == "train"))
    base_rows = np.flatnonzero(earlier & (split == "test"))
    new_rows = np.flatnonzero((df["file"] != "train").to_numpy() & ~held)
    held_rows = np.flatnonzero((df["file"] != "train").to_numpy() & held)
    seconds = {"embed": time.perf_counter() - start}
    result: dict[str, Any] = {"params": cfg.model_dump(), "trials": TRIALS,
                              "cold_trials": COLD_TRIALS, "sizes": list(SIZES),
                              "held_out_domains": list(HELD),
                              "champion_train_rows": len(champ_train),
                              "baseline_pool_rows": len(base_rows)}
    t = time.perf_counter()
    probs, classes = head_probs(x[champ_train], df["label"].to_numpy()[champ_train].tolist(), x)
    acc = float((np.array(classes)[probs[new_rows].argmax(1)]
                 == df["label"].to_numpy()[new_rows]).mean())
    result["head"] = {"accuracy_new_rows": acc, **champion_trials(
        "head", probs, classes, df, base_rows, new_rows, held_rows, cfg)}
    seconds["head"] = time.perf_counter() - t
    if os.environ.get("NOISE_FINETUNE"):
        t = time.perf_counter()
        need = np.concatenate([base_rows, new_rows, held_rows])
        part, classes = finetune_probs(df.iloc[champ_train].reset_index(drop=True),
                                       df["text"].to_numpy()[need].tolist(), CACHE / "finetune")
        probs = np.zeros((len(df), len(classes)))
        probs[need] = part
        acc = float((np.array(classes)[probs[new_rows].argmax(1)]
                     == df["label"].to_numpy()[new_rows]).mean())
        result["finetune"] = {"epochs": FINETUNE_EPOCHS, "accuracy_new_rows": acc,
                              **champion_trials("finetune", probs, classes, df, base_rows,
                                                new_rows, held_rows, cfg)}
        seconds["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    result["cold_start"] = cold_trials(x, df["label"].to_numpy(), new_rows, cfg)
    seconds["cold_start"] = time.perf_counter() - t
    t = time.perf_counter()
    result["demo"] = demo(cfg)
    seconds["demo"] = time.perf_counter() - t
    result["seconds"] = seconds
    return result
