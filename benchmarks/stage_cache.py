"""Drift and evaluate on one workspace's inputs, this code against an older commit's.

`python -m benchmarks.stage_cache --workspace W --old 48e5dc0 [--repeat R] [--out f.json]`

W is a workspace whose newest batch has been prepared and whose candidate is trained (e.g.
`ratchet ingest B -w W && cd W && dvc repro finetune`), with a champion. Each arm runs the two
stage commands exactly as `dvc.yaml` does, in W, in a fresh process, writing its outputs to a
temporary folder (W is not changed):
- drift, then evaluate with that arm's own importance weights;
- the old arm (COMMIT's tree from `git archive`) without an embedding cache (it had none),
  with the prediction cache in its own format (one parquet file per model, made from W's
  shards) and W's params without the keys it does not know (NEW_KEYS); the new arm with
  copies of W's embedding and prediction caches.
Every repetition starts from the same copies, so each sees the caches as this run of the
pipeline would. Arms alternate (old, new, new, old, ...) so machine load hits both alike; the
load average is recorded. Per run: wall seconds and peak RSS of the stage process, rows
embedded (drift's report, new arm) and predicted per model (evaluate's report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
NEW_KEYS = (("drift", "weight_rows"),)
"""params.yaml keys the old arm's config does not know (left out of its copy)."""


def old_cache(shards: Path, dest: Path) -> None:
    """The prediction cache in 48e5dc0's layout: `<model>.parquet`, every row in one file."""
    dest.mkdir(parents=True, exist_ok=True)
    if not shards.is_dir():
        return
    for folder in shards.iterdir():
        if folder.is_dir():
            parts = [pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))]
            if parts:
                table = pd.concat(parts, ignore_index=True).drop_duplicates("key", keep="last")
                table.to_parquet(dest / f"{folder.name[:64]}.parquet", index=False)


def timed(cmd: list[str], cwd: Path, code: Path) -> dict[str, Any]:
    """Run a stage command; its wall seconds and its own peak RSS (wait4's rusage)."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[2:4])} failed: {err.read().strip()[-500:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def one(arm: str, code: Path, ws: Path, base: Path, scratch: Path) -> dict[str, Any]:
    out = scratch / arm
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    py = sys.executable
    drift = [py, "-m", "tasks.drift", "--data", "data/prepared", "--champion", "champion.json",
             "--report", str(out / "drift.json"), "--plot-path", str(out / "drift.png"),
             "--weights", str(out / "weights.parquet")]
    predictions = out / "cache-predictions"
    if arm == "new":
        shutil.copytree(base / "embeddings", out / "cache-embeddings")
        shutil.copytree(base / "predictions", predictions)
        drift += ["--cache", str(out / "cache-embeddings")]
    else:
        shutil.copytree(base / "old-predictions", predictions)
        # The old config refuses keys it does not know: the workspace's params without them.
        import yaml

        raw = yaml.safe_load((ws / "params.yaml").read_text())
        for section, key in NEW_KEYS:
            raw.get(section, {}).pop(key, None)
        (out / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        params = ["--params", str(out / "params.yaml")]
        drift += params
    evaluate = [py, "-m", "tasks.evaluate", "--candidate", "models/candidate", "--test",
                "data/prepared/test.parquet", "--champion", "champion.json", "--weights",
                str(out / "weights.parquet"), "--metrics", str(out / "eval.json"),
                "--predictions", str(out / "pred.parquet"), "--report",
                str(out / "eval" / "report.json"), "--floor", "floor.json",
                "--cache", str(predictions)]
    if arm == "old":
        evaluate += params
    load = os.getloadavg()[0]
    entry: dict[str, Any] = {"arm": arm, "load_avg_before": round(load, 2)}
    entry["drift"] = timed(drift, ws, code)
    report = json.loads((out / "drift.json").read_text())
    entry["drift"]["embedding"] = report.get("embedding")
    entry["drift"]["weighted_rows"] = report.get("weights_n")
    entry["evaluate"] = timed(evaluate, ws, code)
    ev = json.loads((out / "eval" / "report.json").read_text())
    metrics = json.loads((out / "eval.json").read_text())
    entry["evaluate"]["predicted"] = ev.get("predicted")
    entry["evaluate"]["n_test"] = metrics.get("n/all")
    entry["evaluate"]["weighted"] = {k: metrics.get(f"{k}")
                                     for k in ("n/weighted", "ess/weighted",
                                               "diff/weighted/macro_f1",
                                               "diff/weighted/macro_f1_low",
                                               "test/weighted/p_value")}
    entry["load_avg_after"] = round(os.getloadavg()[0], 2)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage_cache",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--old", required=True, metavar="COMMIT")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    ws = args.workspace.resolve()
    if not (ws / "dvc.yaml").is_file() or not (ws / "models" / "candidate").is_dir():
        print(f"error: {ws} is not a workspace with a trained candidate", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="stage-cache-") as tmp:
        tmp = Path(tmp)
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        base = tmp / "caches"
        cache = ws / ".ratchet" / "cache"
        for name in ("embeddings", "predictions"):
            if (cache / name).is_dir():
                shutil.copytree(cache / name, base / name)
            else:
                (base / name).mkdir(parents=True)
        old_cache(base / "predictions", base / "old-predictions")
        order = [("old", old), ("new", ROOT)]
        for r in range(args.repeat):
            for arm, code in order if r % 2 == 0 else order[::-1]:
                entry = one(arm, code, ws, base, tmp / "runs")
                entry["repeat"] = r
                results.append(entry)
                print(json.dumps(entry), flush=True)
    if args.out:
        from ratchet.runtime import write_json

        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
