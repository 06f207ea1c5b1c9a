"""prepare: dedup kinds, conflict policies, and a reproducible, stable replay buffer."""

import pandas as pd
import pytest

from ratchet.config import PrepareConfig
from ratchet.data import BATCH, LABEL, TEXT
from ratchet.demo_data import demo_batches
from tasks.prepare import allocate, prepare_frame, replay_buffer


def frame(rows: list[tuple[str, str]], orders: list[int] | None = None) -> pd.DataFrame:
    orders = orders or [0] * len(rows)
    return pd.DataFrame({TEXT: [t for t, _ in rows], LABEL: [lab for _, lab in rows],
                         BATCH: [f"b{o}" for o in orders], "batch_order": orders})


def test_exact_and_normalised_duplicates_are_counted_apart_and_dropped():
    rows = frame([("Book a flight", "f"), ("Book a flight", "f"), ("book  A FLIGHT", "f"),
                  ("wake me up", "a")])
    out, stats = prepare_frame(rows, PrepareConfig())
    assert len(out) == 2
    assert stats["exact_duplicates"] == 1 and stats["normalised_duplicates"] == 1
    assert stats["duplicates_dropped"] == 2 and stats["conflicting_texts"] == 0


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest", {"lost card": "card", "hi there": "greet"}),
    ("majority", {"lost card": "block", "hi there": "greet"}),
    ("drop", {"hi there": "greet"}),
])
def test_conflict_policies(policy, expected):
    # `lost card` is labelled block, block, then card (the newest batch): the policies disagree.
    rows = frame([("lost card", "block"), ("Lost card", "block"), ("hi there", "greet"),
                  ("LOST CARD", "card")], orders=[0, 0, 0, 1])
    out, stats = prepare_frame(rows, PrepareConfig(conflicts=policy))
    got = {t.lower(): lab for t, lab in zip(out[TEXT], out[LABEL], strict=True)}
    assert got == expected
    assert stats["conflicting_texts"] == 1
    assert stats["conflict_rows_dropped"] == {"latest": 0, "majority": 1, "drop": 3}[policy]


def test_majority_tie_goes_to_the_latest_label():
    rows = frame([("lost card", "block"), ("lost card", "card")], orders=[0, 1])
    out, _ = prepare_frame(rows, PrepareConfig(conflicts="majority"))
    assert out[LABEL].tolist() == ["card"]


@pytest.mark.parametrize(("capacity", "total", "expected"), [
    ({"a": 10, "b": 10}, 6, {"a": 3, "b": 3}),
    ({"a": 1, "b": 10, "c": 10}, 9, {"a": 1, "b": 4, "c": 4}),
    ({"a": 2, "b": 3}, 100, {"a": 2, "b": 3}),
    ({"a": 5, "b": 5, "c": 5}, 7, {"a": 3, "b": 2, "c": 2}),
    ({"a": 0, "b": 4}, 3, {"a": 0, "b": 3}),
    ({"a": 4}, 0, {"a": 0}),
])
def test_allocate_water_fills(capacity, total, expected):
    assert allocate(capacity, total) == expected


def _prepared(n_batches: int) -> pd.DataFrame:
    frames = [b.frame for b in demo_batches(seed=3, scale=0.5)[:n_batches]]
    rows = pd.concat([f.assign(**{BATCH: f"b{i}", "batch_order": i}) for i, f in enumerate(frames)],
                     ignore_index=True)
    out, _ = prepare_frame(rows, PrepareConfig())
    return out[out["split"] == "train"].drop(columns="split")


def test_replay_buffer_is_reproducible_order_free_and_stratified():
    train = _prepared(2)
    a = replay_buffer(train, 120, "s")
    shuffled = replay_buffer(train.sample(frac=1, random_state=1), 120, "s")
    assert len(a) == 120 and a.equals(shuffled)
    assert not a.equals(replay_buffer(train, 120, "another salt"))
    per_label = a[LABEL].value_counts()
    available = train[LABEL].value_counts()
    # Even across labels, except labels with fewer rows than their share, which give all.
    full = per_label[per_label < per_label.max() - 1].index
    assert all(per_label[lab] == available[lab] for lab in full)
    assert per_label.max() - per_label[per_label.index.difference(full)].min() <= 1
    # Within a label, batches share the seats evenly where they can.
    for lab, part in a.groupby(LABEL):
        counts = part[BATCH].value_counts()
        caps = train[train[LABEL] == lab][BATCH].value_counts()
        assert all(counts.get(b, 0) == caps[b] or counts.get(b, 0) >= counts.max() - 1
                   for b in caps.index)


def test_replay_buffer_keeps_its_rows_when_a_batch_arrives():
    before = replay_buffer(_prepared(2), 150, "s")
    after = replay_buffer(_prepared(3), 150, "s")
    # Per stratum the kept rows are nested (bottom-k by a fixed priority): one side holds all of
    # the other, whichever way its quota moved.
    for (lab, batch), old in before.groupby([LABEL, BATCH]):
        new = set(after[(after[LABEL] == lab) & (after[BATCH] == batch)][TEXT])
        assert set(old[TEXT]) <= new or new <= set(old[TEXT])
    assert replay_buffer(_prepared(2), 0, "s").empty


def test_an_emptied_newest_batch_leaves_recent_empty_and_says_so():
    # Batch b2's only text contradicts b1's: `drop` removes both, so b2 has no row left.
    rows = frame([("hi there", "greet"), ("lost card", "block"), ("wake me up", "alarm"),
                  ("LOST CARD", "card")], orders=[0, 1, 1, 2])
    out, stats = prepare_frame(rows, PrepareConfig(conflicts="drop"))
    assert not (out["slice"] == "recent").any()  # b1 does not become recent
    assert set(out[BATCH]) == {"b0", "b1"}
    assert (stats["recent/batch"], stats["recent/rows_in"], stats["recent/rows"]) == ("b2", 1, 0)
