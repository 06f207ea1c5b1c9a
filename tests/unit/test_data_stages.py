"""augment and drift: seeded and label-preserving; drift found where it is and not elsewhere."""

import pandas as pd
import pytest

from ratchet.config import AugmentConfig, DriftConfig
from ratchet.demo_data import NEW_DOMAIN, OLD_DOMAINS, demo_batches, make_rows
from tasks.augment import augment_frame, perturb
from tasks.drift import drift_stats


def test_augment_is_seeded_label_preserving_with_provenance():
    train = demo_batches(scale=0.1)[0].frame
    a = augment_frame(train, AugmentConfig(copies=2, seed=1))
    b = augment_frame(train, AugmentConfig(copies=2, seed=1))
    c = augment_frame(train, AugmentConfig(copies=2, seed=2))
    assert a.equals(b) and not a.equals(c)
    aug = a[a.augmented_from.notna()]
    assert len(aug) > len(train)
    source_label = dict(zip(train.text, train.label, strict=True))
    assert all(source_label[s] == lab for s, lab in zip(aug.augmented_from, aug.label, strict=True))
    assert (aug.text != aug.augmented_from).all()
    assert (
        a[a.augmented_from.isna()]
        .drop(columns="augmented_from")
        .reset_index(drop=True)
        .equals(train.reset_index(drop=True))
    )


def test_augment_disabled_returns_originals():
    train = demo_batches(scale=0.1)[0].frame
    assert len(augment_frame(train, AugmentConfig(enabled=False))) == len(train)


@pytest.mark.parametrize("op", ["swap", "delete"])
def test_perturb_keeps_words_from_the_source(op):
    import random

    text = "please book a flight to paris on friday"
    out = perturb(text, op, 0.3, random.Random(0))
    assert out != text and set(out.split()) <= set(text.split())


def test_drift_found_for_a_new_domain_and_not_for_the_same_source():
    import random

    rng = random.Random(0)
    seen: set[str] = set()
    ref = make_rows(rng, OLD_DOMAINS, 400, seen)
    same = make_rows(rng, OLD_DOMAINS, 200, seen)
    shifted = pd.concat(
        [make_rows(rng, [NEW_DOMAIN], 100, seen), make_rows(rng, OLD_DOMAINS, 100, seen)]
    )
    cfg = DriftConfig(alpha=0.01)
    quiet, loud = drift_stats(ref, same, cfg), drift_stats(ref, shifted, cfg)
    assert not quiet["drifted"] and quiet["label_p"] > 0.01
    assert loud["drifted"] and loud["label_p"] < 1e-6 and len(loud["new_labels"]) == 4
    assert loud["label_jsd"] > quiet["label_jsd"] and loud["oov_rate"] > quiet["oov_rate"]
    assert drift_stats(ref.iloc[:0], ref, cfg)["status"] == "no_reference"
