"""The finetune stage as a parameter sweep: trials in parallel on Dask, each logged to MLflow, the
best one committed as the stage's output so the gate judges it and `dvc.lock` names its params.

`sweep.grid` in params.yaml maps finetune keys to values; every combination is a trial. Trials
run as Prefect tasks on a `DaskTaskRunner`: a local cluster of `sweep.workers` processes, or the
scheduler at `sweep.address` (its workers must see the workspace at the same path, e.g. a shared
volume). The winner's params are written into params.yaml and its outputs recorded with
`dvc commit`, so the version the gate registers names a commit whose params reproduce it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from ratchet import workspace
from ratchet.errors import WorkspaceError
from ratchet.headline import write_metrics
from ratchet.runtime import write_json

SWEEP_DIR = Path(".ratchet/sweep")
REPORT = Path("reports/sweep.json")


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's key order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in
            itertools.product(*(grid[k] for k in keys))]


def stage_paths(ws: Path) -> dict[str, str]:
    """The finetune stage's `--name path` arguments, read from dvc.yaml (one source of truth)."""
    cmd = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["finetune"]["cmd"]
    words = shlex.split(cmd)
    return {w[2:].replace("-", "_"): words[i + 1] for i, w in enumerate(words)
            if w.startswith("--") and i + 1 < len(words)}


@task(name="trial", task_run_name="trial-{index}")
def trial(ws: str, index: int, overrides: dict[str, Any], root: str, threads: int) -> dict:
    """Train one combination into `root/trial-NN` (runs in a Dask worker process)."""
    from ratchet.config import parse_params
    from tasks import finetune

    os.chdir(ws)  # stage paths are relative to the workspace, as under `dvc repro`
    raw = yaml.safe_load(Path("params.yaml").read_text()) or {}
    raw.setdefault("finetune", {}).update(overrides)
    raw["finetune"]["threads"] = threads
    params = parse_params(raw, f"sweep trial {index}")
    paths = {k: Path(v) for k, v in stage_paths(Path(ws)).items()}
    out = Path(root) / f"trial-{index:02d}"
    start = time.perf_counter()
    stats = finetune.run(params, train=paths["train"], val=paths["val"],
                         pretrained=paths["pretrained"], init=paths.get("init"),
                         replay=paths.get("replay"), checkpoints=out / "checkpoints",
                         out=out / "model", metrics=out / "metrics.json",
                         curve=out / "curve.csv")
    return {"index": index, "overrides": overrides, "stats": stats, "dir": str(out),
            "wall_s": time.perf_counter() - start}


