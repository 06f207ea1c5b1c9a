"""The `retrain` flow: refresh the champion, run each DVC stage as a task, report the decision.

After the drift stage the flow reads `reports/drift.json`: when the trigger policy
(`drift.trigger`) says retraining is not needed, the remaining stages are skipped and the run
records a `skipped` decision (no model version is registered; the artifact says why).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from ratchet import workspace

# I/O against the registry, git and the DVC remote may fail for a moment (a server restart, a
# network blip): retried with growing pauses. Stages are not: they are deterministic.
# $RATCHET_IO_RETRY_DELAYS (seconds, comma-separated) sets the pauses and so the retry count.
IO_DELAYS = [float(x) for x in os.environ.get("RATCHET_IO_RETRY_DELAYS", "2,10,30").split(",")
             if x.strip()]
IO_RETRIES = {"retries": len(IO_DELAYS), "retry_delay_seconds": IO_DELAYS}


@task(name="refresh-champion", **IO_RETRIES)
def refresh_champion(ws: Path) -> dict:
    return workspace.refresh_champion(ws)


@task(name="stage")
def run_stage(ws: Path, stage: str) -> float:
    """`dvc repro --single-item <stage>`: DVC skips it when its inputs did not change."""
    return workspace.repro(ws, stage)


@task(name="record", **IO_RETRIES)
def record(ws: Path) -> None:
    workspace.finish_run(ws)


@task(name="record-skip", **IO_RETRIES)
def record_skip(ws: Path, record: dict) -> None:
    workspace.record_skip(ws, record)


def noise_line(noise: dict | None) -> str:
    """The label-noise line of the artifact: the newest batch's verdict, marked when flagged."""
    if not noise or not noise.get("summary"):
        return "Label noise: n/a"
    if noise.get("flagged"):
        return f"Label noise: **flagged**: {noise['summary']} (review: `ratchet labels`)"
    return f"Label noise: {noise['summary']}"


def skipped_markdown(record: dict, timings: dict[str, float], noise: dict | None = None) -> str:
    lines = [
        "# Gate decision: **skipped**",
        "",
        f"Not retrained: {record['checks'][0]['reason']}.",
        f"Champion stays: {record.get('champion_before')} (no model version was registered).",
        f"Drift: {record.get('drift_summary')}",
        noise_line(noise),
        f"Skipped stages: {', '.join(record['skipped_stages'])}",
    ]
    return "\n".join(lines + timings_table(timings))


def timings_table(timings: dict[str, float]) -> list[str]:
    return ["", "| stage | seconds |", "|---|---|", *(f"| {s} | {t:.1f} |"
                                                      for s, t in timings.items())]


def decision_markdown(gate: dict, timings: dict[str, float], noise: dict | None = None) -> str:
    """The artifact's markdown. `noise`: the noise stage's report, read when the gate record
    has no `label_noise` entry (a gate from before that check)."""
    uri = gate.get("tracking_uri", "")
    name, version = gate.get("model_name"), gate.get("version")
    if uri.startswith("http"):
        link = f"[{name} v{version}]({uri.rstrip('/')}/#/models/{name}/versions/{version})"
    else:
        link = f"`models:/{name}/{version}` (open with `mlflow ui --backend-store-uri {uri}`)"
    lines = [
        f"# Gate decision: **{gate.get('decision')}**",
        "",
        f"Model version: {link}",
        f"Champion before: {gate.get('champion_before')}; after: {gate.get('champion_after')}",
        f"Drift: {gate.get('drift_summary')}",
        noise_line(gate.get("label_noise") or noise),
        f"Data Docs: {docs_link(gate)}",
        "",
        "| check | passed | reason |",
        "|---|---|---|",
    ]
    lines += [f"| {c['name']} | {'yes' if c['passed'] else 'no'} | {c['reason']} |"
              for c in gate.get("checks", [])]
    if gate.get("metrics"):
        from tasks.gate import metric_table

        lines += ["", "## Metrics by slice", "", metric_table(gate["metrics"])]
    if gate.get("sweep"):
        lines += ["", "## Sweep", "", sweep_table(gate["sweep"])]
    warnings = gate.get("validation_warnings") or []
    if warnings:
        lines += ["", f"Validation warnings ({len(warnings)}):", ""]
        lines += [f"- {w}" for w in warnings[:20]]
    return "\n".join(lines + timings_table(timings))


def sweep_table(sweep: dict) -> str:
    metric = sweep["metric"]
    rows = ["| trial | params | " + metric + " | best |", "|---|---|---|---|"]
    for t in sweep["trials"]:
        got = (f"{t['stats'][metric]:.4f}" if "stats" in t else f"failed: {t['error'][:80]}")
        chosen = "yes" if t["index"] == sweep["best"] else ""
        rows.append(f"| {t['index']} | {t['overrides']} | {got} | {chosen} |")
    rows.append(f"\nEach trial is a nested MLflow run under run `{sweep['mlflow_parent_run']}`.")
    return "\n".join(rows)


