"""Training speed and accuracy on CLINC150: the plain and the expert Hugging Face `Trainer`
against ratchet's finetune stage with its defaults, every arm in one run, 3 seeds each.

Data: `../shared/data/clinc150/{train,val,test}.csv` (columns text, label, domain; 151 labels,
`oos` included), read by path and never copied. Model: the packaged MiniLM (`minilm-l6`),
max_length 64, the same epochs (EPOCHS), batch 32, learning rate, weight decay and warmup in
every arm (ratchet's finetune defaults). Every arm's head has all 151 labels from the start.

Arms, each in its own Python process (so that its peak RSS, `ru_maxrss`, is its own):
- baseline: `benchmarks/hf_baseline.py`, a plain `Trainer` with `DataCollatorWithPadding` on
  random batches of 32, no evaluation during training, torch's default thread count.
- expert: the same `Trainer` as a performance-minded user sets it up
  (`hf_baseline.train(expert=True)`): `train_sampling_strategy="group_by_length"`, `bf16=True`
  where the CPU has native bf16, ratchet's thread count, main-process data loading, no pinned
  memory, the fused AdamW that is transformers 5's default.
- full: ratchet's `tasks.finetune.run` with its defaults (`finetune.mode: full`,
  `finetune.precision: auto`; its early stopping reads the val split each epoch, as the stage
  does in the pipeline).
- lora: the same with `finetune.mode: lora`, one seed, at each of LORA_LRS; the one with the
  best validation macro-F1 (what `sweep.metric` ranks by) is the `lora` entry: the test split
  chooses nothing.

Order: seed by seed (SEEDS), every compared arm once per seed, the order of baseline, expert
and full rotated each round, so machine load falls on every arm alike; the LoRA runs last.

Per arm and seed (`runs`), and their mean and sample standard deviation (`_sd`) across seeds:
`samples_per_s` (training rows seen by the model in training mode divided by the trainer's own
training seconds: `trainer.train()` for the Trainer arms, which validate nothing, finetune's
`train_seconds` for ratchet, which times its per-epoch validation apart (`val_forward_s`)),
`wall_s` (the whole training call: loading, tokenizing, training, validation, saving; not test
prediction), `peak_rss_mb`, `test_accuracy` (all 5,500 test rows, predicted by
`ratchet.models.Classifier` as the served model predicts), `test_inscope_accuracy` (label !=
oos), `test_macro_f1` (over the labels), padded and real tokens per batch (`mean_padded_length`,
`padding_share`).

FLOPs: `FlopCounterMode` counts one forward + backward of a single text of each length
1..max_length on the MiniLM classifier (matmuls and attention; with no cross-row operation a
batch costs the sum of its rows). Every training batch the model sees is recorded (a wrapper on
`BertModel.forward`, training mode only), so `achieved_flops` is the FLOPs the arm executed
(padding included) per second of training steps, and `useful_flops` the same without padding.
`matmul_peak_flops`: the best of timed fp32 `torch.matmul` of MATMUL_N x MATMUL_N matrices at
the thread count ratchet trains with, before and after the arms (`matmul["bf16"]`: the same in
bf16, where the CPU has it).

The machine is shared: the load average before and after each run is in its entry. The result
file is rewritten after every run (`complete: false` until the last), so a cut-short run leaves
its numbers. `python -m benchmarks.training --limit 400 --epochs 0.5 --seeds 1 --out /tmp/t.json`
is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
SPLITS = ("train", "val", "test")
OOS = "oos"
MAX_LENGTH = 64
# Every arm trains for the same number of epochs (ratchet's default is 3; 2 keeps the run's
# 3 seeds x 3 arms + 3 LoRA runs of MiniLM on 15k rows near an hour on an idle 2-core machine).
EPOCHS = 2.0
BATCH_SIZE = 32  # the Trainers' per-device batch and ratchet's finetune.batch_size
SEEDS = (13, 14, 15)  # 13 is ratchet's default model.seed
LORA_LRS = (2e-3, 5e-3, 1e-2)  # finetune.lora_learning_rate candidates, chosen among on val
MATMUL_N = 2048
ARMS = ("baseline", "expert", "full", "lora")
COMPARED = ("baseline", "expert", "full")


# ---------------------------------------------------------------- data


def load_splits(limit: int | None = None, seed: int = 0) -> dict[str, pd.DataFrame]:
    """train/val/test of CLINC150 (oos included); `limit` keeps a seeded sample of each split."""
    out = {}
    for split in SPLITS:
        df = pd.read_csv(DATA / f"{split}.csv", dtype=str, keep_default_na=False)
        if limit is not None and limit < len(df):
            df = df.sample(n=limit, random_state=seed).sort_index()
        out[split] = df.reset_index(drop=True)
    return out


def prepare_inputs(splits: dict[str, pd.DataFrame], work: Path) -> dict[str, Any]:
    """Write every arm's parquet inputs to `work`; return the labels."""
    work.mkdir(parents=True, exist_ok=True)
    cols = ["text", "label", "domain"]
    for split in SPLITS:
        splits[split][cols].to_parquet(work / f"{split}.parquet", index=False)
    labels = sorted(set().union(*(set(splits[s]["label"]) for s in SPLITS)))
    meta = {"labels": labels}
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------- measurements


