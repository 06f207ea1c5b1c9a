"""The shared pieces of the two training stages: batches, optimizer, schedule, progress, memory,
processes (torchrun), checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratchet.runtime import atomic_dir, atomic_path


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    kind: str = "linear"  # linear | cosine | constant, after the warmup


def make_optimizer(model, lr: float, weight_decay: float, schedule: Schedule):
    """AdamW without decay on biases and norms, with linear warmup then the schedule's decay."""
    import torch
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    try:  # one fused kernel per step instead of a loop over tensors (CPU and CUDA)
        opt = torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, lr=lr)
    if schedule.kind == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, schedule.warmup_steps, schedule.total_steps)
    elif schedule.kind == "constant":
        sched = get_constant_schedule_with_warmup(opt, schedule.warmup_steps)
    else:
        sched = get_linear_schedule_with_warmup(opt, schedule.warmup_steps, schedule.total_steps)
    return opt, sched


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Shuffled index batches covering every row once."""
    idx = list(range(n))
    rng.shuffle(idx)
    for start in range(0, n, batch_size):
        yield idx[start : start + batch_size]


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, *,
                           pool: int = 50) -> list[list[int]]:
    """Batches of similar length, in random order: little padding, still shuffled.

    Rows are shuffled, cut into pools of `pool` batches, each pool sorted by length and cut into
    batches, and the batches shuffled. Every row appears exactly once.
    """
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    span = batch_size * pool
    for start in range(0, len(idx), span):
        chunk = sorted(idx[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_for(n: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(math.ceil(n / batch_size) * epochs))


def progress(total: int, desc: str, *, initial: int = 0, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=1.0, disable=disable)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class Dist:
    """Where this process stands under `torchrun` (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the rank on this machine: which GPU it takes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        """This rank's GPU (`LOCAL_RANK` modulo the GPUs) where there is one, else the CPU."""
        import torch

        if torch.cuda.is_available():
            return torch.device(f"cuda:{self.local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (length-sorted: similar work). Shares
        differ by one row at most, so none is empty while the batch has a row per rank."""
        n = len(rows)
        return rows[self.rank * n // self.world : (self.rank + 1) * n // self.world]


def init_distributed() -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs); else no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    info = Dist(0, world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.device)  # before NCCL, so each rank talks from its GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), info.local_rank)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
    """Let glibc's malloc keep and reuse freed memory instead of returning it to the kernel.

    A training step allocates the same large tensors each time (the 47 MB gradient of MiniLM's
    word embeddings, activations); glibc serves blocks above its mmap threshold (at most 32 MB)
    with fresh mmap pages and unmaps them on free, so every step page-faults them in again,
    zeroed by the kernel: ~20k faults a step here, 12% of a step's CPU time. Serving every block
    from the heap (`M_MMAP_MAX` 0) and trimming it only above 1 GB free keeps the pages mapped;
    the arithmetic is unchanged (bit-identical weights). Peak memory stays the process's peak.
    Not done where another allocator is preloaded or MALLOC_* tunables are set (the user chose),
    or without glibc. Returns whether it took effect."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or "LD_PRELOAD" in os.environ or any(
            k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def set_rank_threads(dist_info: Dist, threads: int = 0) -> None:
    """`threads` torch threads; with 0, every core this process may use (`set_threads`), shared
    among the ranks where torchrun runs several on the CPU. Also has freed memory reused
    (`reuse_freed_memory`): both training stages call this first."""
    import torch

    from ratchet.models import set_threads

    reuse_freed_memory()
    if threads:
        torch.set_num_threads(threads)
        return
    set_threads()
    if dist_info.world > 1 and not torch.cuda.is_available():  # the ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // dist_info.world))


def mixed_precision(device, used: str):
    """(autocast context, GradScaler or None) for a training step on `device` in the resolved
    precision `used` (`ratchet.precision.resolve`): bf16 autocast, fp16 autocast with loss
    scaling (GPUs without bf16), or fp32 (a no-op context). Weights and optimizer stay fp32."""
    import torch

    from ratchet.precision import autocast

    scaler = torch.amp.GradScaler("cuda") if used == "fp16" else None
    return autocast(used, device), scaler


def all_reduce_grads(params: list, dist_info: Dist) -> None:
    """Sum the gradients of every rank in one flat all-reduce (losses are already divided by the
    global batch size, so the sum is the global mean's gradient)."""
    if dist_info.world <= 1:
        return
    import torch
    import torch.distributed as dist

    # Every rank sends every gradient, zeros where it has none (a rank whose share of a small
    # last batch is empty): the ranks' all-reduce calls must match one for one.
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(opt, scaler, params: list, dist_info: Dist, max_norm: float = 1.0) -> None:
    """Sum the ranks' gradients, clip their norm, step (through the fp16 loss scaler if any)."""
    import torch

    all_reduce_grads(params, dist_info)
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def all_sum(value: float, dist_info: Dist) -> float:
    """`value` summed over the ranks (NCCL reduces GPU tensors only: it goes through the GPU)."""
    if dist_info.world <= 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return float(t.item())


def file_digest(path: Path) -> str:
    """Content hash of a file or a folder's files, read in chunks (model weights can be GBs);
    of nothing for a path that does not exist."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:  # named by its place in the folder: a file moved is a change
        h.update((f.name if f == path else str(f.relative_to(path))).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_key(parts: dict[str, Any]) -> str:
    """A checkpoint's folder name: a hash of everything that decides the run (params, input
    digests, start model, world size), so a run resumes only its own checkpoint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _torch_rngs(dist_info: Dist) -> tuple[Any, Any]:
    import torch

    device = dist_info.device
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def training_state(model, opt, sched, rng: random.Random, scaler, dist_info: Dist
                   ) -> dict[str, Any]:
    """What a resumed run needs to go on exactly: weights, optimizer, schedule, the sampling
    `rng`, the fp16 loss scaler, and every rank's torch generators (CPU, and its GPU's): dropout
    draws differ per rank. Under torchrun every rank must call it (it gathers); rank 0 saves."""
    rngs = [_torch_rngs(dist_info)]
    if dist_info.world > 1:
        import torch.distributed as dist

        rngs = [None] * dist_info.world
        dist.all_gather_object(rngs, _torch_rngs(dist_info))
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng.getstate(), "torch_rngs": rngs,
            "scaler": scaler.state_dict() if scaler is not None else None}


