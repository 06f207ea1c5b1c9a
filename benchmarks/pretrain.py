"""Does the pretrain stage earn its time? Few-label fine-tuning on CLINC150 after each pretrain
recipe against none, same seeds, through ratchet's own `tasks.pretrain.run` and
`tasks.finetune.run`.

Data: `../shared/data/clinc150/{train,val,test}.csv` (text, label, domain; 151 labels with
`oos`), read by path, never copied. Per seed: LABELED rows per label of train (a seeded draw)
are the labeled train split; the rest of train, texts only, is the unlabeled corpus (what
`data/corpus` holds in a workspace). Val: VAL_PER_LABEL rows per label of val (one fixed draw,
1,510 of 3,100 rows, to keep the run near an hour), the prepared val split of every arm:
finetune's early stopping and kept epoch, pretrain's held-out perplexity, the choice between
arms. Test: all 5,500 rows, scored once per trained model.

Model: the packaged MiniLM (`minilm-l6`), which ships no MLM head: `load_base_mlm` gives it a
random one. Arms (pretrain params over ratchet's defaults; finetune identical in every arm):
- none: `pretrain.enabled: false`, the stage passes the base encoder on.
- default: the default of 48e5dc0, 30 whole-model steps at 5e-5 from the random head.
- head_only: HEAD_STEPS steps of the head alone (encoder frozen) at 1e-3. The encoder it
  passes on is the base encoder, tensor for tensor (checked), so fine-tuning from it is the
  `none` arm's fine-tuning: it is not run again, and the entry carries `none`'s numbers. What
  the arm measures is the perplexity a warmed head reaches (augment's contextual op uses the
  MLM when it is at most `augment.contextual_max_perplexity`) and what that costs.
- warmup: the same head phase, then STEPS whole-model steps at 5e-5.
Every arm runs for every seed (model.seed and the labeled draw), arms interleaved within a seed
in an order rotated per seed, so the shared machine's load falls on all alike; the load average
is in each entry. Per arm and seed: val accuracy and macro-F1 of the kept epoch (finetune keeps
the best val macro-F1), test accuracy, held-out perplexity before/after (and after the head
phase), pretrain and finetune wall seconds. The summary gives mean ± sd over seeds, and each
arm's paired val and test differences to `none` (mean ± sd). An arm "helps" when its mean
paired val gain exceeds the sd of that gain; the choice is made on val, test is reported.

Threads: every stage honours OMP_NUM_THREADS (`ratchet.models.set_threads`). On a 2-core
machine shared with other jobs (load average 13-16 here), one MiniLM training step took 3.6 s
with 1 thread and 19.3 s with 2 (OpenMP threads waiting on each other when preempted), so the
recorded run sets OMP_NUM_THREADS=1; `setup.threads` says which it used.

`python -m benchmarks.pretrain --smoke` is a small run (10 labels, 2 seeds, few steps);
`python -m benchmarks pretrain` (or `python -m benchmarks.pretrain`) the full one, which writes
benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
RESULTS = Path(__file__).parent / "results"
SEEDS = (0, 1, 2)
LABELED = 10  # labeled train rows per label
VAL_PER_LABEL = 10  # val rows per label (a fixed seeded draw): early stopping and the choice
# The same in every arm; ratchet's default is 3, 2 keeps 3 seeds x 3 fine-tunings of MiniLM on a
# shared 2-core machine near an hour.
EPOCHS = 2.0
HEAD_STEPS = 100
STEPS = 100
# The default of 48e5dc0, spelled out so that changing the default does not change this arm.
OLD_DEFAULT = {"enabled": True, "head_warmup_steps": 0, "max_steps": 30,
               "learning_rate": 5e-5, "batch_size": 32}


def arms(head_steps: int, steps: int) -> dict[str, dict[str, Any]]:
    warm = {"enabled": True, "head_warmup_steps": head_steps, "head_learning_rate": 1e-3,
            "learning_rate": 5e-5, "batch_size": 32, "eval_every": head_steps}
    return {"none": {"enabled": False}, "default": OLD_DEFAULT,
            "head_only": {**warm, "max_steps": 0}, "warmup": {**warm, "max_steps": steps}}


def load(split: str, labels: list[str] | None = None) -> pd.DataFrame:
    df = pd.read_csv(DATA / f"{split}.csv", dtype=str, keep_default_na=False)
    if labels is not None:
        df = df[df["label"].isin(labels)]
    return df.reset_index(drop=True)


def few_labels(train: pd.DataFrame, per_label: int, seed: int
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labeled, unlabeled): `per_label` seeded rows of each label, and the rest."""
    picked = train.groupby("label", group_keys=False).sample(n=per_label, random_state=seed)
    rest = train.drop(index=picked.index)
    return picked.reset_index(drop=True), rest.reset_index(drop=True)


