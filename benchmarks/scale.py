"""Scale: does a batch cost the same on day 40 as on day 2? Old code and new, side by side.

`python -m benchmarks.scale` streams BATCHES synthetic batches (ratchet.demo_data's generator,
ROWS rows each, a new domain every DOMAIN_EVERY batches: banking and dining first, then home,
travel and insurance) through the real pipeline, as a person runs it, for two arms:

- `old`: the code at OLD_COMMIT (the commit before issue 14), extracted with `git archive` into
  a temporary folder (nothing is committed), run with PYTHONPATH pointing at it and this venv;
- `new`: the tree this module is in (so a rerun after a merge measures the merged code).

Per arm: `python -m ratchet.cli init WS --model tiny`, params.yaml edited to PARAMS_EDITS (new
domains bring new labels; the tiny model's learning rate and the test suite's allowances for
it, else it stays at chance and no batch is ever promoted), then per batch `ratchet ingest
FILE -w WS` and `ratchet run -w WS` (the Prefect flow on its ephemeral server, the default
engine). Each arm has its own workspace (git, DVC cache and local remote, SQLite MLflow store,
PREFECT_HOME). The arms are interleaved batch by batch (old 1, new 1, old 2, ...) so that the
machine's load hits both alike.

Which code ran is checked, not assumed: PYTHONPATH starts with a folder holding a
`sitecustomize.py` (TRACER) that every Python process of the run imports at start-up; at exit it
appends one JSON line (argv, the files of the imported `ratchet`/`tasks`/`flows`, its own peak
RSS and CPU seconds, start and end) to the run's trace file. A batch whose processes imported
ratchet or tasks from outside the arm's tree stops the benchmark.

Per batch and arm (`batches` rows):
- `wall_s` = `ingest_s` + `run_s` (each the whole subprocess); `stage_s`: each stage's wall time
  as the flow logs it ("stage X: 1.2s"; 0.0 when DVC found it up to date); `stage_process`: per
  stage the traced `python -m tasks.X` process: wall, CPU seconds and peak RSS (MB).
- `peak_rss_mb`: the largest peak RSS of any one process of the ingest or the run (os.wait4's
  rusage of the subprocess: the maximum over it and every descendant it waited for);
  `tree_rss_peak_mb`: the largest sum of RSS over the run's live process tree, sampled every
  SAMPLE_S by psutil (shared pages count once per process).
- storage added by the batch (apparent bytes, hard links once): `dvc_cache_bytes` (.dvc/cache),
  `mlflow_artifact_bytes` (mlartifacts/), `stored_bytes` (the two together, a file both
  hold as hard links once: the target's "storage"), and beside them `dvc_remote_bytes` (the
  default local remote, a second copy of what is pushed), `mlflow_db_bytes` and
  `workspace_bytes` (everything under the workspace);
- `file_bytes` (the CSV handed to ingest), `batch_bytes` (the parquet ingest stored),
  `model_bytes` (models/candidate after the run), `budget_bytes` = 2 * file_bytes +
  model_bytes, `within_budget` = stored_bytes <= budget_bytes;
- `decision` (reports/gate.json when this run's gate ran, else "run failed" / "refused at
  ingest" / "gate not run"), `version`, any gate-record key naming the finetune init;
- `loadavg` (1-minute load average at the batch's start).

Per arm (`old`, `new`): `late_over_early` = median wall_s of the last 10 batches / median of
batches 2-11 (target <= 1.3 for new); `bytes_per_batch` = median stored_bytes;
`budget_bytes_median`, `within_budget` (median stored <= median budget) and `batches_over_budget`;
the same medians for the remote and the whole workspace; median stage seconds early and late.

`eval_scale`: `python -m benchmarks.eval_scale` (evaluate's scoring on synthetic predictions at
10k/100k/1M rows; one JSON line per size with rows, seconds, peak_rss_mb), run from the new
tree after the stream when the module exists; `eval_1m_peak_rss_mb` is its 1M row (target
<= 4096). Skipped (and said so) when the module is absent or the new arm is not run.

Options: --batches, --rows, --arms old,new, --param SECTION.KEY=VALUE (one more edit for both
arms, e.g. finetune.epochs=1), --out (the JSON; the PNG beside it), --root (the
work folder; default a new one under /tmp), --resume (continue the run recorded in --out: its
workspaces are in its root), --reuse-old FILE (take the old arm from an earlier `--arms old`
result and run only what is missing: the result says the arms ran in separate invocations).
The result is written atomically after every batch, so a run stopped midway leaves its data;
stop a run with SIGTERM (`kill PID`: a background job ignores Ctrl-C's SIGINT), which stops the
running `ratchet run` the way Ctrl-C does, and `--resume` it later.

Time: at 48e5dc0 one batch takes ~4-6 min per arm on 2 cores at load average 4-9 and ~12-13 min
at load 12-14 (batch 1; pretrain and finetune are most of it); the old code's finetune then
grows with every batch of history.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # the tree under test for the `new` arm
RESULTS = HERE / "benchmarks" / "results"
OLD_COMMIT = "48e5dc0"
ARMS = ("old", "new")
BATCHES = 40
ROWS = 500
DOMAIN_EVERY = 10
DOMAIN_ORDER = ("banking", "dining", "home", "travel", "insurance")  # most template room first
START_DOMAINS = 2
SEED = 0
MODEL = "tiny"
# New domains bring new labels (without allow_new_labels ingest refuses them: the first batch's
# labels become the known set). The rest are the test suite's settings under which the tiny
# random-init BERT learns the synthetic intents (tests/conftest.py TINY; with the defaults it
# stays at chance, 0.10 macro-F1, and the gate rejects every batch, so no champion would ever
# exist), but for the epochs: 3 (the default) rather than 6, as the old code's cost per epoch
# grows with all history.
PARAMS_EDITS: dict[str, dict[str, Any]] = {
    "validate": {"allow_new_labels": True},
    "augment": {"ops": ["swap", "delete"]},  # the tiny model's word table is random
    "finetune": {"learning_rate": 0.005},
    "gate": {"max_regression": 0.05, "min_invariance": 0.5},
}
EARLY = (2, 11)  # batches (1-based, inclusive) of the early median
LATE_N = 10  # the last this many batches form the late median
SAMPLE_S = 0.25
MB = 1 << 20
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
}
TRACE_ENV = "RATCHET_SCALE_TRACE"
TRACER = f'''"""Written by benchmarks/scale.py: one JSON line per Python process to ${TRACE_ENV}."""
import atexit, json, os, resource, sys, time

_START = time.time()


def _record():
    try:
        mods = {{}}
        for name in ("ratchet", "tasks", "flows"):
            f = getattr(sys.modules.get(name), "__file__", None)
            if f:
                mods[name] = f
        ru = resource.getrusage(resource.RUSAGE_SELF)
        line = json.dumps({{"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[:3],
                           "start": _START, "end": time.time(), "maxrss_kb": ru.ru_maxrss,
                           "cpu_s": ru.ru_utime + ru.ru_stime, "modules": mods}})
        with open(os.environ["{TRACE_ENV}"], "a") as fh:
            fh.write(line + "\\n")
    except Exception:
        pass


if os.environ.get("{TRACE_ENV}"):
    atexit.register(_record)
'''


def say(msg: str) -> None:
    print(f"scale: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the batches (pure)


def domain_schedule(batches: int, every: int = DOMAIN_EVERY, start: int = START_DOMAINS,
                    order: tuple[str, ...] = DOMAIN_ORDER) -> list[tuple[str, ...]]:
    """The domains of each batch: `start` at first, one more every `every` batches."""
    if batches < 1 or every < 1 or not 1 <= start <= len(order):
        raise ValueError("batches and every must be >= 1, start within the domain list")
    return [tuple(order[:min(len(order), start + i // every)]) for i in range(batches)]


def make_batches(batches: int, rows: int, *, seed: int = SEED, every: int = DOMAIN_EVERY,
                 start: int = START_DOMAINS) -> list[Any]:
    """`batches` frames (text, label, domain) of `rows` rows each from the demo generator, no
    text in two batches (nor twice in one) even ignoring case and punctuation (text_key)."""
    import pandas as pd

    from ratchet.data import text_key
    from ratchet.demo_data import make_rows

    rng = random.Random(seed)
    seen: set[str] = set()
    keys: set[str] = set()
    out = []
    for domains in domain_schedule(batches, every, start):
        parts, have = [], 0
        while have < rows:
            df = make_rows(rng, list(domains), rows - have, seen)
            k = df["text"].map(text_key)
            keep = ~k.isin(keys) & ~k.duplicated()
            keys.update(k[keep])
            parts.append(df[keep])
            have += int(keep.sum())
        frame = pd.concat(parts).sample(frac=1.0, random_state=rng.randrange(2**31))
        out.append(frame.reset_index(drop=True))
    return out


# ---------------------------------------------------------------- summaries (pure)


def with_params(edits: dict[str, dict[str, Any]], assignments: list[str]
                ) -> dict[str, dict[str, Any]]:
    """`edits` plus each `section.key=value` (the value read as YAML), as a new dict."""
    import yaml

    out = {section: dict(values) for section, values in edits.items()}
    for item in assignments:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ValueError(f"{item!r} is not SECTION.KEY=VALUE")
        out.setdefault(section, {})[key] = yaml.safe_load(value)
    return out


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def late_over_early(walls: list[float | None], early: tuple[int, int] = EARLY,
                    late_n: int = LATE_N) -> float | None:
    """Median of the last `late_n` walls / median of batches early[0]..early[1] (1-based)."""
    first, last = early
    e = _median(walls[first - 1:last])
    lt = _median(walls[-late_n:])
    if e is None or lt is None or e <= 0:
        return None
    return round(lt / e, 3)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's summary from its batch rows (in batch order)."""
    rows = sorted(rows, key=lambda r: r["batch"])
    ok = [r for r in rows if r.get("run_exit") == 0]
    walls = [r["wall_s"] if r.get("run_exit") == 0 else None for r in rows]

    def med(key: str, among: list[dict[str, Any]] = ok) -> float | None:
        m = _median([r.get(key) for r in among])
        return None if m is None else round(m, 3)

    stages = sorted({s for r in ok for s in r.get("stage_s", {})})
    first, last = EARLY
    early_rows = [r for r in ok if first <= r["batch"] <= last]
    late_rows = [r for r in ok if r["batch"] > len(rows) - LATE_N]
    stored, budget = med("stored_bytes"), med("budget_bytes")
    return {
        "batches": len(rows),
        "failed_runs": sum(r.get("run_exit") != 0 for r in rows),
        "late_over_early": late_over_early(walls),
        # the same ratio of the stage processes' CPU seconds: what machine load moves less
        "cpu_late_over_early": late_over_early(
            [sum(p.get("cpu_s", 0.0) for p in r["stage_process"].values())
             if r.get("run_exit") == 0 and r.get("stage_process") else None for r in rows]),
        "loadavg_early_median": med("loadavg", early_rows),
        "loadavg_late_median": med("loadavg", late_rows),
        "early_median_wall_s": med("wall_s", early_rows),
        "late_median_wall_s": med("wall_s", late_rows),
        "overlap": len(rows) < EARLY[1] + LATE_N,  # the two windows share batches
        "bytes_per_batch": None if stored is None else int(stored),
        "budget_bytes_median": None if budget is None else int(budget),
        "within_budget": None if stored is None or budget is None else stored <= budget,
        "batches_over_budget": sum(not r["within_budget"] for r in ok),
        "dvc_cache_bytes_per_batch": med("dvc_cache_bytes"),
        "mlflow_artifact_bytes_per_batch": med("mlflow_artifact_bytes"),
        "dvc_remote_bytes_per_batch": med("dvc_remote_bytes"),
        "workspace_bytes_per_batch": med("workspace_bytes"),
        "workspace_bytes_total": sum(r.get("workspace_bytes") or 0 for r in rows),
        "file_bytes_median": med("file_bytes"),
        "model_bytes_median": med("model_bytes"),
        "peak_rss_mb_max": max((r["peak_rss_mb"] for r in ok), default=None),
        "tree_rss_peak_mb_max": max((r["tree_rss_peak_mb"] for r in ok), default=None),
        "total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
        "stage_s_early_median": {s: _median([r["stage_s"].get(s) for r in early_rows])
                                 for s in stages},
        "stage_s_late_median": {s: _median([r["stage_s"].get(s) for r in late_rows])
                                for s in stages},
        "decisions": {d: sum(r["decision"] == d for r in rows)
                      for d in sorted({r["decision"] for r in rows})},
    }


