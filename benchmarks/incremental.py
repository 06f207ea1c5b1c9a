"""validate and prepare on a long history with one new batch: the code before issue 14 against now.

Data: `ratchet.demo_data.make_rows`, BATCHES batches of ROWS rows, a new demo domain every 10
batches (batch i draws from the first 1 + i // 10 of the five demo domains); from the second
batch on, 2% of a batch repeats texts of the batch before, half of them with another label
(duplicates and label conflicts for validate's warnings and prepare's dedup and policy),
stored as `ratchet ingest` stores them (canonical columns, PII redacted, `<seq>-<hash>.parquet`).
The label set is learned (`data.labels` empty, `validate.allow_new_labels: true`): each new
domain brings new labels. Every other param is the default.

Arms: `old` is commit OLD_COMMIT, exported with `git archive` to a temporary folder; `new` is
a copy of this checkout's files taken at the start. Each arm runs its own `dvc.yaml`'s command
for the stage (the new one passes the stage caches under `.ratchet/cache/`), as a subprocess
with the arm's tree first on PYTHONPATH, in a folder holding params.yaml and data/batches (no
DVC: the stage alone).

Per arm: `full` = validate, then prepare, on the first BATCHES - 1 batches in a fresh folder (for
the new arm this also fills its caches). Then, REPEATS times, arms interleaved (old, new, new,
old, ...): a copy of that folder gets the last batch, and validate then prepare run; `new_batch`
is their wall time (the whole process, imports included, as DVC pays it). Load average (1 min)
is recorded before each timed run.

Outputs: the arms' summary.json and prepared splits must be equal (`outputs_equal`, checked on
every timed run against the old arm's first).

Storage (`storage`): per arm a real workspace (`workspace.init` of the arm's code, the tiny model,
`noise.cold_start: skip` so that the noise stage costs nothing, labels learned), then per batch
(STORE_BATCHES of them) the arm's `workspace.ingest` and `dvc repro prepare` (validate, noise,
prepare); the bytes each adds to `.dvc/cache`, beside the batch file's own size. This covers the
stages up to prepare; benchmarks/scale.py measures the whole pipeline.

Run: `python -m benchmarks incremental` (results in benchmarks/results/incremental.json).
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "48e5dc0"
BATCHES = int(os.environ.get("INCR_BATCHES", "40"))
ROWS = int(os.environ.get("INCR_ROWS", "500"))
REPEATS = int(os.environ.get("INCR_REPEATS", "3"))
STORE_BATCHES = int(os.environ.get("INCR_STORE_BATCHES", "6"))
STAGES = ("validate", "prepare")
PARAMS = {"validate": {"allow_new_labels": True}}
ENV = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
       "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
       "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "PYTHONDONTWRITEBYTECODE": ""}


def write_batches(folder: Path, n: int = BATCHES, rows: int = ROWS) -> list[Path]:
    """n batch files as ingest stores them, in arrival order."""
    import pandas as pd

    from ratchet.data import canonical, content_hash, write_parquet_atomic
    from ratchet.demo_data import NEW_DOMAIN, OLD_DOMAINS, make_rows
    from ratchet.validation import redact

    domains = [*OLD_DOMAINS, NEW_DOMAIN]
    seen: set[str] = set()
    folder.mkdir(parents=True, exist_ok=True)
    out, previous = [], None
    for i in range(n):
        rng = random.Random(f"incr-{i}")
        df = make_rows(rng, domains[: 1 + min(i // 10, 4)], rows, seen)
        if previous is not None:  # 2% repeats of the batch before, half of them relabelled
            k = max(2, rows // 50)
            again = previous.sample(n=k, random_state=i).reset_index(drop=True)
            labels = sorted(set(df["label"]))
            again.loc[: k // 2 - 1, "label"] = [rng.choice(labels) for _ in range(k // 2)]
            df = pd.concat([df.iloc[: rows - k], again], ignore_index=True)
        previous = df
        stored = redact(canonical(df))
        path = folder / f"{i + 1:04d}-{content_hash(stored)[:12]}.parquet"
        write_parquet_atomic(stored, path)
        out.append(path)
    return out


def params_text() -> str:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in PARAMS.items():
        raw[section].update(values)
    return yaml.safe_dump(raw, sort_keys=False)


def stage_cmd(tree: Path, stage: str) -> list[str]:
    cmd = yaml.safe_load((tree / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    args = shlex.split(cmd)
    assert args[0] == "python", cmd
    return [sys.executable, *args[1:]]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, **ENV, "PYTHONPATH": str(tree),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def _call(tree: Path, ws: Path, args: list[str], what: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ws, env=_env(tree), capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed in {ws} ({tree}): {proc.stderr[-2000:]}")
    return wall


def run_stage(tree: Path, ws: Path, stage: str) -> float:
    return _call(tree, ws, stage_cmd(tree, stage), stage)


def outputs(ws: Path) -> dict[str, Any]:
    """What the two stages decided: the validation summary and the prepared splits."""
    import json

    import pandas as pd

    summary = json.loads((ws / "reports/validation/summary.json").read_text())
    return {"summary": {k: summary[k] for k in ("passed", "batches", "warnings")},
            **{s: pd.read_parquet(ws / f"data/prepared/{s}.parquet")
               for s in ("train", "val", "test")},
            "replay": pd.read_parquet(ws / "data/replay/buffer.parquet")}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["summary"] == b["summary"] and all(a[k].equals(b[k]) for k in a if k != "summary")


def cache_bytes(ws: Path) -> int:
    return sum(p.stat().st_size for p in (ws / ".dvc" / "cache").rglob("*") if p.is_file())


def storage(root: Path, trees: dict[str, Path], files: list[Path]) -> dict[str, Any]:
    """DVC cache bytes added per batch by ingest and by `dvc repro prepare`, per arm."""
    import pandas as pd

    overrides = {"model": {"source": "tiny"}, "noise": {"cold_start": "skip"},
                 "validate": {"allow_new_labels": True}}
    out: dict[str, Any] = {}
    for arm, tree in trees.items():
        ws = root / f"store-{arm}"
        _call(tree, root, [sys.executable, "-c",
                           "import sys; from pathlib import Path; from ratchet import workspace; "
                           f"workspace.init(Path(sys.argv[1]), {overrides!r})", str(ws)], "init")
        rows = []
        for k, f in enumerate(files[:STORE_BATCHES]):
            incoming = root / f"incoming-{arm}-{k}.csv"
            pd.read_parquet(f).to_csv(incoming, index=False)
            before = cache_bytes(ws)
            _call(tree, root, [sys.executable, "-c",
                               "import sys; from pathlib import Path; from ratchet import "
                               "workspace; workspace.ingest(Path(sys.argv[1]), Path(sys.argv[2]))",
                               str(ws), str(incoming)], "ingest")
            ingested = cache_bytes(ws)
            _call(tree, ws, [sys.executable, "-m", "dvc", "repro", "prepare"], "dvc repro")
            after = cache_bytes(ws)
            rows.append({"batch": k + 1, "batch_bytes": f.stat().st_size,
                         "ingest_bytes": ingested - before, "repro_bytes": after - ingested})
        late = rows[-1]
        out[arm] = {"per_batch": rows,
                    "last_added_over_batch": round(
                        (late["ingest_bytes"] + late["repro_bytes"]) / late["batch_bytes"], 2)}
    return out


def old_tree(root: Path) -> Path:
    """The old commit's files (no git worktree: nothing is added to the repository)."""
    tree = root / "old-tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def new_tree(root: Path) -> Path:
    """This checkout's files as they are now (edits made while the benchmark runs do not
    reach it, nor change the code digests its caches are keyed by)."""
    tree = root / "new-tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", ".venv", "*.egg-info", ".cache", "results", ".pytest_cache",
        ".ruff_cache", "demo-workspace"))
    return tree


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ratchet-incr-") as tmp:
        root = Path(tmp)
        files = write_batches(root / "batches")
        trees = {"old": old_tree(root), "new": new_tree(root)}
        result: dict[str, Any] = {"batches": BATCHES, "rows_per_batch": ROWS,
                                  "old_commit": OLD_COMMIT, "repeats": REPEATS,
                                  "cpus": os.cpu_count(), "arms": {}}
        snapshots = {}
        for arm, tree in trees.items():
            ws = root / f"{arm}-warm"
            (ws / "data" / "batches").mkdir(parents=True)
            (ws / "params.yaml").write_text(params_text())
            for f in files[:-1]:
                shutil.copy2(f, ws / "data" / "batches" / f.name)
            full = {"load_1m": os.getloadavg()[0]}
            for stage in STAGES:
                full[stage] = run_stage(tree, ws, stage)
            result["arms"][arm] = {"full": full, "new_batch": []}
            snapshots[arm] = ws
        reference = None
        equal = True
        for rep in range(REPEATS):
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for arm in order:
                ws = root / f"{arm}-{rep}"
                shutil.copytree(snapshots[arm], ws, symlinks=True)
                shutil.copy2(files[-1], ws / "data" / "batches" / files[-1].name)
                timed = {"load_1m": os.getloadavg()[0]}
                for stage in STAGES:
                    timed[stage] = run_stage(trees[arm], ws, stage)
                result["arms"][arm]["new_batch"].append(timed)
                got = outputs(ws)
                reference = reference or got
                equal = equal and same(got, reference)
                shutil.rmtree(ws)
        result["outputs_equal"] = equal
        for arm in trees:
            runs = result["arms"][arm]["new_batch"]
            result["arms"][arm]["median_new_batch_s"] = {
                s: round(statistics.median(r[s] for r in runs), 2) for s in STAGES}
        result["speedup_new_batch"] = {
            s: round(result["arms"]["old"]["median_new_batch_s"][s]
                     / result["arms"]["new"]["median_new_batch_s"][s], 2) for s in STAGES}
        if STORE_BATCHES:
            result["storage"] = storage(root, trees, files)
        return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
