"""finetune: train the candidate classifier: full or LoRA, optionally adversarial (FGM), from the
pretrained encoder or (continual mode) from the champion with replay; resumable; runs unchanged
under `torchrun --nproc_per_node N`."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ratchet.config import FinetuneConfig, Params
from ratchet.continual import newest_batch
from ratchet.data import BATCH, LABEL, RECENT, TEXT
from ratchet.errors import ConfigError, RatchetError
from ratchet.headline import FULL_HELP, write_metrics
from ratchet.stage import stage_main

CURVE_FIELDS = ["step", "epoch", "loss", "lr", "val_macro_f1", "val_accuracy"]


# --- the training set ----------------------------------------------------------------------------


class NothingNew(RatchetError):
    """Continual training found no train row the champion has not seen."""


def training_frame(train: pd.DataFrame, replay: pd.DataFrame | None, cfg: FinetuneConfig, *,
                   continual: bool, seed: int, since: str | None = None
                   ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Everything (from base), or the new rows plus replayed older rows (continual).

    With `since` (the newest batch the champion was trained on, `finetune.batch`), the new
    rows are those of every later batch: a batch whose candidate the gate rejected is still
    new to the champion, not only replayed. Without it, the newest batch is prepare's `recent`
    slice, as every stage reads it: when prepare left it no train row, there is nothing new to
    continue on (the batch before it is not "new").
    """
    if not continual or BATCH not in train.columns:
        return train, {"train_rows": len(train)}
    if since is not None:
        new = train[train[BATCH].notna() & (train[BATCH].astype(str) > since)]
        if new.empty:
            raise NothingNew(
                f"finetune: no train row is newer than batch {since}, the champion's newest "
                "(prepare dropped the new rows as conflicts, duplicates or noise suspects, or "
                "all fell in val/test; see metrics/prepare.json `recent/*`), so continual "
                "training has nothing new to learn: ingest a batch with new rows, or set "
                "`finetune.init: base`")
        newest = max(new[BATCH].astype(str))
        seen = (replay[replay[BATCH].astype(str) <= since]
                if replay is not None and BATCH in replay else None)
    elif "slice" in train.columns:
        new = train[train["slice"] == RECENT]
        if new.empty:
            raise NothingNew(
                "finetune: the newest batch has no row in the train split (prepare dropped its "
                "rows as conflicts, duplicates or noise suspects, or all fell in val/test; see "
                "metrics/prepare.json `recent/*`), so continual training has nothing new to "
                "learn: ingest a batch with new rows, or set `finetune.init: base`")
        newest = new[BATCH].iloc[0]
        seen = replay[replay[BATCH] != newest] if replay is not None and BATCH in replay else None
    else:  # a train file from before prepare marked slices
        newest = sorted(train[BATCH].dropna().unique())[-1]
        new = train[train[BATCH] == newest]
        seen = replay[replay[BATCH] != newest] if replay is not None and BATCH in replay else None
    take = 0 if seen is None else min(len(seen), math.ceil(cfg.replay_mix * len(new)))
    mixed = new if take == 0 else pd.concat([new, seen.sample(n=take, random_state=seed)],
                                            ignore_index=True)
    stats = {"train_rows": len(mixed), "new_rows": len(new), "replay_rows": take,
             "new_batch": str(newest)}
    if since is not None:
        stats["new_batches"] = int(new[BATCH].nunique())
    return mixed.reset_index(drop=True), stats


# --- the model -----------------------------------------------------------------------------------


def grow_head(model, old: list[str], labels: list[str]) -> list[str]:
    """Give a classifier one output per label of `labels` (a superset of `old`), keeping each old
    label's trained row; new labels start from small random rows. Returns the added labels."""
    import torch

    added = [lab for lab in labels if lab not in old]
    dropped = [lab for lab in old if lab not in labels]
    if dropped:
        raise ConfigError(f"the champion knows labels the new label set lacks: {dropped}")
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"cannot extend a {type(head).__name__} head (a Linear is expected)")
    if labels == old:
        return []
    new = torch.nn.Linear(head.in_features, len(labels), bias=head.bias is not None)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        new.weight.normal_(0.0, std)
        if new.bias is not None:
            new.bias.zero_()
        for i, lab in enumerate(labels):
            if lab in old:
                j = old.index(lab)
                new.weight[i] = head.weight[j]
                if new.bias is not None:
                    new.bias[i] = head.bias[j]
    if hasattr(model, "classifier"):
        model.classifier = new
    else:
        model.score = new
    model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {lab: i for i, lab in enumerate(labels)}
    return added


