"""Caches of what a model computed for a text: predictions (evaluate, the gate) and sentence
embeddings (drift), kept by model fingerprint and text hash.

A model's outputs never change (its fingerprint is the hash of its weights), so a model
predicts or embeds each text once across runs: the champion and the floor models of the gate
on the rows that are new since their last evaluation, the candidate once, and again never when
it becomes the champion.

The key of a text is a hash of the exact text the model is given, not of a normalised form: a
model's tokenizer decides what casing, accents and spacing mean to it (a cased encoder reads
"US" and "us" apart), so a normalised key could hand one text's output to another. It costs no
hits in a workspace: prepare keeps one row per normalised text.

Storage, under the workspace's `.ratchet/cache/` (local derived data, not versioned: deleting
it costs only time): one folder per model, holding parquet shards. A call that computes rows
adds one shard holding only those rows, written atomically (a reader never sees half a shard),
so a run writes what is new, not the model's whole history. Shards of similar size are merged
once FANOUT of them pile up (size tiers, as a log-structured store does), so a model's folder
holds O(log rows) shards and every row is rewritten O(log rows) times in all, never once per
run. At most MAX_MODELS models are kept, least recently used dropped first: a rejected
candidate's rows do not pile up run after run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.runtime import atomic_path

KEY, LABEL, SCORE, VECTOR = "key", "label", "score", "vector"
FANOUT = 4
"""Shards of one size tier (rows within a factor FANOUT) merged into one when this many pile up."""
MAX_MODELS = 8
"""Models kept per cache (the champion, the floor's, the last candidates); older ones go."""
STALE_TMP_S = 3600.0
"""Temporary files older than this are left by a killed writer and removed."""


def text_key(text: str) -> str:
    """The cache key of a text: a hash of the exact text the model saw (casing matters)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _safe(fingerprint: str) -> str:
    return "".join(ch for ch in fingerprint if ch.isalnum() or ch in "-_.")[:96] or "model"


class ShardStore:
    """Rows per model in `root/<model>/*.parquet`: appended as shards, merged by size tier."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, model: str) -> Path:
        return self.root / _safe(model)

    def shards(self, model: str) -> list[Path]:
        folder = self.folder(model)
        return sorted(folder.glob("*.parquet")) if folder.is_dir() else []

    def read(self, model: str, columns: list[str]) -> pd.DataFrame:
        """Every stored row of `model` (the last written wins for a key); marks it used."""
        parts = []
        for path in self.shards(model):
            try:
                parts.append(pd.read_parquet(path, columns=columns))
            except Exception:  # noqa: BLE001 - a damaged or vanished shard is only lost time
                continue
        self._touch(model)
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return table.drop_duplicates(KEY, keep="last") if len(parts) > 1 else table

    def append(self, model: str, rows: pd.DataFrame) -> None:
        """Add `rows` as one new shard, then merge a full size tier and drop unused models."""
        folder = self.folder(model)
        folder.mkdir(parents=True, exist_ok=True)
        self._write(folder, rows)
        self.compact(model)
        self.evict(keep=model)

    def _write(self, folder: Path, rows: pd.DataFrame) -> Path:
        # Names sort by creation time, so a later shard wins a key over an earlier one.
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        path = folder / name
        with atomic_path(path) as tmp:
            rows.to_parquet(tmp, index=False)
        return path

    @staticmethod
    def _rows(path: Path) -> int:
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - unreadable: treat as empty, the next merge drops it
            return 0

    def compact(self, model: str) -> None:
        """Merge the shards of each size tier that holds FANOUT or more, smallest tier first.

        The merged shard takes the newest name of its parts, so it sorts where its newest row
        was written; the parts are removed after it is in place (a crash in between leaves
        duplicates, which reads drop).
        """
        folder = self.folder(model)
        self._clean_tmp(folder)
        while True:
            sizes = {p: self._rows(p) for p in self.shards(model)}
            tiers: dict[int, list[Path]] = {}
            for path, n in sizes.items():
                tiers.setdefault(int(math.log(max(n, 1), FANOUT)), []).append(path)
            full = [t for t, paths in sorted(tiers.items()) if len(paths) >= FANOUT]
            if not full:
                return
            parts = sorted(tiers[full[0]])
            frames = []
            for p in parts:
                try:
                    frames.append(pd.read_parquet(p))
                except Exception:  # noqa: BLE001 - a damaged shard is dropped by the merge
                    continue
            merged = pd.concat(frames, ignore_index=True).drop_duplicates(KEY, keep="last")
            target = parts[-1].with_name(parts[-1].stem + "-m.parquet")
            with atomic_path(target) as tmp:
                merged.to_parquet(tmp, index=False)
            for p in parts:
                p.unlink(missing_ok=True)

    @staticmethod
    def _clean_tmp(folder: Path) -> None:
        now = time.time()
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()

    def _touch(self, model: str) -> None:
        folder = self.folder(model)
        if folder.is_dir():
            with contextlib.suppress(OSError):
                os.utime(folder)

    def evict(self, keep: str | None = None, max_models: int | None = None) -> list[str]:
        """Remove the least recently used models beyond `max_models` (MAX_MODELS); returns them."""
        limit = MAX_MODELS if max_models is None else max_models
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        gone = []
        for folder in folders[limit:]:
            if keep is not None and folder.name == _safe(keep):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
        return gone


def _legacy(root: Path, model: str) -> Path:
    """Where the cache before shards kept a model's predictions: one file, rewritten per call."""
    name = "".join(ch for ch in model if ch.isalnum() or ch in "-_")[:64] or "model"
    return root / f"{name}.parquet"


class PredictionCache:
    """Labels and top-class scores per (model fingerprint, text), sharded per model (ShardStore).

    `root` None is a cache that keeps nothing (every call predicts), for callers outside a
    workspace.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.store = ShardStore(root) if root is not None else None

    def _read(self, fingerprint: str) -> pd.DataFrame:
        assert self.store is not None and self.root is not None
        old = _legacy(self.root, fingerprint)
        if old.is_file():  # a cache written before shards: its file becomes the first shard
            folder = self.store.folder(fingerprint)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(old, folder / f"{0:020d}-legacy.parquet")
        return self.store.read(fingerprint, [KEY, LABEL, SCORE])

    def predict(self, fingerprint: str | None, texts: Sequence[str],
                predict: Callable[[list[str]], tuple[list[str], Sequence[float]]]
                ) -> tuple[list[str], np.ndarray, int]:
        """The model's (labels, scores) for `texts`, calling `predict` only on uncached texts.

        Returns also how many texts were predicted now (0 when all were cached).
        """
        texts = [str(t) for t in texts]
        if self.store is None or not fingerprint:
            labels, scores = predict(texts) if texts else ([], [])
            return list(labels), np.asarray(scores, dtype=float), len(texts)
        keys = [text_key(t) for t in texts]
        known = self._read(fingerprint)
        where = pd.Index(known[KEY].astype(str)).get_indexer(keys)
        if len(known):
            at = np.maximum(where, 0)
            labels = known[LABEL].astype(str).to_numpy(dtype=object)[at]
            scores = known[SCORE].to_numpy(dtype=float)[at]
        else:
            labels, scores = np.empty(len(keys), dtype=object), np.zeros(len(keys))
        missing = sorted({k: i for i, k in enumerate(keys) if where[i] < 0}.values())
        if missing:
            new_labels, new_scores = predict([texts[i] for i in missing])
            fresh = pd.DataFrame({KEY: [keys[i] for i in missing],
                                  LABEL: [str(x) for x in new_labels],
                                  SCORE: np.asarray(new_scores, dtype=float)})
            self.store.append(fingerprint, fresh)
            got = dict(zip(fresh[KEY], zip(fresh[LABEL], fresh[SCORE], strict=True),
                           strict=True))
            for i in np.flatnonzero(where < 0).tolist():
                labels[i], scores[i] = got[keys[i]]
        return [str(x) for x in labels], scores, len(missing)


class EmbeddingCache:
    """Sentence embeddings per (encoder key, text), sharded per encoder (ShardStore).

    An embedding is stored as its float32 bytes; `root` None keeps nothing.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.store = ShardStore(root) if root is not None else None

    def lookup(self, encoder: str, texts: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors of the cached texts in input order, row i zero when missing; the missing
        row positions)."""
        if self.store is None:
            return None, np.arange(len(texts))
        keys = [text_key(str(t)) for t in texts]
        known = self.store.read(encoder, [KEY, VECTOR])
        where = pd.Index(known[KEY].astype(str)).get_indexer(keys)
        missing = np.flatnonzero(where < 0)
        if len(known) == 0:
            return None, missing
        blobs = known[VECTOR].tolist()
        dim = len(blobs[0]) // 4
        table = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)
        out = table[np.maximum(where, 0)].copy()
        out[missing] = 0
        return out, missing

    def embed(self, encoder: str, texts: Sequence[str],
              compute: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, int]:
        """Embeddings of `texts` (n, dim) float32, calling `compute` only on uncached texts.

        Returns also how many texts were embedded now (0 when all were cached).
        """
        texts = [str(t) for t in texts]
        cached, missing = self.lookup(encoder, texts)
        if len(missing) == 0 and cached is not None:
            return cached, 0
        first: dict[str, int] = {}  # one embedding per distinct missing text
        for i in missing.tolist():
            first.setdefault(texts[i], i)
        fresh = np.asarray(compute(list(first)), dtype=np.float32)
        if fresh.ndim != 2 or fresh.shape[0] != len(first):
            raise ValueError(f"{fresh.shape} embeddings for {len(first)} texts")
        if cached is None or cached.shape[1] != fresh.shape[1]:
            cached = np.zeros((len(texts), fresh.shape[1]), dtype=np.float32)
        row = {t: j for j, t in enumerate(first)}
        for i in missing.tolist():
            cached[i] = fresh[row[texts[i]]]
        if self.store is not None and first:
            self.store.append(encoder, pd.DataFrame({
                KEY: [text_key(t) for t in first], VECTOR: [v.tobytes() for v in fresh]}))
        return cached, len(first)
