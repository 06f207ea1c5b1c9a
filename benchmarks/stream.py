"""A real stream, end to end: six CLINC150 batches through `ratchet init/ingest/run`, as a new user.

Data: `../shared/data/clinc150/{train,val,test}.csv` (columns text, label, domain), read by path
and never copied; `oos` is left out, and of texts equal after `ratchet.data.normalise` only the
first is kept (150 intents of 15 in 10 domains, ~150 rows each). A seeded permutation of the
domains gives 6 launch domains, 2 new ones and 1 later one (the tenth is not used). Each intent's
rows are shuffled once (seed SEED) and dealt out in consecutive chunks of `rows_per_intent`, so
no row is in two batches:

| batch | rows | expected | must |
|---|---|---|---|
| 1 launch | every intent of the 6 launch domains | promote | yes |
| 2 new-domains | every intent of the 2 new domains | promote | yes |
| 3 noisy | every known intent (8 domains), half the labels set to other known ones | reject | yes |
| 4 clean | every known intent, the next chunk, labels as they are | either | no |
| 5 repeat | the same file as batch 4 | no new version | yes |
| 6 late-domain | every intent of the later domain | promote | yes |

Size: ROWS_PER_INTENT = 40 (batches of 3,600 / 1,200 / 4,800 / 4,800 / the same / 600 rows;
49 is the most the data allow, three chunks of each known intent). Measured on batch 1 alone:
1,380 s (ingest 55 s; `ratchet run` 1,326 s: finetune 473, pretrain 294, noise 222, evaluate 87,
validate 44, gate 43, the rest under 15 each, 121 s outside the stages) on the 2 cores shared
with other jobs at load average ~5.5, where the same stages run ~10x faster idle (validate
3.9 s, pretrain 24.8 s in results/orchestration.json). Finetune grows with all the rows so far
(every run trains from the base model on every batch), the rest is mostly per run: the whole
stream is ~20-25 min idle and ~3 h at that load (an estimate from this batch). With 15 rows per
intent batch 1 took 554 s (load ~4.5) but reached only 0.53 test macro-F1 after one epoch (the
floor is 0.5; 0.82 with 40): later verdicts would be about models that barely pass the floor.

Exactly round(NOISE_SHARE * rows) rows of batch 3 are flipped, each to a label drawn uniformly
from the known labels (batches 1-2) other than its own; `domain` stays the text's own.

The pipeline, as a person runs it: `ratchet init WS --model M` (default params otherwise), then
the workspace's params.yaml edited to PARAMS_EDITS (`finetune.epochs: 1` for time, and
`validate.allow_new_labels: true`, without which ingest refuses batches 2 and 6: with
`data.labels` empty the first batch's labels become the known set). Per batch `ratchet ingest
FILE -w WS`, then `ratchet run -w WS` (the Prefect `retrain` flow on its ephemeral server, the
default engine), then `ratchet status -w WS`; each a subprocess of this venv's `ratchet`, with a
temporary PREFECT_HOME and telemetry off. Nothing else is set: threads and every other param
are the defaults a new user gets.

Per batch, recorded:
- `decision`: "no new version" when `ratchet status` lists as many registry versions as before
  the run, else the decision of the workspace's reports/gate.json (`promoted` -> "promote",
  `rejected` -> "reject", any other label as it is, e.g. "deferred"); `gate_decision` and
  `versions` keep the raw facts. A refused ingest is "refused at ingest", a run that exits
  non-zero "run failed" (both with `error`, the end of the output); the stream goes on.
  `right`: decision == expected, None for "either"; `right_share` is over the "must" batches.
- `failed_checks`: name and reason of every failed check in reports/gate.json, when the gate
  stage ran in this run (`gate_ran`; else the record is the previous run's: [] here).
- `noise_rate` / `noise_flagged`: reports/validation/noise.json -> batches[<batch id>] "rate" and
  "flagged" (the noise stage's record; None when the file, the batch or the key is absent).
- `macro_f1`: candidate and champion, recent and reference, from reports/eval/metrics.json
  (None where absent, e.g. the champion at cold start).
- `stage_seconds`: each stage's own wall time as the flow logs it ("stage X: 12.3s"; 0.0 for a
  stage DVC found up to date), `ingest_s`, `run_s` (the whole `ratchet run` process: the
  Prefect server start, the champion refresh, every stage, the commit and the DVC push) and
  `ingest_noop` (the ingest created no batch file).
- `baselines`: on the same eval.json, what two other rules would decide, reusing
  `benchmarks.gate.naive_rule` (candidate recent macro-F1 > champion's) and `mlflow_rule`
  (MLflow's `MetricThreshold(threshold=gate.min_score, min_absolute_change=gate.min_delta)`);
  with no champion the champion's score is -inf (MLflow then checks the threshold alone). A rule
  only says promote or not: it is right on "promote" when it promotes, and on "reject" and "no
  new version" when it does not (promoting a re-run of unchanged data would move `champion` for
  nothing); None on "either". Their `right_share` is over the same "must" batches.

Top-level: `decisions`, `right_share`, `baselines` (per rule: decisions and right share),
`timings` (per batch and total seconds), `setup` (model, rows per intent, domains, seed,
params edits, batch sizes) and `workspace` (kept for inspection). `run(rows_per_intent=...,
model=...)`, or $RATCHET_STREAM_ROWS / $RATCHET_STREAM_MODEL, make a smoke run (e.g. 3 rows per
intent on `tiny`: a few minutes).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared/data/clinc150"
SPLITS = ("train", "val", "test")
SEED = 0
MODEL = "minilm-l6"
ROWS_PER_INTENT = 40
NOISE_SHARE = 0.5
LAUNCH_DOMAINS, NEW_DOMAINS, LATE_DOMAINS = 6, 2, 1
PARAMS_EDITS: dict[str, dict[str, Any]] = {
    "finetune": {"epochs": 1},
    "validate": {"allow_new_labels": True},
}
EXPECTED = ("promote", "reject", "either", "no new version")
GATE_LABELS = {"promoted": "promote", "rejected": "reject"}
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
}


@dataclass(frozen=True)
class Batch:
    number: int
    name: str
    expected: str
    must: bool
    frame: pd.DataFrame  # text, label, domain: what the file holds
    domains: tuple[str, ...]
    flipped: np.ndarray  # per row of `frame`: was its label changed
    same_file_as: int | None = None  # batch 5 re-sends batch 4's file

    @property
    def filename(self) -> str:
        return f"{self.number:02d}-{self.name}.csv"


# ---------------------------------------------------------------- the batches (pure)


def load_rows(data: Path = DATA) -> pd.DataFrame:
    """train+val+test without `oos`, one row per normalised text (the first seen)."""
    from ratchet.data import normalise

    frames = [pd.read_csv(data / f"{s}.csv", dtype=str, keep_default_na=False) for s in SPLITS]
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["label"] != "oos"]
    rows = rows.loc[~rows["text"].map(normalise).duplicated()]
    return rows[["text", "label", "domain"]].reset_index(drop=True)


def plan_domains(domains: list[str], seed: int = SEED) -> dict[str, tuple[str, ...]]:
    """Launch, new and later domains: a seeded permutation of the sorted domain names."""
    order = np.random.default_rng([seed, 0]).permutation(sorted(domains)).tolist()
    a, b = LAUNCH_DOMAINS, LAUNCH_DOMAINS + NEW_DOMAINS
    return {"launch": tuple(sorted(order[:a])), "new": tuple(sorted(order[a:b])),
            "late": tuple(sorted(order[b:b + LATE_DOMAINS]))}


def flip_labels(labels: np.ndarray, known: list[str], share: float, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exactly round(share * n) labels, at random rows, set to another label of `known`."""
    n = len(labels)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=round(share * n), replace=False)] = True
    out = labels.copy()
    for i in np.flatnonzero(mask):
        others = [k for k in known if k != labels[i]]
        out[i] = others[rng.integers(len(others))]
    return out, mask


