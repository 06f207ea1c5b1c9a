"""Atomic writes: a finished file is readable by others; a failed write leaves nothing behind."""

import os
import stat

import pandas as pd
import pytest

from ratchet.data import content_hash, write_parquet_atomic
from ratchet.runtime import read_json, write_json


def test_json_and_parquet_are_published_with_normal_permissions(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    write_parquet_atomic(pd.DataFrame({"text": ["a"]}), tmp_path / "b.parquet")
    for name in ("a.json", "b.parquet"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) & 0o044 == 0o044
    assert read_json(tmp_path / "a.json") == {"x": 1}


def test_failed_write_leaves_no_partial_file(tmp_path):
    bad = pd.DataFrame({"text": [object()]})  # pyarrow cannot serialise a bare object
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises
        write_parquet_atomic(bad, tmp_path / "out.parquet")
    assert list(tmp_path.iterdir()) == []


def test_content_hash_ignores_the_file_format_but_not_the_rows():
    a = pd.DataFrame({"text": ["x", "y"], "label": ["l1", "l2"]})
    assert content_hash(a) == content_hash(a.copy())
    assert content_hash(a) != content_hash(a.iloc[::-1])
    assert content_hash(a) != content_hash(a.assign(label=["l1", "l3"]))


def test_column_map_renames_and_reports_unused_columns():
    from ratchet.data import ColumnMap

    raw = pd.DataFrame({"body": ["a"], "intent": ["l"], "domain": ["d"], "note": ["n"]})
    out, unused = ColumnMap(text="body", label="intent").apply(raw)
    assert list(out.columns) == ["text", "label", "domain"] and unused == ["note"]
    assert ColumnMap(id="ref").required() == ["id"]


def test_value_types_keep_what_canonical_erases():
    from ratchet.data import value_types

    raw = pd.DataFrame({"text": ["a", 1, None, 2.5, ["x"]], "label": ["l"] * 5})
    assert value_types(raw)["text"].tolist() == ["str", "int", None, "float", "list"]
