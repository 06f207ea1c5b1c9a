"""prepare: dedup, conflict resolution, stable hash splits, slices, and the replay buffer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import Params, PrepareConfig
from ratchet.data import (
    BATCH,
    DOMAIN,
    GROUP,
    LABEL,
    RECENT,
    REFERENCE,
    SPLITS,
    TEXT,
    assign_splits,
    batch_files,
    combine_batches,
    text_key,
    unit_coin,
    unit_hash,
    unit_nodes,
    write_parquet_atomic,
)
from ratchet.errors import BatchRefused, ConfigError
from ratchet.headline import FULL_HELP, write_metrics
from ratchet.noise import exclusion_mask
from ratchet.runtime import atomic_path, read_json
from ratchet.stage import stage_main
from ratchet.stagecache import StageCache, code_digest, digest, file_digest
from ratchet.workspace import CHAMPION_FILE

# What prepare derives from one batch by itself, kept per batch (`batch_parts`): each row's text
# key, its own unit node (its group's; None: its text's), that node's split coin and its replay
# priority. Everything across batches (units, dedup, conflicts, slices, the buffer) is done anew
# over all rows each run, from these.
PART_VERSION = 1
TKEY, OWN, COIN, PRIO = "_tkey", "_own", "_coin", "_prio"
DERIVED = (TKEY, OWN, COIN, PRIO)


def resolve_conflicts(rows: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, int]:
    """One label per normalised text, by `policy`; returns the rows and how many texts conflicted.

    Rows must carry `norm` and be in arrival order (oldest first).
    """
    labels_per_text = rows.groupby("norm")[LABEL].nunique()
    conflicted = labels_per_text.index[labels_per_text > 1]
    if len(conflicted) == 0 or policy == "latest":
        return rows, len(conflicted)
    if policy == "drop":
        return rows[~rows["norm"].isin(conflicted)], len(conflicted)
    if policy != "majority":
        raise ValueError(f"unknown conflict policy {policy!r}")
    # Majority label per text; ties go to the label seen last (the freshest evidence).
    part = rows[rows["norm"].isin(conflicted)].reset_index()
    counts = part.groupby(["norm", LABEL]).agg(n=(LABEL, "size"), last=("index", "max"))
    best = counts.sort_values(["n", "last"]).groupby(level="norm").tail(1).reset_index()
    winner = dict(zip(best["norm"], best[LABEL], strict=True))
    keep = ~rows["norm"].isin(conflicted) | (rows[LABEL] == rows["norm"].map(winner))
    return rows[keep], len(conflicted)


def check_split_scheme(champion: dict, model_name: str, cfg: PrepareConfig) -> None:
    """Refuse a split scheme other than the one the champion was trained and tested under.

    A new salt or key moves rows between splits: rows the champion trained on would land in
    test, where it would be judged on them, and its scores (and every candidate's comparison
    with it) would mean nothing. With no champion of `model_name` (a first run, or a fresh
    baseline under a new name) or a champion whose scheme nobody recorded, there is nothing to
    hold.
    """
    held = champion.get("split_scheme")
    if not champion.get("version") or champion.get("name") != model_name or not held:
        return
    now = cfg.scheme()
    if held.get("key") == now["key"] and held.get("salt") in (None, now["salt"]):
        return
    changes = [f"prepare.{field} `{held.get(part)}` -> `{now[part]}`"
               for field, part in (("salt", "salt"), ("split_key", "key"))
               if held.get(part) is not None and held.get(part) != now[part]]
    back = ", ".join(f"prepare.{field}: {held[part]}" for field, part in
                     (("salt", "salt"), ("split_key", "key")) if held.get(part) is not None)
    raise ConfigError(
        f"the split scheme changed ({'; '.join(changes)}) but champion {model_name} version "
        f"{champion['version']} was trained and tested under the old one: the new splits would "
        "put rows it trained on into the test split and judge it on them. Set it back "
        f"({back}) to keep the splits, or start a fresh baseline with no champion: change "
        "registry.model_name too (or use a new workspace), and the first run of the new scheme "
        "is judged by the absolute floor alone"
    )


def prepare_frame(rows: pd.DataFrame, cfg: PrepareConfig, exclude: pd.Series | None = None,
                  *, splits: pd.Series | None = None, keys: pd.Series | None = None
                  ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Pure core: rows of all batches (oldest first) -> deduplicated rows with split and slice.

    Exact repeats of a text are counted apart from texts that only match by their key
    (`text_key`: case, width, spacing, punctuation), so a user sees both kinds of repetition;
    both are deduplicated. Dedup and the split hash use the one key: were dedup finer, variants
    of one text would train the model twice and be tested twice; were it coarser, it would
    drop rows the split treats as different texts. Splits are assigned before anything is
    dropped (`ratchet.data.assign_splits`), so a row's split never depends on noise verdicts,
    the conflict policy or which copy of a text wins.
    `exclude` (aligned with `rows`) marks rows kept out before anything else (the noise stage's
    suspects, see `ratchet.noise.exclusion_mask`): an older copy of the same text still counts,
    and the newest batch stays `recent` even if it loses rows.
    `splits` (`assign_splits` of `rows`) and `keys` (each row's `text_key`), aligned with
    `rows`, are computed here when not given.
    """
    # "recent" is the newest batch as ingested, fixed before any row is dropped: if prepare
    # empties it, recent is empty (and the stats say so), never the batch before it.
    newest = rows["batch_order"].max()
    newest_in = rows[rows["batch_order"] == newest]
    rows = rows.assign(split=assign_splits(rows, cfg) if splits is None else splits)
    excluded = 0
    if exclude is not None:
        excluded = int(exclude.sum())
        rows = rows[~exclude.to_numpy(dtype=bool)]
    rows = rows.dropna(subset=[TEXT, LABEL]).copy()
    before = len(rows)
    rows["norm"] = ([text_key(t, cfg.split_key) for t in rows[TEXT]] if keys is None
                    else keys.loc[rows.index].tolist())
    exact = int(rows.duplicated(subset=[TEXT]).sum())
    near = int((rows.duplicated(subset=["norm"]) & ~rows.duplicated(subset=[TEXT])).sum())
    rows, conflicts = resolve_conflicts(rows, cfg.conflicts)
    resolved = len(rows)
    # The latest occurrence wins among what is left: its text form and its batch.
    rows = rows.drop_duplicates(subset="norm", keep="last")
    rows["slice"] = [RECENT if o == newest else REFERENCE for o in rows["batch_order"]]
    stats = {
        "rows_in": before,
        "rows_out": len(rows),
        "duplicates_dropped": resolved - len(rows),
        "exact_duplicates": exact,
        "normalised_duplicates": near,
        "conflicting_texts": conflicts,
        "conflict_rows_dropped": before - resolved,
        "noise/excluded": excluded,
        "recent/batch": str(newest_in[BATCH].iloc[0]) if len(newest_in) else None,
        "recent/rows_in": len(newest_in),
        "recent/rows": int((rows["slice"] == RECENT).sum()),
    }
    cols = [c for c in rows.columns if c not in ("norm", "split")] + ["split"]
    return rows[cols].reset_index(drop=True), stats