def make_batches(rows: pd.DataFrame, rows_per_intent: int, seed: int = SEED) -> list[Batch]:
    """The six batches of the stream (see the module docstring), disjoint but for batch 5."""
    plan = plan_domains(rows["domain"].unique().tolist(), seed)
    rng = np.random.default_rng([seed, 1])
    # Each intent's rows in one seeded order, dealt out chunk by chunk: no row is used twice.
    pools = {label: g.sample(frac=1.0, random_state=int(rng.integers(2**31)))
             for label, g in rows.groupby("label", sort=True)}
    dealt = dict.fromkeys(pools, 0)

    def take(domains: tuple[str, ...]) -> pd.DataFrame:
        parts = []
        for label in sorted(rows.loc[rows["domain"].isin(domains), "label"].unique()):
            start, pool = dealt[label], pools[label]
            if start + rows_per_intent > len(pool):
                raise ValueError(f"intent `{label}` has {len(pool)} rows: too few for another "
                                 f"{rows_per_intent} (lower rows_per_intent)")
            parts.append(pool.iloc[start:start + rows_per_intent])
            dealt[label] = start + rows_per_intent
        out = pd.concat(parts)
        return out.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)

    def clean(number: int, name: str, expected: str, domains: tuple[str, ...]) -> Batch:
        frame = take(domains)
        return Batch(number, name, expected, expected != "either", frame, domains,
                     np.zeros(len(frame), dtype=bool))

    known = plan["launch"] + plan["new"]
    b1 = clean(1, "launch", "promote", plan["launch"])
    b2 = clean(2, "new-domains", "promote", plan["new"])
    noisy = take(known)
    known_labels = sorted(set(b1.frame["label"]) | set(b2.frame["label"]))
    labels, flipped = flip_labels(noisy["label"].to_numpy(dtype=object), known_labels,
                                  NOISE_SHARE, rng)
    b3 = Batch(3, "noisy", "reject", True, noisy.assign(label=labels), known, flipped)
    b4 = clean(4, "clean", "either", known)
    b5 = Batch(5, "repeat", "no new version", True, b4.frame, known, b4.flipped, same_file_as=4)
    b6 = clean(6, "late-domain", "promote", plan["late"])
    return [b1, b2, b3, b4, b5, b6]


