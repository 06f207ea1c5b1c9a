"""Data IO and the pure functions over rows: reading batches, normalising text, stable splits."""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import PrepareConfig
from ratchet.errors import BatchRefused
from ratchet.runtime import atomic_path

TEXT, LABEL, DOMAIN, BATCH = "text", "label", "domain", "batch_id"
ID, TIMESTAMP = "id", "timestamp"
# Rows that must share a split (turns of one conversation, paraphrases by one writer, ...).
GROUP = "group"
COLUMNS = (TEXT, LABEL, DOMAIN, ID, TIMESTAMP, GROUP)  # what a stored batch may hold, in order
SUFFIXES = {".csv", ".jsonl", ".json", ".parquet"}
SPLITS = ("train", "val", "test")
# The slices prepare marks: rows of the newest batch, and rows of every batch before it.
RECENT, REFERENCE = "recent", "reference"
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFKC, lower case, single spaces: the form the drift and validation reports count words of."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


# The versions of "the same text" (`prepare.split_key`). 1: `normalise`, which keeps punctuation,
# so "what's my balance?" and "whats my balance" could sit in train and test; workspaces made
# before version 2 keep it until they start a fresh baseline. 2: punctuation ignored too.
SPLIT_KEYS = (1, 2)


def text_key(text: str, version: int = 2) -> str:
    """The identity of a text for dedup, the split hash and the augmentation leak check.

    Version 2 drops every Unicode punctuation character (category P*: `'`, `?`, `-`, `«`, ...)
    from the normalised text, so `w-2` and `w2` are one text; symbols (`$`, `+`) stay, as they
    carry meaning. A text of punctuation only keeps its version-1 form rather than becoming "".
    """
    norm = normalise(text)
    if version == 1:
        return norm
    if version != 2:
        raise ValueError(f"unknown split key version {version!r} (known: {SPLIT_KEYS})")
    # casefold can leave compatibility forms (and NFKC can undo a fold): settle both first.
    bare = "".join(c for c in unicodedata.normalize("NFKC", norm)
                   if not unicodedata.category(c).startswith("P"))
    return _SPACE.sub(" ", bare).strip() or norm


