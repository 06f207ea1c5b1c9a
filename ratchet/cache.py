"""A prediction cache: what a model predicted for a text, kept by model fingerprint and text hash.

A model's predictions never change (its fingerprint is the hash of its weights), so a model
predicts each text once: the champion and the floor models of the gate on the rows that are new
since their last evaluation, the candidate once, and again never when it becomes the champion.
The cache is local derived data under the workspace's `.ratchet/` (not versioned: deleting it
costs only time) and is written atomically, one parquet file per model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.runtime import atomic_path

KEY, LABEL, SCORE = "key", "label", "score"


def text_key(text: str) -> str:
    """The cache key of a text: a hash of the exact text the model saw (casing matters)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


class PredictionCache:
    """Labels and top-class scores per (model fingerprint, text), in `root/<fingerprint>.parquet`.

    `root` None is a cache that keeps nothing (every call predicts), for callers outside a
    workspace.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, fingerprint: str) -> Path:
        assert self.root is not None
        safe = "".join(ch for ch in fingerprint if ch.isalnum() or ch in "-_")[:64] or "model"
        return self.root / f"{safe}.parquet"

    def _read(self, fingerprint: str) -> pd.DataFrame:
        path = self._path(fingerprint)
        if path.is_file():
            try:
                return pd.read_parquet(path, columns=[KEY, LABEL, SCORE])
            except Exception:  # noqa: BLE001 - a damaged cache file is only lost time
                pass
        return pd.DataFrame({KEY: pd.Series(dtype=str), LABEL: pd.Series(dtype=str),
                             SCORE: pd.Series(dtype=float)})

    def predict(self, fingerprint: str | None, texts: Sequence[str],
                predict: Callable[[list[str]], tuple[list[str], Sequence[float]]]
                ) -> tuple[list[str], np.ndarray, int]:
        """The model's (labels, scores) for `texts`, calling `predict` only on uncached texts.

        Returns also how many texts were predicted now (0 when all were cached).
        """
        texts = [str(t) for t in texts]
        if self.root is None or not fingerprint:
            labels, scores = predict(texts) if texts else ([], [])
            return list(labels), np.asarray(scores, dtype=float), len(texts)
        keys = [text_key(t) for t in texts]
        known = self._read(fingerprint).drop_duplicates(KEY, keep="last").set_index(KEY)
        missing = sorted({k: i for i, k in enumerate(keys) if k not in known.index}.values())
        if missing:
            labels, scores = predict([texts[i] for i in missing])
            fresh = pd.DataFrame({KEY: [keys[i] for i in missing],
                                  LABEL: [str(x) for x in labels],
                                  SCORE: np.asarray(scores, dtype=float)})
            table = pd.concat([known.reset_index(), fresh], ignore_index=True)
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._path(fingerprint)) as tmp:
                table.to_parquet(tmp, index=False)
            known = table.set_index(KEY)
        rows = known.loc[keys]
        return rows[LABEL].astype(str).tolist(), rows[SCORE].to_numpy(dtype=float), len(missing)