def docs_link(gate: dict) -> str:
    """The Data Docs page: in the workspace, and under the version's run artifacts."""
    docs = gate.get("data_docs")
    if not docs:
        return "n/a"
    run = gate.get("run_id")
    logged = f" (also logged with run `{run}` under `reports/docs/`)" if run else ""
    return f"`{docs}` in the workspace{logged}"


def undo_failed(flow, flow_run, state) -> None:
    """Failure, crash and cancellation hook: undo in the registry what the run left there.

    The flow body already undoes on an exception; this covers a run stopped from outside. If
    another retrain holds the workspace now, it has already done this at its start.
    """
    from ratchet.errors import WorkspaceError

    ws = Path(flow_run.parameters.get("workspace_dir", ".")).resolve()
    try:
        with workspace.retrain_lock(ws, timeout=0):
            undone = workspace.recover(ws, reason=f"flow run {flow_run.name} ended "
                                                  f"{state.type.value.lower()}")
    except WorkspaceError:
        return
    if undone:
        print(f"undone in the registry after the failed run: {undone}")


@flow(name="retrain", log_prints=True, on_failure=[undo_failed], on_crashed=[undo_failed],
      on_cancellation=[undo_failed])
def retrain(workspace_dir: str = ".", batch: str | None = None,
            overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """Retrain on the workspace's batches and gate the candidate; returns the gate record.

    Args:
        workspace_dir: the ratchet workspace.
        batch: a file to ingest first (csv/jsonl/parquet); a refused batch fails the run.
        overrides: params.yaml changes for this and later runs, e.g.
            `{"finetune": {"epochs": 2}}`; validated, then committed with the run.
    """
    logger = get_run_logger()
    ws = workspace.require(Path(workspace_dir))
    workspace.check_batches(ws)
    with workspace.retrain_lock(ws, on_wait=logger.info), \
            workspace.run_guard(ws, log=logger.warning):
        if overrides:
            workspace.apply_overrides(ws, overrides)
        if batch:
            landed = workspace.ingest(ws, Path(batch))
            logger.info("ingested %s as %s", batch, landed.batch_id)
        return _retrain(ws, logger)


def _retrain(ws: Path, logger) -> dict:
    champion = refresh_champion(ws)
    timings: dict[str, float] = {}
    stages = workspace.stage_names(ws)
    # One `dvc status` instead of a `dvc repro` per stage when inputs did not change; once a
    # stage has run, the rest go to DVC, which sees what that stage's outputs changed.
    changed, ran = workspace.changed_stages(ws), False
    sweep = None
    for i, stage in enumerate(stages):
        if not ran and stage not in changed:
            timings[stage] = 0.0
            logger.info("stage %s: up to date, skipped", stage)
        elif stage == "finetune" and sweep_grid(ws):
            from flows.sweep import run_sweep

            sweep = run_sweep(ws)
            timings[stage], ran = sweep["wall_s"], True
            logger.info("stage finetune: sweep of %d trials, best %s (%.1fs)",
                        len(sweep["trials"]), sweep["best_overrides"], timings[stage])
        else:
            timings[stage] = run_stage.with_options(name=stage, task_run_name=stage)(ws, stage)
            ran = True
            logger.info("stage %s: %.1fs", stage, timings[stage])
        drift = workspace.read_drift(ws) if stage == "drift" else {}
        if drift.get("retrain", True) is False:
            skip = workspace.skipped_decision(drift, champion, stages[i + 1 :])
            skip["timings"] = timings
            logger.info("not retraining: %s", drift.get("retrain_reason"))
            record_skip(ws, skip)
            create_markdown_artifact(key="gate-decision",
                                     markdown=skipped_markdown(skip, timings,
                                                               workspace.read_noise(ws)),
                                     description="gate decision: skipped")
            return skip
    gate = workspace.read_gate(ws)
    gate["timings"] = timings
    if sweep is not None:
        gate["sweep"] = {k: sweep[k] for k in ("best", "best_overrides", "metric", "trials",
                                               "mlflow_parent_run")}
    record(ws)
    create_markdown_artifact(key="gate-decision",
                             markdown=decision_markdown(gate, timings, workspace.read_noise(ws)),
                             description=f"gate decision: {gate.get('decision')}")
    return gate


def sweep_grid(ws: Path) -> dict:
    from ratchet.config import load_params

    return load_params(ws / "params.yaml").sweep.grid


def run_once(ws: Path) -> dict:
    """Run the flow in this process (Prefect's ephemeral server unless PREFECT_API_URL is set)."""
    start = time.perf_counter()
    result = retrain(str(ws))
    result["wall_s"] = time.perf_counter() - start
    return result