def _coin(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by a key and the salt: a seeded coin per key."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def unit_hash(text: str, salt: str) -> float:
    """A seeded coin per normalised text (the replay buffer's priorities)."""
    return _coin(normalise(text), salt)


def _split_at(u: float, val_frac: float, test_frac: float) -> str:
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


def split_of(text: str, *, val_frac: float, test_frac: float, salt: str, key: int = 2) -> str:
    """Assign a split from a hash of the text's key (`text_key`), for a row in no group.

    The same text always lands in the same split, whatever batch it came in, so test sets only
    grow and no text can be in two splits.
    """
    return _split_at(_coin(text_key(text, key), salt), val_frac, test_frac)


def _group_key(group: str) -> str:
    # Its own namespace: a group called "hello" is not the text "hello".
    return f"\x01group\x00{group}"


def unit_nodes(text: object, group: object, key: int) -> tuple[str | None, str | None]:
    """A row's text node (its `text_key`) and its own node: its group's, or None when it has
    no group (its unit is then its text's); (None, None) for a row without text."""
    if not isinstance(text, str):
        return None, None
    own = _group_key(str(group).strip()) if isinstance(group, str) and group.strip() else None
    return text_key(text, key), own


def unit_coin(tnode: str, own: str | None, salt: str) -> float:
    """The coin of a row's own node, which decides its unit's split when it is the oldest row."""
    return _coin(own if own is not None else tnode, salt)


def assign_splits(rows: pd.DataFrame, cfg: PrepareConfig, *,
                  nodes: tuple[Sequence[str | None], Sequence[str | None]] | None = None,
                  coins: Sequence[float] | None = None) -> pd.Series:
    """Each row's split (None for a row without text), over rows of all batches.

    A row without a group hashes its text key (exactly `split_of`); a row with a `group` hashes
    the group, so a group never straddles splits. Groups and texts form units: two groups that
    hold the same text (by key) are one unit, and a text and every group it appears in share one
    split. A unit's split is the hash of its oldest row's group (or its text, if that row had
    none), oldest in arrival order: `batch_order`, then position. So a new batch never moves
    rows it does not touch, and a new group that repeats an old text joins the old unit's split;
    only two old units joined by a new row can move (the younger joins the older).

    `nodes` (each row's `unit_nodes`) and `coins` (its `unit_coin`), in row order, are what a
    row contributes by itself: given (prepare keeps them per batch), nothing is hashed here.
    """
    key, salt = cfg.split_key, cfg.salt
    if nodes is None:
        texts = rows[TEXT].tolist()
        groups = rows[GROUP].tolist() if GROUP in rows.columns else [None] * len(rows)
        pairs = [unit_nodes(t, g, key) for t, g in zip(texts, groups, strict=True)]
        nodes = ([p[0] for p in pairs], [p[1] for p in pairs])
    # Missing nodes as None, however the caller's frame spelt them (NaN, pd.NA).
    tnodes = [t if isinstance(t, str) else None for t in nodes[0]]
    owns = [o if isinstance(o, str) else None for o in nodes[1]]
    if coins is None:
        coins = [unit_coin(t, o, salt) if t is not None else float("nan")
                 for t, o in zip(tnodes, owns, strict=True)]
    if all(o is None for o in owns):  # no groups: each text is its own unit
        return pd.Series([_split_at(c, cfg.val_frac, cfg.test_frac) if t is not None else None
                          for t, c in zip(tnodes, coins, strict=True)],
                         index=rows.index, dtype=object)
    order = (np.argsort(rows["batch_order"].to_numpy(), kind="stable")
             if "batch_order" in rows.columns else np.arange(len(rows)))
    parent: dict[str, str] = {}
    oldest: dict[str, tuple[int, int]] = {}  # unit root -> its oldest row's (rank, position)

    def find(node: str) -> str:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for rank, i in enumerate(order):
        tnode = tnodes[i]
        if tnode is None:
            continue
        own = owns[i] if owns[i] is not None else tnode
        for node in {tnode, own}:
            if node not in parent:  # first seen here: this row is the oldest of its unit
                parent[node] = node
                oldest[node] = (rank, int(i))
        a, b = find(tnode), find(own)
        if a != b:  # join two units; the one whose oldest row came first keeps its split
            young, old = (a, b) if oldest[a] > oldest[b] else (b, a)
            parent[young] = old
    splits: dict[str, str] = {}
    out = []
    for tnode in tnodes:
        if tnode is None:
            out.append(None)
            continue
        root = find(tnode)
        if root not in splits:
            splits[root] = _split_at(coins[oldest[root][1]], cfg.val_frac, cfg.test_frac)
        out.append(splits[root])
    return pd.Series(out, index=rows.index, dtype=object)


def _decode(raw: bytes, name: str) -> str:
    """Strict UTF-8 (a leading BOM is dropped); a bad byte is refused with its offset and line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        hint = "save it as UTF-8"
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = "it looks like UTF-16 (byte-order mark); save it as UTF-8"
        elif b"\x00" not in raw[:4096]:
            hint = "it may be Latin-1 or Windows-1252; save it as UTF-8"
        raise BatchRefused(name, [
            f"undecodable bytes: not valid UTF-8 at byte {err.start} (line {line}): "
            f"{err.reason}; {hint}"
        ]) from None


def _read_jsonl(text: str, name: str) -> pd.DataFrame:
    """One JSON object per line; a broken line is refused with its line number, not skipped."""
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise BatchRefused(name, [
                f"line {lineno} is not valid JSON: {err.msg} (column {err.colno})"
            ]) from None
        if not isinstance(obj, dict):
            raise BatchRefused(name, [
                f"line {lineno} is a JSON {type(obj).__name__}, expected an object of columns"
            ])
        records.append(obj)
    return pd.DataFrame.from_records(records)


def read_table(path: Path) -> pd.DataFrame:
    """Read a csv/jsonl/parquet file; refuse unreadable files with a message naming why.

    Text formats are decoded here, strictly, so that a wrong encoding is reported with the byte
    offset and line instead of surfacing as mojibake in the batch. CSV values stay strings; JSON
    and parquet keep their types so that the contract can refuse numbers where text belongs.
    """
    name = str(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise BatchRefused(name, [
                "is a symlink that does not resolve (a loop or a missing target)"
            ]) from None
    if path.is_dir():
        raise BatchRefused(name, ["is a directory, expected a .csv, .jsonl or .parquet file"])
    if not path.exists():
        raise BatchRefused(name, ["file not found"])
    if not path.is_file():
        raise BatchRefused(name, ["is not a regular file"])
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise BatchRefused(name, [f"unsupported file type `{suffix}` (use .csv, .jsonl, .parquet)"])
    if path.stat().st_size == 0:
        raise BatchRefused(name, ["file is empty"])
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            text = _decode(path.read_bytes(), name)
            if suffix == ".csv":
                df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
            elif suffix == ".json" and text.lstrip().startswith("["):
                df = pd.DataFrame.from_records(json.loads(text))
            else:
                df = _read_jsonl(text, name)
    except (ValueError, OSError, TypeError, pd.errors.ParserError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BatchRefused(name, [f"could not be parsed as {suffix[1:]}: {detail}"]) from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


@dataclass(frozen=True)
class ColumnMap:
    """Which source column feeds each canonical column.

    `text` and `label` always name a column. The optional ones, left as None, use a column of the
    canonical name when the file has one; named explicitly, the file must have it.
    """

    text: str = TEXT
    label: str = LABEL
    domain: str | None = None
    id: str | None = None
    timestamp: str | None = None
    group: str | None = None

    def sources(self) -> dict[str, str]:
        """canonical name -> source column name."""
        return {TEXT: self.text, LABEL: self.label, DOMAIN: self.domain or DOMAIN,
                ID: self.id or ID, TIMESTAMP: self.timestamp or TIMESTAMP,
                GROUP: self.group or GROUP}

    def required(self) -> list[str]:
        """The optional canonical columns the user asked for by name."""
        asked = {DOMAIN: self.domain, ID: self.id, TIMESTAMP: self.timestamp, GROUP: self.group}
        return [col for col, src in asked.items() if src is not None]

    def apply(self, df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        """The frame with canonical column names, and the source columns nothing uses."""
        out = pd.DataFrame(index=df.index)
        used = set()
        for canon, src in self.sources().items():
            if src in df.columns:
                out[canon] = df[src]
                used.add(src)
        return out, [c for c in df.columns if c not in used]


def value_type(value: object) -> str | None:
    """A short type name for a cell (None for a missing value), to refuse numbers as text."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return "str"
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, bytes):
        return "bytes"
    return type(value).__name__


