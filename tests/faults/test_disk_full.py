"""A full disk while writing: one `no space left on device` error naming the path, and nothing
half-written left (neither the file nor its temporary). Real writes: to /dev/full, and a real
checkpoint and model into a 2 MiB tmpfs (skipped, with the reason, where mounting is refused)."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratchet.errors import DiskFull
from ratchet.runtime import atomic_path, write_json
from tests.conftest import tiny_classifier
from tests.faults.procs import small_tmpfs


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_a_full_device_inside_atomic_path_is_one_no_space_error_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(DiskFull) as caught, atomic_path(target) as tmp:
        tmp.write_text("partial")
        with open("/dev/full", "w") as full:  # the kernel's always-full device: ENOSPC
            full.write("x" * 10_000)
            full.flush()
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing {target} (")
    assert "free): free some space and run again" in message
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    assert not target.exists() and leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted on a fresh folder; unmounted afterwards, whatever happened."""
    if shutil.which("mount") is None:
        pytest.skip("no `mount` on this machine")
    with small_tmpfs(tmp_path / "small", "2m") as mnt:
        yield mnt


def test_a_checkpoint_on_a_full_disk_says_no_space_and_leaves_no_temp(small_disk):
    from ratchet.training import save_checkpoint

    model, _ = tiny_classifier(["a", "b"])  # ~8 MB of weights for a 2 MiB disk
    folder = small_disk / "ckpt" / "abc"
    with pytest.raises(DiskFull) as caught:
        save_checkpoint(folder, {"model": model.state_dict(), "step": 3})
    message = str(caught.value)
    assert "no space left on device writing" in message and str(folder / "state.pt") in message
    assert "iostream" not in message
    assert not (folder / "state.pt").exists() and leftovers(small_disk) == []


def test_a_model_saved_on_a_full_disk_says_no_space_and_leaves_nothing(small_disk):
    from ratchet.training import save_model

    model, tok = tiny_classifier(["a", "b"])
    out = small_disk / "models" / "candidate"
    with pytest.raises(DiskFull) as caught:
        save_model(out, model, tok)
    assert f"no space left on device writing {out}" in str(caught.value)
    assert not out.exists() and leftovers(small_disk) == []
    assert list((small_disk / "models").iterdir()) == []


def test_json_on_a_full_disk_keeps_the_previous_file_whole(small_disk):
    target = small_disk / "metrics.json"
    write_json(target, {"kept": True})
    with open(small_disk / "filler", "wb", buffering=0) as fh:  # fill it to the last block
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    with pytest.raises(DiskFull) as caught:
        write_json(target, {"rows": ["x" * 100] * 10_000})
    assert f"no space left on device writing {target}" in str(caught.value)
    assert target.read_text() == '{\n  "kept": true\n}\n'
    assert leftovers(small_disk) == []


def test_dvc_itself_failing_on_a_full_disk_says_no_space(tmp_path):
    """DVC, not a stage, can be what fails on a full disk (its own lock and temp files): it
    exits 255 and no stage recorded why. The run's error still says no space left, and where.
    (The fault suite's disk-full run found it: `error: the pipeline failed (exit 255)`.)"""
    from ratchet import workspace
    from ratchet.errors import RatchetError
    from tests.faults import harness

    with small_tmpfs(tmp_path / "small", "60m") as mnt:
        ws = harness.make_workspace(mnt / "ws")
        workspace.ingest(ws, harness.batch_file(ws, 0))
        filler = mnt / "filler"
        with open(filler, "wb") as fh, pytest.raises(OSError):
            while True:  # until the disk is full
                fh.write(b"\0" * (1 << 20))
        with pytest.raises(RatchetError) as caught:
            workspace.repro(ws, "validate")
        assert "no space left on device" in str(caught.value), str(caught.value)
        assert str(ws) in str(caught.value)
