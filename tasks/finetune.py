"""finetune: train the candidate classifier from the pretrained encoder (full fine-tuning)."""

from __future__ import annotations

import csv
import random
import shutil
import time
from pathlib import Path

import pandas as pd

from ratchet.config import Params
from ratchet.data import LABEL, TEXT
from ratchet.runtime import write_json
from ratchet.stage import stage_main


def run(params: Params, *, train: Path, val: Path, pretrained: Path, out: Path, metrics: Path,
        curve: Path) -> dict:
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ratchet.models import Classifier, set_threads
    from ratchet.stats import macro_f1
    from ratchet.training import Schedule, epoch_batches, make_optimizer, progress, steps_for

    set_threads()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    cfg, mcfg = params.finetune, params.model
    train_df, val_df = pd.read_parquet(train), pd.read_parquet(val)
    labels = sorted(set(params.data.labels) | set(train_df[LABEL]))
    label2id = {lab: i for i, lab in enumerate(labels)}
    torch.manual_seed(mcfg.seed)
    tok = AutoTokenizer.from_pretrained(pretrained)
    model = AutoModelForSequenceClassification.from_pretrained(
        pretrained, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    model.config.ratchet_max_length = mcfg.max_length
    texts, y = train_df[TEXT].tolist(), [label2id[x] for x in train_df[LABEL]]
    total = steps_for(len(texts), cfg.batch_size, cfg.epochs)
    opt, sched = make_optimizer(model, cfg.learning_rate, cfg.weight_decay,
                                Schedule(total, int(total * cfg.warmup_ratio)))
    rng = random.Random(mcfg.seed)
    rows, best, best_state, step, epoch = [], -1.0, None, 0, 0
    start = time.perf_counter()
    model.train()
    with progress(total, "finetune") as bar:
        while step < total:
            epoch += 1
            for idx in epoch_batches(len(texts), cfg.batch_size, rng):
                if step >= total:
                    break
                enc = tok([texts[i] for i in idx], truncation=True, max_length=mcfg.max_length,
                          padding=True, return_tensors="pt")
                loss = model(**enc, labels=torch.tensor([y[i] for i in idx])).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                rows.append({"step": step, "epoch": epoch, "loss": float(loss),
                             "lr": sched.get_last_lr()[0]})
                bar.set_postfix(epoch=epoch, loss=f"{float(loss):.3f}")
                bar.update()
            # Keep the epoch with the best validation macro-F1 (early stopping on val).
            preds, _ = Classifier(model=model, tokenizer=tok,
                                  max_length=mcfg.max_length).predict(val_df[TEXT].tolist())
            score = macro_f1(val_df[LABEL].tolist(), preds)
            rows[-1]["val_macro_f1"] = score
            if score > best or best_state is None:
                best, best_state = score, copy.deepcopy(model.state_dict())
            model.train()
    model.load_state_dict(best_state)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    curve.parent.mkdir(parents=True, exist_ok=True)
    with open(curve, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "epoch", "loss", "lr", "val_macro_f1"])
        writer.writeheader()
        writer.writerows(rows)
    stats = {"steps": step, "epochs": epoch, "train_rows": len(texts), "labels": len(labels),
             "best_val_macro_f1": best, "train_seconds": time.perf_counter() - start,
             "samples_per_s": step * cfg.batch_size / (time.perf_counter() - start)}
    write_json(metrics, stats)
    return stats


def main() -> None:
    stage_main("finetune", __doc__, {
        "train": "augmented train split (parquet)",
        "val": "prepared val split (parquet), for early stopping",
        "pretrained": "folder of the pretrained encoder",
        "out": "folder for the candidate model",
        "metrics": "finetune metrics JSON to write",
        "curve": "training curve CSV to write (DVC plot)",
    }, run)


if __name__ == "__main__":
    main()
