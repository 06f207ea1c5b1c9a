"""Failures as one `error:` line (plus a log), never a traceback: the MLflow registry down, an
unexpected exception in a command or a stage, Ctrl-C. Real workspaces (git + DVC), a real
`mlflow server` started then stopped, the real `ratchet` console script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.procs import default_signals
from tests.integration import servers

BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    """This environment without anything that would override the workspace's registry set-up."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_HTTP_REQUEST", "MLFLOW_TRACKING_URI", "RATCHET_DEBUG"))}
    return {**keep, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            **extra}


def ratchet(*args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ratchet"), *args], capture_output=True, text=True,
                          env=env(**extra), timeout=timeout, check=False)


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if line.startswith("error:")]


def make_ws(root: Path, uri: str | None = None, timeout_s: float = 3) -> Path:
    from ratchet import workspace

    registry = {"tracking_uri": uri, "timeout_s": timeout_s} if uri else {}
    return workspace.init(root / "ws", {"model": {"source": "tiny"},
                                        **({"registry": registry} if registry else {})})


def assert_unreachable(proc: subprocess.CompletedProcess, uri: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    lines = errors(proc)
    assert len(lines) == 1, out
    assert uri in lines[0] and "unreachable after" in lines[0], out
    assert "start it or fix registry.tracking_uri" in lines[0], out


def test_status_against_a_closed_port_is_one_unreachable_line(tmp_path):
    uri = f"http://127.0.0.1:{servers.free_port()}"
    ws = make_ws(tmp_path, uri, timeout_s=3)
    start = time.monotonic()
    proc = ratchet("status", "-w", str(ws), timeout=120)
    assert_unreachable(proc, uri)
    assert "Connection refused" in errors(proc)[0]
    assert time.monotonic() - start < 60  # generous: the budget is 3 s (it took 266 s before)


@pytest.mark.slow
def test_a_stopped_mlflow_server_fails_status_and_run_in_one_line(tmp_path):
    port = servers.free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
           (tmp_path / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    server = servers.start("mlflow server", cmd, url=uri, log=tmp_path / "mlflow.log",
                           env={**env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                           cwd=tmp_path)
    try:
        servers.wait_ready(server, "/health", 120)
        ws = make_ws(tmp_path, uri, timeout_s=3)
        up = ratchet("status", "-w", str(ws))
        assert up.returncode == 0, up.stdout + up.stderr + server.log_tail()
    finally:
        servers.stop(server)
    assert_unreachable(ratchet("status", "-w", str(ws)), uri)
    run = ratchet("run", "--engine", "dvc", "-w", str(ws))
    assert_unreachable(run, uri)
    logs = list((ws / ".ratchet" / "logs").glob("*-run-*.log"))
    assert logs and "unreachable" in logs[0].read_text()


def stage_script(ws: Path, body: str) -> subprocess.CompletedProcess:
    """A stage run as DVC runs one: `stage_main` in a child process, in the workspace."""
    code = ("from ratchet.stage import stage_main\ndef fn(params):\n"
            + textwrap.indent(textwrap.dedent(body).strip(), "    ")
            + '\nstage_main("probe", "a probe stage", {}, fn)\n')
    return subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True,
                          env=env(), timeout=120, check=False)


@pytest.mark.slow  # the fault suite only (make test-faults): make test keeps its time
def test_a_stage_that_cannot_reach_the_registry_says_so_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{servers.free_port()}"
    ws = make_ws(tmp_path, uri, timeout_s=2)
    proc = stage_script(ws, """
        from pathlib import Path
        from ratchet.registry import connect
        connect(params.registry, Path.cwd())
    """)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ratchet probe: the MLflow registry at {uri}")


def test_an_unexpected_stage_error_is_one_line_with_its_log(tmp_path):
    from ratchet.stage import last_failure
    from ratchet.workspace import WorkspaceError, repro

    ws = make_ws(tmp_path)
    proc = stage_script(ws, "raise ValueError('the probe broke')")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("ratchet probe: ValueError: the probe broke (details: "), line
    log = Path(line.split("(details: ")[1].rstrip(")"))
    assert log.parent == ws / ".ratchet" / "logs" and "Traceback" in log.read_text()
    shown = stage_script_debug(ws)
    assert "Traceback" in shown.stderr and "ValueError: the probe broke" in shown.stderr
    assert last_failure(ws, since=0)["stage"] == "probe"
    # Through DVC: `ratchet run`'s final line names the stage, its error and its log.
    pipeline = yaml.safe_load((ws / "dvc.yaml").read_text())
    pipeline["stages"] = {"probe": {"cmd": "python -c \"from ratchet.stage import stage_main; "
                                           "stage_main('probe', '', {}, lambda p: 1 / 0)\""},
                          **pipeline["stages"]}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    with pytest.raises(WorkspaceError) as caught:
        repro(ws, "probe")
    message = str(caught.value)
    assert message.startswith("stage `probe` failed: ZeroDivisionError: division by zero "
                              f"(details: {ws / '.ratchet' / 'logs'}"), message


def stage_script_debug(ws: Path) -> subprocess.CompletedProcess:
    code = ("from ratchet.stage import stage_main\n"
            "def fn(params):\n    raise ValueError('the probe broke')\n"
            "stage_main('probe', 'a probe stage', {}, fn)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True,
                          env=env(RATCHET_DEBUG="1"), timeout=120, check=False)


def test_an_unexpected_command_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    ws = make_ws(tmp_path)
    report = ws / "reports" / "validation" / "noise.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text('{"summary": "trunc')  # a report cut short
    proc = ratchet("status", "-w", str(ws))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    lines = errors(proc)
    assert len(lines) == 1 and lines[0].startswith("error: JSONDecodeError: "), out
    log = Path(lines[0].split("(details: ")[1].rstrip(")"))
    assert log.parent == ws / ".ratchet" / "logs" and "Traceback" in log.read_text()
    shown = ratchet("--debug", "status", "-w", str(ws))
    assert shown.returncode == 1 and "Traceback" in shown.stderr, shown.stderr


@pytest.mark.slow  # the fault suite only (make test-faults): make test keeps its time
def test_ctrl_c_is_error_interrupted_exit_130(tmp_path):
    from ratchet.workspace import retrain_lock

    ws = make_ws(tmp_path)
    with retrain_lock(ws):  # the run waits for it: a Ctrl-C at a known point
        proc = subprocess.Popen([str(BIN / "ratchet"), "run", "--engine", "dvc", "-w", str(ws)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env(), preexec_fn=default_signals)
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "waiting for the retrain in progress" in line or not line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    text = "".join(lines) + out + err
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "error: interrupted" in text, text


def test_the_prefect_engine_reports_an_unreachable_registry_once_without_tracebacks(tmp_path):
    """The flow's refresh-champion task does not retry what the registry probe already retried
    for registry.timeout_s, and Prefect's own task and flow failure logs carry no traceback of
    a ratchet error (--debug shows it)."""
    uri = f"http://127.0.0.1:{servers.free_port()}"
    ws = make_ws(tmp_path, uri, timeout_s=2)
    proc = ratchet("run", "-w", str(ws), timeout=300, RATCHET_IO_RETRY_DELAYS="1,1,1")
    assert_unreachable(proc, uri)
    out = proc.stdout + proc.stderr
    assert "Retries are exhausted" not in out and "Retrying" not in out, out
    # Nothing reached the registry before the failure: nothing to undo, no second failure.
    assert "undoing it failed" not in out and "could not be cleaned up" not in out, out
    assert not list((ws / ".ratchet" / "runs").glob("*.jsonl"))
