"""The `retrain` flow: refresh the champion, run each DVC stage as a task, report the decision.

After the drift stage the flow reads `reports/drift.json`: when the trigger policy
(`drift.trigger`) says retraining is not needed, the remaining stages are skipped and the run
records a `skipped` decision (no model version is registered; the artifact says why).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.exceptions import MissingContextError

from ratchet import workspace

# I/O against the registry, git and the DVC remote may fail for a moment (a server restart, a
# network blip): retried with growing pauses. Stages are not: they are deterministic.
# $RATCHET_IO_RETRY_DELAYS (seconds, comma-separated) sets the pauses and so the retry count.
IO_DELAYS = [float(x) for x in os.environ.get("RATCHET_IO_RETRY_DELAYS", "2,10,30").split(",")
             if x.strip()]


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition for the I/O tasks: retry what may pass in a moment, not what
    cannot (a bad config, a full disk, an alias moved by someone else) nor an unreachable
    registry, which `registry.connect` has already waited for for registry.timeout_s."""
    from ratchet.errors import ConfigError, DiskFull, RegistryError

    try:
        state.result()
    except (ConfigError, DiskFull, RegistryError):
        return False
    except BaseException:  # noqa: BLE001 - anything else may be a blip: the retry policy decides
        return True
    return True


IO_RETRIES = {"retries": len(IO_DELAYS), "retry_delay_seconds": IO_DELAYS,
              "retry_condition_fn": transient}


@task(name="refresh-champion", **IO_RETRIES)
def refresh_champion(ws: Path, full: bool = False) -> dict:
    return workspace.refresh_champion(ws, full=full)


@task(name="stage")
def run_stage(ws: Path, stage: str) -> float:
    """`dvc repro --single-item <stage>`: DVC skips it when its inputs did not change. What
    the stage prints goes to the terminal and, line by line, to this task run's log."""
    return workspace.repro(ws, stage, on_line=stage_log())


def stage_log() -> Callable[[str], None]:
    """This task run's log for a stage's own lines, sent to the Prefect API only: the lines
    reach the terminal as the stage printed them (bars included), so Prefect's console
    handler would print each twice. From any thread: the run's ids travel with the record."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("prefect.task_runs.stage-output")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logging.LoggerAdapter(logger, dict(get_run_logger().extra)).info


def _log() -> Callable[[str], None]:
    """A warning line in the run's log (in a flow or task run), else on stderr."""
    try:
        return get_run_logger().warning
    except MissingContextError:
        return workspace._warn


def publish(markdown: str, description: str, log: Callable[[str], None],
            extras: tuple[Callable[[], Any], ...] = ()) -> bool:
    """The gate-decision artifact, best effort: its failure (the Prefect API gone: Prefect's
    client retries a lost connection PREFECT_CLIENT_MAX_RETRIES times, with growing pauses)
    is a warning, never a failed run: reports/gate.json holds the same decision."""
    try:
        create_markdown_artifact(key="gate-decision", markdown=markdown,
                                 description=description)
        for make in extras:
            make()
        return True
    except Exception as err:  # noqa: BLE001 - best effort, see above
        log(f"the gate-decision artifact was not published ({type(err).__name__}: "
            f"{str(err).strip()[:200]}); the decision is in reports/gate.json")
        return False


def finish(ws: Path, gate: dict, timings: dict[str, float],
           log: Callable[[str], None] | None = None) -> None:
    """Record a gated run: the artifact (best effort), `dvc push`, the commit (from here on
    the run counts as recorded: its journal is closed to undo), the lineage stamp (retried,
    else a warning that the next run acts on)."""
    log = log or _log()
    markdown = decision_markdown(gate, timings, workspace.read_noise(ws))
    extras = (lambda: create_table_artifact(key="gate-metrics", table=metrics_rows(gate),
                                            description="the gate's metrics by slice"),
              lambda: create_link_artifact(key="model-version", **version_link(gate),
                                           description="the candidate in the MLflow registry"))
    workspace.finish_run(
        ws, log=log,
        publish=lambda: publish(markdown, f"gate decision: {gate.get('decision')}", log,
                                extras if gate.get("version") else extras[:1]))


