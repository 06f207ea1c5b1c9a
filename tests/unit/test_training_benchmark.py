"""The training benchmark's pieces: the inputs, the test scores, the token meter and FLOP table
(tiny BERT), the matmul peak, the run order, the result assembly (means and sds over seeds, LoRA
chosen on val), and the expert Trainer grouping by length (tiny BERT, real steps)."""

from __future__ import annotations

import json

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


def test_prepare_inputs_writes_every_split_and_every_label(tmp_path):
    df = clinc_like()
    splits = {"train": df, "val": df.iloc[::2], "test": pd.concat([df, frame([("x", "new_lab",
                                                                               "home")])])}
    meta = training.prepare_inputs(splits, tmp_path)
    assert "new_lab" in meta["labels"] and meta["labels"] == sorted(meta["labels"])
    for split in training.SPLITS:
        assert len(pd.read_parquet(tmp_path / f"{split}.parquet")) == len(splits[split])
    assert json.loads((tmp_path / "meta.json").read_text()) == meta


def test_scores_count_all_rows_in_scope_rows_and_every_label_in_macro_f1():
    test = frame([("1", "a", "d1"), ("2", "a", "d1"), ("3", "b", "d2"), ("4", "oos", "oos")])
    pred = ["a", "b", "b", "a"]
    s = training.scores(test, pred, labels=["a", "b", "c", "oos"])
    assert s["test_accuracy"] == pytest.approx(2 / 4)
    assert s["test_inscope_accuracy"] == pytest.approx(2 / 3)
    # F1: a = 2*1/(2*1+1+1) = 0.5, b = 2/(2+1) = 2/3, c and oos = 0 (never right).
    assert s["test_macro_f1"] == pytest.approx((0.5 + 2 / 3) / 4)


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


def arm(samples_per_s, acc, seed=13, **more):
    return {"seed": seed, "samples_per_s": samples_per_s, "test_accuracy": acc, "wall_s": 100.0,
            **more}


MATMUL = {"best": 100.0, "peak": 200.0}


def seeds(*runs):
    return [arm(s, a, seed=13 + i, **m) for i, (s, a, m) in enumerate(runs)]


def test_assemble_gives_means_sds_ratios_and_the_targets():
    arms = {"baseline": seeds((10.0, 0.90, {"achieved_flops": 50.0}), (12.0, 0.91, {}),
                              (11.0, 0.91, {})),
            "expert": seeds((15.0, 0.905, {}), (17.0, 0.915, {}), (16.0, 0.91, {})),
            "full": seeds((20.0, 0.902, {"achieved_flops": 80.0}), (24.0, 0.91, {}),
                          (22.0, 0.906, {})),
            "lora": [arm(30.0, 0.80, lora_learning_rate=1e-3, val_macro_f1=0.70),
                     arm(33.0, 0.85, lora_learning_rate=2e-3, val_macro_f1=0.80)]}
    r = training.assemble(arms, MATMUL, {"config": {"epochs": 2}})
    assert {"baseline", "expert", "full", "lora", "matmul_peak_flops", "targets"} <= set(r)
    assert r["config"] == {"epochs": 2} and r["matmul_peak_flops"] == 200.0
    assert r["baseline"]["samples_per_s"] == pytest.approx(11.0)
    assert r["baseline"]["samples_per_s_sd"] == pytest.approx(1.0)
    assert r["expert"]["test_accuracy"] == pytest.approx(0.91)
    assert r["expert"]["test_accuracy_sd"] == pytest.approx(0.005)
    assert r["full"]["seeds"] == [13, 14, 15] and len(r["full"]["runs"]) == 3
    assert r["full_vs_baseline_speedup"] == pytest.approx(2.0)
    assert r["full_vs_expert_speedup"] == pytest.approx(22 / 16)
    assert r["full_vs_expert_accuracy_delta"] == pytest.approx(-0.004)
    assert r["full"]["achieved_vs_matmul_peak"] == pytest.approx(0.4)  # the mean over its runs
    t = r["targets"]
    assert t["better_trainer_arm"] == "expert" and t["accuracy_gap_to_better"] == pytest.approx(
        -0.004)
    assert t["met"] == {"full_vs_baseline_speedup": True, "full_vs_expert_speedup": True,
                        "accuracy_within_one_sd": True}  # 0.4 points; the expert's sd: 0.5
    assert r["lora"]["lora_learning_rate"] == 2e-3 and r["lora"]["test_accuracy"] == 0.85
    assert r["lora_vs_full_speedup"] == pytest.approx(1.5)


