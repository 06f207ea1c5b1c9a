"""`finetune.init: auto` against always-full on a CLINC150 stream, through the pipeline's own code.

Data: `../shared/data/clinc150/{train,val,test}.csv` (text, label, domain; 151 labels with
`oos`), read by path and never copied. Only train rows are streamed; val chooses the defaults,
test reports them. The stream (seeded, no row used twice):
- batch 1: INITIAL_DOMAINS of DOMAINS domains (a seeded order of the ten) and `oos`, FIRST rows
  per label;
- batch ARRIVAL: the other domains arrive (FIRST rows per new label) with routine rows;
- every other batch: routine, ROUTINE rows per label of every label seen so far.

Arms, interleaved batch by batch (batch k of every arm before batch k+1 of any), each in its own
workspace folder with its own MLflow store, the same batches and seed:
- `full`: `finetune.init: base`, a full retrain on the whole history every batch;
- `auto-r<m>`: `finetune.init: auto` (the default) with `finetune.replay_mix` m, at the
  default `finetune.full_every`;
- `continual`: `finetune.init: champion` (always continual: new labels grow the head), the
  continual arm of the training benchmark.
Each batch of each arm runs what a retrain runs for finetune: `refresh_champion` (the real
decision, read from the registry's tags; finetune-init.json), `tasks.prepare.run` (splits and
the replay buffer), `tasks.finetune.run` (from base, or from the champion loaded from the
registry, replay mixed in by `training_frame`, head grown by `grow_head`), then registration
(`registry.log_candidate`, the version tags the gate sets) and the `champion` alias moved to
it. The gate is not in the loop: every candidate becomes the champion, so the arms differ only
in how they train (the gate judges a continual candidate like any other; that is tested).
validate, noise, drift, augment and pretrain are left out (pretrain: the packaged encoder).

A full retrain whose inputs (prepared train and val files, params of the training) an arm has
already trained on is trained once: its model and measurements are copied (`reused_from`),
as DVC's run cache would; so batch 1 is trained once for all arms, and auto's full retrains
are the `full` arm's of the same batch. Its compute is counted in every arm that ran it.

Measured per batch and arm: the decision (`init`, `init_reason`), train rows (new, replayed),
training samples processed and training seconds (finetune's own `samples`, `train_seconds`),
and accuracy on CLINC150 val and test rows whose label the stream has shown so far (`seen`),
plus all rows. Selection on val: `replay_mix` is the auto arm with the best mean val accuracy
over the batches; the `full_every` evidence is the val gap to `full` by batches since the last
full retrain. Reported on test: the chosen auto arm against `full` (accuracy at the last batch
and compute over the stream; target: within 1 point at <= 40% of the compute).

`python -m benchmarks.continual --smoke` is a quick run on the tiny model (not a measurement).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
OUT = Path(__file__).parent / "results" / "continual.json"
OOS = "oos"
SEED = 13
# Sized for ~an hour of MiniLM on 2 busy cores: 6 of the 10 domains (90 intents + oos), 4 at
# first, 2 more with batch 3; 7 batches; few rows per label; 2 epochs (ratchet's default is 3).
DOMAINS = 6
INITIAL_DOMAINS = 4
ARRIVAL = 3  # the batch the remaining domains arrive with
BATCHES = 7
FIRST, ROUTINE = 16, 4  # rows per label: when a label first arrives, in each later batch
EPOCHS = 2.0
REPLAY_MIXES = (1.0, 2.0)


# --- the stream ----------------------------------------------------------------------------------


def load(split: str) -> pd.DataFrame:
    df = pd.read_csv(DATA / f"{split}.csv", dtype=str, keep_default_na=False)
    return df[["text", "label", "domain"]]


def domain_order(train: pd.DataFrame, seed: int) -> list[str]:
    domains = sorted(set(train["domain"]) - {OOS})
    random.Random(seed).shuffle(domains)
    return domains


def make_stream(train: pd.DataFrame, *, domains: list[str], initial: int, arrival: int,
                batches: int, first: int, routine: int, seed: int) -> list[pd.DataFrame]:
    """The batches: label rows in a seeded order, each row used once."""
    rows = {lab: part.sample(frac=1.0, random_state=seed).reset_index(drop=True)
            for lab, part in train.groupby("label")}
    used = dict.fromkeys(rows, 0)
    dom_of = train.groupby("label")["domain"].first().to_dict()
    start = set(domains[:initial]) | {OOS}
    later = set(domains[initial:])
    out, seen = [], set()
    for b in range(1, batches + 1):
        arriving = start if b == 1 else later if b == arrival else set()
        parts = []
        for lab in sorted(rows):
            n = first if dom_of[lab] in arriving else routine if lab in seen else 0
            if n:
                take = rows[lab].iloc[used[lab]: used[lab] + n]
                if len(take) < n:
                    raise SystemExit(f"error: label {lab} has only {len(rows[lab])} train rows; "
                                     "fewer rows per label or batches")
                used[lab] += n
                parts.append(take)
        seen |= {lab for lab in rows if dom_of[lab] in arriving}
        out.append(pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=seed + b)
                   .reset_index(drop=True))
    return out


def batch_id(k: int, frame: pd.DataFrame) -> str:
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return f"{k:04d}-{digest.hexdigest()[:12]}"


# --- one arm -------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Arm:
    """A workspace folder: params, batches, its own MLflow store, the stages' files."""

    def __init__(self, root: Path, name: str, finetune: dict[str, Any], base: dict[str, Any]):
        from ratchet.workspace import template

        self.name, self.ws = name, root / name
        self.ws.mkdir(parents=True)
        raw = yaml.safe_load(template("params.yaml").read_text())
        for section, values in base.items():
            raw[section].update(values)
        raw["finetune"].update(finetune)
        (self.ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        (self.ws / "data" / "batches").mkdir(parents=True)
        self.rows: list[dict[str, Any]] = []

    def path(self, rel: str) -> Path:
        return self.ws / rel

    def params(self):
        from ratchet.config import load_params

        return load_params(self.ws / "params.yaml")


def train_key(arm: Arm) -> str:
    """What a full retrain depends on: the prepared splits and the training params (not the
    continual ones, which a full retrain does not read)."""
    p = arm.params()
    ft = p.finetune.model_dump(exclude={"init", "full_every", "replay_mix"})
    blob = json.dumps({"train": file_digest(arm.path("data/prepared/train.parquet")),
                       "val": file_digest(arm.path("data/prepared/val.parquet")),
                       "finetune": ft, "model": p.model.model_dump(),
                       "labels": p.data.labels}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def step(arm: Arm, k: int, frame: pd.DataFrame, bid: str, pretrained: Path,
         full_runs: dict[str, tuple[str, Path, dict]]) -> dict[str, Any]:
    """Batch k through the arm: decide, prepare, train (or reuse), register, promote."""
    from ratchet import continual
    from ratchet.promotion import move_alias
    from ratchet.registry import CHAMPION, connect, current_champion, log_candidate
    from ratchet.runtime import write_json
    from ratchet.workspace import fingerprint, refresh_champion
    from tasks import finetune, prepare

    os.chdir(arm.ws)  # the stages' paths are relative to the workspace, as under `dvc repro`
    frame.to_parquet(arm.path(f"data/batches/{bid}.parquet"), index=False)
    load0, started = os.getloadavg()[0], time.perf_counter()
    refresh_champion(arm.ws)
    params = arm.params()
    prepare.run(params, batches=arm.path("data/batches"), out=arm.path("data/prepared"),
                replay=arm.path("data/replay/buffer.parquet"),
                metrics=arm.path("metrics/prepare.json"), champion=arm.path("champion.json"))
    ref = json.loads(arm.path("finetune-init.json").read_text())
    how, why = continual.start(params.finetune.init, params.finetune.full_every, ref)
    candidate, metrics = arm.path("models/candidate"), arm.path("metrics/finetune.json")
    key = train_key(arm) if how == continual.FULL else None
    reused = None
    t0 = time.perf_counter()
    if key is not None and key in full_runs:
        reused, model_dir, stats = full_runs[key]
        if candidate.exists():
            shutil.rmtree(candidate)
        shutil.copytree(model_dir, candidate)
        # What finetune itself writes for this start (ratchet.continual.start decided it).
        stats = {**stats, "init": how, "init_reason": why, "init_from": "base",
                 "batch": ref.get("batch") or stats.get("batch")}
        write_json(metrics, stats)
    else:
        stats = finetune.run(params, train=arm.path("data/prepared/train.parquet"),
                             val=arm.path("data/prepared/val.parquet"), pretrained=pretrained,
                             out=candidate, metrics=metrics,
                             curve=arm.path("reports/finetune/curve.csv"),
                             init=arm.path("finetune-init.json"),
                             replay=arm.path("data/replay/buffer.parquet"))
        if stats["init"] == continual.FULL:
            key = train_key(arm)
            keep = arm.ws.parent / "full-runs" / key[:16]
            if not keep.exists():
                shutil.copytree(candidate, keep)
            full_runs.setdefault(key, (arm.name, keep, stats))
    train_wall = time.perf_counter() - t0
    # Registered as the gate registers a candidate, with its tags; then it serves.
    client = connect(params.registry, arm.ws)
    name = params.registry.model_name
    fp = fingerprint(candidate)
    tags = {"fingerprint": fp, **continual.tags(stats)}
    _, version = log_candidate(candidate, name=name, params={}, metrics={}, artifacts=[],
                               run_tags=tags)
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)
    before = current_champion(client, name)
    move_alias(client, name, CHAMPION, version, by="gate", ws=arm.ws,
               expected=before.version if before else None,
               reason="benchmark: every candidate is promoted")
    return {
        "batch": k, "batch_id": bid, "init": stats["init"], "init_reason": stats["init_reason"],
        "init_from": stats.get("init_from"), "reused_from": reused,
        "train_rows": stats["train_rows"], "new_rows": stats.get("new_rows"),
        "replay_rows": stats.get("replay_rows"), "added_labels": len(stats["added_labels"]),
        "labels": stats["labels"], "samples": stats["samples"],
        "train_seconds": stats["train_seconds"], "finetune_wall_s": train_wall,
        "step_wall_s": time.perf_counter() - started, "fingerprint": fp,
        "batches_since_full": ref.get("batches_since_full"),
        "load_avg_1min": [load0, os.getloadavg()[0]],
    }


# --- accuracy ------------------------------------------------------------------------------------


def accuracy(model_dir: Path, splits: dict[str, pd.DataFrame], seen: set[str],
             new_domains: set[str], cache: dict[str, dict]) -> dict[str, float]:
    """Accuracy on val and test: rows of the labels seen so far, all rows; at the new domains
    and the rest of the seen rows. Each model (by fingerprint) is scored once."""
    from ratchet.models import Classifier
    from ratchet.workspace import fingerprint

    fp = fingerprint(model_dir)
    key = f"{fp}:{len(seen)}:{','.join(splits)}"
    if key in cache:
        return cache[key]
    clf = Classifier(model_dir, batch_size=128)
    out: dict[str, float | None] = {}
    for split, df in splits.items():
        pred = np.asarray(clf.predict(df["text"].tolist())[0])
        y = df["label"].to_numpy()
        right = pred == y
        is_seen = np.isin(y, list(seen))
        is_new = df["domain"].isin(new_domains).to_numpy() & is_seen
        out[f"{split}_accuracy_seen"] = float(right[is_seen].mean())
        out[f"{split}_accuracy_all"] = float(right.mean())
        out[f"{split}_accuracy_new_domains"] = (float(right[is_new].mean()) if is_new.any()
                                                else None)
        rest = is_seen & ~is_new
        out[f"{split}_accuracy_old_domains"] = float(right[rest].mean())
        out[f"{split}_rows_seen"] = int(is_seen.sum())
    cache[key] = out
    return out


# --- the run -------------------------------------------------------------------------------------


def arms_config(replay_mixes: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    arms: dict[str, dict[str, Any]] = {"full": {"init": "base"}}
    for m in replay_mixes:
        arms[f"auto-r{m:g}"] = {"init": "auto", "replay_mix": m}
    arms["continual"] = {"init": "champion", "replay_mix": 2.0}
    return arms


def summarize(arms: dict[str, Arm], first_batch_shared: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    full = arms["full"].rows
    for name, arm in arms.items():
        rows = arm.rows
        samples = sum(r["samples"] for r in rows)
        seconds = sum(r["train_seconds"] for r in rows)
        last = rows[-1]
        out[name] = {
            "samples": samples, "train_seconds": seconds,
            "full_retrains": [r["batch"] for r in rows if r["init"] == "full"],
            "mean_val_accuracy_seen": float(np.mean([r["val_accuracy_seen"] for r in rows])),
            "final_val_accuracy": last["val_accuracy_seen"],
            "final_test_accuracy": last["test_accuracy_seen"],
            "final_test_accuracy_all": last["test_accuracy_all"],
            "final_test_accuracy_new_domains": last["test_accuracy_new_domains"],
            "final_test_accuracy_old_domains": last["test_accuracy_old_domains"],
            "compute_ratio_samples": samples / sum(r["samples"] for r in full),
            "compute_ratio_seconds": seconds / sum(r["train_seconds"] for r in full),
            "compute_ratio_samples_after_batch_1": (
                sum(r["samples"] for r in rows[1:]) / sum(r["samples"] for r in full[1:])
                if len(rows) > 1 else None),
            "test_accuracy_delta_vs_full": last["test_accuracy_seen"] - full[-1][
                "test_accuracy_seen"],
            "val_accuracy_delta_vs_full": last["val_accuracy_seen"] - full[-1][
                "val_accuracy_seen"],
            "per_batch_val_delta_vs_full": [r["val_accuracy_seen"] - f["val_accuracy_seen"]
                                            for r, f in zip(rows, full, strict=True)],
        }
    autos = [n for n in arms if n.startswith("auto-")]
    chosen = max(autos, key=lambda n: (out[n]["mean_val_accuracy_seen"],
                                       out[n]["final_val_accuracy"])) if autos else None
    # full_every evidence: val gap to `full` by batches since the last full retrain, over the
    # continual batches of every continual-capable arm.
    gaps: dict[str, dict[int, list[float]]] = {}
    for name in [*autos, "continual"]:
        if name not in arms:
            continue
        depth, by_depth = 0, {}
        for r, f in zip(arms[name].rows, full, strict=True):
            depth = 0 if r["init"] == "full" else depth + 1
            if depth:
                by_depth.setdefault(depth, []).append(r["val_accuracy_seen"]
                                                      - f["val_accuracy_seen"])
        gaps[name] = {d: v for d, v in sorted(by_depth.items())}
    out["selection"] = {
        "replay_mix_by": "mean val accuracy (seen labels) over the batches, then final val",
        "chosen_auto_arm": chosen,
        "val_gap_by_batches_since_full": gaps,
        "first_batch_shared": first_batch_shared,
    }
    if chosen:
        c = out[chosen]
        out["auto_vs_full"] = {
            "arm": chosen,
            "test_accuracy_delta": c["test_accuracy_delta_vs_full"],
            "compute_ratio_samples": c["compute_ratio_samples"],
            "compute_ratio_seconds": c["compute_ratio_seconds"],
            "target": "test accuracy within 1 point of always-full at <= 40% of its compute",
            "accuracy_met": c["test_accuracy_delta_vs_full"] >= -0.01,
            "compute_met": c["compute_ratio_samples"] <= 0.40,
        }
    return out


def run(*, model: str = "minilm-l6", batches: int = BATCHES, initial: int = INITIAL_DOMAINS,
        arrival: int = ARRIVAL, first: int = FIRST, routine: int = ROUTINE,
        epochs: float = EPOCHS, replay_mixes: tuple[float, ...] = REPLAY_MIXES,
        domains_limit: int | None = DOMAINS, eval_rows: int | None = None, seed: int = SEED,
        root: Path | None = None, arms_only: list[str] | None = None, threads: int = 0,
        test_every_batch: bool = False) -> dict[str, Any]:
    from ratchet.config import FinetuneConfig
    from ratchet.models import source_dir
    from ratchet.runtime import setup

    setup()
    if not (DATA / "train.csv").is_file():
        return {"skipped": f"no CLINC150 at {DATA}"}
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    train, val, test = (load(s) for s in ("train", "val", "test"))
    domains = domain_order(train, seed)
    if domains_limit is not None:
        domains = domains[:domains_limit]
        keep = set(domains) | {OOS}
        train, val, test = (d[d["domain"].isin(keep)] for d in (train, val, test))
    splits = {"val": val, "test": test}
    if eval_rows is not None:
        splits = {s: d.sample(n=min(eval_rows, len(d)), random_state=seed)
                  for s, d in splits.items()}
    stream = make_stream(train, domains=domains, initial=initial, arrival=arrival,
                         batches=batches, first=first, routine=routine, seed=seed)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # finetune and scoring (set_threads)
    base = {"model": {"source": model, "seed": seed},
            "finetune": {"epochs": epochs, "threads": threads},
            "registry": {"timeout_s": 60.0}}
    if model == "tiny":
        base["finetune"].update(learning_rate=0.005)
    tmp = Path(tempfile.mkdtemp(prefix="ratchet-continual-", dir=root))
    config = arms_config(replay_mixes)
    if arms_only:
        config = {k: v for k, v in config.items() if k in arms_only or k == "full"}
    arms = {name: Arm(tmp, name, ft, base) for name, ft in config.items()}
    pretrained = source_dir(model)
    if pretrained is None:  # tiny: a saved random-init encoder, as the pretrain stage leaves it
        from ratchet.models import load_base_mlm

        mlm, tok = load_base_mlm("tiny", seed)
        pretrained = tmp / "pretrained"
        mlm.save_pretrained(pretrained)
        tok.save_pretrained(pretrained)
    full_runs: dict[str, tuple[str, Path, dict]] = {}
    scored: dict[str, dict] = {}
    seen: set[str] = set()
    new_domains = set(domains[initial:])
    cwd = os.getcwd()
    try:
        for k, frame in enumerate(stream, start=1):
            bid = batch_id(k, frame)
            seen |= set(frame["label"])
            for arm in arms.values():  # interleaved: batch k of every arm, then batch k + 1
                row = step(arm, k, frame, bid, pretrained, full_runs)
                scoring = splits if test_every_batch or k == len(stream) else {
                    "val": splits["val"]}
                row.update(accuracy(arm.path("models/candidate"), scoring, seen, new_domains,
                                    scored))
                arm.rows.append(row)
                print(f"batch {k} {arm.name}: {row['init']} ({row['init_reason'][:70]}) "
                      f"samples {row['samples']} train {row['train_seconds']:.0f}s "
                      f"val {row['val_accuracy_seen']:.4f} "
                      f"test {row.get('test_accuracy_seen', float('nan')):.4f}"
                      + (f" [reused from {row['reused_from']}]" if row["reused_from"] else ""),
                      file=sys.stderr, flush=True)
    finally:
        os.chdir(cwd)
    result = {
        "config": {"model": model, "batches": batches, "initial_domains": initial,
                   "arrival_batch": arrival, "first_rows_per_label": first,
                   "routine_rows_per_label": routine, "epochs": epochs, "seed": seed,
                   "replay_mixes": list(replay_mixes), "domain_order": domains,
                   "full_every": FinetuneConfig.model_fields["full_every"].default,
                   "eval_rows": {s: len(d) for s, d in splits.items()},
                   "test_every_batch": test_every_batch, "threads": _threads()},
        "stream": [{"batch": k, "rows": len(f), "labels": int(f["label"].nunique()),
                    "domains": sorted(set(f["domain"]))} for k, f in enumerate(stream, 1)],
        "arms": {name: {"finetune": config[name], "batches": arm.rows}
                 for name, arm in arms.items()},
        **summarize(arms, first_batch_shared=True),
        "machine": {"cores": len(os.sched_getaffinity(0)), "load_avg_1min_at_start": load0,
                    "load_avg_1min_at_end": os.getloadavg()[0]},
        "seconds": time.perf_counter() - start,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--batches", type=int, default=BATCHES)
    parser.add_argument("--initial", type=int, default=INITIAL_DOMAINS)
    parser.add_argument("--arrival", type=int, default=ARRIVAL)
    parser.add_argument("--first", type=int, default=FIRST)
    parser.add_argument("--routine", type=int, default=ROUTINE)
    parser.add_argument("--epochs", type=float, default=EPOCHS)
    parser.add_argument("--replay-mix", type=float, action="append", dest="replay_mixes")
    parser.add_argument("--arm", action="append", dest="arms",
                        help="run only these arms (and full); default: all")
    parser.add_argument("--domains", type=int, default=DOMAINS,
                        help="use this many of the ten domains (a seeded order)")
    parser.add_argument("--eval-rows", type=int, help="score a sample of val/test (smoke)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (finetune.threads; 0: every core)")
    parser.add_argument("--test-every-batch", action="store_true",
                        help="score test after every batch (default: the last only)")
    parser.add_argument("--root", type=Path, help="folder for the temporary workspaces")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 3 domains, 5 batches: checks the wiring only")
    args = parser.parse_args(argv)
    kw: dict[str, Any] = dict(model=args.model, batches=args.batches, initial=args.initial,
                              arrival=args.arrival, first=args.first, routine=args.routine,
                              epochs=args.epochs, domains_limit=args.domains,
                              eval_rows=args.eval_rows, seed=args.seed, root=args.root,
                              replay_mixes=tuple(args.replay_mixes or REPLAY_MIXES),
                              arms_only=args.arms, threads=args.threads,
                              test_every_batch=args.test_every_batch)
    if args.smoke:
        kw.update(model="tiny", batches=5, initial=2, arrival=3, first=12, routine=4,
                  epochs=2.0, domains_limit=3, eval_rows=400)
    result = run(**kw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from ratchet.runtime import write_json

    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("auto_vs_full", "selection") if k in result},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