def champion_classifier(params: Params, ref: dict[str, Any]):
    """The champion's (model, tokenizer, version) (unwrapped from its registered pyfunc) that
    finetune-init.json (`ref`) names, or None."""
    if not ref.get("version"):
        return None
    from ratchet.registry import load_champion

    clf = load_champion(params, ref).unwrap_python_model()._clf
    return clf.model, clf.tokenizer, ref["version"]


def starting_point(params: Params, ref: dict[str, Any], labels: set[str]
                   ) -> tuple[str, str, Any]:
    """(`full` | `continual`, why, the champion's (model, tokenizer, version) or None): the
    plan in finetune-init.json (`ref`, see `ratchet.continual.start`), checked against the
    champion's own labels under `finetune.init: auto`, where a label it lacks means a full
    retrain (in mode `champion` its head grows instead)."""
    from ratchet.continual import FULL, Facts, choose, start

    cfg = params.finetune
    how, why = start(cfg.init, cfg.full_every, ref)
    if how == FULL:
        return how, why, None
    champion = champion_classifier(params, ref)
    if champion is None:
        return FULL, "there is no champion yet", None
    config = champion[0].config
    grew = sorted(labels - {config.id2label[i] for i in range(config.num_labels)})
    if cfg.init == "auto" and grew:
        return (*choose(cfg.full_every, Facts(champion[2], None, None, grew)), None)
    return how, why, champion


def with_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = ["query", "value"] if {"query", "value"} <= names else None  # else peft's default
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets)
    return get_peft_model(model, lora)


# --- batches -------------------------------------------------------------------------------------


