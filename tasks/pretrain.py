"""pretrain: continue masked-language-model training of the base model on the domain's texts."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pandas as pd

from ratchet.config import Params
from ratchet.data import TEXT
from ratchet.runtime import write_json
from ratchet.stage import stage_main


def perplexity(model, tok, texts: list[str], max_length: int, mlm_probability: float) -> float:
    """Masked-token perplexity with fixed masks (seeded), comparable before and after training."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    if not texts:
        return float("nan")
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=mlm_probability)
    model.eval()
    total, count = 0.0, 0
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            enc = tok(texts[start : start + 64], truncation=True, max_length=max_length)
            batch = collator([{"input_ids": ids} for ids in enc["input_ids"]])
            n = int((batch["labels"] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    torch.random.set_rng_state(state)
    model.train()
    return math.exp(total / count) if count else float("nan")


def run(params: Params, *, train: Path, val: Path, out: Path, metrics: Path) -> dict:
    import torch
    from transformers import DataCollatorForLanguageModeling

    from ratchet.models import load_base_mlm, set_threads
    from ratchet.training import Schedule, make_optimizer, progress

    set_threads()
    cfg, mcfg = params.pretrain, params.model
    model, tok = load_base_mlm(mcfg.source, mcfg.seed)
    texts = pd.read_parquet(train)[TEXT].tolist()
    val_texts = pd.read_parquet(val)[TEXT].tolist()
    stats: dict = {"enabled": int(cfg.enabled), "steps": 0, "texts": len(texts)}
    if cfg.enabled and cfg.max_steps > 0 and texts:
        stats["perplexity_before"] = perplexity(model, tok, val_texts, mcfg.max_length,
                                                cfg.mlm_probability)
        torch.manual_seed(mcfg.seed)
        rng = random.Random(mcfg.seed)
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=cfg.mlm_probability)
        opt, sched = make_optimizer(model, cfg.learning_rate, 0.01,
                                    Schedule(cfg.max_steps, cfg.max_steps // 10))
        model.train()
        losses = []
        with progress(cfg.max_steps, "pretrain (MLM)") as bar:
            for _ in range(cfg.max_steps):
                batch_texts = rng.sample(texts, min(cfg.batch_size, len(texts)))
                enc = tok(batch_texts, truncation=True, max_length=mcfg.max_length)
                batch = collator([{"input_ids": ids} for ids in enc["input_ids"]])
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
        stats.update(steps=cfg.max_steps, final_loss=sum(losses[-5:]) / len(losses[-5:]))
        stats["perplexity_after"] = perplexity(model, tok, val_texts, mcfg.max_length,
                                               cfg.mlm_probability)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_json(metrics, stats)
    return stats


def main() -> None:
    stage_main("pretrain", __doc__, {
        "train": "prepared train split (parquet); its texts are the MLM corpus",
        "val": "prepared val split (parquet); held-out perplexity",
        "out": "folder for the pretrained model",
        "metrics": "pretrain metrics JSON to write",
    }, run)


if __name__ == "__main__":
    main()
