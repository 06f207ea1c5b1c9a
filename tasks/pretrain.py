"""pretrain: continue masked-language-model training of the encoder on the domain's texts (every
batch's train split plus an optional unlabeled corpus), within a step and time budget, stopping
when held-out perplexity stops improving; runs unchanged under `torchrun`. With `enabled: auto`
(the default) it trains only a start model whose MLM head is trained, and otherwise passes the
base encoder on, saying why (benchmarks/pretrain.py: from a random head it did not help)."""

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
from ratchet.headline import FULL_HELP, write_metrics
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


def masked_loss_sum(model, input_ids, attention_mask, labels, amp):
    """The cross-entropy summed over the masked positions. The vocabulary projection (the
    largest matmul of a small encoder's step) runs on those positions only where the model's
    MLM head is a separate module (`cls`: BERT; `lm_head`: RoBERTa); else on every position."""
    import torch

    picked = labels != -100
    head = getattr(model, "cls", None)
    if head is None:
        head = getattr(model, "lm_head", None)
    with amp:
        if head is not None:
            hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
            logits = head(hidden[picked])
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[picked]
    return torch.nn.functional.cross_entropy(logits.float(), labels[picked], reduction="sum")


def shard_loss(model, batch: dict, dist, amp):
    """This rank's part of the global batch's mean masked-token loss: the cross-entropy summed
    over its share of the rows, divided by the masked tokens of the whole batch (so the ranks'
    gradients add up to the 1-process gradient; a share with no masked token adds zero)."""
    masked = int((batch["labels"] != -100).sum())
    mine = dist.shard(list(range(len(batch["labels"]))))
    part = {k: v[mine[0] : mine[-1] + 1] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    part = {k: v[:, :width].to(dist.device) for k, v in part.items()}
    total = masked_loss_sum(model, part["input_ids"], part["attention_mask"], part["labels"], amp)
    return total / max(masked, 1)


def perplexity(model, tok, examples: list[dict], mlm_probability: float) -> float:
    """Masked-token perplexity of encoded rows (`encode`) with fixed masks (seeded), comparable
    before and after training."""
    import contextlib

    import torch

    if not examples:
        return float("nan")
    collate = Masker(tok, mlm_probability, seed=1234)  # the same masks every time
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(examples), 64):
            batch = collate(examples[start : start + 64])
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"] != -100).sum())
            if n:
                total += float(masked_loss_sum(model, batch["input_ids"],
                                               batch["attention_mask"], batch["labels"],
                                               contextlib.nullcontext()))
                count += n
    model.train(was_training)
    return math.exp(total / count) if count else float("nan")


class LazyEncoded:
    """Rows of a text list, tokenized the first time a batch draws them: a run tokenizes at
    most (steps x batch size) rows however large the corpus is."""

    def __init__(self, tok, texts: list[str], max_length: int, whole_word: bool):
        self.tok, self.texts, self.max_length, self.whole_word = tok, texts, max_length, whole_word
        self.done: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, idx: list[int]) -> list[dict]:
        new = [i for i in idx if i not in self.done]
        if new:
            encoded = encode(self.tok, [self.texts[i] for i in new], self.max_length,
                             self.whole_word)
            self.done.update(zip(new, encoded, strict=True))
        return [self.done[i] for i in idx]


def held_out_sample(n: int, k: int, seed: int) -> list[int]:
    """`k` of `n` held-out rows, drawn by seed (a prepared split is ordered by batch, and a
    source file often by label: its head would be a few labels of the oldest batch)."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def phase_multipliers(head_steps: int, steps: int):
    """Learning-rate multipliers per optimizer step, for the MLM head's parameters and the
    encoder's: the first `head_steps` steps train the head alone (the encoder frozen: 0) with
    a 10% warmup and a linear decay; then `steps` steps train everything, warmed up over their
    first 10% and decayed linearly. The head's multiplier after its warmup is relative to its
    own learning rate, so `ratio` (learning_rate / head_learning_rate) scales it down."""

    def linear(i: int, total: int) -> float:
        warm = total // 10
        if i < warm:
            return i / max(1, warm)
        return max(0.0, (total - i) / max(1, total - warm))

    def encoder(i: int) -> float:
        return 0.0 if i < head_steps else linear(i - head_steps, steps)

    def head(i: int, ratio: float = 1.0) -> float:
        return linear(i, head_steps) if i < head_steps else ratio * encoder(i)

    return head, encoder


def make_phased_optimizer(model, head_params: set[int], lr: float, head_lr: float,
                          weight_decay: float, head_steps: int, steps: int):
    """AdamW (no decay on biases and norms) with the head and the encoder in their own groups,
    each on its `phase_multipliers` schedule; without a head phase, one schedule for all."""
    import torch

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        key = (id(p) in head_params, p.ndim < 2 or "LayerNorm" in name)
        groups.setdefault(key, []).append(p)
    keys = sorted(groups)
    head_rate = head_lr if head_steps else lr
    head, encoder = phase_multipliers(head_steps, steps)
    param_groups = [{"params": groups[k], "lr": head_rate if k[0] else lr,
                     "weight_decay": 0.0 if k[1] else weight_decay} for k in keys]
    try:  # one fused kernel per step instead of a loop over tensors (CPU and CUDA)
        opt = torch.optim.AdamW(param_groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(param_groups, lr=lr)
    ratio = lr / head_rate
    lambdas = [(lambda i: head(i, ratio)) if k[0] else encoder for k in keys]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


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


def head_names(model) -> list[str]:
    """The MLM head's parameters: every parameter outside the encoder (`base_model`)."""
    encoder = {id(p) for p in model.base_model.parameters()}
    return [n for n, p in model.named_parameters() if id(p) not in encoder]