def scores(df: pd.DataFrame, pred: list[str] | np.ndarray, labels: list[str]
           ) -> dict[str, float]:
    """Test accuracy (all rows and in-scope rows) and macro-F1 over `labels`."""
    from sklearn.metrics import f1_score

    y, p = df["label"].to_numpy(), np.asarray(pred)
    right = y == p
    inscope = y != OOS
    out = {"test_accuracy": float(right.mean()),
           "test_inscope_accuracy": float(right[inscope].mean()),
           "test_macro_f1": float(f1_score(y, p, labels=labels, average="macro",
                                           zero_division=0)),
           "test_rows": len(y)}
    return out


class TokenMeter:
    """Records the batches a BERT encoder sees in training mode (rows, padded length, real
    tokens per row) and the seconds it spends in eval mode, by wrapping `BertModel.forward` for
    the duration of a `with` block. Works whatever builds the batches or wraps the model
    (Trainer, ratchet's loop, peft) and whether it passes token ids or input embeddings."""

    def __init__(self):
        self.batches: list[tuple[int, int]] = []  # (rows, padded length)
        self.lengths: list[int] = []  # real tokens of every training row
        self.eval_seconds = 0.0

    @contextmanager
    def installed(self):
        from transformers.models.bert import modeling_bert

        original = modeling_bert.BertModel.forward
        meter = self

        def forward(module, input_ids=None, attention_mask=None, *args, **kwargs):
            if module.training:
                meter.record(input_ids if input_ids is not None else kwargs["inputs_embeds"],
                             attention_mask)
                return original(module, input_ids, attention_mask, *args, **kwargs)
            start = time.perf_counter()
            try:
                return original(module, input_ids, attention_mask, *args, **kwargs)
            finally:
                meter.eval_seconds += time.perf_counter() - start

        modeling_bert.BertModel.forward = forward
        try:
            yield self
        finally:
            modeling_bert.BertModel.forward = original

    def record(self, inputs, attention_mask) -> None:
        """One training batch: `inputs` is (rows, length[, hidden]); the mask marks real tokens
        (no mask: every position is real)."""
        rows, length = int(inputs.shape[0]), int(inputs.shape[1])
        self.batches.append((rows, length))
        if attention_mask is None:
            self.lengths.extend([length] * rows)
        else:
            self.lengths.extend(attention_mask.sum(dim=1).tolist())

    def summary(self) -> dict[str, Any]:
        if not self.batches:
            return {"train_samples": None}
        padded = sum(r * n for r, n in self.batches)
        real = sum(self.lengths)
        return {"train_samples": len(self.lengths), "train_batches": len(self.batches),
                "padded_tokens_per_batch": padded / len(self.batches),
                "real_tokens_per_batch": real / len(self.batches),
                "mean_padded_length": padded / len(self.lengths),
                "mean_real_length": real / len(self.lengths),
                "padding_share": 1 - real / padded}

    def flops(self, per_row: dict[int, float]) -> tuple[float, float]:
        """(executed, useful) FLOPs of every recorded batch given FLOPs per row by length."""
        executed = sum(r * per_row[n] for r, n in self.batches)
        return executed, sum(per_row[n] for n in self.lengths)


