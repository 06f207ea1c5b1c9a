"""The training benchmark's pure pieces: the continual split and replay sample, the test scores,
the token meter and FLOP table (tiny BERT), the matmul peak and the result assembly."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from benchmarks import training
from tests.conftest import tiny_classifier


def frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["text", "label", "domain"])


def clinc_like(per_label: int = 6) -> pd.DataFrame:
    """Three domains of two labels each, plus oos rows (domain `oos`, as in CLINC150)."""
    rows = [(f"{d}-{lab}-{i}", f"{d}_{lab}", d) for d in ("banking", "home", "work")
            for lab in ("a", "b") for i in range(per_label)]
    rows += [(f"oos-{i}", "oos", "oos") for i in range(4)]
    return frame(rows)


def test_split_domain_puts_only_the_new_domain_in_new_and_keeps_oos_old():
    df = clinc_like()
    old, new = training.split_domain(df, "work")
    assert set(new["domain"]) == {"work"} and len(new) == 12
    assert "work" not in set(old["domain"]) and "oos" in set(old["label"])
    assert len(old) + len(new) == len(df)


def test_replay_sample_spreads_rows_evenly_over_labels_and_is_seeded():
    old, _ = training.split_domain(clinc_like(per_label=10), "work")  # 5 labels, 44 rows
    sample = training.replay_sample(old, 12, seed=3)
    assert len(sample) == 12 and sample["text"].is_unique
    assert set(sample["text"]) <= set(old["text"])
    counts = Counter(sample["label"])
    assert len(counts) == 5 and max(counts.values()) - min(counts.values()) <= 1
    assert sample.equals(training.replay_sample(old, 12, seed=3))
    assert sample["text"].tolist() != training.replay_sample(old, 12, seed=4)["text"].tolist()
    # A label that runs out (oos has 4 rows) leaves the rest to the others, still no repeats.
    big = training.replay_sample(old, 40, seed=0)
    assert big["text"].is_unique and Counter(big["label"])["oos"] == 4
    assert len(training.replay_sample(old, 999, seed=0)) == len(old)


def test_prepare_inputs_writes_every_arm_input(tmp_path):
    df = clinc_like()
    splits = {"train": df, "val": df.iloc[::2], "test": pd.concat([df, frame([("x", "new_lab",
                                                                               "home")])])}
    meta = training.prepare_inputs(splits, tmp_path, new_domain="work", replay_mix=0.5, seed=0)
    assert meta["new_rows"] == 12 and meta["replay_rows"] == 6 and meta["old_rows"] == 28
    assert "new_lab" in meta["labels"] and meta["labels"] == sorted(meta["labels"])
    mixed = pd.read_parquet(tmp_path / "new_replay.parquet")
    assert (mixed["domain"] == "work").sum() == 12 and len(mixed) == 18
    for name in ("old", "old_val"):
        assert "work" not in set(pd.read_parquet(tmp_path / f"{name}.parquet")["domain"])
    assert json.loads((tmp_path / "meta.json").read_text()) == meta


def test_scores_count_all_rows_in_scope_rows_and_every_label_in_macro_f1():
    test = frame([("1", "a", "d1"), ("2", "a", "d1"), ("3", "b", "d2"), ("4", "oos", "oos")])
    pred = ["a", "b", "b", "a"]
    s = training.scores(test, pred, labels=["a", "b", "c", "oos"], new_domain="d2")
    assert s["test_accuracy"] == pytest.approx(2 / 4)
    assert s["test_inscope_accuracy"] == pytest.approx(2 / 3)
    # F1: a = 2*1/(2*1+1+1) = 0.5, b = 2/(2+1) = 2/3, c and oos = 0 (never right).
    assert s["test_macro_f1"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert s["test_accuracy_new_domain"] == 1.0 and s["test_accuracy_old_domains"] == 0.5
    assert "test_accuracy_new_domain" not in training.scores(test, pred, ["a", "b"])


def test_token_meter_records_training_batches_only_and_restores_the_model():
    import torch
    from transformers.models.bert import modeling_bert

    original = modeling_bert.BertModel.forward
    model, _ = tiny_classifier(["x", "y"])
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    mask = (ids != 0).long()
    meter = training.TokenMeter()
    with meter.installed():
        model.train()
        model(input_ids=ids, attention_mask=mask)
        embeds = model.get_input_embeddings()(ids[:1, :3])
        model(inputs_embeds=embeds, attention_mask=mask[:1, :3])  # ratchet's loop passes these
        model.eval()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
    assert modeling_bert.BertModel.forward is original
    assert meter.batches == [(2, 5), (1, 3)] and meter.lengths == [4, 3, 3]
    assert meter.eval_seconds > 0
    s = meter.summary()
    assert s["train_samples"] == 3 and s["padded_tokens_per_batch"] == pytest.approx(6.5)
    assert s["real_tokens_per_batch"] == pytest.approx(5.0)
    assert s["padding_share"] == pytest.approx(3 / 13)
    executed, useful = meter.flops({n: 10.0 * n for n in range(1, 6)})
    assert executed == pytest.approx(2 * 50 + 30) and useful == pytest.approx(40 + 30 + 30)
    assert training.TokenMeter().summary() == {"train_samples": None}


def test_flops_by_length_grow_about_linearly_with_the_row():
    model, _ = tiny_classifier(["x", "y"])
    table = training.flops_by_length(model, 16)
    assert sorted(table) == list(range(1, 17)) and table[1] > 0
    assert all(table[n + 1] > table[n] for n in range(1, 16))
    assert table[16] / table[8] == pytest.approx(2.0, rel=0.1)  # attention's square is small
    assert all(p.grad is None for p in model.parameters())


def test_matmul_peak_is_a_rate_and_restores_threads():
    import torch

    before = torch.get_num_threads()
    peak = training.matmul_peak(n=64, repeats=3, threads=1)
    assert peak["threads"] == 1 and torch.get_num_threads() == before
    assert 0 < peak["median"] <= peak["best"]


def arm(samples_per_s, acc, **more):
    return {"samples_per_s": samples_per_s, "test_accuracy": acc, "wall_s": 100.0, **more}


META = {"new_domain": "work", "new_rows": 10, "replay_rows": 10, "old_rows": 90,
        "replay_mix": 1.0}
MATMUL = {"best": 100.0, "peak": 200.0}


def test_assemble_gives_the_required_shape_and_ratios():
    arms = {"baseline": arm(10.0, 0.90, achieved_flops=50.0),
            "full": arm(16.0, 0.897, achieved_flops=80.0, train_samples=1000),
            "lora": arm(24.0, 0.88),
            "champion": arm(16.0, 0.80, train_samples=900),
            "replay": arm(16.0, 0.892, train_samples=300, wall_s=35.0)}
    r = training.assemble(arms, META, MATMUL, {"config": {"epochs": 2}})
    assert {"baseline", "full", "lora", "continual", "matmul_peak_flops"} <= set(r)
    assert r["matmul_peak_flops"] == 200.0 and r["config"] == {"epochs": 2}
    assert r["full_vs_baseline_speedup"] == pytest.approx(1.6)
    assert r["lora_vs_full_speedup"] == pytest.approx(1.5)
    assert r["full_vs_baseline_accuracy_delta"] == pytest.approx(-0.003)
    assert r["full"]["achieved_vs_matmul_peak"] == pytest.approx(0.4)
    c = r["continual"]
    assert c["compute_ratio_samples"] == pytest.approx(0.3)
    assert c["compute_ratio_wall"] == pytest.approx(0.35)
    assert c["accuracy_delta"] == pytest.approx(-0.005) and c["goal_met"] is True
    assert c["champion_on_old"]["train_samples"] == 900  # reported, not counted in B


@pytest.mark.parametrize("replay", [arm(16.0, 0.88, train_samples=300),  # 1.7 points worse
                                    arm(16.0, 0.90, train_samples=500)])  # 50% of the compute
def test_continual_goal_needs_both_accuracy_and_compute(replay):
    full = arm(16.0, 0.897, train_samples=1000)
    assert training.continual_summary(full, arm(1, 0.8), replay, META)["goal_met"] is False


def test_a_failed_arm_is_kept_and_leaves_its_ratios_empty():
    arms = {"baseline": arm(10.0, 0.9), "full": arm(16.0, 0.9, train_samples=1000),
            "lora": {"error": "RuntimeError: boom"}, "champion": {"error": "x"},
            "replay": {"error": "x"}}
    r = training.assemble(arms, META, MATMUL, {})
    assert r["lora"] == {"error": "RuntimeError: boom"}
    assert r["lora_vs_full_speedup"] is None and r["lora_vs_full_accuracy_delta"] is None
    assert r["continual"]["goal_met"] is None
    assert r["continual"]["champion_plus_replay"] == {"error": "x"}


def test_run_is_skipped_without_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "DATA", tmp_path)
    assert "skipped" in training.run()


def test_load_splits_limit_is_a_seeded_sample(tmp_path, monkeypatch):
    df = clinc_like()
    for split in training.SPLITS:
        df.to_csv(tmp_path / f"{split}.csv", index=False)
    monkeypatch.setattr(training, "DATA", tmp_path)
    a, b = training.load_splits(limit=10), training.load_splits(limit=10)
    assert len(a["train"]) == 10 and a["train"].equals(b["train"])
    assert len(training.load_splits()["test"]) == len(df)
    assert np.all(training.load_splits(limit=10, seed=1)["train"]["text"].isin(df["text"]))
