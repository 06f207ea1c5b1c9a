"""Latency per example at batch 1 and 32, and model size read from safetensors headers."""

import math

import numpy as np
import pytest

from ratchet import latency
from tests.conftest import tiny_classifier

KEYS = {"latency/p50_ms_bs1", "latency/p95_ms_bs1", "latency/p50_ms_bs32", "latency/p95_ms_bs32"}
TEXTS = ["book a flight to paris", "what is my balance", "hi", "cancel my order please",
         "play some jazz music in the kitchen"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeClassifier:
    """Takes 10 ms per call plus 1 ms per text on a fake clock, and records the batches."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.batch_size = 64
        self.calls: list[tuple[int, int]] = []  # (texts passed, batch_size at the time)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        self.calls.append((len(texts), self.batch_size))
        self.clock.now += (10 + len(texts)) / 1000
        return np.zeros((len(texts), 2))


@pytest.fixture
def fake(monkeypatch) -> FakeClassifier:
    clock = FakeClock()
    monkeypatch.setattr(latency, "perf_counter", clock)
    return FakeClassifier(clock)


def test_times_are_per_example_and_warmup_is_not_counted(fake):
    out = latency.measure(fake, [f"text {i}" for i in range(40)], warmup=3)
    assert set(out) == KEYS
    assert out["latency/p50_ms_bs1"] == pytest.approx(11.0)
    assert out["latency/p95_ms_bs1"] == pytest.approx(11.0)
    # A batch of 32 takes 10 + 32 ms: 42 / 32 per example, not 42.
    assert out["latency/p50_ms_bs32"] == pytest.approx(42 / 32)
    # 40 texts at batch 1: 3 warm-up calls + 40; at batch 32: 3 + 2 full batches.
    assert fake.calls == [(1, 1)] * 43 + [(32, 32)] * 5
    assert fake.batch_size == 64  # restored


def test_fewer_texts_than_the_batch_size_still_fill_the_batch(fake):
    out = latency.measure(fake, TEXTS[:3], batch_sizes=(32,), warmup=0)
    assert fake.calls == [(32, 32)]
    assert out == {"latency/p50_ms_bs32": pytest.approx(42 / 32),
                   "latency/p95_ms_bs32": pytest.approx(42 / 32)}


def test_max_examples_caps_the_texts_timed(fake):
    latency.measure(fake, [f"t{i}" for i in range(100)], batch_sizes=(1,), max_examples=10,
                    warmup=0)
    assert len(fake.calls) == 10


def test_no_texts_gives_nan(fake):
    out = latency.measure(fake, [])
    assert set(out) == KEYS
    assert all(math.isnan(v) for v in out.values())
    assert fake.calls == []


def tiny_classifier_model():
    return tiny_classifier(["a", "b", "c"])


def test_latency_of_a_tiny_model():
    from ratchet.models import Classifier

    model, tok = tiny_classifier_model()
    clf = Classifier(model=model, tokenizer=tok, batch_size=8)
    out = latency.measure(clf, TEXTS)
    assert set(out) == KEYS
    assert all(v > 0 for v in out.values())
    for bs in (1, 32):
        assert out[f"latency/p95_ms_bs{bs}"] >= out[f"latency/p50_ms_bs{bs}"]
    assert clf.batch_size == 8


def test_model_size_of_a_saved_tiny_model(tmp_path):
    from safetensors import safe_open

    model, tok = tiny_classifier_model()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with safe_open(str(weights), framework="numpy") as fh:
        stored = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    out = latency.model_size(tmp_path)
    assert set(out) == {"size/mb", "size/parameters"}
    assert out["size/parameters"] == stored == sum(p.numel() for p in model.parameters())
    assert out["size/mb"] == pytest.approx(weights.stat().st_size / 1e6)


def test_model_size_adds_up_shards_and_ignores_sub_folders(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float16)},
              str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "np"})
    save_file({"c": np.zeros((2, 2, 2), np.float32)},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "checkpoint-10").mkdir()
    save_file({"old": np.zeros(1000, np.float32)},
              str(tmp_path / "checkpoint-10" / "model.safetensors"))
    out = latency.model_size(tmp_path)
    assert out["size/parameters"] == 12 + 5 + 8
    shards = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert out["size/mb"] == pytest.approx(shards / 1e6)


def test_model_size_without_weights_is_nan(tmp_path):
    assert all(math.isnan(v) for v in latency.model_size(tmp_path).values())


class Named(FakeClassifier):
    """A FakeClassifier that also logs its name into a shared call log."""

    def __init__(self, clock: FakeClock, name: str, log: list, per_call: float) -> None:
        super().__init__(clock)
        self.name, self.log, self.per_call = name, log, per_call

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        self.log.append(self.name)
        self.clock.now += self.per_call / 1000
        return np.zeros((len(texts), 2))


def test_compare_times_both_models_back_to_back_and_judges_the_ratio(fake):
    log: list[str] = []
    cand = Named(fake.clock, "candidate", log, per_call=20.0)
    champ = Named(fake.clock, "champion", log, per_call=10.0)
    out = latency.compare(cand, champ, TEXTS, rounds=2, warmup=1)
    timed = log[2:]  # one warm-up call each first
    assert len(timed) == 2 * 2 * len(TEXTS)
    # Each text goes to both models in a row, and which goes first alternates.
    pairs = [tuple(timed[i : i + 2]) for i in range(0, len(timed), 2)]
    assert all(set(p) == {"candidate", "champion"} for p in pairs)
    assert pairs[0] != pairs[1]
    assert out["latency/ratio_bs1"] == pytest.approx(2.0)
    assert out["candidate/latency/best_p95_ms_bs1"] == pytest.approx(20.0)
    assert out["champion/latency/best_p95_ms_bs1"] == pytest.approx(10.0)


def test_compare_reports_the_fastest_and_the_slowest_round(fake):
    calls = {"n": 0}

    class Bursty(FakeClassifier):
        def predict_proba(self, texts):  # the first round (after 2 warm-ups) is under load
            calls["n"] += 1
            self.clock.now += (300 if calls["n"] <= 2 + len(TEXTS) else 5) / 1000
            return np.zeros((len(texts), 2))

    out = latency.compare(Bursty(fake.clock), None, TEXTS, rounds=3)
    assert out["candidate/latency/best_p95_ms_bs1"] == pytest.approx(5.0)
    assert out["candidate/latency/worst_p95_ms_bs1"] == pytest.approx(300.0)
    assert "latency/ratio_bs1" not in out


def test_compare_without_texts_is_nan(fake):
    out = latency.compare(fake, fake, [])
    assert math.isnan(out["latency/ratio_bs1"]) and math.isnan(
        out["candidate/latency/best_p95_ms_bs1"])
