"""validate and prepare work on what is new: per-batch results kept between runs (issue 14).

Real stages on real batch files: a second run with one new batch validates (great-expectations)
and splits only that batch, and gives what a run from scratch gives; a params change, a damaged
entry or a changed batch re-does what it must.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ratchet.config import parse_params
from ratchet.data import SPLITS, canonical, content_hash, load_batches, write_parquet_atomic
from ratchet.demo_data import OLD_DOMAINS, make_rows


def _write(folder: Path, seq: int, df: pd.DataFrame) -> Path:
    """A batch file as ingest stores it."""
    stored = canonical(df)
    path = folder / f"{seq:04d}-{content_hash(stored)[:12]}.parquet"
    write_parquet_atomic(stored, path)
    return path


def history(folder: Path, rows: int = 60) -> list[pd.DataFrame]:
    """Four batches: fresh texts; repeats of batch 1 (some with another label: conflicts, some
    re-cased: normalised duplicates) and groups; a group joining an old text; a new label."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, seen = random.Random(7), set()
    b1 = make_rows(rng, OLD_DOMAINS[:2], rows, seen)
    b2 = make_rows(rng, OLD_DOMAINS[:2], rows, seen)
    repeats = b1.iloc[:6].copy()
    repeats.loc[repeats.index[:3], "label"] = "check_balance"  # another label: conflicts
    repeats.loc[repeats.index[3:], "text"] = repeats["text"].iloc[3:].str.upper()
    b2 = pd.concat([b2, repeats], ignore_index=True)
    b2["group"] = [f"g{i // 4}" if i < 20 else None for i in range(len(b2))]
    b3 = make_rows(rng, OLD_DOMAINS[:3], rows, seen)
    b3["group"] = [f"h{i // 3}" if i < 9 else None for i in range(len(b3))]
    b3.loc[0, "text"] = b2.loc[1, "text"]  # joins unit g0 of batch 2 and h0 of batch 3
    b4 = make_rows(rng, OLD_DOMAINS[:3], rows, seen)
    b4.loc[:4, "label"] = "brand_new_label"
    b4 = pd.concat([b4, b1.iloc[10:12]], ignore_index=True)  # repeats, same labels
    return [b1, b2, b3, b4]


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[pd.DataFrame]:
    return history(tmp_path_factory.mktemp("frames"))


# --- validate --------------------------------------------------------------------------------


def _validate(tmp: Path, batches: Path, cache: Path | None, tag: str, **overrides) -> dict:
    from tasks.validate import run

    params = parse_params({"validate": {"allow_new_labels": True, **overrides}})
    docs = tmp / f"docs-{tag}"
    summary = run(params, batches=batches, report=tmp / f"summary-{tag}.json",
                  metrics=tmp / f"metrics-{tag}.json", docs=docs, cache=cache)
    metrics = json.loads((tmp / f"metrics-{tag}.json").read_text())
    pages = sorted(p.name for p in (docs / "validations").rglob("*.html"))
    index = (docs / "index.html").read_text()
    return {"summary": summary, "metrics": metrics, "pages": pages, "index": index}


def test_validate_runs_great_expectations_only_on_new_batches(tmp_path, frames):
    batches, cache = tmp_path / "batches", tmp_path / "cache"
    batches.mkdir()
    names = [_write(batches, i + 1, df).name for i, df in enumerate(frames[:2])]

    first = _validate(tmp_path, batches, cache, "1")
    assert (first["metrics"]["validated_now"], first["metrics"]["reused"]) == (2, 0)

    names.append(_write(batches, 3, frames[2]).name)
    second = _validate(tmp_path, batches, cache, "2")
    assert (second["metrics"]["validated_now"], second["metrics"]["reused"]) == (1, 2)
    # Data Docs still cover every batch: a page each, all three in the index.
    assert len(second["pages"]) == 3
    assert all(n in second["index"] for n in names)

    scratch = _validate(tmp_path, batches, None, "scratch")  # no cache: every batch, as before
    assert scratch["metrics"]["validated_now"] == 3
    same = ("passed", "batches", "warnings")
    assert {k: second["summary"][k] for k in same} == {k: scratch["summary"][k] for k in same}
    assert {k: v for k, v in second["metrics"].items() if k not in ("validated_now", "reused")} \
        == {k: v for k, v in scratch["metrics"].items() if k not in ("validated_now", "reused")}
    warned = "\n".join(second["summary"]["warnings"])
    assert "conflicting labels" in warned and "duplicates of earlier batches" in warned