def allocate(capacity: dict, total: int) -> dict:
    """Split `total` seats over strata as evenly as their capacities allow (water-filling).

    Small strata get all their rows; what they cannot use goes to the others. Leftover seats
    after an even split go to strata in sorted key order, so the result is deterministic.
    """
    seats = {k: 0 for k in capacity}
    open_ = sorted(k for k, c in capacity.items() if c > 0)
    left = min(total, sum(capacity.values()))
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for i, k in enumerate(open_):
            give = min(share + (1 if i < extra else 0), capacity[k] - seats[k])
            seats[k] += give
            left -= give
        open_ = [k for k in open_ if seats[k] < capacity[k]]
    return seats


def replay_buffer(train: pd.DataFrame, size: int, salt: str,
                  priority: Sequence[float] | None = None) -> pd.DataFrame:
    """A reservoir sample of the train split, stratified by label and then by batch.

    Each row's priority is a hash of its normalised text, and each stratum keeps its rows of
    smallest priority: a bottom-k reservoir, which is a uniform random sample that needs no
    state between runs. The same data gives the same buffer, and when a batch arrives a stratum
    keeps the rows it had unless its quota shrinks. `priority` (each row's `replay_priority`,
    in row order) is computed here when not given.
    """
    if size == 0 or train.empty:
        return train.iloc[:0].assign(priority=pd.Series(dtype="float64"))
    prio = ([replay_priority(t, salt) for t in train[TEXT]] if priority is None
            else list(priority))
    pool = train.assign(priority=prio).sort_values(["priority", TEXT], kind="stable")
    per_label = allocate(pool[LABEL].value_counts().to_dict(), size)
    strata = pool.groupby([LABEL, BATCH], observed=True).size()
    quota: dict[tuple[str, str], int] = {}
    for label, seats in per_label.items():
        per_batch = allocate(strata.loc[label].to_dict(), seats)
        quota.update({(label, batch): n for batch, n in per_batch.items()})
    # Each stratum's first rows in priority order: one pass, not one filter per stratum (the
    # strata multiply with labels x batches).
    rank = pool.groupby([LABEL, BATCH], observed=True, sort=False).cumcount().to_numpy()
    seats = np.array([quota.get(k, 0) for k in zip(pool[LABEL], pool[BATCH], strict=True)])
    picked = pool[rank < seats]
    return picked.sort_values([LABEL, BATCH, "priority"]).reset_index(drop=True)


