"""Numeric precision of training and prediction: `finetune.precision` (auto | fp32 | bf16).

bf16 here is autocast: the weights, the optimizer state and the saved model stay fp32; matmuls
and attention run in bf16 inside `torch.autocast`. Where the hardware has native bf16 (x86 CPUs
with `avx512_bf16` or `amx_bf16`, GPUs that report bf16) that is much faster; elsewhere torch
emulates it, slower than fp32, so `auto` picks fp32 there and an explicit `bf16` is refused.

What ran is one of `fp32`, `bf16` or (a GPU without bf16 under `auto`: ratchet's GPU behaviour
before this key existed) `fp16` with loss scaling.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ratchet.errors import ConfigError

REQUESTS = ("auto", "fp32", "bf16")
USED = ("fp32", "bf16", "fp16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
MODEL_CONFIG_KEY = "ratchet_precision"  # in a saved model's config.json: what it predicts in

log = logging.getLogger(__name__)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: torch's own probe (cpuinfo) joined with /proc/cpuinfo's `flags`
    line where there is one (Linux)."""
    flags: set[str] = set()
    try:
        import torch

        flags |= {k for k, v in torch.cpu.get_capabilities().items() if v is True}
    except (ImportError, AttributeError, RuntimeError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags |= set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    return frozenset(flags)


def cpu_has_bf16(flags: str | Iterable[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively. `flags`: a capability string such as
    /proc/cpuinfo's `flags` line (or its words); None reads this machine's."""
    if flags is None:
        have = cpu_flags()
    elif isinstance(flags, str):
        have = frozenset(flags.split())
    else:
        have = frozenset(flags)
    return bool(have & NATIVE_BF16_FLAGS)


def resolve(requested: str, device: Any = "cpu", *, flags: str | Iterable[str] | None = None,
            key: str = "finetune.precision") -> str:
    """The precision that will run on `device` for `requested` (auto | fp32 | bf16, or an already
    resolved fp16): bf16 under `auto` where the hardware has it, else fp32 (fp16 on a GPU without
    bf16). An explicit bf16 the hardware lacks is a `ConfigError` naming `key`. `flags` stands in
    for this CPU's feature flags (tests)."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    if requested not in (*REQUESTS, "fp16"):
        raise ConfigError(f"{key}: `{requested}` is not one of {', '.join(REQUESTS)}")
    if requested == "fp32":
        return "fp32"
    if kind == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16"
        if requested == "bf16":
            raise ConfigError(f"{key} is bf16, but this GPU has no bf16: set {key} to auto "
                              "(fp16 with loss scaling here) or fp32")
        return "fp16"
    if requested == "fp16":
        raise ConfigError(f"{key}: fp16 autocast is for GPUs; on the CPU use auto, bf16 or fp32")
    if cpu_has_bf16(flags):
        return "bf16"
    if requested == "bf16":
        raise ConfigError(
            f"{key} is bf16, but this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16): "
            f"torch would emulate it, slower than fp32; set {key} to auto (bf16 where the CPU has "
            "it, else fp32) or fp32")
    return "fp32"


def autocast(used: str, device: Any = "cpu"):
    """The context a forward pass runs in for a resolved precision (a no-op for fp32)."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    if used == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if used == "bf16" else torch.float16
    return torch.autocast(device_type=kind, dtype=dtype)


def for_model(config: Any, device: Any = "cpu", *, flags: str | Iterable[str] | None = None
              ) -> str:
    """The precision a saved classifier predicts in here: the one it was trained and evaluated
    in (its config's `ratchet_precision`; fp32 for models saved before the key existed) where
    this machine has it, else fp32 (logged: near-tie rows may then get another label than the
    gate saw)."""
    wanted = getattr(config, MODEL_CONFIG_KEY, None) or "fp32"
    if wanted == "fp32":
        return "fp32"
    try:
        return resolve(wanted, device, flags=flags, key=MODEL_CONFIG_KEY)
    except ConfigError:
        log.warning("this model was trained and evaluated in %s, which this machine lacks: it "
                    "predicts in fp32 here", wanted)
        return "fp32"