def flops_by_length(model, max_length: int) -> dict[int, float]:
    """FLOPs of one forward + backward of a single row of each length 1..max_length."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    out = {}
    for n in range(1, max_length + 1):
        ids = torch.full((1, n), 1000, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                         labels=torch.zeros(1, dtype=torch.long)).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
        out[n] = float(counter.get_total_flops())
    return out


def matmul_peak(n: int = MATMUL_N, repeats: int = 10, threads: int | None = None,
                dtype=None) -> dict[str, float]:
    """FLOP/s of timed n x n matmuls (fp32 unless `dtype`): the best and the median of
    `repeats`."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(dtype or torch.float32) for _ in range(2))
        for _ in range(2):
            torch.matmul(a, b)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            rates.append(2 * n**3 / (time.perf_counter() - start))
        return {"best": max(rates), "median": float(np.median(rates)), "n": n,
                "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(before)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- one run (a child process)


def _finetune_params(labels: list[str], mode: str, epochs: float, seed: int,
                     **finetune: Any):
    from ratchet.config import parse_params

    return parse_params({"data": {"labels": labels},
                         "model": {"source": "minilm-l6", "max_length": MAX_LENGTH, "seed": seed},
                         "finetune": {"mode": mode, "epochs": epochs, "batch_size": BATCH_SIZE,
                                      **finetune}}, "benchmarks/training.py")


def _best_val_accuracy(curve: Path, best_epoch: int) -> float | None:
    """The val accuracy finetune measured at its best epoch (its curve's last row of that epoch)."""
    if not curve.is_file():
        return None
    rows = pd.read_csv(curve).dropna(subset=["val_accuracy"])
    rows = rows[rows["epoch"] == best_epoch]
    return float(rows["val_accuracy"].iloc[-1]) if len(rows) else None


def run_arm(arm: str, work: Path, epochs: float, seed: int, lora_lr: float | None = None
            ) -> dict[str, Any]:
    """Train one arm with one seed on the inputs in `work`, predict the test split, measure."""
    import torch

    from ratchet.models import Classifier, minilm_dir

    meta = json.loads((work / "meta.json").read_text())
    labels = meta["labels"]
    test = pd.read_parquet(work / "test.parquet")
    name = f"{arm}-{seed}" + (f"-{lora_lr:g}" if lora_lr else "")
    out_dir = work / f"model-{name}"
    meter = TokenMeter()
    load0 = os.getloadavg()[0]
    val_scores: dict[str, Any] = {}
    if arm in ("baseline", "expert"):
        from benchmarks import hf_baseline
        from ratchet.config import parse_params

        ft = parse_params({}, "benchmarks/training.py").finetune
        train = pd.read_parquet(work / "train.parquet")
        start = time.perf_counter()
        with meter.installed():
            stats = hf_baseline.train(train, out_dir, model_dir=minilm_dir(), labels=labels,
                                      epochs=epochs, batch_size=BATCH_SIZE,
                                      learning_rate=ft.learning_rate,
                                      weight_decay=ft.weight_decay,
                                      warmup_ratio=ft.warmup_ratio, max_length=MAX_LENGTH,
                                      seed=seed, expert=arm == "expert")
        wall = time.perf_counter() - start
    else:
        from tasks import finetune

        extra = {"lora_learning_rate": lora_lr} if lora_lr else {}
        params = _finetune_params(labels, arm, epochs, seed, **extra)
        curve = work / f"curve-{name}.csv"
        start = time.perf_counter()
        with meter.installed():
            stats = finetune.run(params, train=work / "train.parquet", val=work / "val.parquet",
                                 pretrained=minilm_dir(), out=out_dir,
                                 metrics=work / f"metrics-{name}.json", curve=curve)
        wall = time.perf_counter() - start
        val_scores = {"val_macro_f1": stats["best_val_macro_f1"],
                      "val_accuracy": _best_val_accuracy(curve, stats["best_epoch"])}
    threads = torch.get_num_threads()
    rss_trained = peak_rss_mb()
    clf = Classifier(out_dir, max_length=MAX_LENGTH, batch_size=64)
    pred, _ = clf.predict(test["text"].tolist())
    tokens = meter.summary()
    train_s = float(stats["train_seconds"])
    samples = tokens["train_samples"]
    result = {
        "seed": seed,
        "samples_per_s": samples / train_s if samples and train_s else None,
        "wall_s": wall,
        "train_s": train_s,
        # finetune measures peak memory itself; else this process's peak by the end of training
        # (before test prediction, whose peak is lower).
        "peak_rss_mb": stats.get("peak_rss_mb", rss_trained),
        **val_scores,
        **scores(test, pred, labels),
        "predicted_in": clf.precision,
        **tokens,
        "val_forward_s": meter.eval_seconds,
        "torch_threads": threads,
        "trainer_stats": {k: v for k, v in stats.items() if isinstance(v, int | float | str)},
        "load_avg_1min": [load0, os.getloadavg()[0]],
    }
    if lora_lr:
        result["lora_learning_rate"] = lora_lr
    table = work / "flops.json"
    if arm != "lora" and table.is_file() and meter.batches and train_s > 0:
        # Full fine-tuning only: LoRA's backward skips the frozen weights' gradients.
        per_row = {int(k): v for k, v in json.loads(table.read_text()).items()}
        executed, useful = meter.flops(per_row)
        result["achieved_flops"] = executed / train_s
        result["useful_flops"] = useful / train_s
    shutil.rmtree(out_dir, ignore_errors=True)  # 90 MB each; the numbers are what is kept
    return result


# ---------------------------------------------------------------- the whole run (parent)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _delta(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


MEANED = ("samples_per_s", "test_accuracy", "test_inscope_accuracy", "test_macro_f1", "wall_s",
          "train_s", "peak_rss_mb", "val_macro_f1", "val_accuracy", "achieved_flops",
          "useful_flops", "padding_share", "mean_padded_length")


def summarize(runs: list[dict]) -> dict[str, Any]:
    """One arm over its seeds: the mean of each number (and its sample sd, `_sd`; None with
    one run), the runs themselves, and the failed runs' errors."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in ok]}
    if not ok:
        return {**out, "error": "; ".join(str(r.get("error")) for r in runs) or "not run",
                "runs": runs}
    for key in MEANED:
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values:
            out[key] = statistics.fmean(values)
            out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    for key in ("torch_threads", "predicted_in", "lora_learning_rate"):
        if key in ok[0]:
            out[key] = ok[0][key]
    out["runs"] = runs
    return out


def choose_lora(runs: list[dict]) -> dict[str, Any]:
    """The LoRA run with the best validation macro-F1 (the test split chooses nothing), with
    every candidate's val and test numbers beside it."""
    ok = [r for r in runs if "error" not in r and r.get("val_macro_f1") is not None]
    table = [{k: r.get(k) for k in ("lora_learning_rate", "val_macro_f1", "val_accuracy",
                                    "test_accuracy", "samples_per_s", "error")} for r in runs]
    if not ok:
        return {"error": "no LoRA run finished", "candidates": table}
    best = max(ok, key=lambda r: r["val_macro_f1"])
    return {**summarize([best]), "chosen_by": "val_macro_f1 (the test split chooses nothing)",
            "candidates": table}


def assemble(arms: dict[str, list[dict]], matmul: dict, extras: dict) -> dict[str, Any]:
    """The result JSON: one entry per arm (mean and sd over seeds), ratios, targets."""
    result: dict[str, Any] = {arm: summarize(arms.get(arm, [])) for arm in COMPARED}
    result["lora"] = choose_lora(arms.get("lora", []))
    base, expert, full, lora = (result[a] for a in ARMS)
    result["matmul_peak_flops"] = matmul.get("peak")
    for arm in (base, expert, full):
        if arm.get("achieved_flops") and matmul.get("peak"):
            arm["achieved_vs_matmul_peak"] = arm["achieved_flops"] / matmul["peak"]
    speed = {name: _ratio(full.get("samples_per_s"), other.get("samples_per_s"))
             for name, other in (("baseline", base), ("expert", expert))}
    result["full_vs_baseline_speedup"] = speed["baseline"]
    result["full_vs_expert_speedup"] = speed["expert"]
    result["lora_vs_full_speedup"] = _ratio(lora.get("samples_per_s"), full.get("samples_per_s"))
    result["full_vs_baseline_accuracy_delta"] = _delta(full.get("test_accuracy"),
                                                       base.get("test_accuracy"))
    result["full_vs_expert_accuracy_delta"] = _delta(full.get("test_accuracy"),
                                                     expert.get("test_accuracy"))
    result["lora_vs_full_accuracy_delta"] = _delta(lora.get("test_accuracy"),
                                                   full.get("test_accuracy"))
    hf = [a for a in (base, expert) if a.get("test_accuracy") is not None]
    better = max(hf, key=lambda a: a["test_accuracy"]) if hf else {}
    gap = _delta(full.get("test_accuracy"), better.get("test_accuracy"))
    sd = better.get("test_accuracy_sd")
    met = {"full_vs_baseline_speedup": None if speed["baseline"] is None
           else speed["baseline"] >= 2.0,
           "full_vs_expert_speedup": None if speed["expert"] is None
           else speed["expert"] >= 1.15,
           "accuracy_within_one_sd": None if gap is None or sd is None else gap >= -sd}
    result["targets"] = {
        "full_vs_baseline_speedup": ">= 2.0", "full_vs_expert_speedup": ">= 1.15",
        "accuracy_within_one_sd": "full's mean test accuracy >= the better Trainer arm's mean "
        "minus that arm's sd over seeds",
        "better_trainer_arm": "baseline" if better is base else "expert" if better else None,
        "accuracy_gap_to_better": gap, "met": met}
    result["matmul"] = matmul
    result.update(extras)
    return result


def _flop_table(n_labels: int) -> dict[int, float]:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ratchet.models import minilm_dir

    hf_logging.set_verbosity_error()  # the new head is expected
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=n_labels)
    return flops_by_length(model, MAX_LENGTH)