SLICE_COLUMNS = (("n", "n/{s}"), ("candidate_macro_f1", "candidate/{s}/macro_f1"),
                 ("champion_macro_f1", "champion/{s}/macro_f1"), ("diff", "diff/{s}/macro_f1"),
                 ("diff_low", "diff/{s}/macro_f1_low"), ("diff_high", "diff/{s}/macro_f1_high"),
                 ("p_rule", "test/{s}/p_value"))


def metrics_rows(gate: dict) -> list[dict[str, Any]]:
    """The gate's metrics as a table artifact: a row per slice, numbers rounded, none NaN."""
    import math

    from tasks.gate import _slice_rows

    m = gate.get("metrics") or {}
    rows = []
    for s in _slice_rows(m):
        row: dict[str, Any] = {"slice": s}
        for column, key in SLICE_COLUMNS:
            v = m.get(key.format(s=s))
            row[column] = (None if not isinstance(v, (int, float)) or math.isnan(v) else
                           int(v) if column == "n" else round(float(v), 4))
        rows.append(row)
    return rows


def version_link(gate: dict) -> dict[str, str]:
    """The registered version's page: on the tracking server, else where `mlflow ui` (run in
    the workspace, on its default port) shows it."""
    uri = str(gate.get("tracking_uri", ""))
    name, version = gate.get("model_name"), gate.get("version")
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    text = f"{name} v{version}" + ("" if uri.startswith("http") else
                                   f" (start `mlflow ui --backend-store-uri {uri}` first)")
    return {"link": f"{base}/#/models/{name}/versions/{version}", "link_text": text}


@task(name="record", **IO_RETRIES)
def record(ws: Path, gate: dict, timings: dict[str, float]) -> None:
    finish(ws, gate, timings)
    RECORDED.append(gate)


@task(name="record-skip", **IO_RETRIES)
def record_skip(ws: Path, record: dict, timings: dict[str, float]) -> None:
    log = _log()
    publish(skipped_markdown(record, timings, workspace.read_noise(ws)),
            "gate decision: skipped", log)
    workspace.record_skip(ws, record)
    RECORDED.append(record)


# What this process's flow run recorded (see `run_once`): the flow's own result, kept for when
# Prefect cannot report how the run ended because its API went away after the commit.
RECORDED: list[dict] = []


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
        f"Drift: {record.get('drift_summary') or 'n/a'}",
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
    from tasks.gate import training_line

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
        f"Champion before: {gate.get('champion_before') or '(none)'}; "
        f"after: {gate.get('champion_after') or '(none)'}",
        f"Drift: {gate.get('drift_summary') or 'n/a'}",
        noise_line(gate.get("label_noise") or noise),
        f"Training: {training_line(gate.get('training'))}",
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
    from ratchet.errors import RatchetError, WorkspaceError

    ws = Path(flow_run.parameters.get("workspace_dir", ".")).resolve()
    try:
        with workspace.retrain_lock(ws, timeout=0):
            undone = workspace.recover(ws, reason=f"flow run {flow_run.name} ended "
                                                  f"{state.type.value.lower()}")
    except WorkspaceError:  # another retrain holds the workspace: it undid this at its start
        return
    except RatchetError as err:  # the registry is out of reach: the next run's start undoes
        print(f"the registry could not be cleaned up now ({err}); the next run does it")
        return
    if undone:
        print(f"undone in the registry after the failed run: {undone}")


@flow(name="retrain", log_prints=True, on_failure=[undo_failed], on_crashed=[undo_failed],
      on_cancellation=[undo_failed])
def retrain(workspace_dir: str = ".", batch: str | None = None,
            overrides: dict[str, dict[str, Any]] | None = None, full: bool = False) -> dict:
    """Retrain on the workspace's batches and gate the candidate; returns the gate record.

    Args:
        workspace_dir: the ratchet workspace.
        batch: a file to ingest first (csv/jsonl/parquet); a refused batch fails the run.
        overrides: params.yaml changes for this and later runs, e.g.
            `{"finetune": {"epochs": 2}}`; validated, then committed with the run.
        full: retrain from base this time, whatever `finetune.init` would choose (as
            `ratchet run --full`; `overrides={"finetune": {"init": "base"}}` makes it stick).
    """
    logger = get_run_logger()
    RECORDED.clear()
    ws = workspace.require(Path(workspace_dir))
    workspace.check_batches(ws)
    with workspace.retrain_lock(ws, on_wait=logger.info), \
            workspace.run_guard(ws, log=logger.warning):
        if overrides:
            workspace.apply_overrides(ws, overrides)
        if batch:
            landed = workspace.ingest(ws, Path(batch))
            logger.info("ingested %s as %s", batch, landed.batch_id)
        return _retrain(ws, logger, full)


