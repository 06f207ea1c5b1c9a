"""The fault suite's harness: real tiny workspaces, `ratchet` in a session of its own, and
seeded faults (SIGKILL or SIGINT to the whole process group at a random point of a stage).

One code path for the suite (tests/faults/test_faults.py) and the benchmark
(benchmarks/faults.py): `plan` draws the faults from a seed, `Chain` plays them on one
workspace, run after run, and checks `invariants.check` after each fault, at the point where
the fault's consequences are final: once the next run has done its start-up recovery (the
harness pauses that run's process group, with SIGSTOP, as soon as its first stage starts, and
checks then), or at the end once a last run has completed (`invariants.next_run_ok`).

Stages are seen from outside, as the next run would see them: the `python -m tasks.<stage>`
child of the run's session (/proc/<pid>/cmdline). "record" is the step after the gate (the
commit, `dvc push`, the lineage stamp): from the gate child's exit to the run's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.faults import invariants
from tests.faults.invariants import ratchet_cmd, tool_env
from tests.faults.procs import default_signals

STAGES = ["validate", "noise", "prepare", "drift", "pretrain", "augment", "finetune",
          "evaluate", "gate", "record"]
# Measured wall seconds of each stage of a tiny run on this project's 2-core machines (mostly
# interpreter start-up and imports); a fault lands at a seeded fraction of it.
TYPICAL_S = {"validate": 6.0, "noise": 1.5, "prepare": 1.2, "drift": 3.5, "pretrain": 12.0,
             "augment": 1.2, "finetune": 16.0, "evaluate": 13.0, "gate": 16.0, "record": 2.5}
# A change between runs that makes a stage run again: a new batch re-runs every stage, a new
# finetune learning rate re-runs finetune and what follows.
DATA_STAGES = STAGES[: STAGES.index("finetune")]
RUN_TIMEOUT_S = 900.0
INTERRUPT_GRACE_S = 180.0  # a SIGINT'd run still alive after this is SIGKILLed (and reported)
INTERRUPT_BOUND_S = 20.0  # the issue asks for 10 s; reported beyond twice that


def tiny_overrides() -> dict[str, dict[str, Any]]:
    """The params of a tiny real workspace (tests/conftest.py TINY, with the slow parts off)."""
    from ratchet.demo_data import all_labels
    from tests.conftest import TINY

    o: dict[str, dict[str, Any]] = {s: dict(v) for s, v in TINY.items()}
    o.update(model={"source": "tiny"}, data={"labels": all_labels()},
             pretrain={"enabled": False}, augment={"enabled": False},
             noise={"cold_start": "skip"}, drift={"permutations": 400, "max_rows": 200},
             evaluate={"bootstrap_resamples": 200, "latency_examples": 8, "behaviour_rows": 20},
             gate={**TINY["gate"], "min_score": 0.0, "min_invariance": 0.0})
    return o


def make_workspace(ws: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """A tiny real workspace (git, DVC, an SQLite MLflow store), no batch yet."""
    from ratchet import workspace

    o = tiny_overrides()
    for section, values in (overrides or {}).items():
        o.setdefault(section, {}).update(values)
    return workspace.init(ws, o)


def batch_file(ws: Path, k: int, rows: int = 60) -> Path:
    """The k-th incoming file (k = 0, 1, ...): the demo's first batch, then fresh rows of the
    demo's intents in its four domains, with texts that no earlier file has."""
    from ratchet.demo_data import OLD_DOMAINS, demo_batches, make_rows, write_batch

    incoming = ws / "data" / "incoming"
    if k == 0:
        return write_batch(demo_batches(seed=0, scale=0.3)[0], incoming)
    seen: set[str] = set(demo_batches(seed=0, scale=0.3)[0].frame["text"])
    for j in range(1, k + 1):  # make_rows adds each file's texts to `seen`: none repeats
        df = make_rows(random.Random(f"fault-batch-{j}"), OLD_DOMAINS, rows, seen)
    incoming.mkdir(parents=True, exist_ok=True)
    path = incoming / f"fault-{k:03d}.csv"
    df.to_csv(path, index=False)
    return path


# --- processes --------------------------------------------------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # Zombies of the group (reaped later by the test process) do not count as alive.
    return any(_state(pid) not in ("Z", None) for pid in group_pids(pgid))


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # after the state and ppid: the process group
            pids.append(int(entry))
    return pids


