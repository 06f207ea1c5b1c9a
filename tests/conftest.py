"""Test-wide environment: telemetry off, offline hub, and every tool's state in temp folders."""

import os
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="ratchet-tests-"))
# Set before any test module imports prefect, mlflow or dvc: they read these at import time.
os.environ.update(
    {
        "PREFECT_HOME": str(_STATE / "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DVC_SITE_CACHE_DIR": str(_STATE / "dvc-site-cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        # Tests run on two xdist workers: one thread per process keeps the 2 cores from being
        # oversubscribed (stage subprocesses inherit this).
        "OMP_NUM_THREADS": "1",
        # The retrain flow's I/O retries: once, at once (a refused commit should fail fast).
        "RATCHET_IO_RETRY_DELAYS": "0",
    }
)
from ratchet.runtime import setup  # noqa: E402

setup()

# Settings under which the tiny random-init BERT learns the synthetic intents in seconds.
TINY = {
    # enabled: true keeps the stage in the story (`auto` would skip the tiny model's random head)
    "pretrain": {"enabled": True, "max_steps": 10},
    # The tiny model's word-embedding table is random, so its "synonyms" are random words
    # (unit tests cover the lexical ops with the packaged MiniLM table and toy tables).
    "augment": {"ops": ["swap", "delete"]},
    "finetune": {"epochs": 6.0, "learning_rate": 0.005, "batch_size": 32},
    "evaluate": {"bootstrap_resamples": 1000},
    # A tiny random-init model trained for seconds is neither typo-robust nor right on every
    # probe; the behavioural checks' failing paths are table-tested in tests/unit/test_gate.py.
    "gate": {"max_regression": 0.05, "min_invariance": 0.5, "min_probe_accuracy": 0.0},
}
REPO = Path(__file__).resolve().parent.parent


def tiny_classifier(labels: list[str] | None = None, *, seed: int = 0,
                    max_length: int | None = None):
    """A random-init tiny BERT classifier and the MiniLM tokenizer (no download): (model, tok)."""
    import torch
    from transformers import BertForSequenceClassification

    from ratchet.models import load_tokenizer, tiny_config

    tok = load_tokenizer("tiny")
    config = tiny_config(len(tok))
    if labels is not None:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {lab: i for i, lab in enumerate(labels)}
    if max_length is not None:
        config.ratchet_max_length = max_length
    torch.manual_seed(seed)
    return BertForSequenceClassification(config), tok


def save_tiny_classifier(path: Path, labels: list[str] | None = None, *, seed: int = 0,
                         max_length: int | None = None):
    """`tiny_classifier` saved like a fine-tune (weights, config, tokenizer); returns the model."""
    model, tok = tiny_classifier(labels, seed=seed, max_length=max_length)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model