def _child(arm: str, work: Path, epochs: float, seed: int, lora_lr: float | None = None
           ) -> dict[str, Any]:
    """Run one arm with one seed in a fresh Python process; its JSON, or the error it reported."""
    path = work / "arm.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.training", "--arm", arm, "--work", str(work),
           "--epochs", str(epochs), "--seed", str(seed)]
    if lora_lr:
        cmd += ["--lora-lr", repr(lora_lr)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], check=False)
    if path.is_file():
        return json.loads(path.read_text())
    return {"seed": seed, "error": f"arm process exited with {proc.returncode} and wrote no result"}


def schedule(seeds: tuple[int, ...], lora_lrs: tuple[float, ...]
             ) -> list[tuple[str, int, float | None]]:
    """(arm, seed, LoRA learning rate) in run order: round i runs every compared arm with seed
    i, rotated by i places so that no arm always goes first; then LoRA at each rate (seed
    `seeds[0]`), after the rounds, so that a cut-short run has whole rounds."""
    out: list[tuple[str, int, float | None]] = []
    for i, seed in enumerate(seeds):
        order = COMPARED[i % len(COMPARED):] + COMPARED[: i % len(COMPARED)]
        out += [(arm, seed, None) for arm in order]
    return out + [("lora", seeds[0], lr) for lr in lora_lrs]