def running_stage(pgid: int) -> str | None:
    """The stage whose `python -m tasks.<stage>` child runs in the group now, if any."""
    for pid in group_pids(pgid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [c.decode(errors="replace") for c in cmd]
        for i, a in enumerate(args[:-1]):
            if a == "-m" and args[i + 1].startswith("tasks.") and _state(pid) != "Z":
                return args[i + 1].removeprefix("tasks.")
    return None


@dataclass
class Proc:
    """A `ratchet` command started in its own session (its pid is its process group's id)."""

    popen: subprocess.Popen
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def done(self) -> bool:
        return self.popen.poll() is not None and not group_alive(self.pgid)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.done():
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        if group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self.wait(30)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.is_file() else ""

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.is_file() else ""


def start(args: list[str], ws: Path, logs: Path, tag: str,
          env: dict[str, str] | None = None) -> Proc:
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    with out.open("wb") as o, err.open("wb") as e:
        popen = subprocess.Popen(ratchet_cmd(*args), cwd=ws, env=tool_env(env),
                                 stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                 start_new_session=True, preexec_fn=default_signals)
    return Proc(popen, out, err)



def one_error_line(stderr: str) -> list[str]:
    """What is wrong with a failed command's stderr: it must hold an `error:` line and no
    traceback ([] when it does)."""
    problems = []
    if "Traceback (most recent call last)" in stderr:
        first = next((ln for ln in stderr.splitlines() if "Error" in ln), "")
        problems.append(f"[message] a traceback in stderr ({first.strip()[:160]})")
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    if not errors:
        tail = " | ".join(stderr.strip().splitlines()[-3:])[-300:]
        problems.append(f"[message] no `error:` line in stderr (ends: {tail})")
    elif len(errors) > 1:
        problems.append(f"[message] {len(errors)} `error:` lines, not one")
    return problems


# --- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    sig: str  # "SIGKILL" or "SIGINT"
    stage: str  # one of STAGES
    frac: float  # where in the stage: a fraction of its typical duration
    engine: str = "dvc"

    @property
    def kind(self) -> str:
        return f"{self.sig.lower()}:{self.stage}"


def plan(n: int, seed: int, *, prefect_every: int = 6) -> list[list[Fault]]:
    """`n` faults drawn from `seed`, grouped into chains: each chain follows one change (a new
    batch when it holds a fault in a data stage, else a new finetune learning rate) and its
    faults go in stage order, so each kill finds the stages before it cached by DVC.

    Every stage gets a fault of each signal before any gets a second one; every
    `prefect_every`-th fault runs on the Prefect engine (an ephemeral API in the run)."""
    rng = random.Random(seed)
    pairs = [(s, st) for st in STAGES for s in ("SIGKILL", "SIGINT")]
    draws: list[tuple[str, str]] = []
    while len(draws) < n:
        batch = pairs[:]
        rng.shuffle(batch)
        draws += batch
    faults = [Fault(sig, st, round(rng.uniform(0.1, 0.9), 3),
                    "prefect" if prefect_every and i % prefect_every == prefect_every - 1
                    else "dvc") for i, (sig, st) in enumerate(draws[:n])]
    chains: list[list[Fault]] = []
    for i in range(0, n, 4):  # up to four faults a chain: one partial pass through the stages
        chains.append(sorted(faults[i:i + 4], key=lambda f: STAGES.index(f.stage)))
    return chains


@dataclass
class Outcome:
    fault: Fault
    landed: str  # the stage the signal actually found running (or "between", "exited")
    problems: list[str]
    interrupt_exit_s: float | None = None
    rc: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return not self.problems

    @property
    def kind(self) -> str:
        return f"{self.fault.sig.lower()}:{self.landed}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "planned": self.fault.kind, "engine": self.fault.engine,
                "frac": self.fault.frac,
                "landed": self.landed, "held": self.held, "problems": self.problems,
                "interrupt_exit_s": self.interrupt_exit_s, "rc": self.rc,
                "notes": self.notes}


