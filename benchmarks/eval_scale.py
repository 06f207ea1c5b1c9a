"""Evaluate's scoring at scale: wall time and peak RSS of `ratchet.evaluation.score` on N rows.

`python -m benchmarks.eval_scale --rows N [--rows M ...] [--out f.json]` prints one JSON object
per N, `{"rows": N, "seconds": s, "peak_rss_mb": m, ...}`, and writes the same objects to `--out`
(one per line: a single N gives a file holding one JSON object). Default N: 10,000, 100,000
and 1,000,000.

Each N runs in a fresh Python process, so `peak_rss_mb` (`ru_maxrss`) is that N's alone: the
process builds a synthetic predictions frame of N test rows shaped as `predict_frame` returns
it, then times `score(frame, params)` with the default params (2,000 bootstrap resamples): the
same call the evaluate stage and the gate's re-evaluation make, every slice, both metrics, the
paired permutation on recent, harm p-values per domain and the floor's comparisons.

The frame: 151 labels (150 intents in 10 domains of 15, and `oos` in its own domain, as in
CLINC150), uniform; a candidate right 90% of the time, the champion 88%, three floor models
(`served:<v>`) 85-87%, their errors correlated through a shared row difficulty and mostly to a
label of the same domain; the last 5% of rows are the `recent` slice; per-model confidences.
Weights (`--weights`): `sampled` (default) as the drift stage writes them, a weight on
`drift.weight_rows` test rows drawn at random and 0 elsewhere; `dense`, a weight on every row
(what the drift stage wrote before it sampled; the bootstrap's worst case).

`--old COMMIT` adds an arm running the same child on COMMIT's code (its tree from `git archive`
in a temporary folder, removed after), interleaved with the new arm at each N. `--limit-gb G`
caps every child's address space (RLIMIT_AS, default 8): a child that needs more fails with
MemoryError and its entry says `"failed": "above G GB"` instead of the machine swapping.
`--arm old|new|both` picks arms (default new, or both with `--old`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DEFAULT_ROWS = (10_000, 100_000, 1_000_000)
SEED = 0
INTENTS, PER_DOMAIN = 150, 15
ACCURACY = {"candidate": 0.90, "champion": 0.88, "served:1": 0.87, "served:2": 0.86,
            "served:3": 0.85}
RECENT_SHARE = 0.05


def synthetic_frame(rows: int, *, weights: str = "sampled", weight_rows: int = 5000,
                    seed: int = SEED):
    """A predictions frame of `rows` test rows, as `ratchet.evaluation.predict_frame` returns."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    names = [f"intent_{i:03d}" for i in range(INTENTS)] + ["oos"]
    domain_of = [f"domain_{i // PER_DOMAIN}" for i in range(INTENTS)] + ["oos"]
    n_labels = len(names)
    truth = rng.integers(0, n_labels, rows)
    difficulty = rng.random(rows)
    frame = pd.DataFrame({
        "text": [f"synthetic test utterance number {i}" for i in range(rows)],
        "label": pd.Series(np.asarray(names, dtype=object)[truth]),
        "domain": pd.Series(np.asarray(domain_of, dtype=object)[truth]),
        "slice": np.where(np.arange(rows) >= rows * (1 - RECENT_SHARE), "recent", "reference"),
    })
    for model, acc in ACCURACY.items():
        right = difficulty + 0.1 * rng.standard_normal(rows) < acc
        # Most errors go to a neighbouring intent of the same domain, some anywhere.
        step = rng.integers(1, 4, rows)
        near = truth - truth % PER_DOMAIN + (truth % PER_DOMAIN + step) % PER_DOMAIN
        near = np.where(truth == INTENTS, rng.integers(0, INTENTS, rows), near)
        wrong = np.where(rng.random(rows) < 0.7, near, rng.integers(0, n_labels, rows))
        wrong = np.where(wrong == truth, (truth + 1) % n_labels, wrong)
        pred = np.where(right, truth, wrong)
        frame[model] = pd.Series(np.asarray(names, dtype=object)[pred])
        if not model.startswith("served:"):
            frame[f"{model}_score"] = np.clip(rng.beta(8, 2, rows) + 0.1 * right, 0, 1)
    w = np.exp(0.7 * rng.standard_normal(rows)).clip(0.1, 10.0)
    if weights == "sampled" and rows > weight_rows:
        keep = np.zeros(rows, dtype=bool)
        keep[rng.choice(rows, weight_rows, replace=False)] = True
        w = np.where(keep, w, 0.0)
    elif weights not in {"sampled", "dense"}:
        raise ValueError(f"unknown weights {weights!r} (sampled or dense)")
    frame["weight"] = w * (w > 0).sum() / w.sum()
    return frame


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(rows: int, weights: str, dump: Path | None = None) -> dict[str, Any]:
    """One N in this process: build the frame, time `score`, report the peak RSS (and write
    every metric to `dump`, to compare arms)."""
    import ratchet
    from ratchet.config import parse_params
    from ratchet.evaluation import score

    params = parse_params({})
    weight_rows = getattr(params.drift, "weight_rows", 5000)
    start = time.perf_counter()
    frame = synthetic_frame(rows, weights=weights, weight_rows=weight_rows)
    built = time.perf_counter() - start
    rss_frame = peak_rss_mb()
    start = time.perf_counter()
    out = score(frame, params)
    seconds = time.perf_counter() - start
    if dump is not None:
        dump.write_text(json.dumps(out, sort_keys=True, default=float))
    keys = ("diff/weighted/macro_f1", "diff/weighted/macro_f1_low", "test/weighted/p_value",
            "diff/reference/macro_f1_low", "test/reference/p_value", "test/recent/p_value")
    return {"rows": rows, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "frame_rss_mb": round(rss_frame, 1), "build_seconds": round(built, 2),
            "weights": weights, "weighted_rows": int((frame["weight"] > 0).sum()),
            "resamples": params.evaluate.bootstrap_resamples, "metrics": len(out),
            "code": str(Path(ratchet.__file__).parents[1]),
            "sample": {k: out.get(k) for k in keys}}


