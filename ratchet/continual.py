"""What finetune starts from: `finetune.init: auto` trains on from the champion for a routine
batch and retrains from base when it must. The rule is a pure function (`choose`); the facts it
reads come from the registry and the batches, never from a counter a failed run could advance.

The record is the registry itself: the gate tags every version it registers with how it was
trained (`finetune.init`: full | continual) and the newest batch it was trained on
(`finetune.batch`). "Batches since the last full retrain" is the number of the workspace's
batches newer than the newest batch of any registered full retrain, promoted or not: a full
retrain the gate rejected still counts, so full retraining comes at most once per
`finetune.full_every` batches whatever the gate decides, and a batch's cost stays bounded.
A run that fails registers nothing (its undo removes what it registered), so it moves nothing.

"The label set grew" means the newer batches carry a label that none of the batches the
champion was trained on (those up to its `finetune.batch`) carried: a class it never learned,
whether or not its head already had an output for it (`data.labels` declared up front).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FULL, CONTINUAL = "full", "continual"
INIT_TAG = "finetune.init"  # full | continual: how a registered version was trained
INIT_REASON_TAG = "finetune.init_reason"
BATCH_TAG = "finetune.batch"  # the newest batch a registered version was trained on
REQUESTED = "a full retrain was requested (`ratchet run --full`)"
LABEL_CACHE = Path(".ratchet/cache/batch-labels.json")  # batch id -> its labels (ids are immutable)


@dataclass(frozen=True)
class Facts:
    """What the rule reads; None where it is not known."""

    champion: str | None  # the champion's version
    batches_since_full: int | None  # batches newer than the last full retrain's newest batch
    last_full: str | None  # that batch
    new_labels: list[str] | None = None  # labels of newer batches the champion never learned
    champion_batch: str | None = None  # the newest batch the champion was trained on
    requested: bool = False


def choose(full_every: int, facts: Facts) -> tuple[str, str]:
    """(`full` | `continual`, why) under `finetune.init: auto`."""
    if facts.requested:
        return FULL, REQUESTED
    if not facts.champion:
        return FULL, "there is no champion yet"
    if facts.new_labels:
        shown = ", ".join(facts.new_labels[:5]) + (" ..." if facts.new_labels[5:] else "")
        return FULL, (f"the label set grew: {len(facts.new_labels)} label(s) champion version "
                      f"{facts.champion} never learned ({shown})")
    if facts.batches_since_full is None:
        return FULL, ("no full retrain is on record in the registry (versions registered "
                      f"before finetune.init: auto have no `{INIT_TAG}` tag)")
    if facts.champion_batch is None:
        return FULL, (f"champion version {facts.champion} has no `{BATCH_TAG}` tag (registered "
                      "before finetune.init: auto): what it was trained on is not on record")
    since, last = facts.batches_since_full, facts.last_full
    if since >= full_every:
        return FULL, (f"{since} batch(es) since the last full retrain (on batch {last}): "
                      f"finetune.full_every is {full_every}")
    return CONTINUAL, (f"a routine batch: {since} batch(es) since the last full retrain (on "
                       f"batch {last}), fewer than finetune.full_every ({full_every}), and no "
                       f"new labels: continue from champion version {facts.champion}")


def batches_since(batches: Iterable[str], batch: str | None) -> int | None:
    """How many of `batches` (ids, which sort in arrival order) are newer than `batch`."""
    if batch is None:
        return None
    return sum(1 for b in batches if b > batch)


def newest_batch(batches: Iterable[Any]) -> str | None:
    ids = [str(b) for b in batches if b is not None and str(b) not in ("", "nan", "None")]
    return max(ids, default=None)


# --- the facts, from the registry and the batches ------------------------------------------------


def last_full_batch(client, name: str) -> str | None:
    """The newest batch any registered full retrain of `name` was trained on (None: none is on
    record)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return newest_batch((mv.tags or {}).get(BATCH_TAG) for mv in versions
                        if (mv.tags or {}).get(INIT_TAG) == FULL)


def version_batch(client, name: str, version: str) -> str | None:
    """The newest batch a registered version was trained on (its tag; None: not on record)."""
    from mlflow.exceptions import MlflowException

    try:
        return (client.get_model_version(name, version).tags or {}).get(BATCH_TAG)
    except MlflowException:
        return None


