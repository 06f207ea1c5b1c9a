"""The finetune stage on the tiny model, for real steps: modes, FGM, label growth, resume after a
kill, and 2 processes under torchrun (gloo) against 1."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ratchet.config import parse_params
from ratchet.data import BATCH, LABEL, TEXT
from ratchet.training import length_grouped_batches
from tasks import finetune

LABELS = ["balance", "card_lost", "greeting", "weather"]
WORDS = {
    "balance": ["balance", "money", "account", "funds", "checking"],
    "card_lost": ["card", "lost", "stolen", "missing", "wallet"],
    "greeting": ["hello", "hi", "morning", "hey", "greetings"],
    "weather": ["rain", "sunny", "forecast", "weather", "cold"],
}


def frame(n: int, seed: int, labels=LABELS, batch: str = "0001-a") -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(WORDS.get(label, [label, "new", "thing", "please"]), 3)
        filler = rng.sample(["please", "now", "my", "the", "about", "what", "is", "tell me"],
                            rng.randint(0, 6))
        rows.append({TEXT: " ".join(words + filler), LABEL: label, BATCH: batch})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny encoder (dropout off: runs compare exactly) and train/val splits."""
    from ratchet.models import load_base_mlm

    root = tmp_path_factory.mktemp("finetune")
    model, tok = load_base_mlm("tiny", 0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "pretrained")
    tok.save_pretrained(root / "pretrained")
    frame(160, 0).to_parquet(root / "train.parquet")
    frame(40, 1).to_parquet(root / "val.parquet")
    return {"root": root, "pretrained": root / "pretrained", "train": root / "train.parquet",
            "val": root / "val.parquet"}


def params(**finetune_overrides):
    ft = {"epochs": 6.0, "batch_size": 16, "learning_rate": 0.005, "threads": 1,
          "patience": 0, **finetune_overrides}
    return parse_params({"model": {"source": "tiny", "max_length": 32}, "finetune": ft}, "test")


def train(data, out: Path, p=None, **kw) -> dict:
    return finetune.run(p or params(), train=kw.pop("train", data["train"]), val=data["val"],
                        pretrained=data["pretrained"], out=out / "model",
                        metrics=out / "metrics.json", curve=out / "curve.csv", **kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_full_finetuning_learns_and_reports(data, tmp_path):
    stats = train(data, tmp_path)
    assert stats["best_val_macro_f1"] > 0.9
    assert stats["steps"] == 60 and stats["epochs"] == 6 and stats["samples"] == 960
    assert 0 < stats["padding_efficiency"] <= 1 and stats["peak_rss_mb"] > 50
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve["step"]) == list(range(1, 61))
    assert curve["val_macro_f1"].notna().sum() == 6
    assert curve["loss"].iloc[-5:].mean() < curve["loss"].iloc[:5].mean()
    assert (tmp_path / "curve.png").stat().st_size > 5000
    assert json.loads((tmp_path / "metrics.json").read_text())["mode"] == "full"


