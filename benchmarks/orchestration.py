"""Orchestration overhead of the Prefect `retrain` flow on the demo's first batch (MiniLM).

What it measures, in one run on one workspace:
- `server_start_s`: starting Prefect's local server (what an ephemeral run pays first), apart;
- `overhead_ratio`: the flow's wall time divided by the sum of its stages' own times (each
  stage's `dvc repro` as timed inside its task). The rest is Prefect's task and artifact
  bookkeeping, resolving the champion in MLflow, the git commit and the `dvc push`.
  Target <= 1.10.
- `noop_rerun_s`: the same flow again with nothing changed (every stage is up to date, so one
  `dvc status` replaces the per-stage `dvc repro`), plus the server start. Target <= 20 s.

The workspace is the demo's (`ratchet demo` settings, the packaged MiniLM model, batch
`01-launch.csv`) in a temporary folder; nothing is fetched.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any


def run() -> dict[str, Any]:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import retrain
    from ratchet import workspace
    from ratchet.demo_data import all_labels, demo_batches, demo_probes, write_batch

    root = Path(tempfile.mkdtemp(prefix="ratchet-bench-orch-"))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    ws = workspace.init(root / "ws", {"model": {"source": "minilm-l6"},
                                      "data": {"labels": all_labels(), "require_domain": True}},
                        probes=demo_probes(0))
    batch = demo_batches(seed=0)[0]
    workspace.ingest(ws, write_batch(batch, ws / workspace.INCOMING))

    t0 = time.perf_counter()
    server = SubprocessASGIServer()
    server.start(timeout=120)
    server_start = time.perf_counter() - t0
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            t0 = time.perf_counter()
            first = retrain(str(ws))
            wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = retrain(str(ws))
            noop = time.perf_counter() - t0
    finally:
        server.stop()
    stages = sum(first["timings"].values())
    skipped = [s for s, t in again["timings"].items() if t == 0.0]
    result = {
        "overhead_ratio": round(wall / stages, 4),
        "server_start_s": round(server_start, 2),
        "noop_rerun_s": round(noop + server_start, 2),
        "noop_flow_s": round(noop, 2),
        "noop_stages_skipped": skipped,
        "noop_all_skipped": len(skipped) == len(again["timings"]),
        "flow_wall_s": round(wall, 2),
        "stages_sum_s": round(stages, 2),
        "stage_seconds": {k: round(v, 2) for k, v in first["timings"].items()},
        "decision": first.get("decision"),
        "targets": {"overhead_ratio": "<= 1.10", "noop_rerun_s": "<= 20 (server start included)"},
        "workspace": str(ws),
        "cpu_count": os.cpu_count(),
    }
    for key in ("overhead_ratio", "server_start_s", "noop_rerun_s"):
        print(f"orchestration: {key} = {result[key]}")
    return result