def test_lora_is_chosen_by_val_never_by_test():
    runs = [arm(30.0, 0.95, lora_learning_rate=1e-2, val_macro_f1=0.70),  # best on test
            arm(30.0, 0.85, lora_learning_rate=5e-3, val_macro_f1=0.80)]
    chosen = training.choose_lora(runs)
    assert chosen["lora_learning_rate"] == 5e-3 and chosen["test_accuracy"] == 0.85
    assert [c["test_accuracy"] for c in chosen["candidates"]] == [0.95, 0.85]


def test_accuracy_more_than_one_sd_below_the_better_trainer_misses_the_target():
    arms = {"baseline": seeds((10.0, 0.90, {}), (10.0, 0.91, {})),
            "expert": seeds((15.0, 0.92, {}), (15.0, 0.93, {})),
            "full": seeds((40.0, 0.91, {}), (40.0, 0.91, {}))}
    met = training.assemble(arms, MATMUL, {})["targets"]["met"]
    assert met["accuracy_within_one_sd"] is False  # 0.91 < 0.925 - 0.0071
    assert met["full_vs_expert_speedup"] is True


def test_runs_interleave_arms_by_seed_and_rotate_who_goes_first():
    plan = training.schedule((13, 14, 15), (1e-3, 2e-3, 5e-3, 1e-2))
    assert [p[0] for p in plan[:3]] == ["baseline", "expert", "full"]
    assert [p[0] for p in plan[3:6]] == ["expert", "full", "baseline"]
    assert [p[0] for p in plan[6:9]] == ["full", "baseline", "expert"]
    for i, seed in enumerate((13, 14, 15)):
        assert {p[1] for p in plan[3 * i : 3 * i + 3]} == {seed}
    assert plan[9:] == [("lora", 13, lr) for lr in (1e-3, 2e-3, 5e-3, 1e-2)]
    assert "lora" not in {p[0] for p in training.schedule((13,), ())}


def test_a_failed_run_is_kept_and_leaves_its_ratios_empty():
    arms = {"baseline": seeds((10.0, 0.9, {})), "expert": [{"seed": 13, "error": "boom"}],
            "full": seeds((16.0, 0.9, {})), "lora": [{"seed": 13, "error": "RuntimeError: x"}]}
    r = training.assemble(arms, MATMUL, {})
    assert r["expert"]["error"] == "boom" and r["full_vs_expert_speedup"] is None
    assert r["lora"]["error"] and r["lora_vs_full_speedup"] is None
    assert r["full_vs_baseline_speedup"] == pytest.approx(1.6)
    assert r["targets"]["met"]["accuracy_within_one_sd"] is None  # one seed: no sd


def test_expert_trainer_groups_by_length_and_plain_does_not(tmp_path):
    from benchmarks import hf_baseline
    from ratchet.precision import cpu_has_bf16
    from tests.conftest import save_tiny_classifier

    save_tiny_classifier(tmp_path / "tiny", ["a", "b"])
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(1, 40, size=320)]
    df = pd.DataFrame({"text": texts, "label": ["a", "b"] * 160})
    shares, stats = {}, {}
    for name, expert in (("plain", False), ("expert", True)):
        meter = training.TokenMeter()
        with meter.installed():
            stats[name] = hf_baseline.train(df, tmp_path / name, model_dir=tmp_path / "tiny",
                                            labels=["a", "b"], epochs=1.0, batch_size=8,
                                            max_length=48, expert=expert)
        shares[name] = meter.summary()["padding_share"]
    assert stats["expert"]["train_sampling_strategy"] == "group_by_length"
    assert stats["plain"]["train_sampling_strategy"] == "random"
    assert stats["expert"]["bf16"] is cpu_has_bf16() and stats["plain"]["bf16"] is False
    assert shares["expert"] < shares["plain"] / 2, shares


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
