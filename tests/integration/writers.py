"""Writers of the registry's aliases, each in a process of its own, for the concurrency tests.

    python -m tests.integration.writers TRACKING_URI WORKSPACE MODEL N

imports MLflow and ratchet once, then forks N writer processes (before any client exists, so
they share no connection), each of which connects and prints `ready I`. Every line on stdin is
a JSON list of N specs `ALIAS EXPECTED VERSION ALIAS_DELAY TAG_DELAY`; writer I moves ALIAS to
VERSION if it points at EXPECTED (`-` for none) through `ratchet.promotion.move_alias` and
prints `I {"result": "won" | "moved" | "error", "error": ...}`. All N get their spec at once, so
they race.

The delays (seconds) are slept right before the writer's alias write and move-log write reach
the store: a slow network, made certain. Different delays per writer give the schedule that
breaks a check-then-set (every writer checks, then they write one after another, each seeing
its own write) and a log append that re-reads before writing (each picks the same seq).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def writer(index: int, specs, uri: str, ws: Path, model: str) -> None:
    from mlflow import MlflowClient

    from ratchet import promotion
    from ratchet.errors import AliasMoved
    from ratchet.registry import MOVE_TAG_PREFIX

    delays = {"alias": 0.0, "tag": 0.0}
    set_alias = MlflowClient.set_registered_model_alias
    set_tag = MlflowClient.set_registered_model_tag

    def slow_alias(self, *args, **kwargs):
        time.sleep(delays["alias"])
        return set_alias(self, *args, **kwargs)

    def slow_tag(self, name, key, value):
        if key.startswith(MOVE_TAG_PREFIX):
            time.sleep(delays["tag"])
        return set_tag(self, name, key, value)

    MlflowClient.set_registered_model_alias = slow_alias
    MlflowClient.set_registered_model_tag = slow_tag
    client = MlflowClient(uri, uri)
    client.get_registered_model(model)  # connected: the first request's set-up is done
    say(f"ready {index}")
    for line in specs:
        alias, expected, version, alias_delay, tag_delay = line.split()
        delays.update(alias=float(alias_delay), tag=float(tag_delay))
        try:
            promotion.move_alias(client, model, alias, version, ws=ws, by="cli",
                                 reason=f"writer {version}",
                                 expected=None if expected == "-" else expected)
            out = {"result": "won"}
        except AliasMoved as err:
            out = {"result": "moved", "error": str(err)}
        except Exception as err:  # noqa: BLE001 - reported to the test, which shows it
            out = {"result": "error", "error": f"{type(err).__name__}: {err}"}
        say(f"{index} {json.dumps(out)}")


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: the writers share stdout


def main() -> None:
    uri, ws, model, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # Imported once, before the fork: the store plugins looked up and, for a database store,
    # its ORM mapped (no store made yet, so no connection is shared).
    from mlflow.tracking._model_registry.utils import _get_store_registry

    import ratchet.promotion  # noqa: F401

    _get_store_registry()
    if not uri.startswith("http"):
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        from sqlalchemy.orm import configure_mappers

        configure_mappers()

    pipes = []
    for index in range(n):
        read, write = os.pipe()
        if os.fork() == 0:
            os.close(write)
            for _, other in pipes:
                os.close(other)
            code = 0
            try:
                with os.fdopen(read) as specs:
                    writer(index, specs, uri, ws, model)
            except BaseException as err:  # noqa: BLE001 - the test reads it from stderr
                print(f"writer {index}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        os.close(read)
        pipes.append((index, write))
    for line in sys.stdin:
        for (_, write), spec in zip(pipes, json.loads(line), strict=True):
            os.write(write, (spec + "\n").encode())
    for _, write in pipes:
        os.close(write)
    codes = [os.waitstatus_to_exitcode(os.wait()[1]) for _ in pipes]
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()


# --- the test's side ---------------------------------------------------------------------------


class Writers:
    """The N writer processes, started and connected."""

    def __init__(self, n: int, uri: str, ws: Path, model: str, log: Path,
                 env: dict[str, str] | None = None):
        import subprocess

        self.n, self.log = n, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.writers", uri, str(ws), model, str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
            env={**os.environ, **(env or {})})
        ready = sorted(self._line() for _ in range(n))
        assert ready == sorted(f"ready {i}" for i in range(n)), (ready, self.logs())

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        assert line, f"the writers exited ({self.proc.poll()})\n{self.logs()}"
        return line.strip()

    def logs(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def send(self, specs: list[str]) -> list[dict]:
        """Give every writer its spec at once (they race); their results, by writer."""
        self.proc.stdin.write(json.dumps(specs) + "\n")
        self.proc.stdin.flush()
        results: dict[int, dict] = {}
        for _ in range(self.n):
            index, result = self._line().split(" ", 1)
            results[int(index)] = json.loads(result)
        return [results[i] for i in range(self.n)]

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a stuck writer must not outlive the test
            self.proc.kill()
            self.proc.wait()


def race(client, uri: str, ws: Path, model: str, *, n: int, log_dir: Path,
         delay: float = 0.3, env: dict[str, str] | None = None) -> None:
    """The two races, asserted. `champion` is at 1 and versions 2..n+1 exist.

    1. Every writer moves `champion` from 1 to its own version: exactly one wins, the others
       get AliasMoved, and the log holds exactly that one move.
    2. Every writer moves an alias of its own (`w<i>`, unset) at once: all win, and the log
       holds each of the n moves once (no append overwrote another).
    """
    from ratchet.registry import CHAMPION, alias_history, aliases

    before = len(alias_history(client, model))
    writers = Writers(n, uri, ws, model, log_dir / "writers.log", env)
    try:
        # The writers' alias writes reach the store one `delay` apart, each before the next.
        first = writers.send([f"{CHAMPION} 1 {i + 2} {delay * (i + 1)} 0" for i in range(n)])
        logs = writers.logs()
        won = [i for i, r in enumerate(first) if r["result"] == "won"]
        assert len(won) == 1, (first, logs)
        for i, r in enumerate(first):
            if i not in won:
                assert r["result"] == "moved", (first, logs)
                assert f"expected version 1, it is now {won[0] + 2}" in r["error"], first
        assert aliases(client, model)[CHAMPION] == str(won[0] + 2)
        events = alias_history(client, model)[before:]
        assert [(e["alias"], e["from"], e["to"]) for e in events] == [
            (CHAMPION, "1", str(won[0] + 2))], events

        # Now their move-log writes are the slow ones, one `delay` apart.
        second = writers.send([f"w{i} - {i + 2} 0 {delay * (i + 1)}" for i in range(n)])
        assert [r["result"] for r in second] == ["won"] * n, second
        events = alias_history(client, model)[before + 1:]
        assert sorted((e["alias"], e["from"], e["to"]) for e in events) == [
            (f"w{i}", None, str(i + 2)) for i in range(n)], events
        seqs = [e["seq"] for e in alias_history(client, model)]
        assert len(set(seqs)) == len(seqs), seqs
    finally:
        writers.stop()
