"""The shared pieces of the two training stages: batches, optimizer, schedule, progress."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int


def make_optimizer(model, lr: float, weight_decay: float, schedule: Schedule):
    """AdamW without decay on biases and norms, with linear warmup then linear decay."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    sched = get_linear_schedule_with_warmup(opt, schedule.warmup_steps, schedule.total_steps)
    return opt, sched


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Shuffled index batches covering every row once."""
    idx = list(range(n))
    rng.shuffle(idx)
    for start in range(0, n, batch_size):
        yield idx[start : start + batch_size]


def steps_for(n: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(math.ceil(n / batch_size) * epochs))


def progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
