"""A file lands, the watcher emits `ratchet.batch.landed`, a real Prefect server's trigger runs
a deployment, a real process worker executes it: the event -> deployment -> worker -> flow run
path of `ratchet serve`, with no part simulated.

`prefect server start` runs in a temporary PREFECT_HOME on a free loopback port and a `prefect
worker start --type process` polls a process work pool (each in its own process group, always
stopped, their logs shown on failure). The deployed flow is `record-landed` from
flows/landed.py, built from this repo with `flow.from_source(...)`, behind the same
`DeploymentEventTrigger` that `ratchet serve` attaches to `on-batch-landed`: it records what the
event carried instead of ingesting and training, which the e2e story already covers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.servers import (
    ServerProcess,
    free_port,
    group_alive,
    start,
    stop,
    wait_ready,
)

START_TIMEOUT = 90.0
RUN_TIMEOUT = 90.0
POOL = "ratchet-test-pool"


def spawn(name: str, args: list[str], env: dict[str, str], log: Path,
          url: str = "") -> ServerProcess:
    """`prefect <args>` as a server process of the test (own group, log file, always stopped)."""
    return start(name, [str(Path(sys.executable).parent / "prefect"), *args], url=url, env=env,
                 log=log, cwd=log.parent)


@dataclass
class Stack:
    api: str
    env: dict[str, str]
    root: Path
    procs: list[ServerProcess]
    timings: dict[str, float]

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.procs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("prefect-server")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # `ratchet serve` picks a triggered run up at once
        "DO_NOT_TRACK": "true",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    host, port = api.removeprefix("http://").removesuffix("/api").split(":")
    stack = Stack(api, env, root, [], {})
    start = time.perf_counter()
    server = spawn("server", ["server", "start", "--host", host, "--port", port],
                   server_env, root / "server.log", url=api.removesuffix("/api"))
    stack.procs.append(server)
    try:
        wait_ready(server, "/api/health", START_TIMEOUT)
        stack.timings["server start"] = time.perf_counter() - start
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield stack
    finally:
        for proc in reversed(stack.procs):
            stop(proc)
        left = [p.name for p in stack.procs if group_alive(p.proc.pid)]
        print("timings (s):", {k: round(v, 1) for k, v in stack.timings.items()})
        assert not left, f"{left} still running\n{stack.logs()}"


def create_process_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=name, type="process",
            base_job_template=ProcessWorker.get_default_base_job_template()))


def wait_for_run(stack: Stack, deployment_id) -> object:
    """The deployment's first flow run once it is COMPLETED; fails at once if it ends otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + RUN_TIMEOUT
    runs = []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment_id])))
            for run in runs:
                if run.state and run.state.is_completed():
                    return run
                if run.state and run.state.is_final():
                    pytest.fail(f"flow run ended {run.state.type}: {run.state.message}\n"
                                f"{stack.logs()}")
            time.sleep(0.5)
    states = [(r.name, r.state.type if r.state else None) for r in runs]
    pytest.fail(f"no completed run of the deployment after {RUN_TIMEOUT:.0f} s; runs: "
                f"{states}\n{stack.logs()}")


def test_a_landed_file_runs_the_triggered_deployment_on_a_process_worker(stack, tmp_path):
    from prefect import flow

    from flows.landed import landed_trigger
    from ratchet.watch import Watcher

    ws = tmp_path / "ws"
    (ws / "data" / "incoming").mkdir(parents=True)
    t = time.perf_counter()
    create_process_pool(POOL)
    deployed = flow.from_source(source=str(REPO), entrypoint="flows/landed.py:record_landed")
    deployment_id = deployed.deploy(
        name="landed-test", work_pool_name=POOL, triggers=[landed_trigger(ws)],
        print_next_steps=False, ignore_warnings=True,
    )
    stack.timings["pool + deploy"] = time.perf_counter() - t
    t = time.perf_counter()
    stack.procs.append(spawn("worker", ["worker", "start", "--pool", POOL, "--type", "process"],
                             stack.env, stack.root / "worker.log"))

    landed = ws / "data" / "incoming" / "batch-1.csv"
    landed.write_text("text,label\nhi there,greeting\n")
    (ws / "data" / "incoming" / ".partial.csv").write_text("text,label\n")
    watcher = Watcher(ws)  # the real emitter: Prefect's events client, PREFECT_API_URL
    assert watcher.scan() == []
    assert watcher.scan() == [landed.resolve()]
    stack.timings["emit"] = time.perf_counter() - t

    run = wait_for_run(stack, deployment_id)
    stack.timings["event -> completed run"] = time.perf_counter() - t
    want = {"workspace_dir": str(ws.resolve()), "path": str(landed.resolve())}
    assert run.parameters == want
    record = json.loads((ws / ".ratchet" / "landed" / "batch-1.csv.json").read_text())
    assert {k: record[k] for k in want} == want and record["exists"] is True

    assert Watcher(ws).scan() == []  # a restarted watcher does not emit the file again