def run(limit: int | None = None, epochs: float = EPOCHS, keep: Path | None = None, *,
        seeds: tuple[int, ...] = SEEDS, lora_lrs: tuple[float, ...] = LORA_LRS,
        out: Path | None = None) -> dict[str, Any]:
    if not all((DATA / f"{s}.csv").is_file() for s in SPLITS):
        return {"skipped": f"CLINC150 not found under {DATA}"}
    from ratchet.models import set_threads
    from ratchet.precision import cpu_has_bf16
    from ratchet.runtime import setup, write_json

    setup()
    import torch

    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    work = keep or Path(tempfile.mkdtemp(prefix="ratchet-bench-train-"))
    plan = schedule(seeds, lora_lrs)
    arms: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    splits = load_splits(limit)
    config = {"model": "minilm-l6", "max_length": MAX_LENGTH, "epochs": epochs,
              "batch_size": BATCH_SIZE, "seeds": list(seeds), "lora_learning_rates":
              list(lora_lrs), "limit": limit, "rows": {s: len(df) for s, df in splits.items()},
              "order": [f"{a}/{s}" + (f"/lr={lr:g}" if lr else "") for a, s, lr in plan]}

    def extras(complete: bool) -> dict[str, Any]:
        return {"complete": complete, "config": config,
                "machine": {"cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                            "python": platform.python_version(),
                            "processor": platform.machine(), "cpu_bf16": cpu_has_bf16(),
                            "load_avg_1min_at_start": load_at_start},
                "seconds": time.perf_counter() - start}

    try:
        meta = prepare_inputs(splits, work)
        config["labels"] = len(meta["labels"])
        config["finetune"] = _finetune_params(meta["labels"], "full", epochs, seeds[0]) \
            .finetune.model_dump()
        set_threads()
        per_row = _flop_table(len(meta["labels"]))
        (work / "flops.json").write_text(json.dumps(per_row))
        config["flops_per_row"] = {
            "method": "torch.utils.flop_counter.FlopCounterMode, forward + backward of one row "
            "per length (matmuls and attention)",
            **{f"length_{k}": per_row[k] for k in (8, 16, 32, 64) if k in per_row}}
        matmul = matmul_peak(threads=torch.get_num_threads())
        if cpu_has_bf16():
            matmul["bf16"] = matmul_peak(threads=matmul["threads"], dtype=torch.bfloat16)
        matmul["peak"] = matmul["best"]
        print(f"training benchmark: matmul peak {matmul['best'] / 1e9:.1f} GFLOP/s fp32 "
              f"({matmul['threads']} threads); {len(plan)} runs", flush=True)
        for n, (arm, seed, lr) in enumerate(plan, 1):
            t0 = time.perf_counter()
            arms[arm].append(_child(arm, work, epochs, seed, lr))
            shown = {k: arms[arm][-1].get(k) for k in ("samples_per_s", "test_accuracy",
                                                       "val_macro_f1", "error")}
            print(f"training benchmark: [{n}/{len(plan)}] {arm} seed {seed}"
                  f"{f' lr {lr:g}' if lr else ''} done in {time.perf_counter() - t0:.0f} s: "
                  f"{shown}", flush=True)
            if out is not None:
                write_json(out, assemble(arms, matmul, extras(False)))
        matmul_after = matmul_peak(threads=matmul["threads"])
        matmul["best_after_arms"] = matmul_after["best"]
        matmul["peak"] = max(matmul["best"], matmul_after["best"])
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return assemble(arms, matmul, extras(True))


