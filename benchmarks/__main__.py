"""Run the benchmarks named on the command line (default: all) and write benchmarks/results/*.json.

Each benchmark is a module in this package with a `run() -> dict` function, registered in
BENCHMARKS below.
BENCHMARKS: continual, drift, faults, gate, noise, orchestration, robustness, stream and
training.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BENCHMARKS: dict[str, str] = {  # name -> module
    "continual": "benchmarks.continual",
    "drift": "benchmarks.drift",
    "faults": "benchmarks.faults",
    "gate": "benchmarks.gate",
    "incremental": "benchmarks.incremental",
    "noise": "benchmarks.noise",
    "orchestration": "benchmarks.orchestration",
    "pretrain": "benchmarks.pretrain",
    "robustness": "benchmarks.robustness",
    "stream": "benchmarks.stream",
    "training": "benchmarks.training",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (known: {sorted(BENCHMARKS)})")
    parser.add_argument("--keep", action="append", default=[], metavar="SECTION",
                        help="keep this section from the benchmark's existing results file "
                             "instead of re-running it (gate: type1, scenarios_ratchet); the "
                             "file records what was kept")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    names = args.names or sorted(BENCHMARKS)
    if args.keep and names != ["gate"]:
        parser.error("--keep applies to one benchmark: name it (e.g. `gate --keep type1`)")
    if not names:
        print("no benchmarks registered yet")
        return 0
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        run = importlib.import_module(BENCHMARKS[name]).run
        result = run(keep=frozenset(args.keep)) if args.keep else run()
        if "skipped" in result:  # e.g. its data is absent: keep any earlier results
            print(f"{name}: skipped ({result['skipped']})")
            continue
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: wrote {RESULTS / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
