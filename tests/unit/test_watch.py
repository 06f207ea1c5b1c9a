"""The incoming-folder watcher: one emission per new, finished file, remembered across restarts.

The emission is injected as a callable that records its calls; the real emission to a Prefect
server is covered by tests/integration/test_prefect_server.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ratchet.watch import EVENT, STATE_FILE, Watcher, landed_event, resource_id


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    return tmp_path


class Recorder:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[Path, Path]] = []
        self.fail = fail

    def __call__(self, ws: Path, file: Path) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("server down")
        self.calls.append((ws, file))

    @property
    def names(self) -> list[str]:
        return [f.name for _, f in self.calls]


def drop(ws: Path, name: str, text: str = "text,label\nhi,greeting\n") -> Path:
    path = ws / "data" / "incoming" / name
    path.write_text(text)
    return path


def test_each_new_file_is_emitted_once_after_two_scans_see_it_unchanged(ws):
    rec = Recorder()
    watcher = Watcher(ws, emit=rec)
    drop(ws, "a.csv")
    drop(ws, "b.csv")
    assert watcher.scan() == []  # seen once: it may still be being written
    emitted = watcher.scan()
    assert [p.name for p in emitted] == ["a.csv", "b.csv"]
    assert rec.calls == [(ws.resolve(), ws.resolve() / "data/incoming/a.csv"),
                         (ws.resolve(), ws.resolve() / "data/incoming/b.csv")]
    for _ in range(3):
        assert watcher.scan() == []
    drop(ws, "c.csv")
    watcher.scan()
    watcher.scan()
    assert rec.names == ["a.csv", "b.csv", "c.csv"]


def test_a_growing_file_waits_until_its_size_is_stable(ws):
    rec = Recorder()
    watcher = Watcher(ws, emit=rec)
    path = drop(ws, "big.csv", "text,label\n")
    watcher.scan()
    for i in range(3):
        with path.open("a") as fh:
            fh.write(f"row {i},label\n")
        assert watcher.scan() == [], "emitted while still growing"
    assert rec.calls == []
    assert [p.name for p in watcher.scan()] == ["big.csv"]


def test_a_restart_does_not_emit_again_but_a_replaced_file_is_new(ws):
    rec = Recorder()
    first = Watcher(ws, emit=rec)
    path = drop(ws, "a.csv")
    first.scan()
    first.scan()
    assert rec.names == ["a.csv"]
    state = json.loads((ws / STATE_FILE).read_text())
    assert set(state["emitted"]) == {"a.csv"}

    again = Watcher(ws, emit=rec)
    for _ in range(3):
        again.scan()
    assert rec.names == ["a.csv"]

    path.write_text("text,label\nsomething else entirely,greeting\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again.scan()
    again.scan()
    assert rec.names == ["a.csv", "a.csv"]


def test_a_removed_file_is_forgotten_so_the_same_name_later_is_emitted(ws):
    rec = Recorder()
    watcher = Watcher(ws, emit=rec)
    path = drop(ws, "a.csv")
    watcher.scan()
    watcher.scan()
    path.unlink()
    watcher.scan()
    assert json.loads((ws / STATE_FILE).read_text())["emitted"] == {}
    drop(ws, "a.csv")
    watcher.scan()
    watcher.scan()
    assert rec.names == ["a.csv", "a.csv"]


def test_dotfiles_temporary_files_and_folders_are_ignored(ws):
    rec = Recorder()
    watcher = Watcher(ws, emit=rec)
    for name in (".hidden.csv", "upload.csv.tmp", "x.part", "~lock.csv"):
        drop(ws, name)
    (ws / "data" / "incoming" / "folder").mkdir()
    for _ in range(3):
        watcher.scan()
    assert rec.calls == []
    assert not (ws / STATE_FILE).exists()


def test_a_failed_emission_is_retried_on_the_next_scan_and_not_recorded(ws):
    rec = Recorder(fail=1)
    watcher = Watcher(ws, emit=rec)
    drop(ws, "a.csv")
    watcher.scan()
    assert watcher.scan() == []  # the send failed
    assert not (ws / STATE_FILE).exists()
    assert [p.name for p in watcher.scan()] == ["a.csv"]
    assert rec.names == ["a.csv"]


def test_no_incoming_folder_and_an_unreadable_state_are_not_errors(tmp_path):
    (tmp_path / STATE_FILE).parent.mkdir(parents=True)
    (tmp_path / STATE_FILE).write_text("{not json")
    rec = Recorder()
    watcher = Watcher(tmp_path, emit=rec)
    assert watcher.scan() == []
    assert rec.calls == []


def test_the_event_names_the_workspace_and_the_file(ws):
    path = drop(ws, "a.csv")
    event = landed_event(ws, path)
    assert event["event"] == EVENT == "ratchet.batch.landed"
    assert event["resource"]["prefect.resource.id"] == resource_id(ws)
    assert event["resource"]["prefect.resource.id"] == f"ratchet.workspace.{ws.resolve()}"
    assert event["payload"] == {"workspace": str(ws.resolve()), "path": str(path.resolve()),
                                "name": "a.csv", "size": path.stat().st_size}


def run_until_emitted(ws: Path, rec: Recorder, interval: float, **kw) -> bool:
    """Run the watcher in its thread until it has emitted (10 s at most), stop it; whether the
    thread is still alive after the stop."""
    thread, stop = Watcher(ws, emit=rec).start(interval=interval, **kw)
    try:
        deadline = time.monotonic() + 10
        while not rec.calls and time.monotonic() < deadline:
            stop.wait(interval)
    finally:
        stop.set()
        thread.join(timeout=5)
    return thread.is_alive()


def test_run_in_a_thread_emits_and_stops(ws):
    rec = Recorder()
    drop(ws, "a.csv")
    assert not run_until_emitted(ws, rec, 0.05)
    assert rec.names == ["a.csv"]


def test_the_thread_emits_nothing_until_its_trigger_is_ready(ws):
    """`ratchet serve` starts the watcher before its trigger exists on the server; a file already
    waiting must not be emitted into the void (and marked emitted) in that gap."""
    rec, polls = Recorder(), []

    def ready() -> bool:
        polls.append(len(rec.calls))
        if len(polls) == 2:
            raise ConnectionError("server not answering yet")
        return len(polls) >= 5

    drop(ws, "a.csv")
    assert not run_until_emitted(ws, rec, 0.02, ready=ready)
    assert polls == [0, 0, 0, 0, 0]  # polled until ready, through the error, then never again
    assert rec.names == ["a.csv"]
    assert "a.csv" in json.loads((ws / STATE_FILE).read_text())["emitted"]