def test_ratchet_serve_watches_schedules_and_runs_the_landed_flow(stack, tmp_path):
    """`ratchet serve` on a real workspace: its two deployments (cron schedule, trigger) are
    registered, and a file dropped into data/incoming/ is emitted by its watcher and ingested
    by a run of `on-batch-landed` that the served runner executes. The file is malformed, so
    ingest refuses (quarantines) it and nothing is trained: the whole path, in seconds."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.landed import landed_automations, trigger_ready
    from ratchet import workspace
    from ratchet.watch import EVENT, STATE_FILE, resource_id

    t = time.perf_counter()
    ws = workspace.init(tmp_path / "served-ws", {"model": {"source": "tiny"}})
    stack.timings["workspace init"] = time.perf_counter() - t
    t = time.perf_counter()
    log = stack.root / "serve.log"
    serve = start("ratchet serve", [str(Path(sys.executable).parent / "ratchet"), "serve", "-w",
                                    str(ws), "--interval", "0.5", "--cron", "0 2 * * *"],
                  url="", env=stack.env, log=log, cwd=stack.root)
    stack.procs.append(serve)
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + START_TIMEOUT
            found = {}
            while time.monotonic() < deadline and len(found) < 2:
                if serve.proc.poll() is not None:
                    pytest.fail(f"ratchet serve exited with {serve.proc.returncode}\n"
                                f"{serve.log_tail()}")
                for flow_name in ("retrain", "on-batch-landed"):
                    with contextlib.suppress(ObjectNotFound):  # not registered yet
                        found[flow_name] = client.read_deployment_by_name(
                            f"{flow_name}/{ws.name}")
                time.sleep(0.5)
            assert len(found) == 2, f"deployments registered: {list(found)}\n{serve.log_tail()}"
            stack.timings["ratchet serve registers"] = time.perf_counter() - t
            scheduled, landed = found["retrain"], found["on-batch-landed"]
            assert [s.schedule.cron for s in scheduled.schedules] == ["0 2 * * *"]
            assert scheduled.parameters == {"workspace_dir": str(ws)}
            assert landed.schedules == []
            # The trigger (an automation) is created just after its deployment; the watcher
            # waits for it before emitting (flows.landed.trigger_ready), and so does this test.
            ready, deadline = trigger_ready(ws), time.monotonic() + START_TIMEOUT
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.5)
            automations = client.read_resource_related_automations(
                f"prefect.deployment.{landed.id}")
            assert len(automations) == 1, automations
            # A restarted `ratchet serve` waits for a trigger other than the ones it found.
            assert landed_automations(ws) == {str(automations[0].id)}
            assert not trigger_ready(ws, landed_automations(ws))()
            trigger, action = automations[0].trigger, automations[0].actions[0]
            assert trigger.expect == {EVENT}
            assert trigger.match.model_dump().get("prefect.resource.id") == resource_id(ws)
            assert action.deployment_id == landed.id
            assert action.parameters == {"workspace_dir": "{{ event.payload.workspace }}",
                                         "path": "{{ event.payload.path }}"}

            t = time.perf_counter()
            bad = ws / workspace.INCOMING / "notes.txt"
            bad.write_text("not a table\n")
            run = wait_for_run(stack, landed.id)
            stack.timings["file -> served run completed"] = time.perf_counter() - t
    finally:
        stop(serve)
    assert run.parameters == {"workspace_dir": str(ws), "path": str(bad)}
    assert set(json.loads((ws / STATE_FILE).read_text())["emitted"]) == {"notes.txt"}
    quarantined = list((ws / workspace.QUARANTINE).glob("*-notes.txt/notes.txt"))
    assert len(quarantined) == 1, serve.log_tail()
    assert not list((ws / workspace.BATCHES).glob("*.parquet"))