# ---------------------------------------------------------------- CPU cost of a step (1 thread)


@contextmanager
def step_clock():
    """CPU seconds (this process, every thread) at each optimizer step: `torch.optim.AdamW.step`
    is wrapped, which both Trainer arms (`adamw_torch_fused`) and ratchet (`make_optimizer`)
    call once a step."""
    import torch

    stamps: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stamps.append(usage.ru_utime + usage.ru_stime)
        return out

    torch.optim.AdamW.step = step
    try:
        yield stamps
    finally:
        torch.optim.AdamW.step = original


def step_cost_arm(arm: str, work: Path, seed: int) -> dict[str, Any]:
    """One arm's CPU milliseconds per training step on `work`'s train rows, one epoch, in this
    process (started with OMP_NUM_THREADS=1: one torch thread in every arm). The first and
    last two steps are left out (warm-up; a short last batch)."""
    from ratchet.models import minilm_dir

    labels = json.loads((work / "meta.json").read_text())["labels"]
    out_dir = work / f"model-cost-{arm}-{seed}"
    with step_clock() as stamps:
        if arm in ("baseline", "expert"):
            from benchmarks import hf_baseline

            hf_baseline.train(pd.read_parquet(work / "train.parquet"), out_dir,
                              model_dir=minilm_dir(), labels=labels, epochs=1.0,
                              batch_size=BATCH_SIZE, max_length=MAX_LENGTH, seed=seed,
                              expert=arm == "expert")
        else:
            from tasks import finetune

            finetune.run(_finetune_params(labels, "full", 1.0, seed), train=work /
                         "train.parquet", val=work / "val.parquet", pretrained=minilm_dir(),
                         out=out_dir, metrics=work / "metrics-cost.json",
                         curve=work / "curve-cost.csv")
    shutil.rmtree(out_dir, ignore_errors=True)
    import torch

    if len(stamps) < 6:
        return {"seed": seed, "error": f"only {len(stamps)} steps"}
    timed = len(stamps) - 4
    ms = 1000 * (stamps[-2] - stamps[2]) / timed
    return {"seed": seed, "cpu_ms_per_step": ms, "samples_per_cpu_s": 1000 * BATCH_SIZE / ms,
            "steps_timed": timed, "torch_threads": torch.get_num_threads()}