# ---------------------------------------------------------------- reading a run (pure)


def decision_of(gate: dict[str, Any], versions_before: int | None, versions_after: int | None
                ) -> str:
    """What happened, in the expected's words: no version registered, or the gate's label."""
    if versions_before is not None and versions_after == versions_before:
        return "no new version"
    label = str(gate.get("decision"))
    return GATE_LABELS.get(label, label)


def is_right(expected: str, decision: str) -> bool | None:
    """None for "either" (no must), else whether the decision is the expected one."""
    if expected not in EXPECTED:
        raise ValueError(f"unknown expected decision {expected!r}")
    return None if expected == "either" else decision == expected


def rule_is_right(expected: str, promote: bool) -> bool | None:
    """A promote-or-not rule: right to promote on "promote", right not to on the others."""
    if expected not in EXPECTED:
        raise ValueError(f"unknown expected decision {expected!r}")
    return None if expected == "either" else promote == (expected == "promote")


def right_share(rights: list[bool | None]) -> float | None:
    """Share right over the batches that had a "must" (None entries are "either")."""
    judged = [r for r in rights if r is not None]
    return round(sum(judged) / len(judged), 4) if judged else None


def failed_checks(gate: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": c.get("name"), "reason": c.get("reason")}
            for c in gate.get("checks", []) if not c.get("passed")]


STAGE_LINE = re.compile(r"stage (\w+): (?:([\d.]+)s|up to date, skipped"
                        r"|sweep of \d+ trials, best .* \(([\d.]+)s\))")


def stage_timings(log: str) -> dict[str, float]:
    """Each stage's seconds from the flow's log lines (0.0: DVC found it up to date)."""
    out: dict[str, float] = {}
    for m in STAGE_LINE.finditer(log):
        seconds = m.group(2) or m.group(3)
        out[m.group(1)] = float(seconds) if seconds else 0.0
    return out


def gate_ran(stages: dict[str, float], run_exit: int | None) -> bool:
    """Did this run's gate stage write reports/gate.json? Not when DVC found it up to date (the
    record is then the previous run's) nor when the run failed or never started; a log without
    the gate's line (its format changed) counts as ran."""
    if run_exit != 0:
        return False
    return stages.get("gate", math.nan) != 0.0


VERSIONS_LINE = re.compile(r":\s*(\d+)\s+version\(s\)")


def version_count(status_output: str) -> int | None:
    """The number of registered versions from `ratchet status` (its table title)."""
    m = VERSIONS_LINE.search(status_output)
    return int(m.group(1)) if m else None


def batch_id_of(ingest_output: str) -> str | None:
    m = re.search(r"as\s+batch\s+(\S+)", ingest_output)
    return m.group(1).rstrip(";") if m else None


def noise_of(report: dict[str, Any] | None, batch_id: str | None
             ) -> tuple[float | None, bool | None]:
    """(rate, flagged) of one batch from the noise stage's record; None for what is absent."""
    if not isinstance(report, dict) or batch_id is None:
        return None, None
    entry = (report.get("batches") or {}).get(batch_id)
    if not isinstance(entry, dict):
        return None, None
    rate, flagged = entry.get("rate"), entry.get("flagged")
    return (float(rate) if isinstance(rate, int | float) else None,
            bool(flagged) if isinstance(flagged, bool) else None)


