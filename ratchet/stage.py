"""The thin `main()` every stage module shares: parse paths, load params, run, report errors.

A stage runs under DVC, in the workspace. Whatever stops it is one line on stderr,
`ratchet <stage>: ...`: the project's own errors as they are, anything unexpected as `<type>:
<message> (details: <log>)` with the traceback in that log under `.ratchet/logs/` (printed too
with RATCHET_DEBUG=1, which `ratchet --debug` sets). The same line goes to
`.ratchet/logs/stage-failed.json`, from which `ratchet run` names the stage that failed and why.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ratchet.config import Params, load_params
from ratchet.errors import RatchetError
from ratchet.runtime import LOGS, debug, disk_full, log_file, one_line, read_json, setup, write_json

FAILED = LOGS / "stage-failed.json"
# Each stage's last successful run: when it started and ended, its wall and CPU seconds. The
# gate reads them to give the retrain's MLflow run its span and the stages' costs.
TIMINGS = LOGS / "stages"
started_at: float | None = None  # time.time() when the stage running in this process began


def stage_main(name: str, doc: str, paths: dict[str, str], fn: Callable[..., object],
               optional: tuple[str, ...] = ()) -> None:
    """Run `fn(params, **paths)` as `python -m tasks.<name> --<path> ...`.

    Args:
        paths: argument name -> help text; each becomes a required `--name PATH` option.
        optional: the names among `paths` that may be left out (`fn` has a default for them):
            outputs and inputs added in later versions, so that the `dvc.yaml` of a workspace
            made before them still runs.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=doc)
    for arg, help_text in paths.items():
        parser.add_argument(f"--{arg.replace('_', '-')}", dest=arg, type=Path,
                            required=arg not in optional,
                            help=help_text + (" (optional)" if arg in optional else ""))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    ns = {k: v for k, v in vars(parser.parse_args()).items() if v is not None}
    setup()
    os.environ[STAGE_ENV] = name  # Classifier.predict_proba shows a bar on long work
    global started_at
    started_at = time.time()
    start = time.perf_counter()
    beat = _heartbeat(name, start)
    try:
        params: Params = load_params(ns.pop("params"))
        result = fn(params, **ns)
        beat.set()
        print(f"{name}: {outcome(result)} in {time.perf_counter() - start:.1f}s", flush=True)
        record_timing(name, started_at, time.perf_counter() - start)
    except KeyboardInterrupt:
        beat.set()
        fail(name, "interrupted")
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (and a log)
        beat.set()
        sys.exit(report(name, err))
    finally:
        started_at = None  # only while the stage runs (a process may run more than one)


STAGE_ENV = "RATCHET_STAGE"  # set in a stage's process: its name
HEARTBEAT_S = 15.0


def _heartbeat(name: str, start: float):
    """A line every HEARTBEAT_S while the stage works without a progress bar on screen, so a
    long quiet step (a permutation test, a registry upload) does not look like a hang."""
    import threading

    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                from tqdm import tqdm

                if getattr(tqdm, "_instances", None):
                    continue  # a bar is showing progress already
            except ImportError:
                pass
            print(f"{name}: working ({time.perf_counter() - start:.0f}s)", flush=True)

    threading.Thread(target=beat, daemon=True).start()
    return done


def record_timing(name: str, started: float, seconds: float, ws: Path | None = None) -> None:
    """Leave this stage's span and cost for the gate (`stage_timings`); best effort."""
    import resource

    ws = Path.cwd() if ws is None else ws
    if not (ws / "params.yaml").is_file():
        return
    cpu = sum(getattr(resource.getrusage(who), f) for who in
              (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    with contextlib.suppress(OSError):
        write_json(ws / TIMINGS / f"{name}.json", {
            "stage": name, "start": started, "end": started + seconds, "seconds": seconds,
            "cpu_seconds": cpu})


def stage_timings(ws: Path) -> dict[str, dict[str, float]]:
    """Each stage's last recorded run, by stage; unreadable records are left out."""
    out = {}
    for path in sorted((ws / TIMINGS).glob("*.json")):
        try:
            rec = read_json(path)
        except (OSError, ValueError):
            continue
        out[str(rec.get("stage", path.stem))] = rec
    return out


def outcome(result: object) -> str:
    """The stage's one closing line: its decision or summary where its result has one."""
    if isinstance(result, dict):
        for key in ("decision", "summary"):
            if isinstance(result.get(key), str) and result[key]:
                return f"{result[key][:160]}; done"
        if "passed" in result:
            return "passed; done" if result["passed"] else "failed checks; done"
    return "done"


def report(name: str, err: Exception, ws: Path | None = None) -> int:
    """Print the one line for a stage's failure (the traceback goes to a log unless it is one of
    the project's errors); returns the exit code."""
    ws = Path.cwd() if ws is None else ws
    if not isinstance(err, RatchetError):
        full = disk_full(err, Path(getattr(err, "filename", None) or ws))
        if full is not None:
            full.__cause__ = err
            err = full
    if debug():
        traceback.print_exception(err)
    log = None
    if isinstance(err, RatchetError):
        message = str(err)
    else:
        log = log_file(ws, f"stage-{name}")
        log.write_text(f"ratchet stage `{name}` failed (pid {os.getpid()}, {time.ctime()}):\n"
                       + "".join(traceback.format_exception(err)), encoding="utf-8")
        message = f"{one_line(err)} (details: {log})"
    print(f"ratchet {name}: {message}", file=sys.stderr)
    fail(name, message, log, ws)
    return 1


def fail(name: str, message: str, log: Path | None = None, ws: Path | None = None) -> None:
    """Leave the failure for the process that ran the stage (`last_failure`); best effort."""
    ws = Path.cwd() if ws is None else ws
    if not (ws / "params.yaml").is_file():
        return
    with contextlib.suppress(Exception):  # best effort: the line on stderr is what matters
        write_json(ws / FAILED, {"stage": name, "message": message,
                                 "log": str(log) if log else None, "time": time.time(),
                                 "pid": os.getpid()})


def last_failure(ws: Path, since: float) -> dict[str, Any] | None:
    """The stage failure recorded in `ws` at or after `since` (time.time()), if any."""
    try:
        record = read_json(ws / FAILED)
    except (OSError, ValueError):
        return None
    return record if record.get("time", 0) >= since else None