def step_cost(rows: int, seeds: tuple[int, ...], keep: Path | None = None) -> dict[str, Any]:
    """Every compared arm's CPU cost of a training step at one torch thread, on `rows` train
    rows (seeded sample), seed rounds interleaved and rotated as in `run`. CPU time, unlike
    wall time, hardly depends on what else the machine runs, so this compares the arms' work
    per step on a shared machine; it says nothing about how well each uses 2 threads."""
    from ratchet.runtime import setup

    setup()
    work = keep or Path(tempfile.mkdtemp(prefix="ratchet-bench-cost-"))
    try:
        splits = load_splits()
        splits["train"] = splits["train"].sample(n=min(rows, len(splits["train"])),
                                                 random_state=0).reset_index(drop=True)
        splits["val"] = splits["val"].sample(n=256, random_state=0).reset_index(drop=True)
        prepare_inputs(splits, work)
        runs: dict[str, list[dict]] = {arm: [] for arm in COMPARED}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for arm, seed, _ in schedule(seeds, ()):
            path = work / "arm.json"
            path.unlink(missing_ok=True)
            subprocess.run([sys.executable, "-m", "benchmarks.training", "--cost-arm", arm,
                            "--work", str(work), "--seed", str(seed)], env=env, check=False,
                           cwd=Path(__file__).resolve().parents[1])
            runs[arm].append(json.loads(path.read_text()) if path.is_file()
                             else {"seed": seed, "error": "no result"})
            print(f"step cost: {arm} seed {seed}: {runs[arm][-1]}", flush=True)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"rows": rows, "threads": 1, "epochs": 1.0, "seeds": list(seeds)}
    for arm, arm_runs in runs.items():
        ms = [r["cpu_ms_per_step"] for r in arm_runs if "cpu_ms_per_step" in r]
        out[arm] = {"cpu_ms_per_step": statistics.fmean(ms) if ms else None,
                    "cpu_ms_per_step_sd": statistics.stdev(ms) if len(ms) > 1 else None,
                    "runs": arm_runs}
    for other in ("baseline", "expert"):
        a, b = out["full"]["cpu_ms_per_step"], out[other]["cpu_ms_per_step"]
        out[f"full_vs_{other}_speedup"] = b / a if a and b else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="rows per split (a seeded sample): smoke runs")
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--seeds", type=int, default=len(SEEDS),
                        help=f"how many of the seeds {SEEDS} (default all)")
    parser.add_argument("--lora-lrs", type=float, nargs="*", default=list(LORA_LRS),
                        help="LoRA learning rates to choose among on val (none: no LoRA arm)")
    parser.add_argument("--out", type=Path, help="write the result JSON here, after every run "
                        "(default: print at the end)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one run
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=SEEDS[0], help=argparse.SUPPRESS)
    parser.add_argument("--lora-lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--step-cost", type=int, metavar="ROWS",
                        help="instead: CPU ms per training step of each compared arm at one "
                        "thread on ROWS train rows (`step_cost`)")
    parser.add_argument("--cost-arm", choices=COMPARED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cost_arm:
        from ratchet.runtime import setup

        setup()
        try:
            result = step_cost_arm(args.cost_arm, args.work, args.seed)
        except Exception as err:  # recorded; the other runs go on
            traceback.print_exc()
            result = {"seed": args.seed, "error": f"{type(err).__name__}: {err}"}
        (args.work / "arm.json").write_text(json.dumps(result))
        return 0
    if args.step_cost:
        result = step_cost(args.step_cost, SEEDS[: args.seeds], args.keep)
        if args.out:
            from ratchet.runtime import write_json

            write_json(args.out, result)
            print(f"wrote {args.out}")
        else:
            print(json.dumps(result, indent=2))
        return 0
    if args.arm:
        from ratchet.runtime import setup

        setup()
        try:
            result = run_arm(args.arm, args.work, args.epochs, args.seed, args.lora_lr)
        except Exception as err:  # recorded in the arm's entry; the other runs go on
            traceback.print_exc()
            result = {"seed": args.seed, "error": f"{type(err).__name__}: {err}"}
        (args.work / "arm.json").write_text(json.dumps(result))
        return 0
    if not 1 <= args.seeds <= len(SEEDS):
        parser.error(f"--seeds must be 1..{len(SEEDS)}")
    result = run(args.limit, args.epochs, args.keep, seeds=SEEDS[: args.seeds],
                 lora_lrs=tuple(args.lora_lrs), out=args.out)
    text = json.dumps(result, indent=2)
    if args.out:
        from ratchet.runtime import write_json

        write_json(args.out, result)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