def stage_processes(trace: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage, its traced `python -m tasks.X` process (the last, when it ran twice)."""
    out: dict[str, dict[str, float]] = {}
    for rec in sorted(trace, key=lambda r: r.get("start", 0)):
        argv0 = Path(str((rec.get("argv") or [""])[0]))
        if argv0.parent.name == "tasks" and argv0.suffix == ".py" and argv0.stem != "__init__":
            out[argv0.stem] = {"wall_s": round(rec["end"] - rec["start"], 2),
                               "cpu_s": round(rec["cpu_s"], 2),
                               "peak_rss_mb": round(rec["maxrss_kb"] / 1024, 1)}
    return out


def foreign_code(trace: list[dict[str, Any]], code: Path) -> list[str]:
    """Module files of ratchet/tasks/flows that the traced processes imported from outside
    `code`: empty when the arm ran its own code only."""
    code = code.resolve()
    bad = set()
    for rec in trace:
        for f in (rec.get("modules") or {}).values():
            p = Path(f).resolve()
            if not p.is_relative_to(code):
                bad.add(str(p))
    return sorted(bad)


def code_roots(trace: list[dict[str, Any]]) -> list[str]:
    """The trees the traced processes imported ratchet/tasks/flows from (package/__init__.py)."""
    return sorted({str(Path(f).resolve().parents[1]) for rec in trace
                   for f in (rec.get("modules") or {}).values()})


def merge_old(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """`current` with the old arm's rows and summary taken from `previous` (an earlier run of
    the same setup): the result records that the arms ran in separate invocations."""
    if "old" not in previous or not any(r["arm"] == "old" for r in previous.get("batches", [])):
        raise ValueError("the file to reuse has no old arm")
    mine, theirs = current.get("setup", {}), previous.get("setup", {})
    for key in ("batches", "rows", "seed", "domain_every", "model", "params_edits"):
        if mine.get(key) != theirs.get(key):
            raise ValueError(f"the reused old arm ran with {key}={theirs.get(key)!r}, "
                             f"this run with {mine.get(key)!r}")
    if previous.get("files_sha256") != current.get("files_sha256"):
        raise ValueError("the reused old arm streamed other batch files (files_sha256 differs)")
    out = dict(current)
    out["old"] = previous["old"]
    out["arm_setup"] = {**current.get("arm_setup", {}),
                        "old": previous.get("arm_setup", {}).get("old")}
    out["commit_old"] = previous.get("commit_old")
    out["batches"] = ([r for r in previous["batches"] if r["arm"] == "old"]
                      + [r for r in current.get("batches", []) if r["arm"] != "old"])
    out["batches"].sort(key=lambda r: (r["batch"], ARMS.index(r["arm"])))
    out["setup"] = {**mine, "arms": list(ARMS)}
    out["separate_invocations"] = True
    out["invocations"] = [*previous.get("invocations", []), *current.get("invocations", [])]
    return out


# ---------------------------------------------------------------- measuring (real processes)


def files_digest(paths: list[Path]) -> str:
    """sha256 over the files' bytes, in order: the same batches, or not."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def tree_bytes(*paths: Path) -> int:
    """Apparent bytes of every file under `paths` (each inode once, across the paths too: a
    file two stores hold as hard links is stored once; 0 for an absent path)."""
    total, inodes = 0, set()
    for dirpath, _dirs, files in (w for path in paths if path.exists() for w in os.walk(path)):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                continue
            inodes.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


