"""The training stages on the tiny model, for real steps: finetune's modes, FGM, class weights,
deterministic mode, label growth, resume after a kill; pretrain's masking, budgets and
continuation; both stages under torchrun (2 gloo processes) against 1. torch.compile is `slow`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ratchet.config import load_params, parse_params
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

    stats = train(data, tmp_path, params(mode="lora", lora_rank=4, lora_learning_rate=0.02))
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


def test_balanced_class_weights_keep_the_minority_labels(data, tmp_path):
    f = frame(400, 0)
    skew = pd.concat([f[f[LABEL] == "balance"].head(100),
                      f[f[LABEL] != "balance"].groupby(LABEL).head(10)])  # 100 : 10 : 10 : 10
    skew.to_parquet(tmp_path / "skew.parquet")
    plain = train(data, tmp_path / "plain", params(epochs=3.0), train=tmp_path / "skew.parquet")
    weighted = train(data, tmp_path / "weighted", params(epochs=3.0, class_weights="balanced"),
                     train=tmp_path / "skew.parquet")
    # Unweighted, every val row (10 per label) goes to the majority label: macro-F1 0.1.
    assert plain["best_val_macro_f1"] < 0.3
    assert weighted["best_val_macro_f1"] > plain["best_val_macro_f1"] + 0.4


def test_deterministic_mode_repeats_bit_for_bit_and_is_switched_off_after(data, tmp_path):
    p = params(epochs=2.0, deterministic=True, adversarial_epsilon=0.5)
    train(data, tmp_path / "a", p)
    train(data, tmp_path / "b", p)
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A process that trains again (a sweep's Dask worker) does not inherit the switch.
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow  # compiling the tiny model takes ~40 s on 2 cores
def test_compiled_training_follows_eager(data, tmp_path):
    eager = train(data, tmp_path / "eager", params(epochs=2.0))
    compiled = train(data, tmp_path / "compiled", params(epochs=2.0, compile=True))
    assert compiled["steps"] == eager["steps"]
    a, b = weights(tmp_path / "eager" / "model"), weights(tmp_path / "compiled" / "model")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-3, f"largest weight difference {worst}"


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


def test_continual_new_rows_are_the_recent_slice_never_the_previous_batch():
    """`new` is prepare's recent slice (the newest batch as ingested): a newest batch with no
    train row (dropped by prepare, or all in val/test) must not make the batch before it new."""
    from ratchet.errors import RatchetError

    old, prev = frame(100, 0, batch="0001-a"), frame(30, 1, batch="0002-b")
    train = pd.concat([old, prev]).assign(slice="reference")
    cfg = params(replay_mix=1.0).finetune
    with pytest.raises(RatchetError, match="newest batch has no row in the train split"):
        finetune.training_frame(train, old.assign(slice="reference"), cfg, continual=True,
                                seed=0)
    # With recent rows, replayed rows of the newest batch are not counted twice.
    new = frame(20, 2, batch="0003-c").assign(slice="recent")
    replay = pd.concat([old.assign(slice="reference"), new.head(10)])
    mixed, stats = finetune.training_frame(pd.concat([train, new]), replay, cfg,
                                           continual=True, seed=0)
    assert stats == {"train_rows": 40, "new_rows": 20, "replay_rows": 20, "new_batch": "0003-c"}
    assert (mixed[BATCH] == "0003-c").sum() == 20


def test_continual_new_rows_are_every_batch_the_champion_has_not_seen():
    """The champion was trained up to batch 1; batch 2's candidate was rejected: under auto
    (finetune-init.json's `champion_batch`) batch 2 is as new to it as batch 3, not replay."""
    from tasks.finetune import NothingNew

    old, rejected = frame(100, 0, batch="0001-a"), frame(30, 1, batch="0002-b")
    new = frame(20, 2, batch="0003-c").assign(slice="recent")
    train = pd.concat([old.assign(slice="reference"), rejected.assign(slice="reference"), new])
    replay = pd.concat([old, rejected.head(10)])
    cfg = params(replay_mix=1.0).finetune
    mixed, stats = finetune.training_frame(train, replay, cfg, continual=True, seed=0,
                                           since="0001-a")
    assert stats == {"train_rows": 100, "new_rows": 50, "replay_rows": 50,
                     "new_batch": "0003-c", "new_batches": 2}
    assert set(mixed[BATCH]) == {"0001-a", "0002-b", "0003-c"}
    assert (mixed[BATCH] == "0002-b").sum() == 30  # all of it, none counted twice from replay
    with pytest.raises(NothingNew, match="no train row is newer than batch 0003-c"):
        finetune.training_frame(train, replay, cfg, continual=True, seed=0, since="0003-c")


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


def two_runs(tmp_path: Path, names: tuple[str, str], epochs: float):
    """The environment, params file and folders of two runs of the stage to compare."""
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent),
           "OMP_NUM_THREADS": "1"}
    folders = [tmp_path / name for name in names]
    for d in folders:
        d.mkdir()
        (d / "init.json").write_text('{"init": "base"}')
    return env, write_params(tmp_path / "params.yaml", epochs=epochs), *folders


