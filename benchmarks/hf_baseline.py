"""The Hugging Face `Trainer` arms of the training benchmark: plain, and as an expert sets it up.

Plain (`expert=False`), the way a user writes it from the transformers docs: tokenize with
`datasets.map` (truncation only), `DataCollatorWithPadding` (each random batch of 32 padded to
its longest text), `AutoModelForSequenceClassification`, `TrainingArguments` + `Trainer`, no
evaluation during training, `save_model` at the end; the thread count is torch's default.

Expert (`expert=True`): the same script with what a performance-minded user switches on for
CPU training of short texts:
- `train_sampling_strategy="group_by_length"` (transformers 5's name for `group_by_length`):
  `LengthGroupedSampler` sorts mega-batches of 50 batches by length, so little padding;
- `bf16=True` where the CPU computes bf16 natively (`ratchet.precision.cpu_has_bf16`): accelerate's
  CPU autocast over fp32 master weights, as ratchet's `finetune.precision: auto` does;
- `torch.set_num_threads` to the cores this process may use (ratchet's `set_threads`);
- data loading in the main process (`dataloader_num_workers=0`: on 2 cores a worker process would
  take a core from the matmuls, and collating a tokenized batch takes microseconds) and
  `dataloader_pin_memory=False` (pinned memory only speeds host-to-GPU copies);
- the optimizer stays transformers 5's default, `adamw_torch_fused`.

    python -m benchmarks.hf_baseline --train train.csv --model-dir DIR --out OUT --epochs 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd


def train(train_df: pd.DataFrame, out: Path, *, model_dir: Path, labels: list[str],
          epochs: float, batch_size: int = 32, learning_rate: float = 3e-4,
          weight_decay: float = 0.01, warmup_ratio: float = 0.1, max_length: int = 64,
          seed: int = 13, expert: bool = False) -> dict:
    """Fine-tune `model_dir` on `train_df` (columns text, label) and save it to `out`; `expert`
    switches on length grouping, bf16 where the CPU has it, and ratchet's thread count.

    Returns the Trainer's own numbers: steps, training seconds (`trainer.train()` alone), samples
    per second, and the settings that differ between the arms.
    """
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    label2id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra: dict = {}
    bf16 = False
    if expert:
        from ratchet.models import set_threads
        from ratchet.precision import cpu_has_bf16

        set_threads()
        bf16 = cpu_has_bf16()
        extra = {"train_sampling_strategy": "group_by_length", "bf16": bf16,
                 "dataloader_num_workers": 0, "dataloader_pin_memory": False}

    def preprocess(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["labels"] = [label2id[label] for label in batch["label"]]
        return enc

    dataset = Dataset.from_pandas(train_df[["text", "label"]].reset_index(drop=True))
    dataset = dataset.map(preprocess, batched=True, remove_columns=["text", "label"])
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    with tempfile.TemporaryDirectory(prefix="hf-baseline-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=batch_size,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_ratio,  # transformers 5: a float below 1 is a ratio
            lr_scheduler_type="linear",
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            seed=seed,
            **extra,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(str(out))
    return {"steps": result.global_step, "train_seconds": seconds,
            "trainer_samples_per_s": result.metrics.get("train_samples_per_second"),
            "train_sampling_strategy": args.train_sampling_strategy, "bf16": bf16,
            "optim": str(args.optim), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="CSV with text,label columns")
    parser.add_argument("--model-dir", type=Path, required=True, help="pretrained HF directory")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--expert", action="store_true",
                        help="length grouping, bf16 where the CPU has it, every core")
    args = parser.parse_args(argv)
    df = pd.read_csv(args.train, dtype=str, keep_default_na=False)
    stats = train(df, args.out, model_dir=args.model_dir, labels=sorted(set(df["label"])),
                  epochs=args.epochs, expert=args.expert)
    print(stats)


if __name__ == "__main__":
    main()