@dataclass
class Measured:
    exit: int
    seconds: float
    maxrss_kb: int  # the largest of the process and every descendant it waited for
    tree_peak_kb: int  # the largest sampled sum of RSS over the live tree
    output: str
    trace: list[dict[str, Any]] = field(default_factory=list)


def _sample_tree(pid: int, stop: threading.Event, peak: list[int]) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.wait(SAMPLE_S):
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):  # it ended meanwhile
                total += p.memory_info().rss
        peak[0] = max(peak[0], total // 1024)


def measured(cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> Measured:
    """Run `cmd` to completion, output to `log`; its wall time, exit code, peak RSS, trace."""
    trace = log.with_suffix(".trace.jsonl")
    trace.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, TRACE_ENV: str(trace)}, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=_sample_tree, args=(proc.pid, stop, peak), daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM: `ratchet run` takes SIGTERM as Ctrl-C
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    records = []
    if trace.exists():
        for line in trace.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by a killed process
                records.append(json.loads(line))
    return Measured(proc.returncode, seconds, usage.ru_maxrss, peak[0],
                    log.read_text(errors="replace"), records)


def git_commit(tree: Path, rev: str = "HEAD") -> str | None:
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", f"{rev}^{{commit}}"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def tree_dirty(tree: Path) -> bool | None:
    proc = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "ratchet",
                           "tasks", "flows", "dvc.yaml", "params.yaml"],
                          capture_output=True, text=True, check=False)
    return bool(proc.stdout.strip()) if proc.returncode == 0 else None


