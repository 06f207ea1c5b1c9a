"""The floor (issue "The ratchet holds", margin creep): a candidate is held not only against the
champion but against the best model the registry has served, on the same current rows.

Through the project's own code path: `ratchet.evaluation.score` on a predictions frame with a
`served:<version>` column, then `ratchet.gate.decide`; the pool on a real MLflow store.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ratchet.config import Params
from ratchet.evaluation import score
from ratchet.gate import rule_decision

CLASSES = [f"intent_{i}" for i in range(10)]
PARAMS = Params.model_validate({"evaluate": {"bootstrap_resamples": 1000}})


def _predictions(y: np.ndarray, accuracy: float, order: np.ndarray) -> list[str]:
    """Right on the first `accuracy` share of rows in `order` (nested between models), else the
    next class: models of given accuracy whose errors are paired as real models' largely are."""
    right = np.zeros(len(y), dtype=bool)
    right[order[: round(accuracy * len(y))]] = True
    return [CLASSES[c if ok else (c + 1) % len(CLASSES)] for c, ok in zip(y, right, strict=True)]


def frame(*, reference: dict[str, float], recent: dict[str, float], n_reference: int = 2000,
          n_recent: int = 600, domains: bool = False, seed: int = 0) -> pd.DataFrame:
    """A predictions frame: each model's accuracy on reference and on recent rows."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, n, acc in (("reference", n_reference, reference), ("recent", n_recent, recent)):
        y = rng.integers(0, len(CLASSES), n)
        order = rng.permutation(n)
        part = pd.DataFrame({"text": [f"{name} {i}" for i in range(n)],
                             "label": [CLASSES[c] for c in y], "slice": name})
        for model, a in acc.items():
            part[model] = _predictions(y, a, order)
        if domains:
            part["domain"] = np.where(np.arange(n) % 2 == 0, "banking", "travel")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


RECENT_GAIN = {"candidate": 0.95, "champion": 0.85, "served:3": 0.85}


def test_a_candidate_within_the_margin_of_its_champion_but_far_below_the_best_served_is_rejected():
    # The champion is already 1.5 pts below version 3 (once served); the candidate loses another
    # 1.5 pts: within the margin of the champion, 3 pts below the best model served.
    df = frame(reference={"candidate": 0.89, "champion": 0.905, "served:3": 0.92},
               recent=RECENT_GAIN)
    m = score(df, PARAMS)
    decision = rule_decision(m, PARAMS)
    checks = {c.name: c for c in decision.checks}
    assert checks["recent"].passed and checks["reference"].passed  # the champion alone: promote
    assert not decision.promote
    assert not checks["floor:reference"].passed
    assert "version 3" in checks["floor:reference"].reason
    assert m["floor/model/floor:reference"] == 3


def test_a_candidate_level_with_the_best_served_model_passes_the_floor():
    df = frame(reference={"candidate": 0.92, "champion": 0.905, "served:3": 0.92},
               recent=RECENT_GAIN)
    decision = rule_decision(score(df, PARAMS), PARAMS)
    checks = {c.name: c for c in decision.checks}
    assert checks["floor:reference"].passed, checks["floor:reference"].reason
    assert decision.promote, [c.reason for c in decision.failed]


def test_when_the_champion_is_the_best_served_its_own_checks_cover_the_floor():
    df = frame(reference={"candidate": 0.90, "champion": 0.91, "served:3": 0.88},
               recent=RECENT_GAIN)
    m = score(df, PARAMS)
    decision = rule_decision(m, PARAMS)
    checks = {c.name: c for c in decision.checks}
    assert "floor:reference" not in checks and checks["floor"].passed
    assert m["served:3/reference/macro_f1"] < m["champion/reference/macro_f1"]
    assert decision.promote, [c.reason for c in decision.failed]


def test_a_domain_far_below_the_best_served_model_fails_the_floor():
    # Half the rows are `banking`: a candidate 6 pts below version 3 on reference and 4 pts
    # below it on recent rows (where it beats the champion) fails both.
    df = frame(reference={"candidate": 0.86, "champion": 0.875, "served:3": 0.92},
               recent={**RECENT_GAIN, "served:3": 0.99}, domains=True)
    decision = rule_decision(score(df, PARAMS), PARAMS)
    failed = {c.name for c in decision.failed}
    assert {"floor:reference", "floor:domain:banking"} <= failed


def test_over_many_promotions_the_served_model_never_falls_a_margin_below_the_best():
    """The creep adversary: every round the candidate gains on recent and loses 1 pt of
    reference accuracy against the champion (well inside the 2-pt margin). With the floor the
    served model stays within the margin of the best one served."""
    from ratchet.floor import next_pool

    margin = PARAMS.gate.max_regression
    champion, champion_version, pool = 0.95, "1", []
    accuracy = {"1": 0.95}
    best = promoted = 0
    for round_ in range(2, 10):
        candidate = champion - 0.01
        served = {f"served:{v}": accuracy[v] for v in pool if v != champion_version}
        df = frame(reference={"candidate": candidate, "champion": champion, **served},
                   recent={"candidate": 0.95, "champion": 0.85,
                           **{k: 0.85 for k in served}}, seed=round_)
        m = score(df, PARAMS)
        decision = rule_decision(m, PARAMS)
        scores = {champion_version: m["champion/reference/macro_f1"]}
        scores.update({k[len("served:"):]: m[f"{k}/reference/macro_f1"] for k in served})
        pool = next_pool(pool, scores, PARAMS.gate.floor_models)
        best = max(best, *scores.values())
        if decision.promote:
            promoted += 1
            champion, champion_version = candidate, str(round_)
            accuracy[champion_version] = candidate
        assert best - m["champion/reference/macro_f1"] <= margin + 0.005
    assert promoted >= 1  # the floor allows a step down within the margin, not a second one
    assert champion >= 0.95 - margin - 1e-9


@pytest.fixture
def store(tmp_path, monkeypatch):
    from ratchet.config import RegistryConfig
    from ratchet.registry import connect

    monkeypatch.chdir(tmp_path)
    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return connect(cfg, tmp_path), cfg


def _versions(client, name: str, n: int) -> list[str]:
    """Registered versions without a model artifact: the pool reads tags and aliases only."""
    client.create_registered_model(name)
    out = []
    for i in range(n):
        mv = client.create_model_version(name, source=f"file:///nowhere/{i}",
                                         tags={"fingerprint": f"fp{i + 1}"})
        out.append(str(mv.version))
    return out


def test_the_pool_keeps_the_best_served_models_and_drops_a_rolled_back_one(store):
    from ratchet import floor
    from ratchet.registry import CHAMPION, move_alias

    client, _ = store
    name = "m"
    v = _versions(client, name, 5)
    size = 2
    m = {"n/reference": 100.0, "champion/reference/macro_f1": 0.80}
    floor.update(client, name, m, {"version": v[0]}, size)
    m = {"n/reference": 100.0, "champion/reference/macro_f1": 0.90,
         f"served:{v[0]}/reference/macro_f1": 0.81}
    floor.update(client, name, m, {"version": v[1]}, size)
    m = {"n/reference": 100.0, "champion/reference/macro_f1": 0.85,
         f"served:{v[0]}/reference/macro_f1": 0.82, f"served:{v[1]}/reference/macro_f1": 0.91}
    stored = floor.update(client, name, m, {"version": v[2]}, size)
    assert [s["version"] for s in stored] == [v[1], v[2]]  # version 1 ranked out
    tag = json.loads(client.get_registered_model(name).tags[floor.FLOOR_TAG])
    assert tag == stored
    assert floor.members(client, name, exclude=v[2]) == [{"version": v[1], "fingerprint": "fp2"}]
    # A person rolls back away from version 2: a person judged it unfit, it is not a floor.
    move_alias(client, name, CHAMPION, v[1], by="cli", reason="promote", expected=None)
    move_alias(client, name, CHAMPION, v[2], by="cli", reason="rollback", expected=v[1],
               rollback=True)
    assert floor.members(client, name, exclude=v[2]) == []
    client.delete_model_version(name, v[2])
    assert floor.members(client, name) == []


def test_evaluate_scores_the_floor_models_and_predicts_each_text_once(tmp_path, monkeypatch):
    """The evaluate stage on real tiny models from a real MLflow store: the pool's model gets
    its column and its floor numbers; a second evaluation predicts nothing again."""
    from ratchet import floor
    from ratchet.config import parse_params
    from ratchet.registry import CHAMPION, connect, log_candidate, move_alias
    from ratchet.runtime import write_json
    from ratchet.workspace import fingerprint
    from tasks import evaluate
    from tests.unit.test_gate_stage import tiny_classifier

    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"{t} {i}", "label": lab, "slice": "recent" if i % 2 else "reference"}
            for i in range(6) for lab, t in (("book_flight", "fly to rome"),
                                             ("check_balance", "my balance"),
                                             ("play_music", "play jazz"))]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "probes.yaml").write_text("")
    params = parse_params({"model": {"source": "tiny"},
                           "evaluate": {"bootstrap_resamples": 100, "latency_examples": 4,
                                        "behaviour_rows": 6, "probes": "probes.yaml"}})
    name = params.registry.model_name
    client = connect(params.registry, tmp_path)
    versions = []
    for seed in (1, 2):
        model = tiny_classifier(tmp_path / f"m{seed}", seed=seed)
        fp = fingerprint(model)
        _, v = log_candidate(model, name=name, params={}, metrics={}, artifacts=[],
                             run_tags={"fingerprint": fp})
        client.set_model_version_tag(name, v, "fingerprint", fp)
        versions.append((v, fp))
    (v1, fp1), (v2, fp2) = versions
    move_alias(client, name, CHAMPION, v2, by="cli", reason="test", expected=None)
    floor.update(client, name, {"n/reference": 9.0, "champion/reference/macro_f1": 0.5},
                 {"version": v1}, 3)
    members = floor.members(client, name, exclude=v2)
    assert members == [{"version": v1, "fingerprint": fp1}]
    write_json(tmp_path / "champion.json", {"name": name, "version": v2, "fingerprint": fp2})
    write_json(tmp_path / "floor.json", {"floor": members})
    candidate = tiny_classifier(tmp_path / "candidate", seed=3)
    cache = tmp_path / ".ratchet" / "cache"

    def run() -> tuple[dict, dict]:
        m = evaluate.run(params, candidate=candidate, test=tmp_path / "test.parquet",
                         champion=tmp_path / "champion.json", metrics=tmp_path / "eval.json",
                         predictions=tmp_path / "pred.parquet", report=tmp_path / "r.json",
                         floor=tmp_path / "floor.json", cache=cache)
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["floor"] == members  # what the gate reads back
        return m, report["predicted"]

    m, predicted = run()
    assert m["floor/models"] == 1
    assert f"served:{v1}/reference/macro_f1" in m
    assert f"served:{v1}" in pd.read_parquet(tmp_path / "pred.parquet").columns
    assert predicted == {"candidate": 18, "champion": 18, f"served:{v1}": 18}
    again, predicted = run()
    assert predicted == {"candidate": 0, "champion": 0, f"served:{v1}": 0}
    assert {k: v for k, v in again.items() if "latency" not in k} == {
        k: v for k, v in m.items() if "latency" not in k}