class Chain:
    """Faults played one after another on one workspace; see the module docstring."""

    def __init__(self, ws: Path, logs: Path, *, log=None):
        self.ws = ws
        self.logs = logs
        self.accepted: set[str] = set()
        self.refused: set[str] = set()
        self.batches = 0
        self.lr_step = 0
        self.runs = 0
        self.outcomes: list[Outcome] = []
        self._pending: Outcome | None = None  # the last fault, checked after the next recovery
        self.known: set[str] = set()  # broken invariants already charged to an earlier fault
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # -- changes between runs
    def ingest_next(self) -> None:
        path = batch_file(self.ws, self.batches)
        self.batches += 1
        proc = subprocess.run(ratchet_cmd("ingest", str(path), "-w", str(self.ws)),
                              cwd=self.ws, env=tool_env(), capture_output=True, text=True,
                              timeout=300, check=False)
        self._note_ingest(proc.returncode, proc.stdout)

    def _note_ingest(self, rc: int, stdout: str) -> None:
        import re

        m = re.search(r"batch (\d{4}-[0-9a-f]{12})", stdout)
        if m and rc == 0:
            self.accepted.add(m.group(1))
        elif m:
            self.refused.add(m.group(1))

    def bump_learning_rate(self) -> None:
        path = self.ws / "params.yaml"
        raw = yaml.safe_load(path.read_text())
        self.lr_step += 1
        raw["finetune"]["learning_rate"] = round(0.005 * (1 + 0.01 * self.lr_step), 8)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))

    def check(self) -> list[str]:
        """The broken invariants not already charged to an earlier fault (a commit naming a
        deleted version stays broken; it is the fault that broke it that did not hold)."""
        found = invariants.check(self.ws, accepted=self.accepted, refused=self.refused)
        new = [p for p in found if p not in self.known]
        self.known.update(found)
        return new

    # -- runs
    def start_run(self, engine: str) -> Proc:
        self.runs += 1
        return start(["run", "--engine", engine, "-w", str(self.ws)], self.ws, self.logs,
                     f"run-{self.runs:03d}")

    def _after_recovery(self, proc: Proc) -> None:
        """Check the pending fault now that `proc` (the next run) has recovered: paused at its
        first stage, or ended."""
        if self._pending is None:
            return
        while not proc.done() and running_stage(proc.pgid) is None:
            time.sleep(0.05)
        paused = not proc.done()
        if paused:
            os.killpg(proc.pgid, signal.SIGSTOP)
        try:
            self._pending.problems += self.check()
        finally:
            if paused:
                os.killpg(proc.pgid, signal.SIGCONT)
        self._settle(self._pending)

    def _settle(self, outcome: Outcome) -> None:
        self._pending = None
        self.outcomes.append(outcome)
        mark = "held" if outcome.held else "BROKEN: " + "; ".join(outcome.problems)[:600]
        extra = (f", exit {outcome.interrupt_exit_s:.1f} s"
                 if outcome.interrupt_exit_s is not None else "")
        notes = f" (note: {'; '.join(outcome.notes)})" if outcome.notes else ""
        self.log(f"fault {len(self.outcomes)}: {outcome.fault.kind} ({outcome.fault.engine}) "
                 f"landed in {outcome.landed}{extra}: {mark}{notes}")

    def inflict(self, fault: Fault) -> Outcome:
        """Start a run, wait for the fault's point, signal the group; the outcome is checked
        after the next run's recovery (or `finish`)."""
        proc = self.start_run(fault.engine)
        self._after_recovery(proc)
        landed = self._wait_for(proc, fault)
        outcome = Outcome(fault, landed, [])
        if landed == "exited":
            outcome.rc = proc.popen.returncode
            if proc.popen.returncode != 0:
                outcome.problems += [f"[run] the run failed before the fault (exit "
                                     f"{proc.popen.returncode}): "
                                     + " | ".join(proc.stderr().strip().splitlines()[-3:])[-400:]]
            self._settle(outcome)
            return outcome
        sig = getattr(signal, fault.sig)
        sent = time.monotonic()
        os.killpg(proc.pgid, sig)
        if fault.sig == "SIGINT":
            exited = proc.wait(INTERRUPT_GRACE_S)
            outcome.interrupt_exit_s = round(time.monotonic() - sent, 2)
            if not exited:
                outcome.problems.append(f"[interrupt] the run was still running (or a child of "
                                        f"it) {INTERRUPT_GRACE_S:.0f} s after SIGINT")
                proc.kill()
            elif outcome.interrupt_exit_s > INTERRUPT_BOUND_S:
                outcome.problems.append(f"[interrupt] the run took {outcome.interrupt_exit_s:.0f}"
                                        f" s to exit after SIGINT (the issue's bound: 10 s)")
            if "Traceback (most recent call last)" in proc.stderr():
                # Noted, not counted: Ctrl-C reaches the stage child too, which may print a
                # KeyboardInterrupt traceback; the invariants are about the record.
                outcome.notes.append("a traceback in stderr after SIGINT")
        else:
            proc.kill()
        outcome.rc = proc.popen.returncode
        self._pending = outcome
        return outcome

    def _wait_for(self, proc: Proc, fault: Fault) -> str:
        """Wait until the fault's stage runs (or a later one: the target was cached), then a
        seeded delay into it; returns the stage running when the signal goes."""
        target = STAGES.index(fault.stage)
        gate_seen = False
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.done():
                return "exited"
            now = running_stage(proc.pgid)
            gate_seen = gate_seen or now == "gate"
            if fault.stage == "record":
                if gate_seen and now is None:
                    break
            elif now is not None and STAGES.index(now) >= target:
                break
            time.sleep(0.05)
        else:
            proc.kill()
            return "timeout"
        time.sleep(fault.frac * TYPICAL_S[fault.stage])
        if proc.popen.poll() is not None:
            return "exited"
        now = running_stage(proc.pgid)
        if fault.stage == "record":
            return "record" if now is None else now
        return now or "between"

    def play(self, chain: list[Fault]) -> None:
        """One chain: the change it needs, then its faults in stage order."""
        if any(f.stage in DATA_STAGES for f in chain) or not self.accepted:
            self.ingest_next()
        else:
            self.bump_learning_rate()
        for fault in chain:
            self.inflict(fault)

    def finish(self, engine: str = "dvc") -> list[str]:
        """A last run to completion; settles the pending fault; returns what broke at the end."""
        proc = self.start_run(engine)
        self._after_recovery(proc)
        if not proc.wait(RUN_TIMEOUT_S):
            proc.kill()
            return ["[next-run] the last run did not finish"]
        problems = []
        if proc.popen.returncode != 0:
            problems.append(f"[next-run] the last run failed (exit {proc.popen.returncode}): "
                            + " | ".join(proc.stderr().strip().splitlines()[-3:])[-400:])
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=self.ws, text=True,
                               capture_output=True, check=False).stdout.strip()
        if dirty:
            problems.append(f"[next-run] git status not clean: {' '.join(dirty.split())[:300]}")
        return problems + invariants.check(self.ws, accepted=self.accepted,
                                           refused=self.refused)