def replay_priority(text: object, salt: str) -> float:
    """A row's priority in the replay buffer's reservoir: a seeded coin of its normalised text."""
    return unit_hash(text, f"{salt}\x00replay") if isinstance(text, str) else float("nan")


def noise_exclusions(rows: pd.DataFrame, params: Params, noise: Path | None,
                     suspects: Path | None, splits: pd.Series | None = None
                     ) -> pd.Series | None:
    """The rows the noise stage's verdicts keep out (None without its outputs: older
    workspaces, whose dvc.yaml has no noise stage)."""
    if noise is None or suspects is None or not noise.is_file() or not suspects.is_file():
        return None
    if splits is None:
        splits = assign_splits(rows, params.prepare)
    return exclusion_mask(rows, pd.read_parquet(suspects), read_json(noise)["batches"],
                          train=params.noise.train, splits=splits)


def batch_part(df: pd.DataFrame, cfg: PrepareConfig) -> pd.DataFrame:
    """What prepare derives from one batch's rows alone (the `DERIVED` columns), in row order."""
    # As `combine_batches` casts them: a missing value is pd.NA, anything else a string.
    texts = df[TEXT].astype("string").tolist() if TEXT in df.columns else [None] * len(df)
    groups = df[GROUP].astype("string").tolist() if GROUP in df.columns else [None] * len(df)
    nodes = [unit_nodes(t, g, cfg.split_key) for t, g in zip(texts, groups, strict=True)]
    return pd.DataFrame({
        TKEY: pd.array([n[0] for n in nodes], dtype=object),
        OWN: pd.array([n[1] for n in nodes], dtype=object),
        COIN: [unit_coin(t, o, cfg.salt) if t is not None else float("nan") for t, o in nodes],
        PRIO: [replay_priority(t, cfg.salt) for t in texts],
    })


def batch_parts(files: list[Path], cfg: PrepareConfig, cache: Path | None
                ) -> tuple[list[pd.DataFrame], list[pd.DataFrame], int]:
    """Each batch's rows and its part, the part from the cache when an earlier run made it
    under the same salt, key version and code; returns also how many parts were made now."""
    store = StageCache(cache)
    base = digest(PART_VERSION, code_digest(("ratchet.data", "tasks.prepare")), cfg.salt,
                  cfg.split_key)
    frames, parts, made, used = [], [], 0, []
    for f in files:
        df = pd.read_parquet(f)
        part = None
        if store.root is not None:
            path = store.path(digest(base, file_digest(f)), ".parquet")
            used.append(path)
            try:
                part = pd.read_parquet(path)
                if list(part.columns) != list(DERIVED) or len(part) != len(df):
                    part = None
            except Exception:  # noqa: BLE001 - absent or damaged: made again
                part = None
        if part is None:
            part = batch_part(df, cfg)
            made += 1
            if store.root is not None:
                store.root.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    part.to_parquet(tmp, index=False, compression="zstd")
        frames.append(df)
        parts.append(part)
    store.keep(used)
    return frames, parts, made


