"""One retrain at a time per workspace: a second caller waits, a dead holder frees the lock."""

import subprocess
import sys
import threading
import time

import pytest

from ratchet.errors import WorkspaceError
from ratchet.workspace import apply_overrides, retrain_lock


def test_second_retrain_waits_for_the_first(tmp_path):
    order: list[str] = []
    waits: list[str] = []
    first_in = threading.Event()

    def first():
        with retrain_lock(tmp_path):
            order.append("first in")
            first_in.set()
            time.sleep(0.6)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with retrain_lock(tmp_path, on_wait=waits.append):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
    assert waits and "pid" in waits[0]


def test_waiting_can_time_out_and_a_killed_holder_frees_the_lock(tmp_path):
    code = ("import sys, time; from pathlib import Path; from ratchet.workspace import "
            "retrain_lock\nwith retrain_lock(Path(sys.argv[1])):\n print('held', flush=True)\n"
            " time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceError, match="still running"), \
                retrain_lock(tmp_path, timeout=0.5):
            pass
    finally:
        holder.kill()
        holder.wait()
    with retrain_lock(tmp_path, timeout=5):  # the OS released the dead holder's lock
        pass


def test_overrides_are_validated_before_params_change(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("finetune:\n  epochs: 3.0\n")
    apply_overrides(tmp_path, {"finetune": {"epochs": 1.0}})
    assert "epochs: 1.0" in params.read_text()
    before = params.read_text()
    with pytest.raises(Exception, match="epoch"):
        apply_overrides(tmp_path, {"finetune": {"epoch": 2}})
    assert params.read_text() == before