def _retrain(ws: Path, logger, full: bool = False) -> dict:
    champion = refresh_champion(ws, full)
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
            if not ran:
                skip[workspace.UNCHANGED] = True
            logger.info("not retraining: %s", drift.get("retrain_reason"))
            record_skip(ws, skip, timings)
            return skip
    gate = workspace.read_gate(ws)
    gate["timings"] = timings
    if not ran:  # every stage was up to date: this is the last run's decision, not a new one
        gate[workspace.UNCHANGED] = True
        logger.info("nothing to run: no stage's inputs changed since the last run")
    if sweep is not None:
        gate["sweep"] = {k: sweep[k] for k in ("best", "best_overrides", "metric", "trials",
                                               "mlflow_parent_run")}
    record(ws, gate, timings)
    return gate


def sweep_grid(ws: Path) -> dict:
    from ratchet.config import load_params

    return load_params(ws / "params.yaml").sweep.grid


def run_once(ws: Path, *, full: bool = False) -> dict:
    """Run the flow in this process (against a temporary Prefect server of its own unless
    PREFECT_API_URL is set; see `prefect_api`).

    The run counts as recorded once its commit is made; if Prefect then cannot be told how the
    run ended (its API went away), that is a warning and the run's record is the result. A run
    that failed before that is undone, and its error names the lost API when that was it.
    """
    import httpx

    from ratchet.errors import WorkspaceError

    start = time.perf_counter()
    RECORDED.clear()
    quiet_ratchet_tracebacks()
    with prefect_api() as api:
        try:
            result = retrain(str(ws), full=full)
        except (httpx.HTTPError, OSError) as err:
            if RECORDED:
                workspace._warn(f"the run is recorded, but Prefect's API at {api} could not be "
                                f"told how it ended ({type(err).__name__}: {err})")
                result = dict(RECORDED[-1])
            else:
                raise WorkspaceError(
                    f"the Prefect API at {api} went away during the run ({type(err).__name__}: "
                    f"{err}); nothing of the run is recorded and the registry is as it was; "
                    "start the Prefect server again and re-run (or use --engine dvc)") from err
    result["wall_s"] = time.perf_counter() - start
    return result


class _NoRatchetTraceback(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; for the project's own errors
    (a user-fixable cause, printed once as the run's `error:` line) that is noise. Kept with
    --debug ($RATCHET_DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ratchet.errors import RatchetError

        err = record.exc_info[1] if record.exc_info else None
        while err is not None and not isinstance(err, RatchetError):
            err = err.__cause__ or err.__context__
        if err is not None and not os.environ.get("RATCHET_DEBUG"):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_ratchet_tracebacks() -> None:
    """Put `_NoRatchetTraceback` on the handlers Prefect's loggers print through (once)."""
    for name in ("prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _NoRatchetTraceback) for f in handler.filters):
                handler.addFilter(_NoRatchetTraceback())


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API a run in this process talks to: PREFECT_API_URL when set, else a
    temporary server (Prefect's own app, as its ephemeral mode runs it), stopped at the end.

    Unlike the ephemeral server Prefect would start on first use, this one runs in a session of
    its own: a terminal's Ctrl-C stops the run, not the API that the run then reports its crash
    to (with the API gone, Prefect's client would retry every state and log call for minutes).
    It gets SIGTERM if this process dies without stopping it (PR_SET_PDEATHSIG, Linux).
    """
    import socket
    import subprocess
    import sys

    import httpx
    import prefect
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        yield str(PREFECT_API_URL.value())
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect server exited ({proc.returncode})")
                try:
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server did not start at {url}")
                time.sleep(0.1)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_to_api()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drain_to_api(timeout: float = 5.0) -> None:
    """Ship the logs and events still queued while the API is up (bounded)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with suppress(Exception):  # best effort on the way out
            worker.drain_all(timeout=timeout)