def extract_commit(repo: Path, commit: str, dest: Path) -> Path:
    """The tree of `commit` in `dest` (`git archive | tar -x`): no checkout, nothing committed."""
    if (dest / "ratchet" / "__init__.py").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", commit],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed in {repo}")
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------- one arm


STORED = ("dvc_cache_bytes", "mlflow_artifact_bytes")  # `stored_bytes`: these two, a file once
STORES = {  # result key -> path in the workspace
    "dvc_cache_bytes": ".dvc/cache",
    "dvc_remote_bytes": ".ratchet/dvc-remote",
    "mlflow_artifact_bytes": "mlartifacts",
    "mlflow_db_bytes": "mlflow.db",
    "workspace_bytes": ".",
}


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Arm:
    def __init__(self, name: str, code: Path, root: Path, tracer: Path,
                 edits: dict[str, dict[str, Any]]):
        self.name, self.code, self.dir, self.edits = name, code.resolve(), root / name, edits
        self.ws = self.dir / "ws"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.env = {**env, **TELEMETRY_OFF, "PREFECT_HOME": str(self.dir / "prefect"),
                    "COLUMNS": "200", "PYTHONPATH": f"{tracer}{os.pathsep}{self.code}"}
        self.python = sys.executable

    def cli(self, log: str, *args: str) -> Measured:
        # cwd: the arm's own tree, never the other's (`python -m` puts the cwd on sys.path first)
        m = measured([self.python, "-m", "ratchet.cli", *args], env=self.env, cwd=self.code,
                     log=self.dir / "logs" / f"{log}.log")
        bad = foreign_code(m.trace, self.code)
        if bad:
            raise RuntimeError(f"arm {self.name}: `ratchet {args[0]}` imported code from outside "
                               f"{self.code}: {bad[:5]}")
        return m

    def init(self) -> dict[str, Any]:
        if (self.ws / "dvc.yaml").exists():
            return {"reused": True}
        from benchmarks.stream import edit_params

        self.dir.mkdir(parents=True, exist_ok=True)
        m = self.cli("init", "init", str(self.ws), "--model", MODEL)
        if m.exit != 0:
            raise RuntimeError(f"arm {self.name}: ratchet init failed:\n{_tail(m.output)}")
        edit_params(self.ws, self.edits)  # as a person does in an editor (not committed)
        code = [r["modules"] for r in m.trace if r.get("modules")]
        return {"init_s": round(m.seconds, 1), "modules": code[0] if code else {}}

    def sizes(self) -> dict[str, int]:
        sizes = {k: tree_bytes(self.ws / p) for k, p in STORES.items()}
        sizes["stored_bytes"] = tree_bytes(*(self.ws / STORES[k] for k in STORED))
        return sizes

    def play(self, number: int, file: Path, domains: tuple[str, ...], rows: int
             ) -> dict[str, Any]:
        from benchmarks.stream import gate_ran, stage_timings

        before = self.sizes()
        batches_before = set((self.ws / "data/batches").glob("*.parquet"))
        load = os.getloadavg()[0]
        ing = self.cli(f"{number:03d}-ingest", "ingest", str(file), "-w", str(self.ws))
        new_batches = sorted(set((self.ws / "data/batches").glob("*.parquet")) - batches_before)
        row: dict[str, Any] = {
            "arm": self.name, "batch": number, "domains": list(domains), "rows": rows,
            "new_domain": None, "loadavg": round(load, 2),
            "file_bytes": file.stat().st_size,
            "batch_bytes": sum(p.stat().st_size for p in new_batches),
            "ingest_s": round(ing.seconds, 2), "ingest_exit": ing.exit,
        }
        run = None
        if ing.exit != 0:
            decision = "refused at ingest"
            row["error"] = _tail(ing.output)
        else:
            run = self.cli(f"{number:03d}-run", "run", "-w", str(self.ws))
            if run.exit != 0:
                decision = "run failed"
                row["error"] = _tail(run.output)
        stages = stage_timings(run.output) if run else {}
        gate: dict[str, Any] = {}
        if run is not None and run.exit == 0:
            if gate_ran(stages, run.exit):
                gate = _json_file(self.ws / "reports/gate.json") or {}
                decision = str(gate.get("decision"))
            else:
                decision = "gate not run"
        after = self.sizes()
        added = {k: after[k] - before[k] for k in STORES}
        model = tree_bytes(self.ws / "models/candidate")
        stored = after["stored_bytes"] - before["stored_bytes"]  # the union of the two stores
        budget = 2 * row["file_bytes"] + model
        procs = [ing] + ([run] if run else [])
        row.update({
            "run_s": round(run.seconds, 2) if run else 0.0,
            "run_exit": run.exit if run else None,
            "wall_s": round(ing.seconds + (run.seconds if run else 0.0), 2),
            "stage_s": stages,
            "stage_process": stage_processes(run.trace) if run else {},
            "peak_rss_mb": round(max(p.maxrss_kb for p in procs) / 1024, 1),
            "tree_rss_peak_mb": round(max(p.tree_peak_kb for p in procs) / 1024, 1),
            **added,
            "stored_bytes": stored,
            "model_bytes": model,
            "budget_bytes": budget,
            "within_budget": stored <= budget,
            "decision": decision,
            "version": gate.get("version"),
            "init": {k: v for k, v in gate.items() if "init" in k.lower()} or None,
            "traced_processes": sum(len(p.trace) for p in procs),
            "code_roots": code_roots([t for p in procs for t in p.trace]),
        })
        return row


