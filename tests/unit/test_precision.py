"""finetune.precision: which precision runs where (a CPU without native bf16 is a capability
string), bf16 training of the tiny model for real steps, fp32 unchanged and repeatable, and the
saved model predicting in the precision it was trained and gated in."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ratchet import precision
from ratchet.errors import ConfigError
from tests.unit.test_training import data, frame, params, pretrain, pretrain_params, train, weights

__all__ = ["data"]  # the module fixture, shared with test_training

NO_BF16 = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni"  # AVX-512, but no bf16
WITH_BF16 = NO_BF16 + " avx512_bf16"
needs_bf16 = pytest.mark.skipif(not precision.cpu_has_bf16(),
                                reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")


def test_auto_is_bf16_only_where_the_cpu_has_it_and_fp32_is_always_fp32():
    assert precision.resolve("auto", "cpu", flags=WITH_BF16) == "bf16"
    assert precision.resolve("auto", "cpu", flags=NO_BF16) == "fp32"
    assert precision.resolve("auto", "cpu", flags="amx_tile amx_bf16") == "bf16"
    assert precision.resolve("bf16", "cpu", flags=WITH_BF16) == "bf16"
    for flags in (NO_BF16, WITH_BF16):
        assert precision.resolve("fp32", "cpu", flags=flags) == "fp32"


def test_bf16_on_a_cpu_without_it_is_one_clear_error():
    with pytest.raises(ConfigError) as err:
        precision.resolve("bf16", torch.device("cpu"), flags=NO_BF16)
    message = str(err.value)
    assert "\n" not in message
    assert "finetune.precision is bf16" in message and "avx512_bf16" in message
    assert "auto" in message and "fp32" in message  # what to set instead
    with pytest.raises(ConfigError, match="not one of"):
        precision.resolve("fp8", "cpu", flags=WITH_BF16)


def test_this_machine_reports_what_torch_and_the_kernel_see():
    import torch.cpu

    caps = torch.cpu.get_capabilities()
    if caps.get("avx512_bf16") or caps.get("amx_bf16"):
        assert precision.cpu_has_bf16()
    assert precision.cpu_has_bf16(precision.cpu_flags()) == precision.cpu_has_bf16()


def test_a_bf16_model_predicts_in_fp32_where_the_cpu_lacks_bf16(caplog):
    from transformers import BertConfig

    config = BertConfig()
    assert precision.for_model(config, flags=WITH_BF16) == "fp32"  # saved before the key existed
    setattr(config, precision.MODEL_CONFIG_KEY, "bf16")
    assert precision.for_model(config, flags=WITH_BF16) == "bf16"
    with caplog.at_level(logging.WARNING, logger="ratchet.precision"):
        assert precision.for_model(config, flags=NO_BF16) == "fp32"
    assert "predicts in fp32" in caplog.text


def test_fp32_training_repeats_bit_for_bit(data, tmp_path):
    p = params(epochs=2.0, precision="fp32", deterministic=True)
    a_stats = train(data, tmp_path / "a", p)
    train(data, tmp_path / "b", p)
    a, b = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a_stats["precision"] == "fp32"
    saved = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert saved[precision.MODEL_CONFIG_KEY] == "fp32"


@needs_bf16
def test_bf16_training_learns_keeps_fp32_weights_and_the_model_predicts_in_bf16(data, tmp_path):
    import pandas as pd

    from ratchet.data import LABEL, TEXT
    from ratchet.models import Classifier

    stats = train(data, tmp_path / "bf16", params(precision="bf16"))
    assert stats["precision"] == "bf16"
    curve = pd.read_csv(tmp_path / "bf16" / "curve.csv")
    assert curve["loss"].tail(5).mean() < 0.5 * curve["loss"].head(5).mean()
    assert stats["best_val_macro_f1"] > 0.8
    saved = weights(tmp_path / "bf16" / "model")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # master weights, saved as such
    fp32 = train(data, tmp_path / "fp32", params(precision="fp32"))
    other = weights(tmp_path / "fp32" / "model")
    assert any(not torch.equal(saved[k], other[k]) for k in saved)  # bf16 really ran
    assert fp32["precision"] == "fp32"

    clf = Classifier(tmp_path / "bf16" / "model")
    assert clf.precision == "bf16"
    val = frame(40, 1)
    labels, probs = clf.predict(val[TEXT].tolist())
    assert (pd.Series(labels) == val[LABEL]).mean() > 0.8
    exact = Classifier(tmp_path / "bf16" / "model", precision="fp32")
    assert exact.precision == "fp32"
    _, probs32 = exact.predict(val[TEXT].tolist())
    assert 0 < abs(probs - probs32).max() < 0.05  # the same model, rounded differently


@needs_bf16
def test_pretrain_trains_in_the_precision_finetune_uses(data, tmp_path):
    from ratchet.config import parse_params

    auto = pretrain(data, tmp_path / "auto", pretrain_params(max_steps=20, learning_rate=0.003))
    assert auto["precision"] == "bf16"
    assert auto["perplexity_after"] < auto["perplexity_before"]
    p = parse_params({"model": {"source": "tiny", "max_length": 32},
                      "pretrain": {"max_steps": 4, "batch_size": 16},
                      "finetune": {"precision": "fp32"}}, "test")
    assert pretrain(data, tmp_path / "fp32", p)["precision"] == "fp32"


def test_finetune_stage_fails_with_one_error_line_for_bad_precision(tmp_path: Path):
    from ratchet.config import parse_params

    with pytest.raises(ConfigError, match="precision"):
        parse_params({"finetune": {"precision": "fp16"}}, "test")
