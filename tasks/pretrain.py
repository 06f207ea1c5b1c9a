"""pretrain: continue masked-language-model training of the encoder on the domain's texts (every
batch's train split plus an optional unlabeled corpus), within a step and time budget, stopping
when held-out perplexity stops improving; runs unchanged under `torchrun`."""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import pandas as pd

from ratchet.config import Params
from ratchet.data import TEXT
from ratchet.errors import RatchetError
from ratchet.runtime import write_json
from ratchet.stage import stage_main

CORPUS_SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")


def encode(tok, texts: list[str], max_length: int, whole_word: bool) -> list[dict]:
    """Token ids and the groups of positions masked together: each word's pieces (whole-word
    masking) or each token; special tokens are never masked."""
    enc = tok(texts, truncation=True, max_length=max_length)
    examples = []
    for i, ids in enumerate(enc["input_ids"]):
        words = enc.word_ids(i)
        groups: dict = {}
        for pos, word in enumerate(words):
            if word is not None:
                groups.setdefault(word if whole_word else pos, []).append(pos)
        examples.append({"input_ids": ids, "groups": list(groups.values())})
    return examples


class Masker:
    """BERT's masking, by group: each group is chosen with probability p; a chosen group is
    [MASK]ed (80%), replaced by random tokens (10%) or kept (10%), and predicted."""

    def __init__(self, tok, p: float, seed: int):
        import torch

        self.tok, self.p = tok, p
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            mask[r, :n] = 1
            draws = torch.rand(len(e["groups"]), 2, generator=self.gen)
            for group, (pick, how) in zip(e["groups"], draws.tolist(), strict=True):
                if pick >= self.p:
                    continue
                labels[r, group] = ids[r, group]
                if how < 0.8:
                    ids[r, group] = self.tok.mask_token_id
                elif how < 0.9:
                    ids[r, group] = torch.randint(len(self.tok), (len(group),),
                                                  generator=self.gen)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shard_loss(model, batch: dict, dist, amp):
    """This rank's part of the global batch's mean masked-token loss: the cross-entropy summed
    over its share of the rows, divided by the masked tokens of the whole batch (so the ranks'
    gradients add up to the 1-process gradient; a share with no masked token adds zero)."""
    import torch

    masked = int((batch["labels"] != -100).sum())
    mine = dist.shard(list(range(len(batch["labels"]))))
    part = {k: v[mine[0] : mine[-1] + 1] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    part = {k: v[:, :width].to(dist.device) for k, v in part.items()}
    with amp:
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                              part["labels"].flatten(), ignore_index=-100,
                                              reduction="sum")
    return total / max(masked, 1)


def perplexity(model, tok, texts: list[str], max_length: int, mlm_probability: float,
               whole_word: bool = False) -> float:
    """Masked-token perplexity with fixed masks (seeded), comparable before and after training."""
    import torch

    if not texts:
        return float("nan")
    collate = Masker(tok, mlm_probability, seed=1234)  # the same masks every time
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = collate(encode(tok, texts[start : start + 64], max_length, whole_word))
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    model.train(was_training)
    return math.exp(total / count) if count else float("nan")


def read_corpus(path: Path) -> list[str]:
    """Unlabeled texts: a .txt (one per line), a table with a `text` column, or a folder of them."""
    from ratchet.data import read_table

    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
    texts: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            texts += [line.strip() for line in f.read_text(errors="replace").splitlines()]
        else:
            df = read_table(f)
            if TEXT in df.columns:
                texts += df[TEXT].dropna().astype(str).tolist()
    return [t for t in texts if t]