def restore_training_state(saved: dict[str, Any], model, opt, sched, rng: random.Random,
                           scaler, dist_info: Dist) -> None:
    """Put back what `training_state` saved, each rank its own generators."""
    import torch

    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    rng.setstate(saved["rng"])
    cpu, gpu = saved["torch_rngs"][dist_info.rank]
    torch.set_rng_state(cpu)
    if gpu is not None and dist_info.device.type == "cuda":
        torch.cuda.set_rng_state(gpu, dist_info.device)
    if saved.get("scaler") is not None and scaler is not None:
        scaler.load_state_dict(saved["scaler"])


def load_agreed_checkpoint(folder: Path, dist_info: Dist, step_of) -> dict[str, Any] | None:
    """The checkpoint in `folder` if every rank read the same one (`step_of(saved)`: its step),
    else None on every rank: ranks that resumed at different steps would wait on each other in
    mismatched all-reduces forever."""
    saved = load_checkpoint(folder)
    step = float(step_of(saved)) if saved is not None else 0.0
    if dist_info.world > 1:
        total, squares = all_sum(step, dist_info), all_sum(step * step, dist_info)
        if squares * dist_info.world != total * total:  # equal only when all steps are
            return None
    return saved


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    """Write the state atomically: a kill mid-write leaves the previous checkpoint intact, and a
    full disk fails as one `DiskFull` error with the partial file removed."""
    import torch

    with atomic_path(folder / "state.pt") as tmp:
        torch.save(state, tmp)


def save_model(out: Path, model, tokenizer=None) -> None:
    """`save_pretrained` (weights, config, tokenizer) into `out` as a whole: written to a
    temporary directory beside it and renamed; a full disk fails as one `DiskFull` error and
    leaves neither a partial model nor the temporary directory."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    import torch

    path = folder / "state.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable: start over rather than fail the stage
        return None


def write_curve(curve: Path, rows: list[dict], fields: list[str], *, evaluated: str,
                evaluated_label: str, unit_range: bool = False, log_scale: bool = False
                ) -> None:
    """A training curve as a per-step CSV (a DVC plot) and a PNG beside it, each written whole
    (to a temporary file, then renamed): the loss per step with `evaluated` (a column set on the
    evaluation steps) on a second axis, and the learning rate."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(curve) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["loss"] for r in rows], lw=1, label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    evals = [r for r in rows if r.get(evaluated) is not None]
    if evals:
        ax_eval = ax_loss.twinx()
        ax_eval.plot([r["step"] for r in evals], [r[evaluated] for r in evals], "o-",
                     color="tab:green", label=evaluated_label)
        ax_eval.set_ylabel(evaluated_label)
        if unit_range:
            ax_eval.set_ylim(0, 1)
        if log_scale:  # perplexity: the exponential of a loss
            ax_eval.set_yscale("log")
    ax_loss.set_title(f"training loss and {evaluated_label}" if rows else "no training steps")
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    fig.tight_layout()
    png = curve.with_suffix(".png")
    try:
        with atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
