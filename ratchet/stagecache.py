"""Per-batch results a stage keeps between runs, so a run works only on the batches that are new.

A stored batch never changes, so what a stage derives from it (validate's verdict and Data Docs
pages, prepare's text keys and split coins) is kept under a key made of the file's bytes and
everything else that could change the result: the stage's params, the code that computes it, and
for validate the batches before it. An entry is one file written atomically under the
workspace's `.ratchet/cache/<stage>/` (not versioned); an entry that cannot be read is a miss and
is written again, so a damaged or deleted cache only costs time. Each run marks the entries it
used (their mtime) and removes those no run used for MAX_IDLE_S (other params, old code).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ratchet.runtime import atomic_path

MAX_IDLE_S = 30 * 86400


def digest(*parts: Any) -> str:
    """A hash of JSON-able parts (dict keys sorted), the key of an entry."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """A hash of the source of the named modules: new code, new keys."""
    h = hashlib.sha256()
    for name in modules:
        module = importlib.import_module(name)
        h.update(name.encode())
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()


class StageCache:
    """Entries by key in `root`: `<key><suffix>` files (JSON ones gzipped). `root` None keeps
    nothing."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None and root.is_dir():
            # What a killed run left mid-write (atomic_path's temporaries): never an entry.
            for stale in root.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def path(self, key: str, suffix: str) -> Path:
        assert self.root is not None
        return self.root / f"{key}{suffix}"

    def read_json(self, key: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        try:
            entry = json.loads(gzip.decompress(self.path(key, ".json.gz").read_bytes()))
        except (OSError, ValueError, EOFError):  # absent or damaged: a miss
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def keep(self, used: Iterable[Path]) -> None:
        """Mark the entries this run used, and remove the ones no run used for MAX_IDLE_S."""
        if self.root is None or not self.root.is_dir():
            return
        now = time.time()
        used = set(used)
        for path in used:
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
        for path in self.root.iterdir():
            with contextlib.suppress(OSError):
                if path not in used and now - path.stat().st_mtime > MAX_IDLE_S:
                    path.unlink()

    def write_json(self, key: str, entry: dict[str, Any]) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(key, ".json.gz")) as tmp:
            tmp.write_bytes(gzip.compress(json.dumps({**entry, "key": key}).encode(), mtime=0))