def start_model(params: Params, out: Path):
    """The base model, or (`pretrain.init: previous`) the last run's output where there is one."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ratchet.models import load_base_mlm

    if params.pretrain.init == "previous" and (out / "config.json").is_file():
        return AutoModelForMaskedLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), \
            "previous"
    model, tok = load_base_mlm(params.model.source, params.model.seed)
    return model, tok, "base"


CURVE_FIELDS = ["step", "loss", "lr", "perplexity"]


def run(params: Params, *, train: Path, val: Path, corpus: Path, out: Path,
        metrics: Path, curve: Path | None = None, checkpoints: Path | None = None) -> dict:
    import torch

    from ratchet.training import (
        Schedule,
        all_sum,
        checkpoint_key,
        file_digest,
        init_distributed,
        load_agreed_checkpoint,
        make_optimizer,
        mixed_precision,
        optimizer_step,
        peak_rss_mb,
        progress,
        restore_training_state,
        save_checkpoint,
        set_rank_threads,
        training_state,
        write_curve,
    )

    cfg, mcfg = params.pretrain, params.model
    dist = init_distributed()
    set_rank_threads(dist)
    model, tok, init = start_model(params, out)
    model.to(dist.device)
    from ratchet.precision import resolve as resolve_precision

    precision = resolve_precision(params.finetune.precision, dist.device)  # one key for both
    amp, scaler = mixed_precision(dist.device, precision)
    texts = pd.read_parquet(train)[TEXT].tolist()
    extra = read_corpus(corpus) if cfg.enabled else []
    val_texts = pd.read_parquet(val)[TEXT].tolist()
    stats: dict = {"enabled": int(cfg.enabled), "steps": 0, "texts": len(texts),
                   "corpus_texts": len(extra), "init": init, "whole_word_mask": cfg.whole_word_mask,
                   "precision": precision}
    texts += extra
    points: list[dict] = []  # the curve: loss and learning rate per step, perplexity when measured
    folder = None  # this run's checkpoint folder, when it keeps one
    if cfg.enabled and cfg.max_steps > 0 and texts:
        ww = cfg.whole_word_mask
        held_out = val_texts[: cfg.eval_texts]
        before = perplexity(model, tok, held_out, mcfg.max_length, cfg.mlm_probability, ww)
        stats["perplexity_before"] = before
        torch.manual_seed(mcfg.seed)
        rng = random.Random(mcfg.seed)
        # Every rank draws and masks the same global batch, then trains on its share: N
        # processes follow the 1-process run (up to float summation order; dropout aside).
        collate = Masker(tok, cfg.mlm_probability, mcfg.seed)
        examples = encode(tok, texts, mcfg.max_length, ww)
        if min(cfg.batch_size, len(examples)) < dist.world:
            raise RatchetError(
                f"pretrain: a batch of {min(cfg.batch_size, len(examples))} rows cannot be shared "
                f"by {dist.world} processes; raise pretrain.batch_size or use fewer processes")
        opt, sched = make_optimizer(model, cfg.learning_rate, 0.01,
                                    Schedule(cfg.max_steps, cfg.max_steps // 10))
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        losses, evals = [], [{"step": 0, "perplexity": before}]
        best, bad, stop_reason = before, 0, "max_steps"
        first, elapsed = 1, 0.0
        if checkpoints is not None and cfg.checkpoint_every:
            folder = checkpoints / checkpoint_key({
                "pretrain": cfg.model_dump(), "model": mcfg.model_dump(), "init": init,
                "start": file_digest(out) if init == "previous" else "",
                "train": file_digest(train), "val": file_digest(val),
                "corpus": file_digest(corpus), "world": dist.world, "precision": precision})
            saved = load_agreed_checkpoint(folder, dist, lambda c: c["step"])
            if saved is not None:
                restore_training_state(saved, model, opt, sched, rng, scaler, dist)
                collate.gen.set_state(saved["mask_rng"])
                losses, evals, points = saved["losses"], saved["evals"], saved["points"]
                best, bad, elapsed = saved["best"], saved["bad"], saved["seconds"]
                first = saved["step"] + 1
                stats["resumed_from_step"] = saved["step"]
        start = time.perf_counter() - elapsed  # the budget counts the time before a kill
        with progress(cfg.max_steps, "pretrain (MLM)", initial=first - 1,
                      disable=not dist.main) as bar:
            for step in range(first, cfg.max_steps + 1):
                rows = rng.sample(range(len(examples)), min(cfg.batch_size, len(examples)))
                loss = shard_loss(model, collate([examples[i] for i in rows]), dist, amp)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                optimizer_step(opt, scaler, trainable, dist)
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(all_sum(float(loss.detach()), dist))  # the global batch's loss
                points.append({"step": step, "loss": losses[-1], "lr": sched.get_last_lr()[0]})
                stats["steps"] = step
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    ppl = perplexity(model, tok, held_out, mcfg.max_length,
                                     cfg.mlm_probability, ww)
                    evals.append({"step": step, "perplexity": ppl})
                    points[-1]["perplexity"] = ppl
                    best, bad = (ppl, 0) if ppl < best else (best, bad + 1)
                    if cfg.patience and bad >= cfg.patience:
                        stop_reason = f"perplexity did not improve for {bad} evaluations"
                        break
                # Ranks agree on the time budget (rank 0's clock alone could stop one rank a
                # step before the others, which would then wait in the all-reduce forever).
                if cfg.max_seconds and all_sum(float(
                        time.perf_counter() - start > cfg.max_seconds), dist):
                    stop_reason = f"time budget of {cfg.max_seconds:.0f}s reached"
                    break
                if folder is not None and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    snapshot = training_state(model, opt, sched, rng, scaler, dist)  # all ranks
                    if dist.main:
                        save_checkpoint(folder, {
                            **snapshot, "mask_rng": collate.gen.get_state(), "losses": losses,
                            "evals": evals, "points": points, "best": best, "bad": bad,
                            "seconds": time.perf_counter() - start, "step": step})
        stats.update(final_loss=sum(losses[-5:]) / len(losses[-5:]), stop_reason=stop_reason,
                     train_seconds=time.perf_counter() - start)
        stats["perplexity_after"] = perplexity(model, tok, held_out, mcfg.max_length,
                                               cfg.mlm_probability, ww)
        stats["perplexity_curve"] = evals + [{"step": stats["steps"],
                                              "perplexity": stats["perplexity_after"]}]
        points[-1]["perplexity"] = stats["perplexity_after"]
    else:
        stats["skipped"] = ("pretrain.enabled is false" if not cfg.enabled
                            else "no steps or no texts")
    stats["peak_rss_mb"] = peak_rss_mb()
    if dist.device.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dist.device) / 2**20
    if dist.main:
        if curve is not None:  # empty when skipped: DVC expects the plot either way
            write_curve(curve, points, CURVE_FIELDS,
                        evaluated="perplexity", evaluated_label="held-out perplexity",
                        log_scale=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        write_json(metrics, stats)
        if folder is not None:  # the result is written: its checkpoint is no longer needed
            shutil.rmtree(folder, ignore_errors=True)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return stats


def main() -> None:
    stage_main("pretrain", __doc__, {
        "train": "prepared train split (parquet); its texts are the MLM corpus",
        "val": "prepared val split (parquet); held-out perplexity",
        "corpus": "optional unlabeled texts: a .txt/.csv/.jsonl/.parquet file or a folder",
        "out": "folder for the pretrained model (also the start with pretrain.init: previous)",
        "metrics": "pretrain metrics JSON to write",
        "curve": "training curve CSV to write (DVC plot; a PNG is written beside it)",
        "checkpoints": "folder for resumable checkpoints (pretrain.checkpoint_every)",
    }, run, optional=("curve", "checkpoints"))


if __name__ == "__main__":
    main()