def test_validate_redoes_what_a_params_change_or_a_damaged_entry_touches(tmp_path, frames):
    from tasks.validate import chain_keys

    batches, cache = tmp_path / "batches", tmp_path / "cache"
    batches.mkdir()
    files = [_write(batches, i + 1, df) for i, df in enumerate(frames[:2])]
    assert _validate(tmp_path, batches, cache, "1")["metrics"]["validated_now"] == 2

    # A damaged entry costs its batch a validation, no more: the next batch's key is its own.
    keys = chain_keys(files, parse_params({"validate": {"allow_new_labels": True}}))
    (cache / f"{keys[0]}.json.gz").write_bytes(b"\x1f\x8b cut")
    again = _validate(tmp_path, batches, cache, "2")
    assert (again["metrics"]["validated_now"], again["metrics"]["reused"]) == (1, 1)

    # New params: the verdicts may differ, every batch is validated again.
    strict = _validate(tmp_path, batches, cache, "3", min_chars=30)
    assert (strict["metrics"]["validated_now"], strict["metrics"]["reused"]) == (2, 0)
    assert strict["metrics"]["warnings"] > again["metrics"]["warnings"]


def test_validate_keys_chain_the_history(tmp_path, frames):
    """A batch's verdict depends on the batches before it: replacing an earlier batch changes
    every later key, not the earlier ones."""
    from tasks.validate import chain_keys

    batches = tmp_path / "batches"
    batches.mkdir()
    files = [_write(batches, i + 1, df) for i, df in enumerate(frames[:3])]
    params = parse_params({})
    before = chain_keys(files, params)
    swapped = _write(batches, 2, frames[3])
    files[1].unlink()
    after = chain_keys([files[0], swapped, files[2]], params)
    assert after[0] == before[0] and after[1] != before[1] and after[2] != before[2]
    assert chain_keys(files[:1], parse_params({"model": {"source": "tiny"}}))[0] != before[0]


# --- prepare ---------------------------------------------------------------------------------


def _prepare(tmp: Path, batches: Path, cache: Path | None, tag: str, noise=None,
             **overrides) -> dict:
    from tasks import prepare

    params = parse_params({"prepare": {"replay_size": 50, **overrides}})
    out = tmp / f"prepared-{tag}"
    extra = {} if noise is None else {"noise": noise[0], "suspects": noise[1]}
    stats = prepare.run(params, batches=batches, out=out, replay=tmp / f"replay-{tag}.parquet",
                        metrics=tmp / f"prepare-{tag}.json", cache=cache, **extra)
    frames = {s: pd.read_parquet(out / f"{s}.parquet") for s in SPLITS}
    frames["replay"] = pd.read_parquet(tmp / f"replay-{tag}.parquet")
    return {"stats": stats, "frames": frames}


