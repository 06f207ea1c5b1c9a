"""Stable splits: a function of the normalised text, stable across re-runs and new batches."""

import pandas as pd
import pytest

from ratchet.config import PrepareConfig
from ratchet.data import normalise, split_of, text_key
from ratchet.demo_data import demo_batches
from tasks.prepare import prepare_frame

CFG = PrepareConfig()


def _rows(frames):
    out = []
    for order, df in enumerate(frames):
        out.append(df.assign(batch_order=order, batch_id=f"b{order}"))
    return pd.concat(out, ignore_index=True)


@pytest.mark.parametrize(
    ("a", "b"), [("Book a flight", "  book   a FLIGHT "), ("café", "cafe\u0301"), ("x\ty", "X y")]
)
def test_normalisation_variants_share_a_split(a, b):
    assert normalise(a) == normalise(b)
    assert split_of(a, val_frac=0.15, test_frac=0.2, salt="s") == split_of(
        b, val_frac=0.15, test_frac=0.2, salt="s"
    )


def test_split_fractions_are_close_to_the_config():
    texts = [f"text number {i}" for i in range(20000)]
    splits = pd.Series([split_of(t, val_frac=0.15, test_frac=0.2, salt="s") for t in texts])
    share = splits.value_counts(normalize=True)
    assert abs(share["test"] - 0.2) < 0.015 and abs(share["val"] - 0.15) < 0.015


def test_salt_changes_the_assignment():
    texts = [f"text number {i}" for i in range(500)]
    a = [split_of(t, val_frac=0.15, test_frac=0.2, salt="a") for t in texts]
    b = [split_of(t, val_frac=0.15, test_frac=0.2, salt="b") for t in texts]
    assert a != b


def test_splits_are_stable_across_reruns_and_batch_additions():
    b1, b2, b3, _ = (b.frame for b in demo_batches(scale=0.3))
    first, _ = prepare_frame(_rows([b1]), CFG)
    again, _ = prepare_frame(_rows([b1]), CFG)
    later, _ = prepare_frame(_rows([b1, b2, b3]), CFG)
    assert first.equals(again)
    # Keyed by the text's identity: a later batch may repeat a text in another form (the
    # latest form is kept), which stays where the text was.
    key = first["text"].map(text_key)
    before = dict(zip(key, first["split"], strict=True))
    after = dict(zip(later["text"].map(text_key), later["split"], strict=True))
    assert all(after[t] == s for t, s in before.items())
    # test sets only grow
    assert set(key[first.split == "test"]) <= set(
        later.loc[later.split == "test", "text"].map(text_key)
    )


def test_no_text_in_two_splits_and_latest_label_wins():
    old = pd.DataFrame({"text": ["Pay my bill", "hello there"], "label": ["pay_bill", "greet"]})
    new = pd.DataFrame({"text": ["pay my  BILL", "fresh text"], "label": ["pay_bill2", "greet"]})
    rows, stats = prepare_frame(_rows([old, new]), CFG)
    norms = rows["text"].map(normalise)
    assert norms.is_unique
    assert stats["duplicates_dropped"] == 1 and stats["conflicting_texts"] == 1
    kept = rows[norms == "pay my bill"].iloc[0]
    assert kept["label"] == "pay_bill2" and kept["slice"] == "recent"
    assert rows.loc[rows.text == "hello there", "slice"].item() == "reference"
