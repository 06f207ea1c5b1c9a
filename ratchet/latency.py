"""Serving cost of a classifier: per-example latency at a few batch sizes, and its size on disk.

Both go beside the quality metrics so that a candidate which is better but much slower or larger
than the champion is visible before it is promoted.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Protocol

import numpy as np

WEIGHTS_GLOB = "*.safetensors"
MB = 1_000_000
"""`size/mb` is in SI megabytes."""


class Predictor(Protocol):
    """What `measure` needs of ratchet.models.Classifier."""

    batch_size: int

    def predict_proba(self, texts: list[str]) -> np.ndarray: ...


def _batches(texts: list[str], size: int) -> list[list[str]]:
    """Consecutive batches of exactly `size` texts, cycling through `texts`, at least one.

    Cycling keeps every batch full, so the batch-32 figure is a batch of 32 even when fewer
    texts were sampled; the number of batches is what one pass over the texts needs.
    """
    count = max(1, math.ceil(len(texts) / size))
    return [[texts[(b * size + i) % len(texts)] for i in range(size)] for b in range(count)]


def measure(classifier: Predictor, texts: Sequence[str], *, batch_sizes: Sequence[int] = (1, 32),
            max_examples: int = 64, warmup: int = 2, threads: int | None = 1) -> dict[str, float]:
    """Milliseconds per example of `classifier.predict_proba`, median and 95th percentile.

    Timed on `threads` torch threads (default one: a serving worker's request; None leaves the
    setting alone). On a busy machine several OpenMP threads spin-wait for a core and batch-1
    times grow many-fold (measured here: 9 ms on one thread, 490 ms on two beside another busy
    process), which would make a latency budget judge the machine rather than the model.

    For each batch size b, the first `max_examples` texts go through in batches of b (see
    `_batches`); each batch's wall time (tokenisation included, as when serving) divided by b is
    one sample. `warmup` extra calls per batch size come first and are not counted: the first
    calls pay for lazy initialisation and cold caches. Keys: `latency/p50_ms_bs{b}` and
    `latency/p95_ms_bs{b}`; all NaN when there are no texts.
    """
    texts = [str(t) for t in list(texts)[:max_examples]]
    out: dict[str, float] = {}
    saved = classifier.batch_size
    saved_threads = _set_threads(threads)
    try:
        for size in batch_sizes:
            if size < 1:
                raise ValueError(f"batch sizes must be at least 1, not {size}")
            per_example = _time_batches(classifier, texts, size, warmup) if texts else []
            for q in (50, 95):
                out[f"latency/p{q}_ms_bs{size}"] = (
                    float(np.percentile(per_example, q)) if per_example else math.nan
                )
    finally:
        classifier.batch_size = saved
        _set_threads(saved_threads)
    return out


def _set_threads(n: int | None) -> int | None:
    """Set torch's intra-op threads to n (None: leave them); returns the previous setting."""
    if n is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _time_batches(classifier: Predictor, texts: list[str], size: int, warmup: int) -> list[float]:
    # The classifier splits its input by its own batch_size: make that the size being timed.
    classifier.batch_size = size
    batches = _batches(texts, size)
    for i in range(warmup):
        classifier.predict_proba(batches[i % len(batches)])
    samples = []
    for batch in batches:
        start = perf_counter()
        classifier.predict_proba(batch)
        samples.append((perf_counter() - start) * 1000.0 / len(batch))
    return samples


def safetensors_parameters(path: Path) -> int:
    """Number of values in a .safetensors file, from its JSON header alone (no tensor is read).

    The format: an 8-byte little-endian header length, then a JSON object mapping each tensor's
    name to its dtype, shape and offsets (plus an optional `__metadata__`).
    """
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return sum(math.prod(spec["shape"]) for name, spec in header.items()
               if name != "__metadata__")


def model_size(model_dir: Path | str) -> dict[str, float]:
    """`size/mb`: bytes of the weight files (*.safetensors) / 1e6; `size/parameters`: values in
    them. Only the folder's top level counts (training checkpoints in sub-folders are not the
    model); NaN for both when it holds no .safetensors file. A saved model stores tied weights
    once, so shared tensors count once.
    """
    files = sorted(Path(model_dir).glob(WEIGHTS_GLOB))
    if not files:
        return {"size/mb": math.nan, "size/parameters": math.nan}
    return {
        "size/mb": sum(f.stat().st_size for f in files) / MB,
        "size/parameters": float(sum(safetensors_parameters(f) for f in files)),
    }


def _time_one(classifier: Predictor, text: str) -> float:
    start = perf_counter()
    classifier.predict_proba([text])
    return (perf_counter() - start) * 1000.0


def compare(candidate: Predictor, champion: Predictor | None, texts: Sequence[str], *,
            rounds: int = 3, max_examples: int = 64, warmup: int = 2,
            threads: int | None = 1) -> dict[str, float]:
    """Batch-1 latency of the candidate and the champion, timed interleaved in this process.

    Another process on the cores slows every call made while it runs and never speeds one up,
    so a single p95 measures the machine as much as the model (the same model measured 69-135 ms
    p95 in two busy workspaces). Two things here do not move with the load:
    - **the ratio**: each text is timed on both models back to back (which goes first
      alternates), so both see the same load; `latency/ratio_bs1` is the median over texts and
      rounds of candidate time / champion time;
    - **the fastest round**: the texts are timed `rounds` times; the p95 of the fastest round
      (`candidate/latency/best_p95_ms_bs1`) is the nearest to the quiet-machine figure, and the
      slowest round's (`..._worst_...`) shows how much the load moved it.
    Keys: `candidate/latency/{best,worst}_p95_ms_bs1`, the same for `champion/` and
    `latency/ratio_bs1` when there is a champion. All NaN without texts.
    """
    texts = [str(t) for t in list(texts)[:max_examples]]
    models = {"candidate": candidate} if champion is None else {"candidate": candidate,
                                                               "champion": champion}
    nan = math.nan
    out: dict[str, float] = {}
    if not texts:
        for name in models:
            out[f"{name}/latency/best_p95_ms_bs1"] = out[f"{name}/latency/worst_p95_ms_bs1"] = nan
        if champion is not None:
            out["latency/ratio_bs1"] = nan
        return out
    saved_threads = _set_threads(threads)
    try:
        for model in models.values():
            for i in range(warmup):
                model.predict_proba([texts[i % len(texts)]])
        per_round: dict[str, list[float]] = {name: [] for name in models}
        ratios: list[float] = []
        for r in range(rounds):
            times: dict[str, list[float]] = {name: [] for name in models}
            for i, text in enumerate(texts):
                order = list(models) if (i + r) % 2 == 0 else list(reversed(models))
                for name in order:
                    times[name].append(_time_one(models[name], text))
                if champion is not None and times["champion"][-1] > 0:
                    ratios.append(times["candidate"][-1] / times["champion"][-1])
            for name in models:
                per_round[name].append(float(np.percentile(times[name], 95)))
    finally:
        _set_threads(saved_threads)
    for name, p95s in per_round.items():
        out[f"{name}/latency/best_p95_ms_bs1"] = min(p95s)
        out[f"{name}/latency/worst_p95_ms_bs1"] = max(p95s)
    if champion is not None:
        out["latency/ratio_bs1"] = float(np.median(ratios)) if ratios else nan
    return out
