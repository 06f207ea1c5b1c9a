"""The stream benchmark's batches (on the real CLINC150 files) and its scoring of decisions."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import stream

needs_data = pytest.mark.skipif(not stream.DATA.is_dir(), reason="CLINC150 not found")
N = 5


@pytest.fixture(scope="module")
def clinc():
    return stream.load_rows()


@pytest.fixture(scope="module")
def batches(clinc):
    return stream.make_batches(clinc, N)


@needs_data
def test_rows_leave_out_oos_and_repeated_texts(clinc):
    from ratchet.data import normalise

    assert "oos" not in set(clinc["label"])
    assert clinc["label"].nunique() == 150 and clinc["domain"].nunique() == 10
    assert not clinc["text"].map(normalise).duplicated().any()


@needs_data
def test_batches_are_disjoint_but_batch_5_repeats_batch_4(batches):
    assert [b.expected for b in batches] == [
        "promote", "promote", "reject", "either", "no new version", "promote"]
    assert [b.must for b in batches] == [True, True, True, False, True, True]
    texts = [set(b.frame["text"]) for b in batches]
    assert all(len(t) == len(b.frame) for t, b in zip(texts, batches, strict=True))
    for i in range(6):
        for j in range(i + 1, 6):
            if (i, j) != (3, 4):
                assert not texts[i] & texts[j], (i + 1, j + 1)
    assert batches[4].same_file_as == 4
    assert batches[4].frame.equals(batches[3].frame)
    assert batches[4].filename != batches[3].filename  # but the run sends batch 4's file


@needs_data
def test_domains_and_rows_per_intent(batches, clinc):
    domains = [set(b.frame["domain"]) for b in batches]
    assert [len(d) for d in domains] == [6, 2, 8, 8, 8, 1]
    assert not domains[0] & domains[1]
    assert domains[2] == domains[3] == domains[0] | domains[1]
    assert not domains[5] & (domains[0] | domains[1])
    intents = clinc.groupby("domain")["label"].nunique()
    for b, d in zip(batches, domains, strict=True):
        assert set(b.domains) == d
        assert len(b.frame) == N * int(intents[sorted(d)].sum())
        if not b.flipped.any():  # clean batches: every intent exactly N rows, true labels
            assert set(b.frame.groupby("label").size()) == {N}
            truth = clinc.set_index("text").loc[b.frame["text"], "label"].to_numpy()
            assert (truth == b.frame["label"].to_numpy()).all()


@needs_data
def test_half_the_noisy_batch_is_flipped_to_other_known_labels(batches, clinc):
    noisy = batches[2]
    known = set(batches[0].frame["label"]) | set(batches[1].frame["label"])
    truth = clinc.set_index("text").loc[noisy.frame["text"], "label"].to_numpy()
    changed = truth != noisy.frame["label"].to_numpy()
    assert changed.tolist() == noisy.flipped.tolist()
    assert noisy.flipped.sum() == round(0.5 * len(noisy.frame))
    assert set(noisy.frame["label"]) <= known


@needs_data
def test_batches_are_seeded(clinc, batches):
    again = stream.make_batches(clinc, N)
    other = stream.make_batches(clinc, N, seed=1)
    assert all(a.frame.equals(b.frame) for a, b in zip(again, batches, strict=True))
    assert not other[0].frame.equals(batches[0].frame)


@needs_data
def test_too_many_rows_per_intent_is_refused(clinc):
    with pytest.raises(ValueError, match="too few"):
        stream.make_batches(clinc, 60)  # three known-intent chunks of 60 > ~150 rows


def test_flip_labels_never_keeps_the_label():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 10, dtype=object)
    out, mask = stream.flip_labels(labels, ["a", "b", "c"], 0.5, rng)
    assert mask.sum() == 15
    assert (out[mask] != labels[mask]).all() and (out[~mask] == labels[~mask]).all()


@pytest.mark.parametrize(("expected", "decision", "right"), [
    ("promote", "promote", True),
    ("promote", "reject", False),
    ("reject", "reject", True),
    ("reject", "promote", False),
    ("either", "promote", None),
    ("either", "reject", None),
    ("no new version", "no new version", True),
    ("no new version", "reject", False),
    ("promote", "deferred", False),
])
def test_decisions_are_scored(expected, decision, right):
    assert stream.is_right(expected, decision) is right


@pytest.mark.parametrize(("expected", "promote", "right"), [
    ("promote", True, True), ("promote", False, False), ("reject", False, True),
    ("reject", True, False), ("no new version", False, True), ("no new version", True, False),
    ("either", True, None),
])
def test_baseline_rules_are_scored(expected, promote, right):
    assert stream.rule_is_right(expected, promote) is right


def test_unknown_expected_is_an_error():
    with pytest.raises(ValueError):
        stream.is_right("maybe", "promote")


def test_right_share_counts_the_must_batches_only():
    assert stream.right_share([True, False, None, True, True]) == 0.75
    assert stream.right_share([None]) is None


def test_decision_from_the_gate_record_and_the_registry():
    assert stream.decision_of({"decision": "promoted"}, 1, 2) == "promote"
    assert stream.decision_of({"decision": "rejected"}, 1, 2) == "reject"
    assert stream.decision_of({"decision": "deferred"}, 1, 2) == "deferred"
    # The last run's record is still on disk when nothing re-ran: the registry decides.
    assert stream.decision_of({"decision": "rejected"}, 2, 2) == "no new version"
    assert stream.decision_of({"decision": "promoted"}, 0, 1) == "promote"


def test_reading_the_run_output():
    log = ("12:00:01 | INFO | Flow run 'x' - stage validate: up to date, skipped\n"
           "12:00:09 | INFO | Flow run 'x' - stage prepare: 7.5s\n"
           "12:00:30 | INFO | Flow run 'x' - stage finetune: sweep of 2 trials, best {} (20.1s)\n")
    assert stream.stage_timings(log) == {"validate": 0.0, "prepare": 7.5, "finetune": 20.1}
    assert stream.version_count("   ratchet-classifier: 3 version(s)   \n") == 3
    assert stream.version_count("nothing") is None
    assert stream.batch_id_of("a.csv: 12 rows added as batch 0001-abc\n") == "0001-abc"
    assert stream.batch_id_of("a.csv: 12 rows already ingested as batch 0001-abc; nothing "
                              "changed") == "0001-abc"


def test_the_gate_record_counts_only_when_the_gate_ran():
    assert stream.gate_ran({"evaluate": 3.0, "gate": 12.5}, 0)
    assert not stream.gate_ran({"evaluate": 0.0, "gate": 0.0}, 0)  # previous run's record
    assert not stream.gate_ran({"gate": 12.5}, 1)  # failed run
    assert not stream.gate_ran({}, None)  # refused at ingest: no run
    assert stream.gate_ran({}, 0)


def test_noise_record_is_read_defensively():
    report = {"newest": "b2", "flagged": True, "summary": "",
              "batches": {"b1": {"rate": 0.02, "baseline": 0.02, "flagged": False},
                          "b2": {"rate": 0.41, "flagged": True}, "b3": {"baseline": 0.1}}}
    assert stream.noise_of(report, "b2") == (0.41, True)
    assert stream.noise_of(report, "b1") == (0.02, False)
    assert stream.noise_of(report, "b3") == (None, None)
    assert stream.noise_of(report, "b9") == (None, None)
    assert stream.noise_of(None, "b1") == (None, None)
    assert stream.noise_of({"batches": None}, "b1") == (None, None)


def test_baselines_on_an_eval_record():
    m = {"candidate/recent/macro_f1": 0.93, "champion/recent/macro_f1": 0.925}
    assert stream.baseline_rules(m, min_delta=0.01, floor=0.5) == {
        "naive": True, "mlflow_threshold": False}
    cold = {"candidate/recent/macro_f1": 0.4}  # no champion: MLflow's floor alone decides
    assert stream.baseline_rules(cold, min_delta=0.01, floor=0.5) == {
        "naive": True, "mlflow_threshold": False}
    assert stream.baseline_rules({}, min_delta=0.01, floor=0.5) is None


def test_skipped_without_the_data(monkeypatch, tmp_path):
    monkeypatch.setattr(stream, "DATA", tmp_path / "absent")
    assert "skipped" in stream.run()