# ---------------------------------------------------------------- eval scale, plot, output


def eval_scale(tree: Path, rows: str | None, log: Path) -> dict[str, Any]:
    """`python -m benchmarks.eval_scale` of the new tree: its JSON lines, or why it did not run."""
    if not (tree / "benchmarks" / "eval_scale.py").exists():
        return {"skipped": "benchmarks/eval_scale.py is not in this tree"}
    env = {**os.environ, **TELEMETRY_OFF, "PYTHONPATH": str(tree)}
    sizes = [n.strip() for n in (rows or "").split(",") if n.strip()]
    cmd = [sys.executable, "-m", "benchmarks.eval_scale"]
    cmd += [a for n in sizes for a in ("--rows", n)]
    m = measured(cmd, env=env, cwd=tree, log=log)
    results = []
    for line in m.output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                results.append(json.loads(line))
    out: dict[str, Any] = {"command": " ".join(["python", *cmd[1:]]), "exit": m.exit,
                           "seconds": round(m.seconds, 1), "results": results,
                           "process_peak_rss_mb": round(m.maxrss_kb / 1024, 1)}
    if m.exit != 0:
        out["error"] = _tail(m.output)
    return out


def eval_1m(ev: dict[str, Any]) -> float | None:
    for r in ev.get("results", []):
        if r.get("rows") == 1_000_000 and r.get("arm", "new") == "new":
            return r.get("peak_rss_mb")
    return None


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ratchet.runtime import atomic_path

    rows = result["batches"]
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    colors = {"old": "tab:red", "new": "tab:blue"}
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[0][0]
    for a in arms:
        mine = sorted((r for r in rows if r["arm"] == a), key=lambda r: r["batch"])
        ratio = (result.get(a) or {}).get("late_over_early")
        ax.plot([r["batch"] for r in mine], [r["wall_s"] for r in mine], "o-", ms=3,
                color=colors[a], label=f"{a} (late/early {ratio})")
    ax.set(xlabel="batch", ylabel="seconds (ingest + ratchet run)", title="wall time per batch")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax = axes[0][1]
    for a in arms:
        mine = sorted((r for r in rows if r["arm"] == a), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in mine], [r["stored_bytes"] / MB for r in mine], "o-", ms=3,
                color=colors[a], label=f"{a}: DVC cache + MLflow artifacts")
        ax.plot([r["batch"] for r in mine], [r["budget_bytes"] / MB for r in mine], "--",
                color=colors[a], alpha=0.6, label=f"{a}: budget 2x file + model")
    ax.set(xlabel="batch", ylabel="MB added", title="storage added per batch")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    stages = sorted({s for r in rows for s in r.get("stage_s", {})})
    cmap = plt.get_cmap("tab10")
    for ax, a in zip(axes[1], ARMS, strict=True):
        mine = sorted((r for r in rows if r["arm"] == a), key=lambda r: r["batch"])
        if not mine:
            ax.set_visible(False)
            continue
        xs = [r["batch"] for r in mine]
        bottom = [0.0] * len(mine)
        for i, s in enumerate(stages):
            ys = [r.get("stage_s", {}).get(s, 0.0) for r in mine]
            ax.bar(xs, ys, bottom=bottom, color=cmap(i % 10), label=s, width=0.8)
            bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
        ax.plot(xs, [r["run_s"] for r in mine], "k.", ms=4, label="whole run")
        ax.set(xlabel="batch", ylabel="seconds", title=f"{a}: stage wall time (flow log)")
        ax.legend(fontsize=7, ncol=2)
    setup = result.get("setup", {})
    fig.suptitle(f"ratchet scale: {setup.get('batches')} batches x {setup.get('rows')} rows, "
                 f"model {setup.get('model')}; old {str(result.get('commit_old'))[:8]}, new "
                 f"{str(result.get('commit_new'))[:8]}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> None:
    from ratchet.runtime import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    for a in ARMS:
        mine = [r for r in result["batches"] if r["arm"] == a]
        if mine and a in result["setup"]["arms"]:
            result[a] = summarize(mine)
    return result


# ---------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=BATCHES)
    p.add_argument("--rows", type=int, default=ROWS, help="rows per batch")
    p.add_argument("--domain-every", type=int, default=DOMAIN_EVERY,
                   help="a new domain every this many batches")
    p.add_argument("--arms", default=",".join(ARMS), help="old,new | old | new")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json",
                   help="result JSON (the PNG is written beside it)")
    p.add_argument("--root", type=Path, default=None,
                   help="work folder for the workspaces (default: a new one under /tmp)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out, in its root")
    p.add_argument("--reuse-old", type=Path, default=None, metavar="FILE",
                   help="take the old arm from this earlier result (an `--arms old` run)")
    p.add_argument("--param", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="one more params.yaml edit for both arms (YAML value), e.g. "
                        "finetune.epochs=1; repeatable")
    p.add_argument("--old-commit", default=OLD_COMMIT)
    p.add_argument("--eval-rows", default=None, metavar="N,M,...",
                   help="test rows for benchmarks.eval_scale (default: its own sizes)")
    p.add_argument("--no-eval", action="store_true", help="skip benchmarks.eval_scale")
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arm_list or set(args.arm_list) - set(ARMS):
        p.error(f"--arms: a comma list of {', '.join(ARMS)}")
    if args.reuse_old is not None:
        if not args.reuse_old.is_file():
            p.error(f"--reuse-old: {args.reuse_old} is not a file")
        args.arm_list = [a for a in args.arm_list if a != "old"]
        if not args.arm_list:
            p.error("--reuse-old leaves nothing to run: name another arm in --arms")
    try:
        with_params(PARAMS_EDITS, args.param)
    except ValueError as err:
        p.error(f"--param: {err}")
    if args.batches < 1 or args.rows < 10 or args.domain_every < 1:
        p.error("--batches >= 1, --rows >= 10, --domain-every >= 1")
    if args.resume and not args.out.is_file():
        p.error(f"--resume: {args.out} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminated(signum, _frame):  # stop the running command too, then exit
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, terminated)
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)
    edits = with_params(PARAMS_EDITS, args.param)
    setup = {"batches": args.batches, "rows": args.rows, "seed": SEED,
             "domain_every": args.domain_every, "domain_order": list(DOMAIN_ORDER),
             "start_domains": START_DOMAINS, "model": MODEL, "params_edits": edits,
             "arms": args.arm_list, "engine": "prefect (ratchet run default)",
             "cpu_count": os.cpu_count(), "python": sys.executable}
    invocation = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "arms": args.arm_list,
                  "argv": sys.argv[1:] if argv is None else argv,
                  "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    if args.resume:
        result = json.loads(args.out.read_text())
        if result.get("setup") != setup:
            say(f"error: {args.out} was made with other settings: {result.get('setup')}")
            return 2
        root = Path(result["root"])
        result["invocations"].append(invocation | {"resumed": True})
    else:
        root = (args.root or Path(tempfile.mkdtemp(prefix="ratchet-scale-"))).resolve()
        root.mkdir(parents=True, exist_ok=True)
        result = {"setup": setup, "root": str(root), "batches": [], "invocations": [invocation],
                  "separate_invocations": False}
    old_sha = git_commit(HERE, args.old_commit)
    if "old" in args.arm_list and old_sha is None:
        say(f"error: commit {args.old_commit} not found in {HERE}")
        return 2
    result.update(commit_old=old_sha, commit_new=git_commit(HERE),
                  new_tree=str(HERE), new_tree_dirty=tree_dirty(HERE))
    tracer = root / "tracer"
    tracer.mkdir(exist_ok=True)
    (tracer / "sitecustomize.py").write_text(TRACER)
    codes = {"new": HERE}
    if "old" in args.arm_list:
        say(f"extracting {args.old_commit} ({old_sha[:12]}) into {root / 'old-code'}")
        codes["old"] = extract_commit(HERE, old_sha, root / "old-code")
    arms = [Arm(a, codes[a], root, tracer, edits) for a in ARMS if a in args.arm_list]
    schedule = domain_schedule(args.batches, args.domain_every)
    files = root / "files"
    files.mkdir(exist_ok=True)
    paths = [files / f"{i:03d}.csv" for i in range(1, args.batches + 1)]
    earlier = (Path(json.loads(args.reuse_old.read_text()).get("root", "/nonexistent")) / "files"
               if args.reuse_old else None)
    if earlier is not None and all((earlier / p.name).is_file() for p in paths):
        for p in paths:  # the very files the old arm saw, whatever the generator does now
            if not p.exists():
                shutil.copyfile(earlier / p.name, p)
    if not all(p.exists() for p in paths):
        frames = make_batches(args.batches, args.rows, seed=SEED, every=args.domain_every)
        for path, frame in zip(paths, frames, strict=True):
            if not path.exists():
                frame.to_csv(path, index=False)
    result["files_sha256"] = files_digest(paths)
    if result.setdefault("files_sha256_first", result["files_sha256"]) != result["files_sha256"]:
        say(f"error: the batch files in {files} changed since the run began")
        return 2
    if args.reuse_old is not None:  # refuse now, not after hours of the other arm
        try:
            merge_old(json.loads(args.reuse_old.read_text()),
                      {"setup": setup, "files_sha256": result["files_sha256"], "batches": []})
        except (ValueError, KeyError) as err:
            say(f"error: --reuse-old {args.reuse_old}: {err}")
            return 2
    row_counts = [p.read_bytes().count(b"\n") - 1 for p in paths]  # no newline inside texts
    result.setdefault("arm_setup", {})
    for arm in arms:
        info = arm.init()
        result["arm_setup"].setdefault(arm.name, {"code": str(arm.code), **info})
    done = {(r["arm"], r["batch"]) for r in result["batches"]}
    resumed: set[str] = set()
    write(finalize(result), args.out)
    for i, path in enumerate(paths, start=1):
        for arm in arms:
            if (arm.name, i) in done:
                continue
            row = arm.play(i, path, schedule[i - 1], row_counts[i - 1])
            row["new_domain"] = i > 1 and schedule[i - 1] != schedule[i - 2]
            if args.resume and arm.name not in resumed:
                row["resumed"] = True  # its workspace may hold a stopped run's leftovers
                resumed.add(arm.name)
            result["batches"].append(row)
            result["batches"].sort(key=lambda r: (r["batch"], ARMS.index(r["arm"])))
            done.add((arm.name, i))
            write(finalize(result), args.out)
            stages = ", ".join(f"{s} {t:.0f}" for s, t in row["stage_s"].items() if t)
            say(f"{arm.name} batch {i}/{args.batches} ({row['rows']} rows, "
                f"{len(row['domains'])} domains): {row['wall_s']:.1f}s (ingest "
                f"{row['ingest_s']:.1f}, run {row['run_s']:.1f}: {stages}), peak RSS "
                f"{row['peak_rss_mb']:.0f} MB, stored +{row['stored_bytes'] / MB:.1f} MB "
                f"(budget {row['budget_bytes'] / MB:.1f}), {row['decision']}, "
                f"load {row['loadavg']}")
    if "new" in args.arm_list and not args.no_eval:
        say("benchmarks.eval_scale ...")
        result["eval_scale"] = eval_scale(HERE, args.eval_rows, root / "logs" / "eval_scale.log")
    elif "eval_scale" not in result:
        result["eval_scale"] = {"skipped": "--no-eval" if args.no_eval
                                else "the new arm was not run"}
    result["eval_1m_peak_rss_mb"] = eval_1m(result["eval_scale"])
    result["invocations"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["invocations"][-1]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finalize(result)
    if args.reuse_old is not None:
        result = merge_old(json.loads(args.reuse_old.read_text()), result)
    write(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    for a in ARMS:
        s = result.get(a)
        if s:
            say(f"{a}: late_over_early {s['late_over_early']}, bytes_per_batch "
                f"{s['bytes_per_batch']} (budget median {s['budget_bytes_median']}, within "
                f"{s['within_budget']}), peak RSS {s['peak_rss_mb_max']} MB")
    say(f"eval_1m_peak_rss_mb {result['eval_1m_peak_rss_mb']}; wrote {args.out} and "
        f"{args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