def run(params: Params, *, batches: Path, out: Path, replay: Path, metrics: Path,
        all_metrics: Path | None = None,
        noise: Path | None = None, suspects: Path | None = None,
        champion: Path | None = None, cache: Path | None = None) -> dict:
    """Prepare the splits and the replay buffer from every batch.

    With `cache` (a folder), what a batch gives by itself (`batch_part`) is kept between runs,
    so a run hashes only the rows of new batches; the outputs are those of a run from scratch.
    """
    cfg = params.prepare
    # champion.json is read, not a DVC dependency: a champion move must not re-run prepare, and
    # the scheme can only change with `prepare` params, which re-run this stage. A dvc.yaml made
    # before `--champion` existed still gets the check, from the workspace's file.
    champion = champion or (CHAMPION_FILE if CHAMPION_FILE.is_file() else None)
    if champion is not None and champion.is_file():
        check_split_scheme(read_json(champion), params.registry.model_name, cfg)
    files = batch_files(batches)
    if not files:
        raise BatchRefused(str(batches), ["no batches yet: run `ratchet ingest FILE` first"])
    frames, parts, made = batch_parts(files, cfg, cache)
    rows = combine_batches(files, frames)
    derived = pd.concat(parts, ignore_index=True).set_axis(rows.index)
    splits = assign_splits(rows, cfg, nodes=(derived[TKEY].tolist(), derived[OWN].tolist()),
                           coins=derived[COIN].to_numpy())
    exclude = noise_exclusions(rows, params, noise, suspects, splits)
    rows, stats = prepare_frame(rows.assign(**{PRIO: derived[PRIO]}), cfg, exclude,
                                splits=splits, keys=derived[TKEY])
    stats["cache/batches_split"] = made
    stats["cache/batches_reused"] = len(files) - made
    for split in SPLITS:
        part = rows[rows["split"] == split].drop(columns=["split", PRIO])
        write_parquet_atomic(part, out / f"{split}.parquet")
        for sl in (RECENT, REFERENCE):
            stats[f"{split}/{sl}"] = int((part["slice"] == sl).sum())
    train = rows[rows["split"] == "train"]
    buffer = replay_buffer(train.drop(columns=["split", PRIO]), cfg.replay_size, cfg.salt,
                           priority=train[PRIO].to_numpy())
    write_parquet_atomic(buffer, replay)
    stats["replay/rows"] = len(buffer)
    stats["replay/labels"] = int(buffer[LABEL].nunique())
    stats["replay/batches"] = int(buffer[BATCH].nunique())
    stats["labels"] = int(rows[LABEL].nunique())
    if DOMAIN in rows.columns:
        for domain, n in rows[DOMAIN].fillna("(none)").value_counts().sort_index().items():
            stats[f"domain/{domain}"] = int(n)
    write_metrics("prepare", stats, metrics, all_metrics)
    return stats


def main() -> None:
    stage_main("prepare", __doc__, {
        "batches": "folder of batch parquet files",
        "out": "folder for train/val/test parquet files",
        "replay": "replay buffer parquet to write (for continual training)",
        "metrics": "prepare metrics JSON to write",
        "all_metrics": FULL_HELP,
        "noise": "the noise stage's report (which batches are flagged or reviewed)",
        "suspects": "the noise stage's suspect rows (parquet)",
        "champion": "champion.json: the split scheme the champion was trained under",
        "cache": "folder of per-batch parts kept between runs (.ratchet/cache/prepare)",
    }, run, optional=("noise", "suspects", "champion", "cache", "all_metrics"))


if __name__ == "__main__":
    main()