def collate(ids: list[list[int]], rows: list[int], pad_id: int):
    """Dynamic padding: the batch is as long as its longest row."""
    import torch

    width = max(len(ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
        mask[r, : len(ids[i])] = 1
    return input_ids, mask


def evaluate_split(model, ids: list[list[int]], y: list[int], pad_id: int, device,
                   batch_size: int = 128, amp=None) -> tuple[float, float]:
    """(macro-F1, accuracy) on pre-tokenized rows, length-sorted for little padding, in the
    training's autocast `amp` (the precision the saved model predicts in)."""
    import contextlib

    import numpy as np
    import torch

    from ratchet.stats import macro_f1

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    preds = np.zeros(len(ids), dtype=np.int64)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), amp or contextlib.nullcontext():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, mask = collate(ids, rows, pad_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            preds[rows] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    truth = np.asarray(y)
    return macro_f1(truth.tolist(), preds.tolist()), float((preds == truth).mean())


# --- run -----------------------------------------------------------------------------------------


@dataclass
class State:
    """What a checkpoint holds besides the weights and the optimizer."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    best: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    seconds: float = 0.0
    val_seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


def run(params: Params, **paths: Path | None) -> dict:
    """Fine-tune (see `train_classifier` for the paths); torch's deterministic-algorithms switch
    is put back afterwards, so a process that trains again (a sweep's Dask worker, a benchmark)
    does not inherit it."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return train_classifier(params, **paths)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def train_classifier(params: Params, *, train: Path, val: Path, pretrained: Path, out: Path,
                     metrics: Path, curve: Path, init: Path | None = None,
                     replay: Path | None = None, checkpoints: Path | None = None,
                     all_metrics: Path | None = None) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ratchet.precision import MODEL_CONFIG_KEY
    from ratchet.precision import resolve as resolve_precision
    from ratchet.training import (
        Schedule,
        all_sum,
        checkpoint_key,
        file_digest,
        init_distributed,
        length_grouped_batches,
        load_agreed_checkpoint,
        make_optimizer,
        mixed_precision,
        optimizer_step,
        peak_rss_mb,
        progress,
        restore_training_state,
        save_checkpoint,
        set_rank_threads,
        steps_for,
        training_state,
        write_curve,
    )

    cfg, mcfg = params.finetune, params.model
    dist = init_distributed()
    set_rank_threads(dist, cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    device = dist.device
    precision = resolve_precision(cfg.precision, device)  # before any work: bf16 may be refused
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here

    train_df, val_df = pd.read_parquet(train), pd.read_parquet(val)
    replay_df = pd.read_parquet(replay) if replay is not None and replay.is_file() else None
    torch.manual_seed(mcfg.seed)
    ref = json.loads(init.read_text()) if init is not None and init.is_file() else {}
    how, why, start_from = starting_point(
        params, ref, set(params.data.labels) | set(train_df[LABEL]) | set(val_df[LABEL]))
    trained_on = ref.get("batch") or newest_batch([*train_df.get(BATCH, []),
                                                   *val_df.get(BATCH, [])])
    data_stats: dict[str, Any]
    try:
        train_df, data_stats = training_frame(
            train_df, replay_df, cfg, continual=start_from is not None, seed=mcfg.seed,
            since=ref.get("champion_batch") if cfg.init == "auto" else None)
    except NothingNew:
        if cfg.init != "auto":
            raise
        # Nothing the champion has not seen: as before auto, a full retrain on what there is.
        how, why, start_from = "full", ("nothing new to continue on (no train row newer than "
                                        "the champion's batch): a full retrain"), None
        train_df, data_stats = training_frame(train_df, replay_df, cfg, continual=False,
                                              seed=mcfg.seed)
    labels = sorted(set(params.data.labels) | set(train_df[LABEL]) | set(val_df[LABEL]))
    added: list[str] = []
    if start_from is not None:
        model, tok, champion_version = start_from
        old = [model.config.id2label[i] for i in range(model.config.num_labels)]
        labels = sorted(set(labels) | set(old))
        added = grow_head(model, old, labels)
        init_used = f"champion v{champion_version}"
    else:
        tok = AutoTokenizer.from_pretrained(pretrained)
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)})
        init_used = "base"
    model.config.ratchet_max_length = mcfg.max_length
    setattr(model.config, MODEL_CONFIG_KEY, precision)  # the served model predicts in it too
    label2id = {lab: i for i, lab in enumerate(labels)}
    total_params = sum(p.numel() for p in model.parameters())
    if cfg.mode == "lora":
        model = with_lora(model, cfg)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if cfg.compile else model

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, truncation=True, max_length=mcfg.max_length)["input_ids"]

    ids, y = encode(train_df[TEXT].tolist()), [label2id[x] for x in train_df[LABEL]]
    val_ids, val_y = encode(val_df[TEXT].tolist()), [label2id[x] for x in val_df[LABEL]]
    lengths = [len(x) for x in ids]
    weight = None
    if cfg.class_weights == "balanced":
        counts = torch.bincount(torch.tensor(y), minlength=len(labels)).float()
        weight = (len(y) / (len(labels) * counts.clamp(min=1))).to(device)

    total = steps_for(len(ids), cfg.batch_size, cfg.epochs)
    lr = cfg.lora_learning_rate if cfg.mode == "lora" else cfg.learning_rate
    opt, sched = make_optimizer(model, lr, cfg.weight_decay,
                                Schedule(total, int(total * cfg.warmup_ratio), cfg.schedule))
    rng = random.Random(mcfg.seed)
    amp, scaler = mixed_precision(device, precision)
    state = State()
    best_state = None
    folder = None
    resumed_from = 0
    if checkpoints is not None:
        folder = checkpoints / checkpoint_key({
            "finetune": cfg.model_dump(), "model": mcfg.model_dump(), "labels": labels,
            "train": file_digest(train), "val": file_digest(val), "init": init_used,
            # continual mode mixes it in; a stage dep either way, so a change is a new run
            "replay": file_digest(replay) if replay is not None else "",
            "pretrained": file_digest(pretrained) if start_from is None else "",
            "world": dist.world, "precision": precision})
        saved = load_agreed_checkpoint(folder, dist, lambda c: c["state"]["step"])
        if saved is not None:
            restore_training_state(saved, model, opt, sched, rng, scaler, dist)
            state, best_state = State(**saved["state"]), saved["best_state"]
            resumed_from = state.epoch
    pad_id = tok.pad_token_id or 0
    embed = model.get_input_embeddings()
    real_tokens = padded_tokens = 0
    began = time.perf_counter() - state.seconds

    def loss_of(input_ids, mask, target, n_global: int, delta=None):
        embeds = embed(input_ids)
        if delta is not None:
            embeds = embeds + delta
        elif cfg.adversarial_epsilon > 0:
            if not embeds.requires_grad:  # frozen embeddings (LoRA): still need their gradient
                embeds = embeds.detach().requires_grad_(True)
            embeds.retain_grad()
        with amp:
            logits = forward(inputs_embeds=embeds, attention_mask=mask).logits
        summed = F.cross_entropy(logits.float(), target, weight=weight, reduction="sum")
        return summed, summed / n_global, embeds

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    with progress(total, "finetune", initial=state.step, disable=not dist.main) as bar:
        while state.step < total:
            state.epoch += 1
            for batch in length_grouped_batches(lengths, cfg.batch_size, rng):
                if state.step >= total:
                    break
                mine = dist.shard(batch)
                step_loss = 0.0
                per = max(1, math.ceil(len(mine) / cfg.grad_accumulation))
                for m in range(0, len(mine), per):
                    rows = mine[m : m + per]
                    input_ids, mask = collate(ids, rows, pad_id)
                    real_tokens += int(mask.sum())
                    padded_tokens += mask.numel()
                    input_ids, mask = input_ids.to(device), mask.to(device)
                    target = torch.tensor([y[i] for i in rows], device=device)
                    summed, loss, embeds = loss_of(input_ids, mask, target, len(batch))
                    backward(loss)
                    step_loss += float(summed.detach())
                    if cfg.adversarial_epsilon > 0:  # FGM: one step up the loss, then train on it
                        g = embeds.grad.detach()
                        norm = g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1)
                        delta = cfg.adversarial_epsilon * g / norm
                        _, adv_loss, _ = loss_of(input_ids, mask, target, len(batch), delta)
                        backward(adv_loss)
                optimizer_step(opt, scaler, trainable, dist)
                sched.step()
                opt.zero_grad(set_to_none=True)
                state.step += 1
                state.samples += len(batch)
                loss_value = all_sum(step_loss, dist) / len(batch)
                state.rows.append({"step": state.step, "epoch": state.epoch, "loss": loss_value,
                                   "lr": sched.get_last_lr()[0]})
                bar.set_postfix(epoch=state.epoch, loss=f"{loss_value:.3f}")
                bar.update()
            # Keep the epoch with the best validation macro-F1; stop when it stops improving.
            val_start = time.perf_counter()
            score, acc = evaluate_split(model, val_ids, val_y, pad_id, device, amp=amp)
            state.val_seconds += time.perf_counter() - val_start
            state.rows[-1].update(val_macro_f1=score, val_accuracy=acc)
            if score > state.best or best_state is None:
                state.best, state.best_epoch, state.bad_epochs = score, state.epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                state.bad_epochs += 1
            state.seconds = time.perf_counter() - began
            stop = cfg.patience > 0 and state.bad_epochs >= cfg.patience
            if folder is not None and state.step < total and not stop:
                snapshot = training_state(model, opt, sched, rng, scaler, dist)  # all ranks
                if dist.main:
                    save_checkpoint(folder, {**snapshot, "state": asdict(state),
                                             "best_state": best_state})
            if stop:
                break
    seconds = time.perf_counter() - began
    model.load_state_dict(best_state)
    if cfg.mode == "lora":
        model = model.merge_and_unload()  # plain weights: serving needs no peft
    stats = {
        **data_stats, "mode": cfg.mode, "init": how, "init_reason": why, "init_from": init_used,
        "batch": trained_on, "labels": len(labels),
        "added_labels": added, "steps": state.step, "epochs": state.epoch,
        "best_epoch": state.best_epoch, "best_val_macro_f1": state.best,
        "stopped_early": state.step < total, "resumed_from_epoch": resumed_from,
        # Training steps only; the validation passes (early stopping) are timed apart.
        "train_seconds": seconds - state.val_seconds, "val_seconds": state.val_seconds,
        "samples": state.samples,
        "samples_per_s": state.samples / (seconds - state.val_seconds) if seconds else float(
            "nan"),
        "padding_efficiency": real_tokens / padded_tokens if padded_tokens else float("nan"),
        "trainable_params": sum(p.numel() for p in trainable), "total_params": total_params,
        "world_size": dist.world, "threads": torch.get_num_threads(), "precision": precision,
        "peak_rss_mb": peak_rss_mb(),
    }
    if device.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if dist.main:
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        write_curve(curve, state.rows, CURVE_FIELDS, evaluated="val_macro_f1",
                    evaluated_label="val macro-F1", unit_range=True)
        write_metrics("finetune", stats, metrics, all_metrics)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return stats


def main() -> None:
    stage_main("finetune", __doc__, {
        "train": "augmented train split (parquet)",
        "val": "prepared val split (parquet), for early stopping",
        "pretrained": "folder of the pretrained encoder",
        "init": "finetune-init.json: full retrain or continual from the champion, and why",
        "replay": "replay buffer (parquet), mixed in by continual mode",
        "checkpoints": "folder for per-epoch checkpoints (a killed run resumes from them)",
        "out": "folder for the candidate model",
        "metrics": "finetune metrics JSON to write",
        "all_metrics": FULL_HELP,
        "curve": "training curve CSV to write (DVC plot; a PNG is written beside it)",
    }, run, optional=("init", "replay", "checkpoints", "all_metrics"))


if __name__ == "__main__":
    main()