def _assign_splits_48e5dc0(rows: pd.DataFrame, cfg) -> pd.Series:
    """`ratchet.data.assign_splits` as commit 48e5dc0 had it (every row hashed, every run)."""
    from ratchet.data import GROUP, TEXT, _coin, _group_key, _split_at, text_key

    key, salt = cfg.split_key, cfg.salt
    order = (np.argsort(rows["batch_order"].to_numpy(), kind="stable")
             if "batch_order" in rows.columns else np.arange(len(rows)))
    texts = rows[TEXT].tolist()
    groups = rows[GROUP].tolist() if GROUP in rows.columns else [None] * len(rows)
    parent: dict[str, str] = {}
    oldest: dict[str, tuple[int, str]] = {}

    def find(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    nodes: list[str | None] = [None] * len(rows)
    for rank, i in enumerate(order):
        text, group = texts[i], groups[i]
        if not isinstance(text, str):
            continue
        tnode = text_key(text, key)
        own = _group_key(str(group).strip()) if isinstance(group, str) and group.strip() \
            else tnode
        for node in {tnode, own}:
            if node not in parent:
                parent[node] = node
                oldest[node] = (rank, own)
        a, b = find(tnode), find(own)
        if a != b:
            young, old = (a, b) if oldest[a] > oldest[b] else (b, a)
            parent[young] = old
        nodes[i] = tnode
    coins: dict[str, str] = {}
    out = []
    for node in nodes:
        if node is None:
            out.append(None)
            continue
        root = find(node)
        if root not in coins:
            coins[root] = _split_at(_coin(oldest[root][1], salt), cfg.val_frac, cfg.test_frac)
        out.append(coins[root])
    return pd.Series(out, index=rows.index, dtype=object)


def _replay_buffer_48e5dc0(train: pd.DataFrame, size: int, salt: str) -> pd.DataFrame:
    """`tasks.prepare.replay_buffer` as commit 48e5dc0 had it (one filter per stratum)."""
    from ratchet.data import BATCH, LABEL, TEXT, unit_hash
    from tasks.prepare import allocate

    if size == 0 or train.empty:
        return train.iloc[:0].assign(priority=pd.Series(dtype="float64"))
    prio = [unit_hash(t, f"{salt}\x00replay") for t in train[TEXT]]
    pool = train.assign(priority=prio).sort_values(["priority", TEXT], kind="stable")
    per_label = allocate(pool[LABEL].value_counts().to_dict(), size)
    picked = []
    for label, seats in sorted(per_label.items()):
        rows = pool[pool[LABEL] == label]
        per_batch = allocate(rows[BATCH].value_counts().to_dict(), seats)
        for batch, n in sorted(per_batch.items()):
            picked.append(rows[rows[BATCH] == batch].head(n))
    return pd.concat(picked).sort_values([LABEL, BATCH, "priority"]).reset_index(drop=True)


def reference(tmp: Path, batches: Path, noise=None, **overrides) -> dict:
    """The prepare of commit 48e5dc0: every batch read and hashed anew (`load_batches`, its
    `assign_splits` and `replay_buffer`, copied above; `prepare_frame` and the noise mask
    computing the rest as they did), written and read back as the stage does."""
    from tasks.prepare import noise_exclusions, prepare_frame

    params = parse_params({"prepare": {"replay_size": 50, **overrides}})
    cfg = params.prepare
    rows = load_batches(batches)
    extra = (None, None) if noise is None else noise
    splits = _assign_splits_48e5dc0(rows, cfg)
    rows, stats = prepare_frame(rows, cfg, noise_exclusions(rows, params, *extra, splits),
                                splits=splits)
    frames = {s: rows[rows["split"] == s].drop(columns=["split"]) for s in SPLITS}
    frames["replay"] = _replay_buffer_48e5dc0(frames["train"], cfg.replay_size, cfg.salt)
    for name, df in frames.items():
        df.to_parquet(tmp / f"ref-{name}.parquet", index=False)
        frames[name] = pd.read_parquet(tmp / f"ref-{name}.parquet")
    return {"stats": stats, "frames": frames}


def _same(got: dict, want: dict) -> None:
    for name, df in want["frames"].items():
        pd.testing.assert_frame_equal(got["frames"][name], df, obj=name)
    common = {k: v for k, v in got["stats"].items() if not k.startswith("cache/")}
    assert {k: common[k] for k in want["stats"]} == want["stats"]


def _noise(tmp: Path, names: list[str], frames: list[pd.DataFrame]) -> tuple[Path, Path]:
    """The noise stage's outputs with batch 2 flagged: its first 8 rows are suspects."""
    b2 = Path(names[1]).stem
    sus = tmp / "suspects.parquet"
    frames[1].iloc[:8].assign(batch_id=b2, suggested="x", quality=0.0).to_parquet(sus)
    report = tmp / "noise.json"
    report.write_text(json.dumps({"batches": {b2: {"flagged": True, "review": None}}}))
    return report, sus


def test_prepare_splits_only_the_new_batch_and_equals_the_full_rebuild(tmp_path, frames):
    batches, cache = tmp_path / "batches", tmp_path / "cache"
    batches.mkdir()
    names = [_write(batches, i + 1, df).name for i, df in enumerate(frames[:3])]
    noise = _noise(tmp_path, names, frames)
    first = _prepare(tmp_path, batches, cache, "1", noise)
    assert (first["stats"]["cache/batches_split"], first["stats"]["cache/batches_reused"]) == (3, 0)

    _write(batches, 4, frames[3])
    second = _prepare(tmp_path, batches, cache, "2", noise)
    assert (second["stats"]["cache/batches_split"], second["stats"]["cache/batches_reused"]) \
        == (1, 3)
    want = reference(tmp_path, batches, noise)
    _same(second, want)
    # What this history exercises, so that the equality means something.
    stats = want["stats"]
    assert stats["conflicting_texts"] >= 2 and stats["normalised_duplicates"] >= 3
    assert stats["exact_duplicates"] >= 2 and stats["noise/excluded"] > 0
    assert "brand_new_label" in set(second["frames"]["train"]["label"]) | set(
        second["frames"]["test"]["label"]) | set(second["frames"]["val"]["label"])
    joined = pd.concat([second["frames"][s].assign(split=s) for s in SPLITS])
    assert (joined.dropna(subset=["group"]).groupby("group")["split"].nunique() == 1).all()

    shutil.rmtree(cache)  # from scratch: the same bytes
    scratch = _prepare(tmp_path, batches, cache, "scratch", noise)
    assert scratch["stats"]["cache/batches_split"] == 4
    _same(scratch, want)
    for split in SPLITS:
        assert (tmp_path / "prepared-2" / f"{split}.parquet").read_bytes() == (
            tmp_path / "prepared-scratch" / f"{split}.parquet").read_bytes()


@pytest.mark.parametrize(("overrides", "split_again"), [
    ({"salt": "another"}, 4),      # every row's coin changes: every batch is split again
    ({"split_key": 1}, 4),         # every text key changes
    ({"val_frac": 0.3, "conflicts": "majority"}, 0),  # applied over the kept parts
])
def test_prepare_params_change_redoes_what_it_touches(tmp_path, frames, overrides,
                                                      split_again):
    batches, cache = tmp_path / "batches", tmp_path / "cache"
    batches.mkdir()
    for i, df in enumerate(frames):
        _write(batches, i + 1, df)
    base = _prepare(tmp_path, batches, cache, "base")
    assert base["stats"]["cache/batches_split"] == 4
    changed = _prepare(tmp_path, batches, cache, "changed", **overrides)
    assert changed["stats"]["cache/batches_split"] == split_again
    assert changed["stats"]["cache/batches_reused"] == 4 - split_again
    _same(changed, reference(tmp_path, batches, **overrides))
    assert not all(changed["frames"][s].equals(base["frames"][s]) for s in SPLITS)


def test_prepare_recomputes_a_damaged_part(tmp_path, frames):
    batches, cache = tmp_path / "batches", tmp_path / "cache"
    batches.mkdir()
    for i, df in enumerate(frames[:2]):
        _write(batches, i + 1, df)
    _prepare(tmp_path, batches, cache, "1")
    part = sorted(cache.glob("*.parquet"))[0]
    part.write_bytes(b"PAR1 cut")
    again = _prepare(tmp_path, batches, cache, "2")
    assert (again["stats"]["cache/batches_split"], again["stats"]["cache/batches_reused"]) == (1, 1)
    _same(again, reference(tmp_path, batches))



def test_entries_no_run_used_for_a_month_are_removed(tmp_path, frames):
    import os
    import time

    from ratchet.stagecache import MAX_IDLE_S

    batches, cache = tmp_path / "batches", tmp_path / "cache"
    batches.mkdir()
    _write(batches, 1, frames[0])
    _prepare(tmp_path, batches, cache, "salted", salt="another")  # parts of another salt
    old = sorted(cache.glob("*.parquet"))
    _prepare(tmp_path, batches, cache, "1")
    used = sorted(set(cache.glob("*.parquet")) - set(old))
    assert len(old) == len(used) == 1
    month = time.time() - MAX_IDLE_S - 60
    for path in old + used:
        os.utime(path, (month, month))
    again = _prepare(tmp_path, batches, cache, "2")
    assert again["stats"]["cache/batches_reused"] == 1
    assert sorted(cache.glob("*.parquet")) == used  # the idle one went, the used one stayed
    assert used[0].stat().st_mtime > month + 60


# --- what DVC stores -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
MODELS_AND_JUDGEMENTS = {"models/pretrained", "models/candidate", "data/noise"}


def _outs() -> dict[str, dict]:
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            outs[str(path)] = opts or {}
    return outs


def test_dvc_caches_no_derived_data_that_grows_with_the_history():
    """The DVC cache takes the models and the noise judgements (kept per batch, `persist`) per
    run; the rebuilt outputs are `cache: false` and git-ignored in a new workspace."""
    from ratchet.workspace import GITIGNORE, REBUILT

    outs = _outs()
    cached = {p for p, o in outs.items() if o.get("cache", True)}
    assert cached == MODELS_AND_JUDGEMENTS
    for path in REBUILT:
        assert outs[path].get("cache") is False, path
        assert f"/{path}" in GITIGNORE.splitlines(), path


@pytest.mark.slow
def test_a_rebuilt_output_comes_back_with_the_hash_dvc_lock_recorded(tmp_path):
    """A real workspace: after `dvc repro prepare` the prepared splits are neither in the DVC
    cache nor in git; deleted (a clone, an old checkout), `dvc status` names the stage and
    `dvc repro` rebuilds them, byte for byte what dvc.lock recorded, from the cached parts."""
    import subprocess
    import sys

    import yaml

    from ratchet import workspace
    from tests.faults import harness

    ws = harness.make_workspace(tmp_path / "ws")
    workspace.ingest(ws, harness.batch_file(ws, 0))

    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True,
                              text=True, env=workspace.tool_env(), check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    def recorded() -> dict[str, str]:
        lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
        return {o["path"]: o["md5"] for s in ("prepare", "validate") for o in lock[s]["outs"]}

    dvc("repro", "prepare")
    assert workspace.commit(ws, "retrain: promoted (version 1)") is True
    before = recorded()
    objects = {p.parent.name + p.name for p in (ws / ".dvc" / "cache").rglob("*") if p.is_file()}
    for path in ("data/prepared", "data/replay/buffer.parquet"):
        assert before[path].replace(".dir", "") not in objects, path
        assert subprocess.run(["git", "ls-files", "--", path], cwd=ws, capture_output=True,
                              text=True, check=True).stdout == ""
    shutil.rmtree(ws / "data" / "prepared")
    (ws / "data" / "replay" / "buffer.parquet").unlink()
    assert "prepare" in dvc("status", "prepare")

    dvc("repro", "prepare")
    after = recorded()
    for path in ("data/prepared", "data/replay/buffer.parquet",
                 "reports/validation/summary.json"):
        assert after[path] == before[path], path
    assert json.loads((ws / "metrics" / "prepare.json").read_text())["cache/batches_reused"] == 1
