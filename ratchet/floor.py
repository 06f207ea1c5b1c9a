"""The floor: the best models the registry has served, which a candidate may not fall behind.

Judging a candidate only against the current champion lets quality creep down: each promotion
may lose up to `gate.max_regression` on reference, so after k promotions the served model can be
k margins below the best one ever served. The gate therefore also holds the candidate against a
small pool of the best served models, measured on the same current test rows.

The pool is bounded (`gate.floor_models`, default 3) so the cost does not grow with the number
of promotions: after each gate decision it becomes the best `floor_models` of (the pool, the
champion that was judged against), ranked by macro-F1 on this run's reference rows (all test
rows before there are reference rows). Their predictions are cached by model fingerprint and
text (`ratchet.cache`), so each run predicts only the rows that are new. A model that left the
pool was beaten by `floor_models` others on the rows of its day; the pool can only lose the
best-ever model if later data ranks it below all of them.

The pool lives in the registry, as the registered-model tag `ratchet.floor` (JSON), beside the
aliases and their move log, so every process and the MLflow UI see the same floor. A version
that a person rolled back away from (`ratchet rollback`, a `rollback` event in the move log) is
withdrawn from the pool: a person judged it unfit to serve, so it is not a standard to keep.
Deleted versions drop out.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ratchet.data import REFERENCE

FLOOR_TAG = "ratchet.floor"


def stored(client, name: str) -> list[dict[str, Any]]:
    """The pool as the registry holds it: [{version, macro_f1, slice}], best first."""
    from ratchet.registry import registered_model

    model = registered_model(client, name)
    raw = (model.tags or {}).get(FLOOR_TAG) if model is not None else None
    try:
        members = json.loads(raw) if raw else []
    except ValueError:
        return []  # edited by hand into something else: start a new pool
    return [m for m in members if isinstance(m, dict) and m.get("version")]


def withdrawn(events: list[dict[str, Any]]) -> set[str]:
    """Versions whose latest `champion` event is a rollback away from them."""
    last: dict[str, bool] = {}
    for event in events:
        if event.get("alias") != "champion":
            continue
        if event.get("to") is not None:
            last[str(event["to"])] = False
        if event.get("rollback") and event.get("from") is not None:
            last[str(event["from"])] = True
    return {v for v, away in last.items() if away}


def members(client, name: str, *, exclude: str | None = None, limit: int | None = None
            ) -> list[dict[str, str]]:
    """The pool as the evaluate stage needs it: [{version, fingerprint}], without versions that
    were deleted or withdrawn, nor `exclude` (the champion, judged anyway)."""
    from ratchet.registry import alias_history

    out_of_it = withdrawn(alias_history(client, name))
    found = []
    for member in stored(client, name):
        version = str(member["version"])
        if version == exclude or version in out_of_it:
            continue
        try:
            mv = client.get_model_version(name, version)
        except Exception:  # noqa: BLE001 - deleted since: no longer a floor
            continue
        found.append({"version": version, "fingerprint": (mv.tags or {}).get("fingerprint")})
    return found[:limit] if limit is not None else found


def ranking(metrics: dict[str, float], champion: dict) -> dict[str, float]:
    """Macro-F1 of the judged champion and of each floor model on this run's reference rows
    (all test rows while there are none), from `ratchet.evaluation.score`'s metrics."""
    from ratchet.evaluation import SERVED_PREFIX

    where = REFERENCE if metrics.get(f"n/{REFERENCE}", 0) > 0 else "all"
    scores = {}
    if champion.get("version") and f"champion/{where}/macro_f1" in metrics:
        scores[str(champion["version"])] = metrics[f"champion/{where}/macro_f1"]
    suffix = f"/{where}/macro_f1"
    for key, value in metrics.items():
        if key.startswith(SERVED_PREFIX) and key.endswith(suffix):
            scores[key[len(SERVED_PREFIX) : -len(suffix)]] = value
    return {v: s for v, s in scores.items() if isinstance(s, float) and not math.isnan(s)}


def next_pool(pool: list[str], scores: dict[str, float], size: int) -> list[str]:
    """The best `size` of the pool and the scored versions, by score (ties: the newer)."""
    candidates = [v for v in dict.fromkeys([*pool, *scores]) if v in scores]
    ranked = sorted(candidates, key=lambda v: (scores[v], int(v) if v.isdigit() else 0),
                    reverse=True)
    return ranked[:size]


def update(client, name: str, metrics: dict[str, float], champion: dict, size: int
           ) -> list[dict[str, Any]]:
    """After a gate decision: keep the best `size` of the pool and the judged champion.

    A pool member this run did not score (not evaluated beside it, e.g. withdrawn or loaded
    by an older evaluate) is dropped. Returns the new pool as stored.
    """
    if size <= 0 or not champion.get("version"):
        return stored(client, name)
    scores = ranking(metrics, champion)
    pool = next_pool([str(m["version"]) for m in stored(client, name)], scores, size)
    where = REFERENCE if metrics.get(f"n/{REFERENCE}", 0) > 0 else "all"
    kept = [{"version": v, "macro_f1": round(scores[v], 6), "slice": where} for v in pool]
    client.set_registered_model_tag(name, FLOOR_TAG, json.dumps(kept))
    return kept
