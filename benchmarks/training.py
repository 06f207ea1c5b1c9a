"""Training speed and accuracy on CLINC150: a plain HF Trainer against ratchet's finetune stage.

Data: `../shared/data/clinc150/{train,val,test}.csv` (columns text, label, domain; 151 labels,
`oos` included), read by path and never copied. Model: the packaged MiniLM (`minilm-l6`),
max_length 64, the same epochs (EPOCHS), batch 32, learning rate, weight decay and warmup in
every arm (ratchet's finetune defaults). Every arm's head has all 151 labels from the start.

Arms, one after the other in one run, each in its own Python process (so that its peak RSS,
`ru_maxrss`, is its own):
- baseline: `benchmarks/hf_baseline.py`, a plain `Trainer` with `DataCollatorWithPadding` on
  random batches of 32, no evaluation during training, torch's default thread count.
- full: ratchet's `tasks.finetune.run` with `finetune.mode: full` (its early stopping reads the
  val split each epoch, as the stage does in the pipeline).
- lora: the same with `finetune.mode: lora`.
- continual: a new domain arrives. The last domain alphabetically (NEW_DOMAIN, 1,500 train
  rows) is "new"; the other nine and the `oos` rows are "old".
  A, retrain from base on everything: old + new is the whole train split, so A is the `full`
  arm itself (same recipe, same data; not trained twice).
  B, champion + replay: a champion fine-tuned from base on old (val: the old rows of val; its
  cost is not B's), then fine-tuned from the champion (`pretrained=` its saved folder; the head
  already has every label) on the new rows plus a replay sample of old rows (REPLAY_MIX replay
  rows per new row, the project's `finetune.replay_mix` default, spread evenly over the old
  labels), same epochs and schedule (the learning rate re-warmed then re-decayed). Reported:
  train samples processed and wall time of A and B, their ratio (goal <= 0.40), test accuracy
  (goal: B within 1 point of A), and B's accuracy on the new domain and on the old ones.

Per arm: `samples_per_s` (training rows seen by the model in training mode divided by the
trainer's own training seconds: `trainer.train()` for the baseline, which validates nothing,
finetune's `train_seconds` for ratchet, which times its per-epoch validation apart
(`val_forward_s`)), `wall_s` (the whole training call:
loading, tokenizing, training, validation, saving; not test prediction), `peak_rss_mb`,
`test_accuracy` (all 5,500 test rows), `test_inscope_accuracy` (label != oos), `test_macro_f1`
(over the labels), padded and real tokens per batch (`mean_padded_length`, `padding_share`).

FLOPs: `FlopCounterMode` counts one forward + backward of a single text of each length
1..max_length on the MiniLM classifier (matmuls and attention; with no cross-row operation a
batch costs the sum of its rows). Every training batch the model sees is recorded (a wrapper on
`BertModel.forward`, training mode only), so `achieved_flops` is the FLOPs the arm executed
(padding included) per second of training steps (the trainer's training seconds less its
validation forwards), and `useful_flops` the same without padding tokens.
`matmul_peak_flops`: the best of timed fp32 `torch.matmul` of MATMUL_N x MATMUL_N matrices, at
the thread count ratchet trains with (`ratchet.models.set_threads`), measured in the same run
before and after the arms (the higher of the two).

The machine is shared: the load average before and after each arm is in its entry.
`python -m benchmarks.training --limit 400 --epochs 0.5 --out /tmp/t.json` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
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

from ratchet.config import FinetuneConfig

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
SPLITS = ("train", "val", "test")
OOS = "oos"
MAX_LENGTH = 64
# Every arm trains for the same number of epochs. ratchet's default is 3, but the run holds ~3.7
# trainings of MiniLM on 15k rows (baseline, full, lora, the champion, and B's 3k rows). Estimate
# on an idle 2-core machine: the baseline executes ~1.26 GFLOP per row (~19.7 padded tokens x
# ~64 MFLOP) at ~47% of a ~145 GFLOP/s matmul peak, ~54 rows/s, ~9.5 min for 2 epochs; the whole
# run ~30-40 min with 2 epochs, ~45-60 with 3. Other processes on the cores slow it many times.
EPOCHS = 2.0
BATCH_SIZE = 32  # the baseline's per-device batch and ratchet's finetune.batch_size
SEED = 13  # ratchet's default model.seed, also the baseline's Trainer seed
NEW_DOMAIN = "work"  # the last of the ten domains alphabetically
# Replay rows per new-domain row: ratchet's finetune.replay_mix default.
REPLAY_MIX = FinetuneConfig.model_fields["replay_mix"].default
MATMUL_N = 2048
ARMS = ("baseline", "full", "lora", "champion", "replay")


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


def split_domain(df: pd.DataFrame, new_domain: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(old, new): the rows of `new_domain`, and every other row (oos included) as old."""
    is_new = df["domain"] == new_domain
    return df[~is_new].reset_index(drop=True), df[is_new].reset_index(drop=True)


