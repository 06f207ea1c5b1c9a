"""Fault benchmark: the fault suite's seeded random points (tests/faults/harness.py), many of
them, on one tiny real workspace; how many faults left every invariant holding, by kind, and
how fast a SIGINT'd run exits with all its children.

    python -m benchmarks faults                      # 102 faults planned, seed 13
    python -m benchmarks.faults --faults 10 --seed 1 # a short run

Writes benchmarks/results/faults.json: {"faults", "invariants_held", "by_kind": {kind:
{"tries", "held"}}, "interrupt_exit_s_p95", ...}; progress lines go to stderr. About 30-60 s a
fault on 2 cores (most land early in a run or on runs where only finetune onward re-runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# A signal that finds its run already ended is `missed` (counted apart, not as a fault): 102
# planned leave at least the 100 the issue asks for (one of 100 missed with seed 13).
FAULTS = 102
SEED = 13


def run(faults: int = FAULTS, seed: int = SEED, keep: frozenset[str] = frozenset()) -> dict:
    import tests.conftest  # noqa: F401 - the suite's environment (tool state in temp folders)
    from tests.faults import harness

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ratchet-faults-") as tmp:
        outcomes, final = harness.play(Path(tmp) / "ws", Path(tmp) / "logs", faults, seed)
    result = harness.summary(outcomes)
    result.update(
        seed=seed,
        final_problems=final,
        broken=[{"kind": o.kind, "engine": o.fault.engine, "problems": o.problems}
                for o in outcomes if not o.held],
        notes=sorted({n for o in outcomes for n in o.notes}),
        wall_s=round(time.perf_counter() - start, 1),
        command=f"python -m benchmarks.faults --faults {faults} --seed {seed}",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=FAULTS, help="how many faults to inflict")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the fault points")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                        "faults.json")
    args = parser.parse_args(argv)
    result = run(args.faults, args.seed)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"faults: {result['invariants_held']}/{result['faults']} held, interrupt exit p95 "
          f"{result['interrupt_exit_s_p95']} s; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
