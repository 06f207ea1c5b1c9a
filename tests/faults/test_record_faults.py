"""Record only what holds: once a run's commit is made the run counts as recorded, and nothing
after it (the lineage stamp, the artifact, Prefect's own bookkeeping) can undo the registry.

Quick tests on a real workspace (git, DVC remote, SQLite MLflow store), the failures real: the
MLflow artifact store refusing the stamp's card, a Prefect API on a closed port. The slow test
kills a real `prefect server start` under a real `ratchet run`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ratchet import promotion, workspace
from ratchet.config import load_params
from ratchet.lineage import commit_tags
from ratchet.promotion import Journal
from ratchet.registry import CHAMPION, RUN_TOKEN_ENV, aliases, connect, log_candidate
from tests.conftest import save_tiny_classifier
from tests.faults.procs import RATCHET, default_signals, ratchet_env, tiny_workspace
from tests.integration.servers import free_port, start, stop, wait_ready


def _versions(client, name: str) -> set[str]:
    return {str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")}


def _gate_promotes_a_version(ws: Path, tmp_path: Path):
    """What the gate stage does in a run (inside `run_guard`): registers a version tagged with
    the run's token, moves `champion` to it through the journal, writes its report and card."""
    params = load_params(ws / "params.yaml")
    name = params.registry.model_name
    client = connect(params.registry, ws)
    card = ws / workspace.MODEL_CARD
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text("# card\n\n- Code: the git commit that records this run; params hash x\n")
    model = tmp_path / "model"
    save_tiny_classifier(model, ["a", "b"])
    run_id, version = log_candidate(model, name=name, params={}, metrics={}, artifacts=[card],
                                    run_tags={"fingerprint": "f"}, model_card=card)
    for key, value in commit_tags().items():  # git_commit: the parent; lineage: pending
        client.set_model_version_tag(name, version, key, value)
    promotion.move_alias(client, name, CHAMPION, version, ws=ws, by="gate", expected=None,
                         reason="gate", journal=Journal.of_run(ws))
    (ws / workspace.GATE_REPORT).write_text(json.dumps({
        "decision": "promoted", "version": version, "run_id": run_id, "model_name": name}))
    return client, name, version, run_id


def _block_card_upload(client, run_id: str) -> Path:
    """Make the artifact store refuse the stamp's card: a file where its folder must go."""
    root = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    blocker = root / "reports"
    shutil.rmtree(blocker, ignore_errors=True)
    blocker.write_text("not a folder")
    return blocker


def test_a_stamp_failing_after_the_commit_keeps_the_recorded_version(tmp_path):
    """The DVC engine's path (`run_pipeline` -> `finish_run`) and the flow's both end here: the
    commit names version 1, so version 1 must stay, whatever fails after it; the stamp is
    finished by the next run."""
    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    said: list[str] = []
    with workspace.run_guard(ws, log=said.append):
        client, name, version, run_id = _gate_promotes_a_version(ws, tmp_path)
        blocker = _block_card_upload(client, run_id)
        workspace.finish_run(ws, log=said.append)
        commit = workspace.git(ws, "rev-parse", "HEAD").strip()

    assert f"version {version}" in workspace.git(ws, "log", "-1", "--format=%s")
    assert _versions(client, name) == {version}
    assert aliases(client, name) == {CHAMPION: version}
    assert not Journal.unfinished(ws)  # nothing left for an undo to take back
    assert any("stamp" in m and "next run" in m for m in said), said
    assert client.get_model_version(name, version).tags["lineage"] == "pending"
    assert not workspace.git(ws, "status", "--porcelain").strip()

    blocker.unlink()  # the store works again: the next run finishes the stamp, undoes nothing
    with workspace.run_guard(ws, log=said.append):
        pass
    tags = client.get_model_version(name, version).tags
    assert (tags["git_commit"], tags["lineage"]) == (commit, "recorded")
    assert _versions(client, name) == {version}
    assert not list((ws / promotion.JOURNALS).glob("*"))