def f1_scores(metrics: dict[str, Any]) -> dict[str, float | None]:
    def get(key: str) -> float | None:
        v = metrics.get(key)
        return round(float(v), 4) if isinstance(v, int | float) and not math.isnan(v) else None

    return {f"{who}_{sl}": get(f"{who}/{sl}/macro_f1")
            for who in ("candidate", "champion") for sl in ("recent", "reference")}


def baseline_rules(metrics: dict[str, Any], *, min_delta: float, floor: float
                   ) -> dict[str, bool] | None:
    """What the naive and MLflow rules decide on this eval.json (None: no candidate score)."""
    from benchmarks.gate import mlflow_rule, naive_rule

    scores = f1_scores(metrics)
    cand, champ = scores["candidate_recent"], scores["champion_recent"]
    if cand is None:
        return None
    champ = -math.inf if champ is None else champ
    return {"naive": naive_rule(cand, champ),
            "mlflow_threshold": mlflow_rule(cand, champ, min_delta=min_delta, floor=floor)}


# ---------------------------------------------------------------- the pipeline, as a person runs it


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Shell:
    """Runs this venv's `ratchet` in subprocesses and keeps every command's output."""

    def __init__(self, root: Path):
        self.ratchet = str(Path(sys.executable).with_name("ratchet"))
        # A wide console: rich wraps the output it prints at 80 columns when not on a terminal.
        self.env = {**os.environ, **TELEMETRY_OFF, "PREFECT_HOME": str(root / "prefect"),
                    "COLUMNS": "200"}
        self.log = root / "commands.log"

    def __call__(self, *args: str, check: bool = True) -> tuple[str, float, int]:
        """(output, seconds, exit code); a non-zero exit raises when `check`."""
        t0 = time.perf_counter()
        proc = subprocess.run([self.ratchet, *args], env=self.env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - t0
        out = proc.stdout + proc.stderr
        with self.log.open("a") as fh:
            fh.write(f"$ ratchet {' '.join(args)}  # exit {proc.returncode}, {seconds:.1f}s\n")
            fh.write(out + "\n")
        if check and proc.returncode != 0:
            raise RuntimeError(f"`ratchet {' '.join(args)}` exited {proc.returncode}:\n"
                               f"{out[-3000:]}")
        return out, seconds, proc.returncode


def edit_params(ws: Path, edits: dict[str, dict[str, Any]]) -> None:
    """What a person does in an editor: change a few keys of the workspace's params.yaml."""
    import yaml

    path = ws / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, values in edits.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def play(batch: Batch, file: Path, ws: Path, sh: Shell, gate_params,
         versions_before: int | None) -> dict[str, Any]:
    """Ingest and run one batch; the row of the result.

    A refused ingest or a failed run is a decision too ("refused at ingest", "run failed",
    never right), with the end of its output: the stream goes on with the next batch.
    """
    row: dict[str, Any] = {
        "batch": batch.number, "name": batch.name, "file": file.name, "rows": len(batch.frame),
        "domains": list(batch.domains), "flipped": int(batch.flipped.sum()),
        "expected": batch.expected,
    }
    batches_before = {p.name for p in (ws / "data/batches").glob("*.parquet")}
    ingest_out, ingest_s, ingest_rc = sh("ingest", str(file), "-w", str(ws), check=False)
    new_files = {p.name for p in (ws / "data/batches").glob("*.parquet")} - batches_before
    batch_id = batch_id_of(ingest_out) or (Path(next(iter(new_files))).stem
                                           if len(new_files) == 1 else None)
    row.update(batch_id=batch_id, ingest_noop=not new_files, ingest_s=round(ingest_s, 1))
    gate: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    run_out, run_s, run_rc = "", 0.0, None
    if ingest_rc != 0:
        decision, versions_after = "refused at ingest", versions_before
        row["error"] = _tail(ingest_out)
    else:
        run_out, run_s, run_rc = sh("run", "-w", str(ws), check=False)
        versions_after = version_count(sh("status", "-w", str(ws))[0])
        if run_rc != 0:
            decision = "run failed"
            row["error"] = _tail(run_out)
        else:
            gate = _json(ws / "reports/gate.json") or {}
            # the full record (a workspace made before the headline files kept it here)
            metrics = (_json(ws / "reports/eval/metrics.json")
                       or _json(ws / "metrics/eval.json") or {})
            decision = decision_of(gate, versions_before, versions_after)
    stages = stage_timings(run_out)
    ran = gate_ran(stages, run_rc)
    rate, flagged = noise_of(_json(ws / "reports/validation/noise.json"), batch_id)
    rules = baseline_rules(metrics, min_delta=gate_params.min_delta, floor=gate_params.min_score)
    row.update({
        "decision": decision,
        "right": is_right(batch.expected, decision),
        "noise_rate": rate,
        "noise_flagged": flagged,
        "gate_ran": ran,
        "gate_decision": gate.get("decision") if ran else None,
        "version": gate.get("version"),
        "champion": [gate.get("champion_before"), gate.get("champion_after")],
        "versions": [versions_before, versions_after],
        "failed_checks": failed_checks(gate) if ran else [],
        "macro_f1": f1_scores(metrics),
        "baselines": None if rules is None else {
            name: {"promote": p, "right": rule_is_right(batch.expected, p)}
            for name, p in rules.items()},
        "run_s": round(run_s, 1),
        "run_exit": run_rc,
        "stage_seconds": stages,
    })
    print(f"stream batch {batch.number} ({batch.name}, {len(batch.frame)} rows): expected "
          f"{batch.expected}, got {decision} (gate {gate.get('decision')}), noise {rate}, "
          f"run {run_s:.0f}s; failed: {[c['name'] for c in row['failed_checks']]}", flush=True)
    return row


def run(*, rows_per_intent: int | None = None, model: str | None = None,
        batches: int | None = None) -> dict[str, Any]:
    """The benchmark; `batches` stops after that many (to time the first batch alone)."""
    if not DATA.is_dir():
        return {"skipped": f"CLINC150 not found at {DATA}"}
    from ratchet.config import Params

    n = rows_per_intent or int(os.environ.get("RATCHET_STREAM_ROWS", ROWS_PER_INTENT))
    model = model or os.environ.get("RATCHET_STREAM_MODEL", MODEL)
    start = time.perf_counter()
    clinc = load_rows()
    stream = make_batches(clinc, n)[: batches or None]
    root = Path(tempfile.mkdtemp(prefix="ratchet-bench-stream-"))
    files = root / "files"
    files.mkdir()
    for b in stream:
        if b.same_file_as is None:
            b.frame.to_csv(files / b.filename, index=False)
    sh = Shell(root)
    ws = root / "ws"
    t0 = time.perf_counter()
    sh("init", str(ws), "--model", model)
    edit_params(ws, PARAMS_EDITS)
    init_s = time.perf_counter() - t0
    gate_params = Params().gate  # the defaults: the workspace's gate section is not edited
    rows: list[dict[str, Any]] = []
    versions = version_count(sh("status", "-w", str(ws))[0])  # 0: a fresh registry
    for b in stream:
        file = stream[b.same_file_as - 1].filename if b.same_file_as else b.filename
        rows.append(play(b, files / file, ws, sh, gate_params, versions))
        versions = rows[-1]["versions"][1]
    rules = {}
    for name in ("naive", "mlflow_threshold"):
        per = [(r["batch"], (r["baselines"] or {}).get(name)) for r in rows]
        rules[name] = {
            "decisions": [{"batch": b, "promote": None if d is None else d["promote"],
                           "right": None if d is None else d["right"]} for b, d in per],
            "right_share": right_share([None if d is None else d["right"] for _, d in per]),
        }
    result: dict[str, Any] = {
        "decisions": rows,
        "right_share": right_share([r["right"] for r in rows]),
        "baselines": rules,
        "timings": {
            "init_s": round(init_s, 1),
            "per_batch_s": {r["batch"]: round(r["ingest_s"] + r["run_s"], 1) for r in rows},
            "stage_seconds": {r["batch"]: r["stage_seconds"] for r in rows},
            "total_s": round(time.perf_counter() - start, 1),
        },
        "setup": {
            "model": model,
            "rows_per_intent": n,
            "seed": SEED,
            "noise_share": NOISE_SHARE,
            "domains": plan_domains(clinc["domain"].unique().tolist()),
            "params_edits": PARAMS_EDITS,
            "engine": "prefect (ratchet run default)",
            "batch_rows": {b.number: len(b.frame) for b in stream},
            "cpu_count": os.cpu_count(),
        },
        "workspace": str(ws),
        "commands_log": str(sh.log),
    }
    print(f"stream: right_share {result['right_share']} (naive "
          f"{rules['naive']['right_share']}, mlflow {rules['mlflow_threshold']['right_share']}), "
          f"{result['timings']['total_s']:.0f}s", flush=True)
    return result
