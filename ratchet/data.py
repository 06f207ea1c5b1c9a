"""Data IO and the pure functions over rows: reading batches, normalising text, stable splits."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import pandas as pd

from ratchet.errors import BatchRefused
from ratchet.runtime import publish

TEXT, LABEL, DOMAIN, BATCH = "text", "label", "domain", "batch_id"
SUFFIXES = {".csv", ".jsonl", ".json", ".parquet"}
SPLITS = ("train", "val", "test")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The form used for dedup and split hashing: NFKC, lower case, single spaces."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def split_of(text: str, *, val_frac: float, test_frac: float, salt: str) -> str:
    """Assign a split from a hash of the normalised text.

    The same text always lands in the same split, whatever batch it came in, so test sets only
    grow and no text can be in two splits.
    """
    digest = hashlib.sha256(f"{salt}\x00{normalise(text)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


def read_table(path: Path) -> pd.DataFrame:
    """Read a csv/jsonl/parquet file as strings; refuse unreadable files with a clear message."""
    name = str(path)
    if path.is_dir():
        raise BatchRefused(name, ["is a directory, expected a .csv, .jsonl or .parquet file"])
    if not path.exists():
        raise BatchRefused(name, ["file not found"])
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BatchRefused(name, [f"unsupported file type `{suffix}` (use .csv, .jsonl, .parquet)"])
    if path.stat().st_size == 0:
        raise BatchRefused(name, ["file is empty"])
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        elif suffix in {".jsonl", ".json"}:
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise BatchRefused(name, [f"not valid UTF-8 (byte {err.start}): {err.reason}"]) from None
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise BatchRefused(name, [f"could not be parsed as {suffix[1:]}: {err}"]) from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the known columns with string dtype; empty strings become missing values."""
    out = pd.DataFrame(index=df.index)
    for col in (TEXT, LABEL, DOMAIN):
        if col in df.columns:
            values = df[col].astype("string")
            out[col] = values.mask(values.str.len() == 0)
    return out.reset_index(drop=True)


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary name beside the target, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def content_hash(df: pd.DataFrame) -> str:
    """A hash of a batch's rows, independent of the file format it came in."""
    cols = [c for c in (TEXT, LABEL, DOMAIN) if c in df.columns]
    h = hashlib.sha256()
    for row in df[cols].astype("string").fillna("\x00").itertuples(index=False):
        h.update("\x1f".join(row).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def batch_files(batches_dir: Path) -> list[Path]:
    """Batch files in arrival order (names start with a zero-padded sequence number)."""
    return sorted(p for p in batches_dir.glob("*.parquet") if not p.name.startswith("."))


def load_batches(batches_dir: Path) -> pd.DataFrame:
    """All batches, oldest first, with their batch_id and arrival order."""
    files = batch_files(batches_dir)
    if not files:
        raise BatchRefused(str(batches_dir), ["no batches yet: run `ratchet ingest FILE` first"])
    frames = []
    for order, f in enumerate(files):
        df = pd.read_parquet(f)
        df[BATCH] = f.stem
        df["batch_order"] = order
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    for col in (TEXT, LABEL, DOMAIN, BATCH):
        if col not in out.columns:
            out[col] = pd.NA
        out[col] = out[col].astype("string")
    return out


def label_names(*frames: pd.DataFrame) -> list[str]:
    """The sorted label set over the given frames."""
    labels: set[str] = set()
    for df in frames:
        labels.update(df[LABEL].dropna().astype(str))
    return sorted(labels)
