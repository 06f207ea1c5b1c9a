"""Fast, clean interrupts: a real `ratchet run` on a tiny real workspace, in a session of its
own, interrupted while a stage runs: Ctrl-C (SIGINT to the whole process group, as a terminal
sends it), or SIGINT / SIGTERM to the `ratchet run` process alone. It must undo and exit within
the issue's 10 s, with every process it started gone (dvc, the stage's python, the ephemeral
Prefect server), and no version of the run left in the registry.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ratchet.config import load_params
from ratchet.promotion import Journal
from ratchet.registry import connect
from tests.faults.procs import Watched, ratchet_env, tiny_workspace

EXIT_S = 10.0  # the bound (asserted as a deadline, not a speed target)


def interrupt(tmp_path, engine: str, stage: str, sig: signal.Signals, *, group: bool
              ) -> float:
    ws = tiny_workspace(tmp_path / "ws")
    run = Watched(["run", "-w", str(ws), "--engine", engine], ratchet_env(tmp_path / "home"),
                  tmp_path / "run.log", tmp_path)
    try:
        run.wait_for(lambda r: r.running(f"tasks.{stage}"), timeout=600)
        time.sleep(0.5)  # well inside the stage
        sent = time.monotonic()
        if group:
            os.killpg(run.proc.pid, sig)
        else:
            os.kill(run.proc.pid, sig)
        run.wait_exit(timeout=60)
        took = time.monotonic() - sent
    except BaseException:
        if run.proc.poll() is None:
            run.kill_all()
        raise
    left = run.left()
    for pid in left:  # leave nothing behind for the next test, then fail
        os.kill(pid, signal.SIGKILL)
    print(f"{engine} {sig.name} to {'group' if group else 'pid'} in {stage}: exit {took:.2f} s")
    assert not left, f"still running after ratchet exited: {left}\n{run.tail()}"
    assert took <= EXIT_S, f"exited {took:.1f} s after {sig.name}\n{run.tail()}"
    assert run.proc.returncode != 0
    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    name = params.registry.model_name
    assert not client.search_model_versions(f"name = '{name}'")
    assert not Journal.unfinished(ws)
    assert "Error logging to API" not in run.tail(), run.tail()
    return took


def test_sigint_to_the_dvc_engine_run_alone_stops_its_stage_too(tmp_path):
    interrupt(tmp_path, "dvc", "validate", signal.SIGINT, group=False)


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "stage", "sig", "group"), [
    pytest.param("dvc", "finetune", signal.SIGINT, True, id="dvc-ctrl-c"),
    pytest.param("dvc", "finetune", signal.SIGTERM, False, id="dvc-sigterm"),
    pytest.param("prefect", "finetune", signal.SIGINT, True, id="prefect-ctrl-c"),
    pytest.param("prefect", "finetune", signal.SIGINT, False, id="prefect-sigint"),
    pytest.param("prefect", "evaluate", signal.SIGTERM, False, id="prefect-sigterm"),
])
def test_an_interrupted_run_undoes_and_exits_with_nothing_left(tmp_path, engine, stage, sig,
                                                                group):
    interrupt(tmp_path, engine, stage, sig, group=group)


def test_ctrl_c_while_a_stage_is_still_importing_is_one_line_not_a_traceback(tmp_path):
    """The stage processes spend their first seconds importing torch and pandas, outside
    stage_main's own handler; a Ctrl-C there is one `interrupted` line as well."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, os; signal.signal(signal.SIGINT, "
         "signal.default_int_handler); import tasks; os.kill(os.getpid(), signal.SIGINT); "
         "import time; time.sleep(30)"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RATCHET_DEBUG": ""})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert "interrupted" in err, err