@contextmanager
def checkout(commit: str):
    """`commit`'s tree (`git archive`) in a temporary folder, removed afterwards."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="eval-scale-old-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_child(code: Path, rows: int, weights: str, limit_gb: float,
              dump: Path | None = None) -> dict[str, Any]:
    """The child on `code`'s ratchet, in a fresh process under an address-space cap."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    limit = int(limit_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    extra = ["--dump", str(dump)] if dump is not None else []
    proc = subprocess.run([sys.executable, str(HERE), "--child", "--rows", str(rows),
                           "--weights", weights, *extra], env=env, cwd=code, preexec_fn=cap,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    memory = "MemoryError" in proc.stderr or "Unable to allocate" in proc.stderr
    return {"rows": rows, "seconds": None, "peak_rss_mb": None, "weights": weights,
            "failed": f"above {limit_gb:g} GB" if memory else tail[0],
            "error": tail[0][:300], "wall_until_failure_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="test rows (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the JSON objects here")
    parser.add_argument("--weights", choices=("sampled", "dense"), default="sampled")
    parser.add_argument("--old", metavar="COMMIT", help="also run COMMIT's code (e.g. 48e5dc0)")
    parser.add_argument("--arm", choices=("new", "old", "both"))
    parser.add_argument("--limit-gb", type=float, default=8.0,
                        help="address-space cap of each child (GB)")
    parser.add_argument("--dump", type=Path, metavar="DIR",
                        help="write each child's metrics to DIR/<arm>-<rows>.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rows = args.rows or list(DEFAULT_ROWS)
    if args.child:
        print(json.dumps(child(rows[0], args.weights, args.dump)), flush=True)
        return 0
    if any(n < 1 for n in rows):
        print("error: --rows must be positive", file=sys.stderr)
        return 2
    arm = args.arm or ("both" if args.old else "new")
    if arm != "new" and not args.old:
        print("error: --arm old/both needs --old COMMIT", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    with contextmanager(lambda: (yield None))() if arm == "new" else checkout(args.old) as old:
        for n in rows:
            arms = [("new", ROOT)] * (arm != "old") + [("old", old)] * (arm != "new")
            for name, code in arms:
                dump = None
                if args.dump is not None:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    dump = (args.dump / f"{name}-{n}.json").resolve()
                entry = run_child(code, n, args.weights, args.limit_gb, dump)
                entry["load_avg"] = round(os.getloadavg()[0], 2)
                if arm != "new":
                    entry = {"arm": name, **entry, "commit": args.old if name == "old" else "HEAD"}
                results.append(entry)
                print(json.dumps(entry), flush=True)
    if args.out:
        from ratchet.runtime import write_text_atomic

        write_text_atomic(args.out, "".join(json.dumps(e) + "\n" for e in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