def kill_at_first_checkpoint(cmd: list[str], env: dict[str, str], out: Path) -> dict:
    """Start a stage, SIGKILL it once its first checkpoint (under out/ckpt) is written, and
    return that checkpoint; the stage has written no model."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "ckpt").glob("*/state.pt")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    # torchrun's workers run in sessions of their own: kill them by name, with their launcher.
    victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    assert not (out / "model").exists()
    return torch.load(next((out / "ckpt").glob("*/state.pt")), weights_only=False)


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(data, tmp_path):
    env, p, whole, killed = two_runs(tmp_path, ("whole", "killed"), epochs=4.0)
    run_in_process(data, whole, p)
    assert not list((whole / "ckpt").glob("*")), "a finished run removes its checkpoint"

    saved = kill_at_first_checkpoint(stage_cmd(data, killed, p), env, killed)
    assert 1 <= saved["state"]["epoch"] < 4

    subprocess.run(stage_cmd(data, killed, p), env=env, check=True, capture_output=True)
    stats = json.loads((killed / "metrics.json").read_text())
    assert stats["resumed_from_epoch"] >= 1 and stats["steps"] == 40
    a, b = weights(whole / "model"), weights(killed / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(whole / "curve.csv").equals(pd.read_csv(killed / "curve.csv"))


def test_a_checkpoint_made_with_another_replay_buffer_is_not_resumed(data, tmp_path):
    env, p, killed = two_runs(tmp_path, ("killed",), epochs=2.0)
    frame(20, 5).to_parquet(killed / "none.parquet")  # the replay buffer the stage is given
    kill_at_first_checkpoint(stage_cmd(data, killed, p), env, killed)
    frame(20, 6).to_parquet(killed / "none.parquet")  # prepare wrote another buffer since
    run_in_process(data, killed, p)
    assert json.loads((killed / "metrics.json").read_text())["resumed_from_epoch"] == 0


def test_shards_partition_a_batch_and_none_is_empty_while_there_is_a_row_per_rank():
    from ratchet.training import Dist

    for world in (1, 2, 3, 4):
        for n in range(0, 12):
            rows = list(range(100, 100 + n))
            shares = [Dist(rank, world).shard(rows) for rank in range(world)]
            assert sum(shares, []) == rows
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert n < world or all(shares)


def test_two_gloo_processes_match_one_with_the_same_global_batch(data, tmp_path):
    """161 rows in batches of 16: each epoch ends with a 1-row batch, so one rank has nothing to
    train on there and must still take part in the all-reduce."""
    odd = dict(data, train=tmp_path / "train-161.parquet")
    frame(161, 0).to_parquet(odd["train"])
    env, p, one, two = two_runs(tmp_path, ("one", "two"), epochs=2.0)
    # fp32: under bf16 autocast each shard's shapes round differently (~5e-3 on these weights).
    write_params(p, epochs=2.0, precision="fp32")
    run_in_process(odd, one, p)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    done = subprocess.run(torchrun + stage_cmd(odd, two, p)[1:], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s1 = json.loads((one / "metrics.json").read_text())
    s2 = json.loads((two / "metrics.json").read_text())
    assert s2["world_size"] == 2 and s1["steps"] == s2["steps"] == 22
    a, b = weights(one / "model"), weights(two / "model")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-3, f"largest weight difference {worst}"
    assert abs(s1["best_val_macro_f1"] - s2["best_val_macro_f1"]) < 0.05


@pytest.mark.slow
@pytest.mark.faults  # ~70 s on 2 cores; the one-process kill stays quick
def test_two_killed_gloo_processes_resume_to_the_same_weights_with_dropout_on(data, tmp_path):
    """Each rank's dropout draws its own masks: the checkpoint keeps every rank's generator."""
    from transformers import AutoConfig

    noisy = dict(data, pretrained=tmp_path / "dropout")
    shutil.copytree(data["pretrained"], noisy["pretrained"])
    config = AutoConfig.from_pretrained(noisy["pretrained"])
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.1
    config.save_pretrained(noisy["pretrained"])
    env, p, whole, killed = two_runs(tmp_path, ("whole", "killed"), epochs=4.0)

    def torchrun(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), *stage_cmd(noisy, out, p)[1:]]

    subprocess.run(torchrun(whole), env=env, check=True, capture_output=True, timeout=300)
    saved = kill_at_first_checkpoint(torchrun(killed), env, killed)
    assert 1 <= saved["state"]["epoch"] < 4 and len(saved["torch_rngs"]) == 2
    assert not torch.equal(saved["torch_rngs"][0][0], saved["torch_rngs"][1][0])
    subprocess.run(torchrun(killed), env=env, check=True, capture_output=True, timeout=300)
    assert json.loads((killed / "metrics.json").read_text())["resumed_from_epoch"] >= 1
    a, b = weights(whole / "model"), weights(killed / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- pretrain ------------------------------------------------------------------------------------


def pretrain_params(**overrides):
    pt = {"enabled": True, "max_steps": 12, "batch_size": 16, "learning_rate": 0.001,
          **overrides}  # enabled: true, as `auto` skips the tiny model's random MLM head
    return parse_params({"model": {"source": "tiny", "max_length": 32}, "pretrain": pt}, "test")


def pretrain(data, out: Path, p, corpus: Path | None = None) -> dict:
    from tasks import pretrain as stage

    return stage.run(p, train=data["train"], val=data["val"], corpus=corpus or out / "none",
                     out=out / "model", metrics=out / "metrics.json", curve=out / "curve.csv")


def test_pretrain_lowers_held_out_perplexity_with_whole_word_masks_and_a_corpus(data, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "extra.txt").write_text("my card was stolen yesterday\n\nwhat is the forecast\n")
    pd.DataFrame({TEXT: ["hello there", None]}).to_parquet(corpus / "more.parquet")
    (corpus / "README.md").write_text("not a corpus file")
    stats = pretrain(data, tmp_path, pretrain_params(whole_word_mask=True, max_steps=40,
                                                      learning_rate=0.003, eval_every=15), corpus)
    assert stats["corpus_texts"] == 3 and stats["texts"] == 160
    assert stats["steps"] == 40 and stats["stop_reason"] == "max_steps"
    assert stats["perplexity_after"] < stats["perplexity_before"]
    assert (tmp_path / "model" / "config.json").is_file()
    # The curve: loss and learning rate each step, perplexity where it was measured.
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert curve["step"].tolist() == list(range(1, 41)) and curve["loss"].notna().all()
    measured = curve.dropna(subset=["perplexity"])
    assert measured["step"].tolist() == [15, 30, 40]
    assert measured["perplexity"].iloc[-1] == pytest.approx(stats["perplexity_after"])
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_pretrain_under_two_gloo_processes_matches_one(data, tmp_path):
    """Every rank masks the same global batch and divides by its masked-token count, so two
    processes follow one. Both continue (`init: previous`) the fixture's encoder, whose dropout
    is off: dropout draws its masks per rank."""
    import shutil

    import yaml

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"model": {"source": "tiny", "max_length": 32},
                                 "pretrain": {"enabled": True, "max_steps": 8, "batch_size": 16,
                                              "init": "previous",
                                              "learning_rate": 0.003, "eval_every": 4},
                                 # the sharded math matches in fp32; bf16 rounds per shard shape
                                 "finetune": {"precision": "fp32"}}))
    for name in ("one", "two"):
        shutil.copytree(data["pretrained"], tmp_path / name / "model")
    one = pretrain(data, tmp_path / "one", load_params(p))
    assert one["init"] == "previous"
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent),
           "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "tasks.pretrain", "--train", str(data["train"]),
         "--val", str(data["val"]), "--corpus", str(tmp_path / "none"), "--out", str(two / "model"),
         "--metrics", str(two / "metrics.json"), "--curve", str(two / "curve.csv"),
         "--checkpoints", str(two / "ckpt"), "--params", str(p)],
        env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((two / "metrics.json").read_text())
    assert stats["steps"] == one["steps"] == 8
    assert stats["final_loss"] == pytest.approx(one["final_loss"], rel=1e-3)
    a, b = weights(tmp_path / "one" / "model"), weights(two / "model")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert stats["perplexity_after"] == pytest.approx(one["perplexity_after"], rel=1e-3)
    assert worst < 1e-4, f"largest weight difference {worst}"


@pytest.mark.slow
@pytest.mark.faults  # ~60 s on 2 cores; finetune's kill stays quick
def test_a_killed_pretrain_resumes_from_its_checkpoint_to_the_same_weights(data, tmp_path,
                                                                        monkeypatch):
    import yaml

    from tasks import pretrain as stage

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # this process threads like the stage process
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"model": {"source": "tiny", "max_length": 32},
                                 "pretrain": {"enabled": True, "max_steps": 40, "batch_size": 16,
                                              "learning_rate": 0.003, "eval_every": 10,
                                              "checkpoint_every": 5}}))
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    def paths(out: Path) -> dict[str, Path]:
        return {"train": data["train"], "val": data["val"], "corpus": tmp_path / "none",
                "out": out / "model", "metrics": out / "metrics.json",
                "curve": out / "curve.csv", "checkpoints": out / "ckpt"}

    stage.run(load_params(p), **paths(whole))
    assert not list((whole / "ckpt").glob("*")), "a finished run removes its checkpoint"
    cmd = [sys.executable, "-m", "tasks.pretrain", "--params", str(p)]
    cmd += [a for k, v in paths(killed).items() for a in (f"--{k}", str(v))]
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent)}
    saved = kill_at_first_checkpoint(cmd, env, killed)
    assert 5 <= saved["step"] < 40

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    stats = json.loads((killed / "metrics.json").read_text())
    assert stats["resumed_from_step"] >= 5 and stats["steps"] == 40
    a, b = weights(whole / "model"), weights(killed / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(whole / "curve.csv").equals(pd.read_csv(killed / "curve.csv"))
    assert not list((killed / "ckpt").glob("*"))


def test_whole_word_masking_masks_every_piece_of_a_word():
    from ratchet.models import load_tokenizer
    from tasks.pretrain import Masker, encode

    tok = load_tokenizer("tiny")
    text = "unbelievably photosynthesis antidisestablishmentarianism"
    examples = encode(tok, [text] * 64, 32, True)
    batch = Masker(tok, 0.3, seed=0)(examples)
    assert (batch["labels"] != -100).any()
    pieces = tok(text)["input_ids"]
    words = [tok.convert_ids_to_tokens(i) for i in pieces]
    starts = [i for i, w in enumerate(words) if not w.startswith("##")]
    for row in batch["labels"]:
        masked = (row[: len(pieces)] != -100).tolist()
        for a, b in zip(starts, starts[1:] + [len(pieces)], strict=True):
            assert len(set(masked[a:b])) == 1  # a word is masked whole or not at all


def test_pretrain_tokenizes_only_the_rows_its_batches_draw(data, tmp_path, monkeypatch):
    """A 20,000-row corpus and 3,000 held-out rows, 3 steps of 16: the real tokenizer sees at
    most 48 training rows, drawn from the whole file, and each of 32 held-out rows once."""
    from tasks import pretrain as stage

    seen: list[str] = []
    real = stage.encode

    def counting(tok, texts, max_length, whole_word):
        seen.extend(texts)
        return real(tok, texts, max_length, whole_word)

    monkeypatch.setattr(stage, "encode", counting)
    big = pd.DataFrame({TEXT: [f"row {i} of the corpus" for i in range(20_000)]})
    big.to_parquet(tmp_path / "train.parquet")
    held = pd.DataFrame({TEXT: [f"held out {i}" for i in range(3_000)]})
    held.to_parquet(tmp_path / "val.parquet")
    p = pretrain_params(max_steps=3, eval_texts=32)
    stats = stage.run(p, train=tmp_path / "train.parquet", val=tmp_path / "val.parquet",
                      corpus=tmp_path / "none", out=tmp_path / "model",
                      metrics=tmp_path / "metrics.json")
    trained = [t for t in seen if t.startswith("row ")]
    evaluated = [t for t in seen if t.startswith("held out ")]
    assert stats["steps"] == 3 and len(trained) <= 48
    assert stats["tokenized_rows"] == len(set(trained)) == len(trained)
    assert max(int(t.split()[1]) for t in trained) >= 10_000  # sampled, not the file's head
    assert len(evaluated) == len(set(evaluated)) == stats["eval_rows"] == 32
    assert max(int(t.split()[2]) for t in evaluated) >= 32
    assert json.loads((tmp_path / "metrics.json").read_text())["tokenized_rows"] == len(trained)


def test_the_loss_on_masked_positions_only_is_the_models_own_mlm_loss():
    """The vocabulary projection runs on masked positions only: the same loss as the model's
    (which projects every position), and its gradient."""
    import contextlib

    from ratchet.models import load_base_mlm
    from tasks.pretrain import Masker, encode, masked_loss_sum

    model, tok = load_base_mlm("tiny", 0)
    model.eval()  # no dropout: both passes see the same network
    batch = Masker(tok, 0.3, seed=0)(encode(tok, [f"text number {i} of a few" for i in range(8)],
                                            32, False))
    n = int((batch["labels"] != -100).sum())
    ours = masked_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                           contextlib.nullcontext()) / n
    ours.backward()
    grad = model.bert.encoder.layer[0].output.dense.weight.grad.clone()
    model.zero_grad()
    theirs = model(**batch).loss
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    assert torch.allclose(grad, model.bert.encoder.layer[0].output.dense.weight.grad, atol=1e-6)


def test_the_head_warmup_trains_the_mlm_head_alone_then_the_whole_model(data, tmp_path):
    from safetensors.torch import load_file

    from tasks.pretrain import phase_multipliers

    head, encoder = phase_multipliers(10, 20)
    assert [encoder(i) for i in range(10)] == [0.0] * 10 and encoder(12) > 0
    assert head(0) == 0.0 and head(1) == 1.0 and head(9) < head(5) < 1.0
    assert head(12, 0.1) == pytest.approx(0.1 * encoder(12))
    base = weights(data["pretrained"])
    start = tmp_path / "only_head" / "model"
    shutil.copytree(data["pretrained"], start)  # `init: previous` starts from the fixture's
    only_head = pretrain(data, tmp_path / "only_head", pretrain_params(
        init="previous", head_warmup_steps=15, max_steps=0, head_learning_rate=0.01))
    after = load_file(start / "model.safetensors")
    assert only_head["steps"] == only_head["head_steps"] == 15
    assert only_head["perplexity_after"] < only_head["perplexity_before"]
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved and all(k.startswith("cls.") for k in moved), sorted(moved)
    shutil.copytree(data["pretrained"], tmp_path / "both" / "model")
    both = pretrain(data, tmp_path / "both", pretrain_params(
        init="previous", head_warmup_steps=5, max_steps=5, head_learning_rate=0.01))
    after = load_file(tmp_path / "both" / "model" / "model.safetensors")
    assert both["steps"] == 10 and both["head_steps"] == 5
    assert not torch.equal(base["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])
    lr = pd.read_csv(tmp_path / "both" / "curve.csv")["lr"].tolist()
    assert min(lr[:4]) > 0.001 >= max(lr[5:])  # the head's rate, then the model's


def test_pretrain_stops_early_and_on_its_time_budget(data, tmp_path):
    early = pretrain(data, tmp_path / "early", pretrain_params(
        max_steps=200, eval_every=2, patience=1, learning_rate=0.5))
    assert early["steps"] < 200 and "did not improve" in early["stop_reason"]
    timed = pretrain(data, tmp_path / "timed", pretrain_params(max_steps=100000,
                                                               max_seconds=1.0))
    assert timed["steps"] < 100000 and "time budget" in timed["stop_reason"]


def test_pretrain_disabled_passes_the_base_model_on(data, tmp_path):
    stats = pretrain(data, tmp_path, pretrain_params(enabled=False))
    assert stats["steps"] == 0 and stats["skipped"] == "pretrain.enabled is false"
    assert pd.read_csv(tmp_path / "curve.csv").empty  # DVC's plot exists, with no steps
    assert (tmp_path / "curve.png").is_file()
    assert "perplexity_after" not in stats and (tmp_path / "model" / "config.json").is_file()


def test_pretrain_auto_trains_only_a_model_whose_mlm_head_is_trained(data, tmp_path):
    """`auto` skips a random head (tiny; the packaged MiniLM, which ships none) and says why,
    trains a source folder that holds every head weight, and, with `init: previous`, an output
    whose head it trained before."""
    from ratchet.config import parse_params
    from tasks.pretrain import start_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("my card was stolen\n")
    skipped = pretrain(data, tmp_path / "tiny", pretrain_params(enabled="auto"), corpus)
    assert skipped["trained"] == skipped["steps"] == skipped["corpus_texts"] == 0
    assert skipped["mlm_head"] == "untrained" and "auto" in skipped["skipped"]
    assert (tmp_path / "tiny" / "model" / "config.json").is_file()
    minilm = parse_params({"model": {"source": "minilm-l6"}}, "test")
    assert start_model(minilm, tmp_path / "none")[3] is False  # no cls.* weights shipped
    shipped = parse_params({"model": {"source": str(data["pretrained"]), "max_length": 32},
                            "pretrain": {"enabled": "auto", "max_steps": 3, "batch_size": 16}},
                           "test")
    ran = pretrain(data, tmp_path / "shipped", shipped)
    assert ran["mlm_head"] == "trained" and ran["trained"] == 1 and ran["steps"] == 3
    again = pretrain(data, tmp_path / "tiny", pretrain_params(enabled="auto", init="previous"))
    assert again["init"] == "previous" and again["trained"] == 0  # the head it kept is random
    first = pretrain(data, tmp_path / "cont", pretrain_params(max_steps=3))
    assert first["trained"] == 1
    cont = pretrain(data, tmp_path / "cont", pretrain_params(enabled="auto", init="previous",
                                                             max_steps=3))
    assert cont["init"] == "previous" and cont["mlm_head"] == "trained" and cont["steps"] == 3


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), (True, True), (False, False),
                                           ("false", False)])
def test_pretrain_enabled_is_true_false_or_auto(value, parsed):
    assert pretrain_params(enabled=value).pretrain.enabled == parsed


def test_pretrain_enabled_refuses_other_words():
    from ratchet.errors import ConfigError

    with pytest.raises(ConfigError, match="pretrain.enabled"):
        pretrain_params(enabled="sometimes")


def test_pretrain_can_continue_from_the_previous_encoder(data, tmp_path):
    from safetensors.torch import load_file

    first = pretrain(data, tmp_path, pretrain_params(max_steps=5))
    before = load_file(tmp_path / "model" / "model.safetensors")
    second = pretrain(data, tmp_path, pretrain_params(max_steps=5, init="previous"))
    assert first["init"] == "base" and second["init"] == "previous"
    assert second["perplexity_before"] == pytest.approx(first["perplexity_after"], rel=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in
               load_file(tmp_path / "model" / "model.safetensors").items())


# --- continual mode through the registry --------------------------------------------------------


def test_continual_mode_starts_from_the_registered_champion_and_grows_its_head(data, tmp_path,
                                                                              monkeypatch):
    """The champion (a real registered pyfunc) knows 3 labels; the new batch brings a 4th."""
    from ratchet.registry import connect, log_candidate
    from tests.conftest import save_tiny_classifier

    monkeypatch.chdir(tmp_path)
    p = params(init="champion", epochs=3.0, replay_mix=1.0)
    old_labels = LABELS[:3]
    champion_dir = tmp_path / "champion"
    champ = save_tiny_classifier(champion_dir, old_labels, seed=3, max_length=32)
    connect(p.registry, tmp_path)
    _, version = log_candidate(champion_dir, name=p.registry.model_name, params={}, metrics={},
                               artifacts=[], run_tags={"fingerprint": "champ"})
    (tmp_path / "init.json").write_text(json.dumps(
        {"init": "champion", "name": p.registry.model_name, "version": version}))
    old = frame(120, 0, labels=old_labels, batch="0001-a")
    new = frame(40, 1, labels=LABELS, batch="0002-b")
    pd.concat([old, new]).to_parquet(tmp_path / "train.parquet")
    old.to_parquet(tmp_path / "replay.parquet")

    stats = train(data, tmp_path / "out", p, train=tmp_path / "train.parquet",
                  init=tmp_path / "init.json", replay=tmp_path / "replay.parquet")
    assert stats["init"] == "continual" and stats["init_from"] == f"champion v{version}"
    assert stats["init_reason"].startswith("finetune.init: champion (always continual)")
    assert stats["added_labels"] == ["weather"] and stats["labels"] == 4
    assert stats["new_rows"] == 40 and stats["replay_rows"] == 40 and stats["train_rows"] == 80
    from transformers import AutoModelForSequenceClassification

    grown = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert [grown.config.id2label[i] for i in range(4)] == LABELS
    # It continued from the champion's encoder, not from the pretrained one.
    start = champ.bert.embeddings.position_embeddings.weight
    moved = grown.bert.embeddings.position_embeddings.weight
    pretrained = weights(data["pretrained"])["bert.embeddings.position_embeddings.weight"]
    assert (moved - start).abs().mean() < (moved - pretrained).abs().mean()


def test_continual_mode_without_a_champion_trains_from_the_base(data, tmp_path):
    (tmp_path / "init.json").write_text('{"init": "champion", "name": null, "version": null}')
    stats = train(data, tmp_path, params(init="champion", epochs=1.0),
                  init=tmp_path / "init.json")
    assert stats["init"] == "full" and stats["init_from"] == "base"
    assert stats["init_reason"] == "there is no champion yet" and stats["train_rows"] == 160


def _registered_champion(p, tmp_path: Path, labels: list[str]) -> str:
    from ratchet.registry import connect, log_candidate
    from tests.conftest import save_tiny_classifier

    save_tiny_classifier(tmp_path / "champion", labels, seed=3, max_length=32)
    connect(p.registry, tmp_path)
    return log_candidate(tmp_path / "champion", name=p.registry.model_name, params={},
                         metrics={}, artifacts=[], run_tags={"fingerprint": "champ"})[1]


def _auto_plan(p, version: str, **facts) -> str:
    return json.dumps({"init": "auto", "plan": "continual", "name": p.registry.model_name,
                       "version": version, "batch": "0002-b", "full_every": 5,
                       "batches_since_full": 1, "last_full": "0001-a",
                       "champion_batch": "0001-a", **facts})


def test_auto_continues_from_the_champion_on_a_routine_batch_and_says_why(data, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = params(init="auto", epochs=1.0, replay_mix=1.0)
    version = _registered_champion(p, tmp_path, LABELS)
    (tmp_path / "init.json").write_text(_auto_plan(p, version))
    old, new = frame(120, 0, batch="0001-a"), frame(40, 1, batch="0002-b")
    pd.concat([old, new]).to_parquet(tmp_path / "train.parquet")
    old.to_parquet(tmp_path / "replay.parquet")
    stats = train(data, tmp_path / "out", p, train=tmp_path / "train.parquet",
                  init=tmp_path / "init.json", replay=tmp_path / "replay.parquet")
    assert stats["init"] == "continual" and stats["init_from"] == f"champion v{version}"
    assert stats["init_reason"].startswith("a routine batch: 1 batch(es) since the last full")
    assert stats["batch"] == "0002-b" and stats["train_rows"] == 80  # new + replay, not all
    # Made under full_every 5; a `dvc exp run -S finetune.full_every=1` (no refresh) is obeyed.
    again = train(data, tmp_path / "again", params(init="auto", epochs=1.0, full_every=1),
                  train=tmp_path / "train.parquet", init=tmp_path / "init.json",
                  replay=tmp_path / "replay.parquet")
    assert again["init"] == "full" and again["train_rows"] == 160
    assert again["init_reason"].endswith("finetune.full_every is 1")


def test_auto_with_nothing_new_to_the_champion_retrains_from_base(data, tmp_path, monkeypatch):
    """The champion was trained on batch 2 already (say prepare dropped every new row): auto
    does what the default did before it, a full retrain, instead of failing the run."""
    monkeypatch.chdir(tmp_path)
    p = params(init="auto", epochs=1.0)
    version = _registered_champion(p, tmp_path, LABELS)
    (tmp_path / "init.json").write_text(_auto_plan(p, version, champion_batch="0002-b"))
    pd.concat([frame(120, 0, batch="0001-a"), frame(40, 1, batch="0002-b")]).to_parquet(
        tmp_path / "train.parquet")
    stats = train(data, tmp_path / "out", p, train=tmp_path / "train.parquet",
                  init=tmp_path / "init.json")
    assert stats["init"] == "full" and stats["init_reason"].startswith("nothing new")
    assert stats["train_rows"] == 160 and stats["init_from"] == "base"


def test_auto_retrains_from_base_when_the_champion_lacks_a_label(data, tmp_path, monkeypatch):
    """The plan said continual (say a `dvc exp run -S data.labels=...` added a label after the
    refresh): the champion's head has no output for `weather`, so auto retrains from base."""
    monkeypatch.chdir(tmp_path)
    p = params(init="auto", epochs=1.0)
    version = _registered_champion(p, tmp_path, LABELS[:3])
    (tmp_path / "init.json").write_text(_auto_plan(p, version))
    stats = train(data, tmp_path / "out", p, init=tmp_path / "init.json")
    assert stats["init"] == "full" and stats["init_from"] == "base"
    assert "the label set grew: 1 label(s)" in stats["init_reason"]
    assert "weather" in stats["init_reason"] and stats["added_labels"] == []