def checkpoint_keys(folder: Path) -> set[str]:
    """The tensor names a Hugging Face model folder holds (safetensors, else PyTorch files)."""
    import torch
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    if not keys:
        for f in sorted(folder.glob("pytorch_model*.bin")):
            keys.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
    return keys


TRAINED_FLAG = "ratchet_mlm_trained"  # set in a pretrained output's config when its head trained


def start_model(params: Params, out: Path):
    """The base model, or (`pretrain.init: previous`) the last run's output where there is one;
    and whether its MLM head was trained (a source folder holding every head weight, or a
    previous output whose head this stage trained) rather than newly initialised."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ratchet.models import load_base_mlm, source_dir

    if params.pretrain.init == "previous" and (out / "config.json").is_file():
        model = AutoModelForMaskedLM.from_pretrained(out)
        return model, AutoTokenizer.from_pretrained(out), "previous", bool(
            getattr(model.config, TRAINED_FLAG, False))
    model, tok = load_base_mlm(params.model.source, params.model.seed)
    folder = source_dir(params.model.source)  # None: `tiny`, random from a config
    trained = folder is not None and set(head_names(model)) <= checkpoint_keys(folder)
    return model, tok, "base", trained


def plan(enabled: bool | str, head_trained: bool) -> tuple[bool, str]:
    """Whether to train, and why not. `auto` trains only a model whose MLM head is trained:
    from a random head (the packaged MiniLM ships none), MLM steps were measured not to help
    few-label fine-tuning on CLINC150 and to cost time (benchmarks/results/pretrain.json)."""
    if enabled is False:
        return False, "pretrain.enabled is false"
    if enabled == "auto" and not head_trained:
        return False, ("pretrain.enabled is auto and the start model has no trained MLM head: "
                       "MLM steps from a random head did not help fine-tuning "
                       "(benchmarks/pretrain.py); the base encoder is passed on")
    return True, ""


CURVE_FIELDS = ["step", "loss", "lr", "perplexity"]


def run(params: Params, *, train: Path, val: Path, corpus: Path, out: Path,
        metrics: Path, curve: Path | None = None, checkpoints: Path | None = None,
        all_metrics: Path | None = None) -> dict:
    import torch

    from ratchet.training import (
        all_sum,
        checkpoint_key,
        file_digest,
        init_distributed,
        load_agreed_checkpoint,
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
    model, tok, init, head_trained = start_model(params, out)
    model.to(dist.device)
    from ratchet.precision import resolve as resolve_precision

    precision = resolve_precision(params.finetune.precision, dist.device)  # one key for both
    amp, scaler = mixed_precision(dist.device, precision)
    train_it, why_not = plan(cfg.enabled, head_trained)
    texts = pd.read_parquet(train)[TEXT].tolist()
    extra = read_corpus(corpus) if train_it else []
    val_texts = pd.read_parquet(val)[TEXT].tolist()
    head_steps, steps = cfg.head_warmup_steps, cfg.max_steps
    stats: dict = {"enabled": str(cfg.enabled).lower(), "trained": 0, "steps": 0,
                   "head_steps": 0, "mlm_head": "trained" if head_trained else "untrained",
                   "texts": len(texts), "corpus_texts": len(extra), "tokenized_rows": 0,
                   "eval_rows": 0, "init": init, "whole_word_mask": cfg.whole_word_mask,
                   "precision": precision}
    texts += extra
    points: list[dict] = []  # the curve: loss and learning rate per step, perplexity when measured
    folder = None  # this run's checkpoint folder, when it keeps one
    if train_it and head_steps + steps > 0 and texts:
        ww = cfg.whole_word_mask
        held_out = encode(tok, [val_texts[i] for i in held_out_sample(
            len(val_texts), cfg.eval_texts, mcfg.seed)], mcfg.max_length, ww)
        stats["eval_rows"] = len(held_out)
        before = perplexity(model, tok, held_out, cfg.mlm_probability)
        stats["perplexity_before"] = before
        torch.manual_seed(mcfg.seed)
        rng = random.Random(mcfg.seed)
        # Every rank draws and masks the same global batch, then trains on its share: N
        # processes follow the 1-process run (up to float summation order; dropout aside).
        collate = Masker(tok, cfg.mlm_probability, mcfg.seed)
        examples = LazyEncoded(tok, texts, mcfg.max_length, ww)
        if min(cfg.batch_size, len(examples)) < dist.world:
            raise RatchetError(
                f"pretrain: a batch of {min(cfg.batch_size, len(examples))} rows cannot be shared "
                f"by {dist.world} processes; raise pretrain.batch_size or use fewer processes")
        encoder = {id(p) for p in model.base_model.parameters()}
        head = {id(p) for p in model.parameters()} - encoder
        opt, sched = make_phased_optimizer(model, head, cfg.learning_rate,
                                           cfg.head_learning_rate, 0.01, head_steps, steps)
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
        total = head_steps + steps
        start = time.perf_counter() - elapsed  # the budget counts the time before a kill
        with progress(total, "pretrain (MLM)", initial=first - 1, disable=not dist.main) as bar:
            for step in range(first, total + 1):
                frozen = step <= head_steps  # the head's warmup: the encoder does not move
                for p in model.base_model.parameters():
                    p.requires_grad_(not frozen)
                trainable = [p for p in model.parameters() if p.requires_grad]
                rows = rng.sample(range(len(examples)), min(cfg.batch_size, len(examples)))
                loss = shard_loss(model, collate(examples.rows(rows)), dist, amp)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                optimizer_step(opt, scaler, trainable, dist)
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(all_sum(float(loss.detach()), dist))  # the global batch's loss
                lrs = sched.get_last_lr()  # the head's group is last: its rate in the head phase
                points.append({"step": step, "loss": losses[-1],
                               "lr": lrs[-1] if frozen else lrs[0]})
                stats["steps"], stats["head_steps"] = step, min(step, head_steps)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    ppl = perplexity(model, tok, held_out, cfg.mlm_probability)
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
                if folder is not None and step % cfg.checkpoint_every == 0 and step < total:
                    snapshot = training_state(model, opt, sched, rng, scaler, dist)  # all ranks
                    if dist.main:
                        save_checkpoint(folder, {
                            **snapshot, "mask_rng": collate.gen.get_state(), "losses": losses,
                            "evals": evals, "points": points, "best": best, "bad": bad,
                            "seconds": time.perf_counter() - start, "step": step})
        for p in model.parameters():
            p.requires_grad_(True)
        stats.update(final_loss=sum(losses[-5:]) / len(losses[-5:]), stop_reason=stop_reason,
                     train_seconds=time.perf_counter() - start,
                     tokenized_rows=len(examples.done))
        stats["perplexity_after"] = perplexity(model, tok, held_out, cfg.mlm_probability)
        stats["perplexity_curve"] = evals + [{"step": stats["steps"],
                                              "perplexity": stats["perplexity_after"]}]
        points[-1]["perplexity"] = stats["perplexity_after"]
        stats["trained"] = 1
    else:
        stats["skipped"] = why_not or "no steps or no texts"
    stats["peak_rss_mb"] = peak_rss_mb()
    if dist.device.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dist.device) / 2**20
    # `init: previous` reads it back: a head trained here or by the source stays "trained"
    setattr(model.config, TRAINED_FLAG, bool(head_trained or stats["trained"]))
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
        write_metrics("pretrain", stats, metrics, all_metrics)
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
        "all_metrics": FULL_HELP,
        "curve": "training curve CSV to write (DVC plot; a PNG is written beside it)",
        "checkpoints": "folder for resumable checkpoints (pretrain.checkpoint_every)",
    }, run, optional=("curve", "checkpoints", "all_metrics"))


if __name__ == "__main__":
    main()
