"""Event-driven retraining: `ratchet serve` deploys `retrain` on a schedule and `on-batch-landed`
behind a trigger on the watcher's `ratchet.batch.landed` event.

- `on_batch_landed(workspace_dir, path)`: ingest the file that landed, then run the `retrain`
  flow (as a subflow) when it became a new batch. A refused file is quarantined by ingest and
  the run ends with a `refused` record; a file whose content is already a batch ends the run
  with `duplicate` and trains nothing.
- `record_landed(workspace_dir, path)`: writes what the event carried to
  `.ratchet/landed/<file name>.json` and nothing else: a cheap flow to check that events reach
  a worker (the integration test deploys it to a process work pool).
- `serve_workspace(...)`: what `ratchet serve` runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.retrain import retrain
from ratchet import workspace
from ratchet.watch import EVENT, resource_id

LANDED_PARAMETERS = {"workspace_dir": "{{ event.payload.workspace }}",
                     "path": "{{ event.payload.path }}"}


@task(name="ingest")
def ingest_batch(ws: Path, path: Path) -> dict[str, Any]:
    """Ingest one file; a refusal is a result here (the file is already quarantined)."""
    from ratchet.errors import BatchRefused

    try:
        # Under the workspace's retrain lock: never beside a running retrain's commits.
        with workspace.retrain_lock(ws, on_wait=get_run_logger().info):
            res = workspace.ingest(ws, path)
    except BatchRefused as err:
        return {"decision": "refused", "file": path.name, "reasons": err.problems,
                "quarantine": err.quarantine}
    return {"decision": "ingested" if res.created else "duplicate", "file": path.name,
            "batch_id": res.batch_id, "rows": res.rows, "warnings": res.warnings}


@flow(name="on-batch-landed", log_prints=True)
def on_batch_landed(workspace_dir: str, path: str) -> dict[str, Any]:
    """Ingest the file that landed in data/incoming/, then retrain if it is a new batch."""
    logger = get_run_logger()
    ws = workspace.require(Path(workspace_dir))
    ingested = ingest_batch(ws, Path(path))
    if ingested["decision"] != "ingested":
        logger.warning("%s: %s; not retraining", ingested["file"], ingested["decision"])
        lines = [f"# `{ingested['file']}`: **{ingested['decision']}**, not retrained", ""]
        lines += [f"- {r}" for r in ingested.get("reasons", [])]
        if ingested.get("batch_id"):
            lines.append(f"Its content is already batch `{ingested['batch_id']}`.")
        create_markdown_artifact(key="batch-landed", markdown="\n".join(lines),
                                 description=f"landed batch: {ingested['decision']}")
        return {"ingest": ingested, "decision": ingested["decision"]}
    logger.info("%s added as batch %s (%s rows)", ingested["file"], ingested["batch_id"],
                ingested["rows"])
    gate = retrain(str(ws))
    return {"ingest": ingested, **gate}


@flow(name="record-landed")
def record_landed(workspace_dir: str, path: str) -> dict[str, Any]:
    """Record what a `ratchet.batch.landed` event carried; ingests and trains nothing."""
    record = {"workspace_dir": workspace_dir, "path": path,
              "exists": Path(path).is_file(), "recorded_at": time.time()}
    out = Path(workspace_dir) / ".ratchet" / "landed" / f"{Path(path).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record


def landed_trigger(ws: Path, name: str | None = None):
    """Run a deployment for each `ratchet.batch.landed` event of workspace `ws`, with the
    workspace and the file taken from the event's payload."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=name or f"batch landed in {Path(ws).resolve().name}",
        expect={EVENT},
        match={"prefect.resource.id": resource_id(ws)},
        parameters=dict(LANDED_PARAMETERS),
    )


def deployments(ws: Path, cron: str | None) -> list[Any]:
    """The two served deployments of a workspace, both named after its folder."""
    from prefect.deployments.runner import EntrypointType

    # By module (`flows.landed.on_batch_landed`): importable from an installed ratchet, from
    # whatever folder `ratchet serve` was started in.
    name, by_module = ws.name, EntrypointType.MODULE_PATH
    scheduled = retrain.to_deployment(
        name=name, cron=cron or None, parameters={"workspace_dir": str(ws)},
        entrypoint_type=by_module,
        description=f"retrain {ws}" + (f" on cron `{cron}` (UTC)" if cron else ""),
    )
    landed = on_batch_landed.to_deployment(
        name=name, triggers=[landed_trigger(ws)], entrypoint_type=by_module,
        description=f"ingest + retrain when a file lands in {ws / workspace.INCOMING}",
    )
    return [scheduled, landed]


def landed_automations(ws: Path) -> set[str] | None:
    """The ids of the triggers (automations) of the `on-batch-landed` deployment of `ws` on the
    server; None while that deployment does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{on_batch_landed.name}/{ws.name}")
        except ObjectNotFound:
            return None
        return {str(a.id) for a in client.read_resource_related_automations(
            f"prefect.deployment.{deployment.id}")}


def trigger_ready(ws: Path, stale: set[str] | None = None) -> Callable[[], bool]:
    """True once the landed deployment of `ws` has a trigger that is not one of `stale`: the
    watcher waits for it. Serving deletes a deployment's old triggers and creates new ones (a
    moment apart), so a restarted `ratchet serve` must not take the last run's for ready."""
    stale = stale or set()

    def ready() -> bool:
        return bool((landed_automations(ws) or set()) - stale)
    return ready


def serve_workspace(ws: Path, *, cron: str | None, interval: float, watch: bool) -> None:
    """Serve both deployments (one run at a time: they share the workspace) and, unless
    `watch` is off, run the watcher in a thread; blocks until interrupted."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    from ratchet.errors import RatchetError
    from ratchet.watch import Watcher

    ws = workspace.require(ws)
    if not PREFECT_API_URL.value():
        raise RatchetError(
            "`ratchet serve` needs a running Prefect server (schedules and triggers do not run "
            "on the ephemeral one): start `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api")
    stop = None
    if watch:
        stale = landed_automations(ws) or set()  # a previous `ratchet serve`'s, replaced below
        _, stop = Watcher(ws).start(interval, ready=trigger_ready(ws, stale))
    try:
        serve(*deployments(ws, cron), limit=1)
    finally:
        if stop is not None:
            stop.set()