def test_a_kill_between_the_commit_and_closing_the_journal_does_not_undo(tmp_path):
    """The journal is closed right after the commit; a run killed in between (SIGKILL, so no
    Python cleanup) left it open. The next run sees the commit that names the run and does not
    undo what that commit records."""
    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    guard = workspace.run_guard(ws, log=lambda m: None)
    token = guard.__enter__()
    client, name, version, _run_id = _gate_promotes_a_version(ws, tmp_path)
    journal = ws / promotion.JOURNALS / f"{token}.jsonl"
    before = journal.read_text()
    assert '"moved"' in before  # the champion move, which an undo would revert
    workspace.finish_run(ws)
    # What a SIGKILL right after the commit leaves: the journal as it was before closing.
    journal.write_text(before)
    os.environ.pop(RUN_TOKEN_ENV, None)

    with workspace.run_guard(ws, log=lambda m: None):
        pass
    assert _versions(client, name) == {version}
    assert aliases(client, name) == {CHAMPION: version}


@pytest.mark.slow  # the fault suite only (make test-faults): make test keeps its time
def test_the_flows_record_step_survives_an_unreachable_prefect_api(tmp_path):
    """The flow's record step publishes its artifact before the commit, best effort: with the
    Prefect API on a closed port the run is still recorded, nothing is undone."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import retrain

    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    said: list[str] = []
    closed = f"http://127.0.0.1:{free_port()}/api"
    with workspace.run_guard(ws, log=said.append), \
            temporary_settings(updates={PREFECT_API_URL: closed}):
        client, name, version, _run_id = _gate_promotes_a_version(ws, tmp_path)
        gate = workspace.read_gate(ws)
        retrain.finish(ws, gate, {"gate": 1.0}, log=said.append)
    assert f"version {version}" in workspace.git(ws, "log", "-1", "--format=%s")
    assert _versions(client, name) == {version}
    assert not Journal.unfinished(ws)
    assert any("artifact" in m for m in said), said
    assert client.get_model_version(name, version).tags["lineage"] == "recorded"


# --- slow: a real Prefect server killed under a real run ----------------------------------------


def _git_versions(ws: Path) -> set[str]:
    log = workspace.git(ws, "log", "--format=%B")
    return set(re.findall(r"\(version (\d+)\)", log))


@pytest.mark.slow
def test_the_prefect_server_dying_mid_run_leaves_git_and_the_registry_agreeing(tmp_path):
    ws = tiny_workspace(tmp_path / "ws")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    server_env = {k: v for k, v in ratchet_env(home).items()}
    server_env["PREFECT_UI_ENABLED"] = "false"
    server = start("prefect server", [str(Path(RATCHET).parent / "prefect"), "server", "start",
                                      "--host", "127.0.0.1", "--port", str(port)],
                   url=api.removesuffix("/api"), env=server_env, log=tmp_path / "server.log")
    try:
        wait_ready(server, "/api/health", 90)
        env = ratchet_env(home, PREFECT_API_URL=api, RATCHET_IO_RETRY_DELAYS="0",
                          PREFECT_CLIENT_MAX_RETRIES="1")
        log = tmp_path / "run.log"
        with log.open("wb") as out:
            run = subprocess.Popen([RATCHET, "run", "-w", str(ws)], env=env, cwd=tmp_path,
                                   stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=default_signals)
        # The point where it hurts: the gate has decided, the run is not recorded yet.
        deadline = time.monotonic() + 600
        while not (ws / workspace.GATE_REPORT).is_file() and run.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        stop(server)
        rc = run.wait(timeout=300)
    finally:
        stop(server)
    out = log.read_text(errors="replace")
    # The gate had decided when the API went: the run is recorded and says so (Prefect's own
    # loggers still print their connection errors on the way).
    assert rc == 0, out[-6000:]
    assert "the run is recorded" in out and "decision: promoted" in out, out[-6000:]

    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    name = params.registry.model_name
    named = _git_versions(ws)
    assert named, out[-4000:]
    assert named <= _versions(client, name), (named, out[-4000:])
    assert not Journal.unfinished(ws)
    assert not workspace.git(ws, "status", "--porcelain").strip()

    # The next run (DVC engine: no server needed) succeeds and leaves git clean.
    nxt = subprocess.run([RATCHET, "run", "-w", str(ws), "--engine", "dvc"],
                         env=ratchet_env(home), capture_output=True, text=True, timeout=900)
    assert nxt.returncode == 0, nxt.stdout[-3000:] + nxt.stderr[-3000:]
    assert not workspace.git(ws, "status", "--porcelain").strip()
    assert _git_versions(ws) <= _versions(client, name)
