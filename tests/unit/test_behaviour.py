"""Behavioural checks: the perturbations, the invariance rates and the probes file."""

import random

import pytest

from ratchet.behaviour import invariance, load_probes, probe_results, typo
from ratchet.errors import ConfigError


def keyword_model(texts):
    """A case-sensitive toy classifier: 'card' (lower case, exact word) means lost_card."""
    return ["lost_card" if "card" in t.split() else "other" for t in texts]


def test_typo_swaps_two_inner_letters_of_one_word():
    rng = random.Random(0)
    for text in ["please block my credit card", "transfer money to savings now"]:
        out = typo(text, rng)
        assert out != text and len(out) == len(text)
        changed = [(a, b) for a, b in zip(text.split(), out.split(), strict=True) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert sorted(a) == sorted(b) and a[0] == b[0] and a[-1] == b[-1]
    assert typo("hi to me", rng) == "hi to me"  # no word of 4+ letters: unchanged


def test_invariance_finds_a_case_and_typo_sensitive_model():
    texts = ["i lost my card", "book a table", "my card is gone", "what time is it"]
    res = invariance(keyword_model, texts, seed=1)
    # Upper case breaks both card texts (2 of 8 variants); lower case breaks none.
    assert res["casing"] == pytest.approx(6 / 8)
    assert 0 <= res["typos"] <= 1
    assert res["examples"]["casing"][0]["variant"].isupper()
    robust = invariance(lambda ts: ["x"] * len(ts), texts)
    assert robust["casing"] == 1.0 and robust["typos"] == 1.0


def test_invariance_of_nothing_is_nan():
    res = invariance(keyword_model, [])
    assert res["casing"] != res["casing"]


def test_probes_per_class_and_unknown_classes(tmp_path):
    path = tmp_path / "probes.yaml"
    path.write_text("lost_card: [my card is lost, card stolen]\n"
                    "other: [hello there]\nfile_claim: [i want to file a claim]\n")
    probes = load_probes(path)
    res = probe_results(keyword_model, probes, labels=["lost_card", "other"])
    assert res["per_class"] == {"lost_card": 1.0, "other": 1.0} and res["worst"] == 1.0
    assert res["not_applicable"] == ["file_claim"]
    res = probe_results(keyword_model, {"lost_card": ["CARD lost", "card"]}, ["lost_card"])
    assert res["worst"] == 0.5 and res["failures"][0]["predicted"] == "other"
    assert probe_results(keyword_model, probes, labels=["x"])["worst"] is None


@pytest.mark.parametrize(("content", "message"), [
    ("- a\n- b\n", "must map each label"),
    ("lost_card: [ok, '']\n", "non-empty texts"),
    ("lost_card: {a: 1}\n", "non-empty texts"),
    ("lost_card: [unclosed\n", "not valid YAML"),
])
def test_bad_probe_files_are_refused(tmp_path, content, message):
    path = tmp_path / "probes.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_probes(path)


def test_absent_or_comment_only_probe_file_means_no_probes(tmp_path):
    assert load_probes(tmp_path / "nope.yaml") == {}
    with pytest.raises(ConfigError, match="does not exist"):
        load_probes(tmp_path / "nope.yaml", required=True)
    (tmp_path / "p.yaml").write_text("# nothing yet\n")
    assert load_probes(tmp_path / "p.yaml") == {}
