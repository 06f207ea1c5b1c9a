"""The baseline of the training benchmark: a plain Hugging Face `Trainer` fine-tuning script.

Written the way a user would write it from the transformers docs: tokenize with `datasets.map`
(truncation only), `DataCollatorWithPadding` (each random batch of 32 padded to its longest
text), `AutoModelForSequenceClassification`, `TrainingArguments` + `Trainer`, no evaluation
during training, `save_model` at the end. Nothing here is tuned for speed; the thread count is
torch's default.

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
          seed: int = 13) -> dict:
    """Fine-tune `model_dir` on `train_df` (columns text, label) and save it to `out`.

    Returns the Trainer's own numbers: steps, training seconds (`trainer.train()` alone) and
    samples per second.
    """
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
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorWithPadding(tokenizer),
                          processing_class=tokenizer)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model(str(out))
    return {"steps": result.global_step, "train_seconds": seconds,
            "trainer_samples_per_s": result.metrics.get("train_samples_per_second")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="CSV with text,label columns")
    parser.add_argument("--model-dir", type=Path, required=True, help="pretrained HF directory")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--epochs", type=float, default=3.0)
    args = parser.parse_args(argv)
    df = pd.read_csv(args.train, dtype=str, keep_default_na=False)
    stats = train(df, args.out, model_dir=args.model_dir, labels=sorted(set(df["label"])),
                  epochs=args.epochs)
    print(stats)


if __name__ == "__main__":
    main()
