"""augment: embedding-neighbour synonyms, insertion, MLM fills and per-class rates, all seeded."""

import json
import random

import numpy as np
import pandas as pd
import pytest

from ratchet.config import AugmentConfig
from ratchet.data import LABEL, TEXT
from ratchet.demo_data import demo_batches
from tasks.augment import Lexicon, MaskedLM, augment_frame, contextual_ready, copies_per_label

# A toy embedding table: `flight` and `plane` point the same way, `alarm` and `siren` too.
VOCAB = {"[PAD]": 0, "flight": 1, "plane": 2, "alarm": 3, "siren": 4, "book": 5, "##ing": 6,
         "to": 7}
TABLE = np.array([[0, 0, 0], [1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.95, 0.1], [0, 0, 1],
                  [1, 0, 0], [0.5, 0.5, 0.5]], dtype=np.float32)


def toy_lexicon(min_similarity: float = 0.8) -> Lexicon:
    return Lexicon(VOCAB, TABLE, k=3, min_similarity=min_similarity)


def test_lexicon_neighbours_are_whole_words_above_the_threshold():
    lex = toy_lexicon()
    assert lex.neighbours("flight") == ["plane"]  # not `##ing`, a word piece, nor itself
    assert lex.neighbours("alarm") == ["siren"]
    assert lex.neighbours("book") == []  # nothing similar enough
    assert lex.neighbours("unknownword") == []
    # Once any similarity will do, the closest word of 3+ letters (`to` is too short to swap).
    assert toy_lexicon(-1).neighbours("book")[0] == "siren"


def test_synonym_and_insert_use_neighbours_only():
    from tasks.augment import perturb

    lex = toy_lexicon()
    rng = random.Random(0)
    assert perturb("book a flight to rome", "synonym", 0.1, rng, lex) == "book a plane to rome"
    inserted = perturb("set an alarm now", "insert", 0.1, rng, lex)
    assert sorted(inserted.split()) == sorted(["set", "an", "alarm", "now", "siren"])
    assert perturb("nothing known here", "synonym", 0.5, rng, lex) == "nothing known here"
    with pytest.raises(ValueError, match="needs a lexicon"):
        perturb("book a flight", "synonym", 0.1, rng)


def test_per_class_rates_lift_small_classes_up_to_the_cap():
    labels = pd.Series(["big"] * 40 + ["mid"] * 20 + ["small"] * 5)
    rates = copies_per_label(labels, AugmentConfig(copies=1, max_copies=4))
    assert rates == {"big": 1, "mid": 2, "small": 4}
    assert set(copies_per_label(labels, AugmentConfig(copies=1, balance=False)).values()) == {1}


def test_balanced_augmentation_narrows_the_class_gap():
    train = demo_batches(scale=0.3)[0].frame
    train = pd.concat([train, train[train[LABEL] == train[LABEL].iloc[0]]
                       .assign(text=lambda d: d[TEXT] + " please")], ignore_index=True)
    cfg = AugmentConfig(ops=["swap", "delete"], copies=1, max_copies=6)
    before = train[LABEL].value_counts()
    after = augment_frame(train, cfg)[LABEL].value_counts()
    assert after.max() / after.min() < before.max() / before.min()


def test_contextual_fills_with_the_mlm_and_keeps_labels(tmp_path):
    from ratchet.models import load_base_mlm

    model, tok = load_base_mlm("tiny", 0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    train = demo_batches(scale=0.1)[0].frame.head(20)
    cfg = AugmentConfig(ops=["contextual"], copies=1, balance=False, seed=3)
    a = augment_frame(train, cfg, mlm=MaskedLM(tmp_path))
    b = augment_frame(train, cfg, mlm=MaskedLM(tmp_path))
    assert a.equals(b)
    aug = a[a.augmented_from.notna()]
    assert len(aug) > 0
    source = dict(zip(train[TEXT], train[LABEL], strict=True))
    for new, old, lab in zip(aug[TEXT], aug.augmented_from, aug[LABEL], strict=True):
        assert source[old] == lab and new != old
        changed = [(x, y) for x, y in zip(new.split(), old.split(), strict=True) if x != y]
        assert len(changed) == 1  # exactly one word replaced


def test_contextual_only_with_a_trained_mlm(tmp_path):
    cfg = AugmentConfig(contextual_max_perplexity=100)
    path = tmp_path / "pretrain.json"
    assert not contextual_ready(path, cfg)[0]
    path.write_text(json.dumps({"steps": 0}))
    assert "did not train" in contextual_ready(path, cfg)[1]
    path.write_text(json.dumps({"steps": 30, "perplexity_after": 3000.0}))
    assert "3000.0 > augment.contextual_max_perplexity 100" in contextual_ready(path, cfg)[1]
    path.write_text(json.dumps({"steps": 30, "perplexity_after": 12.5}))
    assert contextual_ready(path, cfg)[0]
    assert not contextual_ready(path, AugmentConfig(ops=["swap"]))[0]


def test_minilm_lexicon_from_the_packaged_model():
    from ratchet.models import source_dir

    lex = Lexicon.from_model_dir(source_dir("minilm-l6"), k=5, min_similarity=0.45)
    assert "flights" in lex.neighbours("flight")
    assert all(w.isalpha() for w in lex.neighbours("weather"))