def params_for(pretrain: dict[str, Any], seed: int, epochs: float):
    from ratchet.config import parse_params

    return parse_params({"model": {"source": "minilm-l6", "seed": seed},
                         "pretrain": {"checkpoint_every": 0, **pretrain},
                         "finetune": {"epochs": epochs}}, "benchmark")


def same_encoder(a: Path, b: Path) -> bool:
    """Whether two saved MLM folders hold the same encoder tensors (the head aside)."""
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    keys = {k for k in x if not k.startswith("cls.")}
    return keys == {k for k in y if not k.startswith("cls.")} and all(
        x[k].equal(y[k]) for k in keys)


def run_arm(name: str, pretrain: dict[str, Any], seed: int, work: Path, epochs: float,
            test: pd.DataFrame, same_as: dict[str, Any] | None = None) -> dict[str, Any]:
    from ratchet.models import Classifier
    from tasks import finetune
    from tasks import pretrain as pretrain_stage

    p = params_for(pretrain, seed, epochs)
    out = work / f"{name}-{seed}"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    pre = pretrain_stage.run(p, train=work / "train.parquet", val=work / "val.parquet",
                             corpus=work / "corpus.parquet", out=out / "pretrained",
                             metrics=out / "pretrain.json", curve=out / "pretrain_curve.csv")
    t1 = time.perf_counter()
    head_ppl = [e["perplexity"] for e in pre.get("perplexity_curve", [])
                if e["step"] == pre.get("head_steps") and e["step"] > 0]
    measured = {
        "arm": name, "seed": seed, "pretrain_seconds": t1 - t0,
        "pretrain_train_seconds": pre.get("train_seconds", 0.0),
        "pretrain_steps": pre["steps"], "head_steps": pre.get("head_steps", 0),
        "tokenized_rows": pre.get("tokenized_rows"),
        "perplexity_before": pre.get("perplexity_before"),
        "perplexity_after_head": head_ppl[0] if head_ppl else pre.get("perplexity_after")
        if pre.get("steps") and pre["steps"] == pre.get("head_steps") else None,
        "perplexity_after": pre.get("perplexity_after"),
    }
    if same_as is not None:  # the base encoder, unchanged: `none`'s fine-tuning is this arm's
        if not same_encoder(out / "pretrained", work / f"none-{seed}" / "pretrained"):
            raise RuntimeError(f"{name}: the encoder changed; it must be fine-tuned")
        keep = ("val_accuracy", "val_macro_f1", "test_accuracy", "best_epoch",
                "finetune_seconds", "finetune_train_seconds")
        return {**measured, **{k: same_as[k] for k in keep}, "finetune": "none's (same encoder)",
                "load_avg_1min": [load0, os.getloadavg()[0]]}
    ft = finetune.run(p, train=work / "train.parquet", val=work / "val.parquet",
                      pretrained=out / "pretrained", out=out / "model",
                      metrics=out / "finetune.json", curve=out / "finetune_curve.csv")
    t2 = time.perf_counter()
    curve = pd.read_csv(out / "finetune_curve.csv").dropna(subset=["val_accuracy"])
    kept = curve[curve["epoch"] == ft["best_epoch"]].iloc[-1]
    pred, _ = Classifier(out / "model").predict(test["text"].tolist())
    right = np.asarray(pred) == test["label"].to_numpy()
    return {
        **measured,
        "val_accuracy": float(kept["val_accuracy"]), "val_macro_f1": ft["best_val_macro_f1"],
        "test_accuracy": float(right.mean()), "best_epoch": ft["best_epoch"],
        "finetune_seconds": t2 - t1, "finetune_train_seconds": ft["train_seconds"],
        "load_avg_1min": [load0, os.getloadavg()[0]],
    }


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan")}


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {}
    for name in names:
        rows = [by[(name, s)] for s in seeds]
        entry = {k: mean_sd([r[k] for r in rows]) for k in (
            "val_accuracy", "val_macro_f1", "test_accuracy", "pretrain_seconds",
            "finetune_seconds")}
        for k in ("perplexity_before", "perplexity_after_head", "perplexity_after"):
            vals = [r[k] for r in rows if r[k] is not None]
            if vals:
                entry[k] = mean_sd(vals)
        if name != "none":
            for split in ("val", "test"):
                diffs = [by[(name, s)][f"{split}_accuracy"] - by[("none", s)][f"{split}_accuracy"]
                         for s in seeds]
                entry[f"{split}_gain_over_none"] = {**mean_sd(diffs), "per_seed": diffs}
            gain = entry["val_gain_over_none"]
            entry["helps"] = bool(len(seeds) > 1 and gain["mean"] > max(gain["sd"], 0.0))
        out[name] = entry
    return out


