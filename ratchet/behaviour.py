"""Behavioural checks: does a model keep its answer when the text changes in ways that must not
matter (casing, a small typo), and does it pass the minimum-functionality probes of each class?

Probes live in the workspace (`probes.yaml` by default): a mapping of label -> texts that must
get that label. They are the team's "this must always work" list, kept in git with the params.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ratchet.errors import ConfigError
from ratchet.runtime import read_yaml_mapping

Predict = Callable[[list[str]], list[str]]


def load_probes(path: Path, *, required: bool = False) -> dict[str, list[str]]:
    """Read the probes file; empty means no probes. Bad shapes are refused clearly.

    `required`: a missing file is an error (a configured path with a typo must not silently
    turn the probes check off); otherwise it means no probes.
    """
    if not path.is_file():
        if required:
            raise ConfigError(f"{path}: the probes file (evaluate.probes) does not exist; "
                              "make it, even empty (see `ratchet init`), or fix the path")
        return {}
    raw = read_yaml_mapping(path, "each label to a list of texts")
    probes: dict[str, list[str]] = {}
    for label, texts in raw.items():
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip()
                                                  for t in texts):
            raise ConfigError(f"{path}: `{label}` must be a list of non-empty texts")
        probes[str(label)] = texts
    return probes


def casing_variants(texts: list[str]) -> list[str]:
    """Each text in upper and in lower case (the pairs a casing-robust model answers alike)."""
    return [t.upper() for t in texts] + [t.lower() for t in texts]


def typo(text: str, rng: random.Random) -> str:
    """One small typo: two adjacent inner letters of one word of 4+ letters swapped.

    Texts with no such word come back unchanged (and count as invariant trivially).
    """
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def invariance(predict: Predict, texts: list[str], *, seed: int = 0) -> dict[str, object]:
    """Share of predictions unchanged under casing changes and under a small typo.

    Returns the two rates and up to 5 examples of each kind that changed.
    """
    if not texts:
        return {"casing": float("nan"), "typos": float("nan"), "examples": {}}
    rng = random.Random(seed)
    typos = [typo(t, rng) for t in texts]
    cased = casing_variants(texts)
    preds = predict(texts + cased + typos)
    n = len(texts)
    base, upper, lower, typo_p = preds[:n], preds[n : 2 * n], preds[2 * n : 3 * n], preds[3 * n :]
    casing_same = [a == b for a, b in zip(base + base, upper + lower, strict=True)]
    typo_same = [a == b for a, b in zip(base, typo_p, strict=True)]
    changed_case = [{"text": (texts + texts)[i], "variant": cased[i], "from": (base + base)[i],
                     "to": (upper + lower)[i]} for i, ok in enumerate(casing_same) if not ok]
    changed_typo = [{"text": texts[i], "variant": typos[i], "from": base[i], "to": typo_p[i]}
                    for i, ok in enumerate(typo_same) if not ok]
    return {
        "casing": sum(casing_same) / len(casing_same),
        "typos": sum(typo_same) / len(typo_same),
        "examples": {"casing": changed_case[:5], "typos": changed_typo[:5]},
    }


def probe_results(predict: Predict, probes: dict[str, list[str]],
                  labels: list[str]) -> dict[str, object]:
    """Accuracy of each class's probes, for the classes the model knows.

    Probes of a class the model has never seen are listed apart, not failed: a model cannot be
    blamed for a class it was not trained on (the class arrives with a later batch).
    """
    known = {lab: texts for lab, texts in probes.items() if lab in set(labels)}
    unknown = sorted(set(probes) - set(known))
    if not known:
        return {"worst": None, "per_class": {}, "not_applicable": unknown, "failures": []}
    flat = [(lab, t) for lab, texts in known.items() for t in texts]
    preds = predict([t for _, t in flat])
    per_class: dict[str, list[bool]] = {}
    failures = []
    for (lab, text), pred in zip(flat, preds, strict=True):
        per_class.setdefault(lab, []).append(pred == lab)
        if pred != lab:
            failures.append({"label": lab, "text": text, "predicted": pred})
    rates = {lab: sum(v) / len(v) for lab, v in per_class.items()}
    return {"worst": min(rates.values()), "per_class": rates, "not_applicable": unknown,
            "failures": failures[:20]}