def value_types(df: pd.DataFrame) -> pd.DataFrame:
    """Per row, the type of each text-like column's value, before canonical() makes it a string."""
    out = pd.DataFrame(index=df.index)
    for col in (TEXT, LABEL, DOMAIN, GROUP):
        if col in df.columns:
            out[col] = pd.Series([value_type(v) for v in df[col].tolist()], index=df.index,
                                 dtype=object)
    return out.reset_index(drop=True)


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the known columns with string dtype; empty strings become missing values.

    A column of all-missing values stays: its absence would read as "column missing".
    """
    out = pd.DataFrame(index=df.index)
    for col in COLUMNS:
        if col in df.columns:
            values = df[col].astype("string")
            out[col] = values.mask(values.str.len() == 0)
    return out.reset_index(drop=True)


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary name beside the target, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def content_hash(df: pd.DataFrame) -> str:
    """A hash of a batch's rows, independent of the file format it came in."""
    cols = [c for c in COLUMNS if c in df.columns]
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
    return combine_batches(files, [pd.read_parquet(f) for f in files])


def combine_batches(files: Sequence[Path], frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The batches' frames (as read from `files`, oldest first) as one, with batch_id and
    arrival order."""
    tagged = [df.assign(**{BATCH: f.stem, "batch_order": order})
              for order, (f, df) in enumerate(zip(files, frames, strict=True))]
    out = pd.concat(tagged, ignore_index=True)
    for col in (TEXT, LABEL, DOMAIN, BATCH):
        if col not in out.columns:
            out[col] = pd.NA
        out[col] = out[col].astype("string")
    if GROUP in out.columns:  # only when a batch has groups: no empty column for the others
        out[GROUP] = out[GROUP].astype("string")
    return out


def label_names(*frames: pd.DataFrame) -> list[str]:
    """The sorted label set over the given frames."""
    labels: set[str] = set()
    for df in frames:
        labels.update(df[LABEL].dropna().astype(str))
    return sorted(labels)