def choose(summary: dict[str, Any]) -> dict[str, Any]:
    """The arm with the best mean val accuracy among `none` and the arms that help."""
    candidates = ["none"] + [n for n, e in summary.items() if e.get("helps")]
    best = max(candidates, key=lambda n: summary[n]["val_accuracy"]["mean"])
    return {"arm": best, "chosen_on": "val accuracy (mean over seeds; an arm must beat none by "
            "more than the sd of its paired val gain)",
            "test_accuracy": summary[best]["test_accuracy"]}


def run(*, seeds: tuple[int, ...] = SEEDS, per_label: int = LABELED, epochs: float = EPOCHS,
        n_labels: int | None = None, head_steps: int = HEAD_STEPS, steps: int = STEPS,
        log=print) -> dict[str, Any]:
    if not (DATA / "train.csv").is_file():
        return {"skipped": f"no CLINC150 at {DATA}"}
    train = load("train")
    labels = sorted(train["label"].unique())[:n_labels] if n_labels else None
    train, val, test = load("train", labels), load("val", labels), load("test", labels)
    val, _ = few_labels(val, min(VAL_PER_LABEL, int(val["label"].value_counts().min())), 0)
    recipes = arms(head_steps, steps)
    names = list(recipes)
    runs: list[dict[str, Any]] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ratchet-pretrain-bench-") as tmp:
        for i, seed in enumerate(seeds):
            work = Path(tmp) / f"seed{seed}"
            work.mkdir()
            labeled, rest = few_labels(train, per_label, seed)
            labeled[["text", "label"]].to_parquet(work / "train.parquet", index=False)
            rest[["text"]].to_parquet(work / "corpus.parquet", index=False)
            val[["text", "label"]].to_parquet(work / "val.parquet", index=False)
            # Rotated per seed (head_only, which reuses none's fine-tuning, after none).
            order = names[i % len(names):] + names[: i % len(names)]
            order.remove("head_only")
            order.insert(order.index("none") + 1, "head_only")
            done: dict[str, dict[str, Any]] = {}
            for name in order:
                r = run_arm(name, recipes[name], seed, work, epochs, test,
                            same_as=done["none"] if name == "head_only" else None)
                done[name] = r
                r.update(train_rows=len(labeled), corpus_rows=len(rest))
                runs.append(r)
                log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in r.items()}), flush=True)
    summary = summarize(runs, names)
    return {
        "setup": {"data": str(DATA), "model": "minilm-l6", "labels": len(train["label"].unique()),
                  "labeled_per_label": per_label, "seeds": list(seeds), "finetune_epochs": epochs,
                  "val_rows": len(val), "test_rows": len(test), "arms": recipes,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "threads": __import__("torch").get_num_threads()},
        "runs": runs, "summary": summary, "choice": choose(summary),
        "wall_seconds": time.perf_counter() - began,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="10 labels, 2 seeds, 1 epoch, few steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--epochs", type=float, default=EPOCHS)
    ap.add_argument("--labels", type=int, default=None, help="keep the first N labels")
    ap.add_argument("--out", type=Path, default=RESULTS / "pretrain.json")
    a = ap.parse_args(argv)
    kw: dict[str, Any] = {"seeds": tuple(a.seeds), "epochs": a.epochs, "n_labels": a.labels}
    if a.smoke:
        kw.update(seeds=(0, 1), epochs=1.0, n_labels=10, head_steps=10, steps=5)
    result = run(**kw)
    if "skipped" in result:
        print(f"pretrain: skipped ({result['skipped']})")
        return 0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": result["summary"], "choice": result["choice"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