def test_lora_trains_adapters_only_and_saves_merged_weights(data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    stats = train(data, tmp_path, params(mode="lora", lora_rank=4, learning_rate=0.02))
    assert stats["trainable_params"] < stats["total_params"] / 2
    saved = weights(tmp_path / "model")
    assert not [k for k in saved if "lora" in k]  # merged: serving needs no peft
    base = weights(data["pretrained"]) if (data["pretrained"] / "model.safetensors").exists() \
        else {}
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(saved[key], base.get(key, saved[key] + 1))  # the adapter is merged in
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert model.config.id2label[0] == "balance"
    assert stats["best_val_macro_f1"] > 0.5


def test_fgm_adds_an_adversarial_pass_that_changes_the_result(data, tmp_path):
    plain = train(data, tmp_path / "plain", params(epochs=1.0))
    adv = train(data, tmp_path / "adv", params(epochs=1.0, adversarial_epsilon=1.0))
    assert plain["steps"] == adv["steps"]
    a, b = weights(tmp_path / "plain" / "model"), weights(tmp_path / "adv" / "model")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_keeps_the_best_epoch(data, tmp_path):
    stats = train(data, tmp_path, params(epochs=8.0, patience=1, learning_rate=0.05))
    assert stats["stopped_early"] and stats["epochs"] < 8
    assert stats["best_epoch"] == stats["epochs"] - 1


def test_grow_head_keeps_the_old_rows(data):
    from tests.conftest import tiny_classifier

    model, _ = tiny_classifier(["a", "c"])
    old = model.classifier.weight.detach().clone()
    added = finetune.grow_head(model, ["a", "c"], ["a", "b", "c"])
    assert added == ["b"] and model.config.num_labels == 3
    assert torch.equal(model.classifier.weight[0], old[0])
    assert torch.equal(model.classifier.weight[2], old[1])
    assert model.config.label2id == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(Exception, match="lacks"):
        finetune.grow_head(model, ["a", "b", "c"], ["a", "b"])


def test_continual_training_mixes_replay_into_the_newest_batch():
    old, new = frame(100, 0, batch="0001-a"), frame(20, 1, batch="0002-b")
    cfg = params(replay_mix=2.0).finetune
    mixed, stats = finetune.training_frame(pd.concat([old, new]), old, cfg, continual=True,
                                           seed=0)
    assert stats == {"train_rows": 60, "new_rows": 20, "replay_rows": 40, "new_batch": "0002-b"}
    assert (mixed[BATCH] == "0002-b").sum() == 20
    everything, _ = finetune.training_frame(pd.concat([old, new]), old, cfg, continual=False,
                                            seed=0)
    assert len(everything) == 120


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(1000)]
    batches = length_grouped_batches(lengths, 32, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    plain = [shuffled[i : i + 32] for i in range(0, 1000, 32)]
    assert padded(batches) < 0.7 * padded(plain)


def stage_cmd(data, out: Path, params_file: Path) -> list[str]:
    return [sys.executable, "-m", "tasks.finetune", "--train", str(data["train"]),
            "--val", str(data["val"]), "--pretrained", str(data["pretrained"]),
            "--init", str(out / "init.json"), "--replay", str(out / "none.parquet"),
            "--checkpoints", str(out / "ckpt"), "--out", str(out / "model"),
            "--metrics", str(out / "metrics.json"), "--curve", str(out / "curve.csv"),
            "--params", str(params_file)]


def write_params(path: Path, **finetune_overrides) -> Path:
    import yaml

    ft = {"epochs": 6.0, "batch_size": 16, "learning_rate": 0.005, "threads": 1,
          "patience": 0, **finetune_overrides}
    path.write_text(yaml.safe_dump({"model": {"source": "tiny", "max_length": 32},
                                    "finetune": ft}))
    return path


def run_in_process(data, out: Path, params_file: Path) -> None:
    """The stage as its command line would run it, in this process (saves an interpreter)."""
    from ratchet.config import load_params

    finetune.run(load_params(params_file), train=data["train"], val=data["val"],
                 pretrained=data["pretrained"], init=out / "init.json",
                 replay=out / "none.parquet", checkpoints=out / "ckpt", out=out / "model",
                 metrics=out / "metrics.json", curve=out / "curve.csv")


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent)}
    p = write_params(tmp_path / "params.yaml", epochs=4.0)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for d in (whole, killed):
        d.mkdir()
        (d / "init.json").write_text('{"init": "base"}')
    run_in_process(data, whole, p)
    assert not list((whole / "ckpt").glob("*")), "a finished run removes its checkpoint"

    proc = subprocess.Popen(stage_cmd(data, killed, p), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "ckpt").glob("*/state.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()
    saved = torch.load(next((killed / "ckpt").glob("*/state.pt")), weights_only=False)
    assert 1 <= saved["state"]["epoch"] < 4

    subprocess.run(stage_cmd(data, killed, p), env=env, check=True, capture_output=True)
    stats = json.loads((killed / "metrics.json").read_text())
    assert stats["resumed_from_epoch"] >= 1 and stats["steps"] == 40
    a, b = weights(whole / "model"), weights(killed / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(whole / "curve.csv").equals(pd.read_csv(killed / "curve.csv"))


def test_two_gloo_processes_match_one_with_the_same_global_batch(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent),
           "OMP_NUM_THREADS": "1"}
    p = write_params(tmp_path / "params.yaml", epochs=2.0)
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        (d / "init.json").write_text('{"init": "base"}')
    run_in_process(data, one, p)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    done = subprocess.run(torchrun + stage_cmd(data, two, p)[1:], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    s1 = json.loads((one / "metrics.json").read_text())
    s2 = json.loads((two / "metrics.json").read_text())
    assert s2["world_size"] == 2 and s1["steps"] == s2["steps"] == 20
    a, b = weights(one / "model"), weights(two / "model")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-3, f"largest weight difference {worst}"
    assert abs(s1["best_val_macro_f1"] - s2["best_val_macro_f1"]) < 0.05


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
