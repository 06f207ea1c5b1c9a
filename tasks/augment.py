"""augment: seeded, label-preserving token-level copies of the training split."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from ratchet.config import AugmentConfig, Params
from ratchet.data import TEXT, write_parquet_atomic
from ratchet.runtime import write_json
from ratchet.stage import stage_main


def perturb(text: str, op: str, prob: float, rng: random.Random) -> str:
    """One operation over a text's words: random swaps or random deletions (at least one)."""
    words = text.split()
    if len(words) < 3:
        return text
    n = max(1, round(prob * len(words)))
    if op == "swap":
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        for _ in range(min(n, len(words) - 2)):
            words.pop(rng.randrange(len(words)))
    else:
        raise ValueError(f"unknown augmentation op {op!r}")
    return " ".join(words)


def augment_frame(train: pd.DataFrame, cfg: AugmentConfig) -> pd.DataFrame:
    """Originals plus `copies` augmented rows each; `augmented_from` names the source text."""
    rng = random.Random(cfg.seed)
    out = train.assign(augmented_from=pd.Series([None] * len(train), dtype="string"))
    if not cfg.enabled or cfg.copies == 0 or not cfg.ops:
        return out
    extra = []
    for row in train.itertuples(index=False):
        seen = {row.text}
        for _ in range(cfg.copies):
            new = perturb(row.text, rng.choice(cfg.ops), cfg.prob, rng)
            if new not in seen:
                seen.add(new)
                extra.append({**row._asdict(), TEXT: new, "augmented_from": row.text})
    if extra:
        out = pd.concat([out, pd.DataFrame(extra).astype({"augmented_from": "string"})],
                        ignore_index=True)
    return out


def run(params: Params, *, train: Path, out: Path, metrics: Path) -> dict:
    base = pd.read_parquet(train)
    aug = augment_frame(base, params.augment)
    write_parquet_atomic(aug, out)
    stats = {"rows_original": len(base), "rows_augmented": int(aug["augmented_from"].notna().sum())}
    write_json(metrics, stats)
    return stats


def main() -> None:
    stage_main("augment", __doc__, {
        "train": "prepared train split (parquet)",
        "out": "augmented train parquet to write",
        "metrics": "augment metrics JSON to write",
    }, run)


if __name__ == "__main__":
    main()