def play(ws: Path, logs: Path, n: int, seed: int, *, prefect_every: int = 6,
         log=None) -> tuple[list[Outcome], list[str]]:
    """Make a tiny workspace at `ws` and play `n` seeded faults on it; (outcomes, final
    problems). The one entry point of the suite's random points and of the benchmark."""
    make_workspace(ws)
    chain = Chain(ws, logs, log=log)
    for faults in plan(n, seed, prefect_every=prefect_every):
        chain.play(faults)
    final = chain.finish()
    return chain.outcomes, final


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """The benchmark's numbers from a list of outcomes."""
    missed = [o for o in outcomes if o.landed in ("exited", "timeout")]
    outcomes = [o for o in outcomes if o not in missed]  # the signal found no run to hit
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:  # by where the signal landed: a cached stage's fault lands later
        entry = by_kind.setdefault(o.kind, {"tries": 0, "held": 0})
        entry["tries"] += 1
        entry["held"] += int(o.held)
    exits = sorted(o.interrupt_exit_s for o in outcomes if o.interrupt_exit_s is not None)
    p95 = exits[min(len(exits) - 1, int(round(0.95 * (len(exits) - 1))))] if exits else None
    return {"faults": len(outcomes), "invariants_held": sum(o.held for o in outcomes),
            "by_kind": dict(sorted(by_kind.items())), "interrupt_exit_s_p95": p95,
            "missed": len(missed), "missed_broken": sum(not o.held for o in missed)}


def dump(outcomes: list[Outcome], path: Path) -> None:
    path.write_text(json.dumps([o.to_dict() for o in outcomes], indent=2) + "\n")