def batch_labels(ws: Path, batches_dir: Path) -> dict[str, list[str]]:
    """Each batch's labels (batch id -> sorted labels). A batch file never changes under its
    id, so each is read once (its label column only) and kept in LABEL_CACHE under the
    workspace's `.ratchet/`, local derived data that costs only time to lose."""
    import json

    import pandas as pd

    from ratchet.data import LABEL, batch_files
    from ratchet.runtime import write_json

    cache_path = ws / LABEL_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    out, added = {}, False
    for f in batch_files(batches_dir):
        if f.stem not in cache:
            try:
                column = pd.read_parquet(f, columns=[LABEL])[LABEL]
                cache[f.stem] = sorted({str(x) for x in column.dropna().unique()})
            except (KeyError, ValueError):  # an unlabeled batch
                cache[f.stem] = []
            added = True
        out[f.stem] = cache[f.stem]
    if added:
        with suppress(OSError):  # a full disk: the next run reads the batches again
            write_json(cache_path, cache)
    return out


def unlearned_labels(labels: dict[str, list[str]], upto: str) -> list[str]:
    """Labels of the batches newer than `upto` that no batch up to it carried."""
    known = {lab for b, labs in labels.items() if b <= upto for lab in labs}
    return sorted({lab for b, labs in labels.items() if b > upto for lab in labs} - known)


def tags(stats: dict[str, Any]) -> dict[str, str]:
    """The registry tags of a version from its finetune measurements (metrics/finetune.json):
    how it was trained, why, and on which newest batch."""
    out = {}
    if stats.get("init") in (FULL, CONTINUAL):
        out[INIT_TAG] = str(stats["init"])
        out[INIT_REASON_TAG] = str(stats.get("init_reason", ""))[:4900]
    if stats.get("batch"):
        out[BATCH_TAG] = str(stats["batch"])
    return out


# --- the plan: refresh writes it into finetune-init.json, finetune follows it --------------------


def auto_plan(client, name: str, champion: str | None, *, ws: Path, batches_dir: Path,
              full_every: int) -> dict[str, Any]:
    """The auto decision for the workspace's newest batch, with the facts it was made from
    (finetune-init.json records them, so that a change of the decision re-runs finetune)."""
    from ratchet.data import batch_files

    batches = [f.stem for f in batch_files(batches_dir)]
    last = last_full_batch(client, name) if champion else None
    since = batches_since(batches, last)
    champion_batch = version_batch(client, name, champion) if champion else None
    grew = None
    if champion_batch is not None and since is not None and since < full_every:
        # else a full retrain anyway: no need to read labels
        grew = unlearned_labels(batch_labels(ws, batches_dir), champion_batch)
    plan, reason = choose(full_every, Facts(champion, since, last, grew, champion_batch))
    out = {"plan": plan, "reason": reason, "batches_since_full": since, "last_full": last,
           "champion_batch": champion_batch}
    if grew:
        out["new_labels"] = grew
    return out


def start(init: str, full_every: int, ref: dict[str, Any]) -> tuple[str, str]:
    """How finetune starts under `finetune.init` = `init`, from finetune-init.json (`ref`):
    (full | continual, why). A continual start is checked once more in finetune against the
    champion's own head (`tasks.finetune.starting_point`)."""
    if init == "base":
        return FULL, "finetune.init: base (always a full retrain from base)"
    made = ref.get("init")
    if made is not None and made != init:
        return FULL, (f"finetune-init.json was written under finetune.init: {made}, not {init} "
                      "(`ratchet run` refreshes it): a full retrain from base")
    if ref.get("plan") == FULL:
        return FULL, str(ref.get("reason") or REQUESTED)
    if not ref.get("version"):
        return FULL, "there is no champion yet"
    if init == "champion":
        return CONTINUAL, (f"finetune.init: champion (always continual): continue from champion "
                           f"version {ref['version']}")
    # Decided again from the file's facts: the plan was made under the full_every of its day,
    # which a `dvc exp run -S finetune.full_every=...` (no refresh) may have changed.
    return choose(full_every, Facts(ref["version"], ref.get("batches_since_full"),
                                    ref.get("last_full"), ref.get("new_labels"),
                                    ref.get("champion_batch")))