def replay_sample(old: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` old rows spread evenly over the labels: a seeded round robin over shuffled labels.

    Each label gives its first, then its second (shuffled) row and so on, so label counts in
    the sample differ by at most one until a label runs out of rows.
    """
    if n >= len(old):
        return old.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    shuffled = old.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby("label").cumcount()
    # Ties within a rank are broken by the shuffled position: a random label order per round.
    order = np.lexsort((np.arange(len(shuffled)), rank.to_numpy()))
    return shuffled.iloc[order[:n]].reset_index(drop=True)


def prepare_inputs(splits: dict[str, pd.DataFrame], work: Path, *, new_domain: str = NEW_DOMAIN,
                   replay_mix: float = REPLAY_MIX, seed: int = SEED) -> dict[str, Any]:
    """Write every arm's parquet inputs to `work`; return the labels and the continual sizes."""
    work.mkdir(parents=True, exist_ok=True)
    cols = ["text", "label", "domain"]
    train, val, test = (splits[s][cols] for s in SPLITS)
    old, new = split_domain(train, new_domain)
    old_val, _ = split_domain(val, new_domain)
    replay = replay_sample(old, round(replay_mix * len(new)), seed)
    frames = {"train": train, "val": val, "test": test, "old": old, "old_val": old_val,
              "new_replay": pd.concat([new, replay], ignore_index=True)}
    for name, df in frames.items():
        df.to_parquet(work / f"{name}.parquet", index=False)
    labels = sorted(set(train["label"]) | set(val["label"]) | set(test["label"]))
    meta = {"labels": labels, "new_domain": new_domain, "new_rows": len(new),
            "replay_rows": len(replay), "old_rows": len(old), "replay_mix": replay_mix}
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------- measurements


def scores(df: pd.DataFrame, pred: list[str] | np.ndarray, labels: list[str],
           new_domain: str | None = None) -> dict[str, float]:
    """Test accuracy (all rows and in-scope rows) and macro-F1 over `labels`; with `new_domain`
    also the accuracy on that domain's rows and on every other in-scope row."""
    from sklearn.metrics import f1_score

    y, p = df["label"].to_numpy(), np.asarray(pred)
    right = y == p
    inscope = y != OOS
    out = {"test_accuracy": float(right.mean()),
           "test_inscope_accuracy": float(right[inscope].mean()),
           "test_macro_f1": float(f1_score(y, p, labels=labels, average="macro",
                                           zero_division=0)),
           "test_rows": len(y)}
    if new_domain is not None:
        is_new = df["domain"].to_numpy() == new_domain
        out["test_accuracy_new_domain"] = float(right[is_new].mean()) if is_new.any() else None
        rest = inscope & ~is_new
        out["test_accuracy_old_domains"] = float(right[rest].mean()) if rest.any() else None
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


def matmul_peak(n: int = MATMUL_N, repeats: int = 10, threads: int | None = None
                ) -> dict[str, float]:
    """FLOP/s of timed fp32 n x n matmuls: the best and the median of `repeats`."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen) for _ in range(2))
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


# ---------------------------------------------------------------- one arm (a child process)


def _finetune_params(labels: list[str], mode: str, epochs: float):
    from ratchet.config import parse_params

    return parse_params({"data": {"labels": labels},
                         "model": {"source": "minilm-l6", "max_length": MAX_LENGTH, "seed": SEED},
                         "finetune": {"mode": mode, "epochs": epochs,
                                      "batch_size": BATCH_SIZE}}, "benchmarks/training.py")


def run_arm(arm: str, work: Path, epochs: float) -> dict[str, Any]:
    """Train one arm on the inputs in `work`, predict the test split, measure."""
    import torch

    from ratchet.models import Classifier, minilm_dir

    meta = json.loads((work / "meta.json").read_text())
    labels = meta["labels"]
    test = pd.read_parquet(work / "test.parquet")
    out_dir = work / f"model-{arm}"
    meter = TokenMeter()
    load0 = os.getloadavg()[0]
    if arm == "baseline":
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
                                      seed=SEED)
        wall = time.perf_counter() - start
    else:
        from tasks import finetune

        inputs = {"full": ("train", "val", minilm_dir(), "full"),
                  "lora": ("train", "val", minilm_dir(), "lora"),
                  "champion": ("old", "old_val", minilm_dir(), "full"),
                  "replay": ("new_replay", "val", work / "model-champion", "full")}[arm]
        train_name, val_name, pretrained, mode = inputs
        params = _finetune_params(labels, mode, epochs)
        start = time.perf_counter()
        with meter.installed():
            stats = finetune.run(params, train=work / f"{train_name}.parquet",
                                 val=work / f"{val_name}.parquet", pretrained=Path(pretrained),
                                 out=out_dir, metrics=work / f"metrics-{arm}.json",
                                 curve=work / f"curve-{arm}.csv")
        wall = time.perf_counter() - start
    threads = torch.get_num_threads()
    rss_trained = peak_rss_mb()
    pred, _ = Classifier(out_dir, max_length=MAX_LENGTH, batch_size=64).predict(
        test["text"].tolist())
    tokens = meter.summary()
    train_s = float(stats["train_seconds"])
    samples = tokens["train_samples"]
    result = {
        "samples_per_s": samples / train_s if samples and train_s else None,
        "wall_s": wall,
        "train_s": train_s,
        # finetune measures peak memory itself when it can; else this process's peak by the end
        # of training (before test prediction, whose peak is lower).
        "peak_rss_mb": stats.get("peak_rss_mb", rss_trained),
        "peak_rss_source": "trainer" if "peak_rss_mb" in stats else "ru_maxrss after training",
        **scores(test, pred, labels, meta["new_domain"] if arm in ("champion", "replay") else None),
        **tokens,
        "val_forward_s": meter.eval_seconds,
        "torch_threads": threads,
        "trainer_stats": {k: v for k, v in stats.items() if isinstance(v, int | float | str)},
        "load_avg_1min": [load0, os.getloadavg()[0]],
    }
    table = work / "flops.json"
    step_s = train_s  # the training steps alone: neither trainer's seconds hold validation
    if arm in ("baseline", "full") and table.is_file() and meter.batches and step_s > 0:
        # Full fine-tuning only: LoRA's backward skips the frozen weights' gradients.
        per_row = {int(k): v for k, v in json.loads(table.read_text()).items()}
        executed, useful = meter.flops(per_row)
        result["achieved_flops"] = executed / step_s
        result["useful_flops"] = useful / step_s
    return result


# ---------------------------------------------------------------- the whole run (parent)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _delta(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def continual_summary(retrain: dict, champion: dict, replay: dict, meta: dict) -> dict[str, Any]:
    """A (retrain from base on everything) against B (champion + replay on the new batch)."""
    keep = ("train_samples", "wall_s", "train_s", "test_accuracy", "test_inscope_accuracy",
            "test_macro_f1", "test_accuracy_new_domain", "test_accuracy_old_domains", "error")
    a = {k: retrain[k] for k in keep if k in retrain}
    b = {k: replay[k] for k in keep if k in replay}
    samples = _ratio(b.get("train_samples"), a.get("train_samples"))
    wall = _ratio(b.get("wall_s"), a.get("wall_s"))
    delta = _delta(b.get("test_accuracy"), a.get("test_accuracy"))
    return {
        "new_domain": meta["new_domain"], "new_rows": meta["new_rows"],
        "replay_rows": meta["replay_rows"], "old_rows": meta["old_rows"],
        "replay_mix": meta["replay_mix"],
        "retrain_from_base": {"arm": "full (old + new = the whole train split)", **a},
        "champion_plus_replay": b,
        "champion_on_old": {k: champion[k] for k in keep if k in champion},
        "compute_ratio_samples": samples,
        "compute_ratio_wall": wall,
        "accuracy_delta": delta,
        "goal": "accuracy_delta >= -0.01 at compute_ratio <= 0.40",
        "goal_met": (None if samples is None or delta is None
                     else bool(delta >= -0.01 and samples <= 0.40
                               and (wall is None or wall <= 0.40))),
    }


def assemble(arms: dict[str, dict], meta: dict, matmul: dict, extras: dict) -> dict[str, Any]:
    """The result JSON: one entry per arm, ratios between them, the continual comparison."""
    base, full, lora = arms["baseline"], arms["full"], arms["lora"]
    result: dict[str, Any] = {"baseline": base, "full": full, "lora": lora,
                              "continual": continual_summary(full, arms["champion"],
                                                             arms["replay"], meta),
                              "matmul_peak_flops": matmul["peak"]}
    result["full_vs_baseline_speedup"] = _ratio(full.get("samples_per_s"),
                                                base.get("samples_per_s"))
    result["lora_vs_full_speedup"] = _ratio(lora.get("samples_per_s"), full.get("samples_per_s"))
    result["full_vs_baseline_accuracy_delta"] = _delta(full.get("test_accuracy"),
                                                       base.get("test_accuracy"))
    result["lora_vs_full_accuracy_delta"] = _delta(lora.get("test_accuracy"),
                                                   full.get("test_accuracy"))
    for arm in (base, full):
        if arm.get("achieved_flops"):
            arm["achieved_vs_matmul_peak"] = arm["achieved_flops"] / matmul["peak"]
    result["targets"] = {"full_vs_baseline_speedup": ">= 1.5",
                         "full_vs_baseline_accuracy_delta": ">= -0.005",
                         "lora_vs_full_speedup": ">= 1.3",
                         "continual": "accuracy within 1 point at <= 40% of the compute"}
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


def _child(arm: str, work: Path, epochs: float) -> dict[str, Any]:
    """Run one arm in a fresh Python process; its JSON, or the error it reported."""
    path = work / f"arm-{arm}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.training", "--arm", arm, "--work", str(work),
           "--epochs", str(epochs)]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], check=False)
    if path.is_file():
        return json.loads(path.read_text())
    return {"error": f"arm process exited with {proc.returncode} and wrote no result"}


def run(limit: int | None = None, epochs: float = EPOCHS, keep: Path | None = None
        ) -> dict[str, Any]:
    if not all((DATA / f"{s}.csv").is_file() for s in SPLITS):
        return {"skipped": f"CLINC150 not found under {DATA}"}
    from ratchet.models import set_threads
    from ratchet.runtime import setup

    setup()
    import torch

    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    work = keep or Path(tempfile.mkdtemp(prefix="ratchet-bench-train-"))
    try:
        splits = load_splits(limit)
        meta = prepare_inputs(splits, work)
        set_threads()
        per_row = _flop_table(len(meta["labels"]))
        (work / "flops.json").write_text(json.dumps(per_row))
        matmul = matmul_peak(threads=torch.get_num_threads())
        print(f"training benchmark: matmul peak {matmul['best'] / 1e9:.1f} GFLOP/s "
              f"({matmul['threads']} threads)", flush=True)
        arms = {}
        for arm in ARMS:
            t0 = time.perf_counter()
            arms[arm] = _child(arm, work, epochs)
            print(f"training benchmark: {arm} done in {time.perf_counter() - t0:.0f} s: "
                  f"{ {k: arms[arm].get(k) for k in ('samples_per_s', 'test_accuracy', 'error')} }",
                  flush=True)
        matmul_after = matmul_peak(threads=matmul["threads"])
        matmul["best_after_arms"] = matmul_after["best"]
        matmul["peak"] = max(matmul["best"], matmul_after["best"])
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    extras = {
        "config": {"model": "minilm-l6", "max_length": MAX_LENGTH, "epochs": epochs,
                   "batch_size": BATCH_SIZE, "seed": SEED, "limit": limit,
                   "rows": {s: len(df) for s, df in splits.items()},
                   "labels": len(meta["labels"]),
                   "finetune": _finetune_params(meta["labels"], "full", epochs)
                   .finetune.model_dump()},
        "machine": {"cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                    "python": platform.python_version(), "processor": platform.machine(),
                    "load_avg_1min_at_start": load_at_start},
        "flops_per_row": {"method": "torch.utils.flop_counter.FlopCounterMode, forward + "
                          "backward of one row per length (matmuls and attention)",
                          **{f"length_{k}": per_row[k] for k in (8, 16, 32, 64)}},
        "seconds": time.perf_counter() - start,
    }
    return assemble(arms, meta, matmul, extras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="rows per split (a seeded sample): smoke runs")
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--out", type=Path, help="write the result JSON here (default: print)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one arm
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        from ratchet.runtime import setup

        setup()
        try:
            result = run_arm(args.arm, args.work, args.epochs)
        except Exception as err:  # recorded in the arm's entry; the other arms go on
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}"}
        (args.work / f"arm-{args.arm}.json").write_text(json.dumps(result))
        return 0
    result = run(args.limit, args.epochs, args.keep)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