def task_runner(address: str | None, workers: int):
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def run_sweep(ws: Path) -> dict[str, Any]:
    """Run every trial, log them, commit the best as the finetune stage's output; returns the
    sweep report (also written to reports/sweep.json)."""
    from ratchet.config import load_params, parse_params

    params = load_params(ws / "params.yaml")
    cfg = params.sweep
    combos = combinations(cfg.grid)
    base = yaml.safe_load((ws / "params.yaml").read_text()) or {}
    for i, combo in enumerate(combos):  # refuse a bad value before any trial starts
        parse_params({**base, "finetune": {**base.get("finetune", {}), **combo}},
                     f"sweep trial {i} ({combo})")
    workers = min(cfg.workers, len(combos))
    threads = max(1, len(os.sched_getaffinity(0)) // workers) if not cfg.address else 0
    root = ws / SWEEP_DIR / time.strftime("%Y%m%d-%H%M%S")
    sweep_flow = _sweep.with_options(task_runner=task_runner(cfg.address, workers))
    start = time.perf_counter()
    try:
        with shared_api():
            results = sweep_flow(str(ws), combos, str(root), threads)
        done = [r for r in results if "stats" in r]
        if not done:
            raise WorkspaceError("every sweep trial failed: "
                                 + "; ".join(r["error"] for r in results))
        best = max(done, key=lambda r: _score(r["stats"].get(cfg.metric)))
        report = {"metric": cfg.metric, "grid": cfg.grid, "best": best["index"],
                  "best_overrides": best["overrides"], "wall_s": time.perf_counter() - start,
                  "workers": workers, "address": cfg.address,
                  "trials": [{k: v for k, v in r.items() if k != "dir"} for r in results]}
        report["mlflow_parent_run"] = log_trials(ws, params, results, report)
        adopt(ws, best)
        write_json(ws / REPORT, report)
    finally:  # the trials' models are copies: none is kept, whatever happened
        shutil.rmtree(root, ignore_errors=True)
    return report


@contextmanager
def shared_api() -> Iterator[None]:
    """Worker processes report their task runs to this process's Prefect API.

    Without a PREFECT_API_URL Prefect runs an ephemeral server for this process; a Dask worker
    process would start one of its own on the same SQLite file (slow, and it locks). So its
    address goes into the environment the local cluster's workers are spawned with.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same instance this process's client uses
    server.start()
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _score(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not math.isnan(value) else -1.0


@flow(name="sweep", log_prints=True)
def _sweep(ws: str, combos: list[dict[str, Any]], root: str, threads: int) -> list[dict]:
    logger = get_run_logger()
    futures = [trial.submit(ws, i, combo, root, threads) for i, combo in enumerate(combos)]
    results = []
    for i, (combo, future) in enumerate(zip(combos, futures, strict=True)):
        try:
            results.append(future.result())
            logger.info("trial %d %s: val macro-F1 %.4f", i, combo,
                        results[-1]["stats"]["best_val_macro_f1"])
        except Exception as err:  # noqa: BLE001 - one failed trial does not sink the sweep
            logger.warning("trial %d %s failed: %s", i, combo, err)
            results.append({"index": i, "overrides": combo, "error": f"{type(err).__name__}: "
                                                                     f"{err}"})
    return results


def log_trials(ws: Path, params, results: list[dict], report: dict) -> str:
    """One MLflow parent run for the sweep and a nested run per trial (params, metrics, curve)."""
    import mlflow

    from ratchet.registry import connect

    connect(params.registry, ws)
    with mlflow.start_run(run_name=f"sweep {len(results)} trials",
                          tags={"ratchet.kind": "sweep"}) as parent:
        mlflow.log_dict({k: v for k, v in report.items() if k != "trials"}, "sweep.json")
        for r in results:
            with mlflow.start_run(run_name=f"trial-{r['index']:02d}", nested=True,
                                  tags={"ratchet.kind": "sweep-trial",
                                        "ratchet.trial": str(r["index"]),
                                        "ratchet.best": str(r["index"] == report["best"])}):
                mlflow.log_params({f"finetune.{k}": v for k, v in r["overrides"].items()})
                if "error" in r:
                    mlflow.set_tag("error", r["error"][:4900])
                    continue
                mlflow.log_metrics({k: float(v) for k, v in r["stats"].items()
                                    if isinstance(v, int | float) and not isinstance(v, bool)
                                    and math.isfinite(v)})
                png = Path(r["dir"]) / "curve.png"
                if png.is_file():
                    mlflow.log_artifact(str(png))
        return parent.info.run_id


def adopt(ws: Path, best: dict) -> None:
    """Make the best trial the finetune stage's output: its params into params.yaml, its files
    where the stage writes them, then `dvc commit` so dvc.lock records both."""
    workspace.apply_overrides(ws, {"finetune": best["overrides"]})
    paths = stage_paths(ws)
    src = Path(best["dir"])
    out = ws / paths["out"]
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src / "model", out)
    full = ws / paths["all_metrics"] if "all_metrics" in paths else None  # else an old dvc.yaml
    write_metrics("finetune", json.loads((src / "metrics.json").read_text()),
                  ws / paths["metrics"], full)
    for name, dest in (("curve.csv", paths["curve"]),
                       ("curve.png", str(Path(paths["curve"]).with_suffix(".png")))):
        (ws / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, ws / dest)
    workspace.dvc(ws, "commit", "-f", "-q", "finetune")
