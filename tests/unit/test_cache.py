"""The prediction and embedding caches: a model computes a text once, storage is appended per
run (not rewritten), merged by size tier, bounded in models, and survives damage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ratchet import cache as cache_mod
from ratchet.cache import EmbeddingCache, PredictionCache, ShardStore, text_key


class Model:
    """A deterministic stand-in for a model's predict: counts the texts it is asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, texts: list[str]) -> tuple[list[str], list[float]]:
        self.asked += texts
        return [f"label-{len(t) % 3}" for t in texts], [len(t) / 100 for t in texts]


def test_a_run_appends_a_shard_of_its_new_rows_and_never_rewrites_the_old(tmp_path):
    cache, model = PredictionCache(tmp_path), Model()
    first = [f"text {i}" for i in range(30)]
    labels, scores, n = cache.predict("fp1", first, model)
    assert n == 30 and labels == model(first)[0]
    [shard] = ShardStore(tmp_path).shards("fp1")
    before = shard.stat().st_mtime_ns
    more = first + [f"new {i}" for i in range(5)]
    model.asked.clear()
    labels, scores, n = cache.predict("fp1", more, model)
    assert n == 5 and model.asked == more[30:]
    assert labels == Model()(more)[0] and np.allclose(scores, Model()(more)[1])
    shards = ShardStore(tmp_path).shards("fp1")
    assert len(shards) == 2 and shard in shards and shard.stat().st_mtime_ns == before
    assert len(pd.read_parquet(shards[-1])) == 5  # only the rows new to the model
    model.asked.clear()
    assert cache.predict("fp1", list(reversed(more)), model)[2] == 0 and not model.asked


def test_shards_merge_by_size_tier_so_few_files_and_few_rewrites(tmp_path, monkeypatch):
    writes: list[int] = []
    original = pd.DataFrame.to_parquet

    def counting(self, *args, **kwargs):
        writes.append(len(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", counting)
    cache, model = PredictionCache(tmp_path), Model()
    texts: list[str] = []
    for run in range(64):
        texts += [f"run {run} row {i}" for i in range(10)]
        assert cache.predict("fp", texts, model)[2] == 10
    shards = ShardStore(tmp_path).shards("fp")
    # 640 rows in at most FANOUT - 1 shards per size tier (4 tiers for 10..640 rows).
    assert len(shards) <= 4 * (cache_mod.FANOUT - 1)
    assert sum(len(pd.read_parquet(p)) for p in shards) == 640
    # Every row rewritten a few times (one per tier), where rewriting the whole table each
    # run wrote 10 + 20 + ... + 640 = 20,800 rows.
    assert sum(writes) <= 640 * 5
    model.asked.clear()
    assert cache.predict("fp", texts, model)[2] == 0 and not model.asked


def test_the_least_recently_used_models_go_beyond_max_models(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MAX_MODELS", 3)
    cache = PredictionCache(tmp_path)
    for i in range(3):
        cache.predict(f"fp{i}", ["a", "b"], Model())
    import os
    import time

    for i in range(3):  # fp0 oldest ... fp2 newest, a second apart
        os.utime(tmp_path / f"fp{i}", (time.time() - 30 + i, time.time() - 30 + i))
    cache.predict("fp0", ["a"], Model())  # read: fp0 is used again
    cache.predict("fp3", ["a", "b"], Model())  # a fourth model: the least recent one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp0", "fp2", "fp3"]


def test_a_cache_from_before_shards_is_read_and_moved_in(tmp_path):
    texts = ["book a flight", "play jazz"]
    pd.DataFrame({"key": [text_key(t) for t in texts], "label": ["travel", "music"],
                  "score": [0.9, 0.8]}).to_parquet(tmp_path / "fp.parquet")
    model = Model()
    labels, scores, n = PredictionCache(tmp_path).predict("fp", texts, model)
    assert (labels, scores.tolist(), n) == (["travel", "music"], [0.9, 0.8], 0)
    assert not model.asked and not (tmp_path / "fp.parquet").exists()
    assert len(ShardStore(tmp_path).shards("fp")) == 1


def test_a_damaged_shard_costs_only_time(tmp_path):
    cache, model = PredictionCache(tmp_path), Model()
    cache.predict("fp", ["a", "b"], model)
    cache.predict("fp", ["a", "b", "c"], model)
    newest = ShardStore(tmp_path).shards("fp")[-1]
    newest.write_bytes(b"not parquet")
    (tmp_path / "fp" / ".half-written.parquet.tmp").write_bytes(b"\0")
    model.asked.clear()
    labels, _, n = cache.predict("fp", ["a", "b", "c"], model)
    assert n == 1 and model.asked == ["c"] and labels == Model()(["a", "b", "c"])[0]


def test_keys_are_the_exact_text_the_model_saw():
    assert text_key("US") != text_key("us") != text_key("us ")


def test_embeddings_round_trip_exactly_and_are_computed_once(tmp_path):
    rng = np.random.default_rng(0)
    table = {f"t{i}": rng.standard_normal(8).astype(np.float32) for i in range(20)}
    asked: list[str] = []

    def compute(texts: list[str]) -> np.ndarray:
        asked.extend(texts)
        return np.stack([table[t] for t in texts])

    cache = EmbeddingCache(tmp_path)
    first = [f"t{i}" for i in range(12)] + ["t0"]  # a repeat is embedded once
    out, n = cache.embed("enc", first, compute)
    assert n == 12 and asked == first[:12]
    assert np.array_equal(out, np.stack([table[t] for t in first]))
    asked.clear()
    texts = [f"t{i}" for i in range(20)][::-1]
    out, n = cache.embed("enc", texts, compute)
    assert n == 8 and sorted(asked) == sorted(f"t{i}" for i in range(12, 20))
    assert np.array_equal(out, np.stack([table[t] for t in texts]))
    asked.clear()
    assert cache.embed("enc", texts, compute)[1] == 0 and not asked
    assert cache.embed("other-encoder", ["t1"], compute)[1] == 1  # keyed by encoder too


def test_no_root_keeps_nothing():
    model = Model()
    assert PredictionCache(None).predict("fp", ["a"], model)[2] == 1
    assert PredictionCache(None).predict("fp", ["a"], model)[2] == 1
    out, n = EmbeddingCache(None).embed("e", ["a", "b"], lambda t: np.ones((len(t), 2)))
    assert n == 2 and out.shape == (2, 2)


@pytest.mark.parametrize("bad", [np.ones((1, 2)), np.ones(3)])
def test_an_encoder_giving_the_wrong_shape_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="embeddings for 3 texts"):
        EmbeddingCache(tmp_path).embed("e", ["a", "b", "c"], lambda t: bad)
