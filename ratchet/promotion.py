"""A promotion as one transaction: who may move aliases now, what a run moved, how to undo it.

The registry (`ratchet.registry`) offers the primitives; three things it cannot give alone live
here, and the gate stage, the run guard and `ratchet promote` / `rollback` / `history` use them:

- **Exclusion.** MLflow has no compare-and-set for an alias, so `registry.move_alias` on its own
  is check-then-set. Every ratchet writer moves aliases through `move_alias` below, under one
  lock per registry held only for the check, the move and its log entry (never for a whole
  retrain, so a person's promote waits seconds): with a local SQLite store an fcntl lock on
  `.ratchet/registry.lock`; with a tracking server (or any other store) a lease held IN the
  registry, which every ratchet process that talks to that server sees (`Lease`).
- **A journal per run** (`.ratchet/runs/<token>.jsonl`, append-only, fsync'd): every alias move
  the run made, written as an intent before the move and confirmed after it, and every version
  it registered or reused. The gate stage runs as a DVC subprocess and finds its run's journal
  through $RATCHET_RUN_TOKEN and its working directory (the workspace).
- **Undo** from that journal: the run's moves are reverted newest first, each only where the
  alias still points where the run put it (a person's move made meanwhile stands), and the
  versions it registered are deleted unless someone has aliased them since. Every undo move is
  logged like any other.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ratchet import registry
from ratchet.errors import AliasMoved, LeaseLost, RegistryBusy, RegistryError

JOURNALS = Path(".ratchet/runs")
LOCK_FILE = Path(".ratchet/registry.lock")
WAIT_S = 120.0  # how long a writer waits for the lock by default: holders keep it for seconds
LEASE_SUFFIX = ".lease"
LEASE_TTL_S = 60.0  # a lease not renewed for this long is a dead holder's and may be broken
GRAVE_AGE_S = 3600.0  # broken leases are kept this long under their token's name (see `_break`)
POLL_S = 0.1
TOKEN, HOLDER, SINCE, EXPIRES = (f"ratchet.lease.{k}" for k in ("token", "holder", "since",
                                                                "expires"))
Log = Callable[[str], None]


def holder() -> str:
    """Who holds a lock, for whoever waits on it: actor, host and process."""
    return f"{registry.actor()}@{socket.gethostname()} pid {os.getpid()}"


# --- the lock: a file with a local store, a lease in the registry with a server ----------------


class FileLock:
    """An exclusive fcntl lock on a file beside the store: held while the file is open, and
    dropped by the OS when its holder dies, so it never goes stale."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def acquire(self, timeout: float | None, on_wait: Log | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the lock is
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                fh.seek(0)
                who = fh.read().strip() or "another writer"
                if deadline is not None and time.monotonic() > deadline:
                    fh.close()
                    raise RegistryBusy(
                        f"the registry is locked by {who} for more than {timeout:.0f} s "
                        f"({self.path}): another promotion is under way; try again") from None
                if not told and on_wait is not None:
                    on_wait(f"waiting for the registry lock held by {who}")
                    told = True
                time.sleep(POLL_S)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{holder()} since {registry.utc_now()}\n")
        fh.flush()
        self._fh = fh

    def verify(self) -> None:
        """Nothing to check: the OS keeps an flock for as long as the file is open."""

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is None:
            return
        fh.seek(0)
        fh.truncate()
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class Lease:
    """An exclusive lease on the model's aliases, held in the registry as the registered model
    `<model>.lease` (holder, token and expiry in its tags); released by deleting it.

    Taking it is `registry.create_model_once`, backed by the store's unique key on model names,
    so exactly one of any number of concurrent takers gets it. The holder renews it while it
    works and verifies that it is still its own right before every alias move. A lease whose
    expiry has passed belongs to a dead (or stuck) holder and is broken by renaming it to
    `<model>.lease.stale.<its token>`: that name is unique too, so of two writers that both saw
    the same stale lease only the first breaks it, and the second cannot rename away a fresh
    lease taken in between (its rename's target exists). Expiry is judged on each writer's own
    clock: keep the hosts' clocks within seconds of each other (NTP), far under the TTL.
    """

    def __init__(self, client, model_name: str, *, ttl: float = LEASE_TTL_S):
        self.client = client
        self.name = f"{model_name}{LEASE_SUFFIX}"
        self.ttl = ttl
        self.token = uuid.uuid4().hex

    def acquire(self, timeout: float | None, on_wait: Log | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        while True:
            tags = {TOKEN: self.token, HOLDER: holder(), SINCE: registry.utc_now(),
                    EXPIRES: f"{time.time() + self.ttl:.3f}"}
            if registry.create_model_once(
                    self.client, self.name, tags=tags,
                    description="ratchet's promotion lease: whoever holds it may move the "
                                "aliases of the model; deleted when released"):
                self.verify()  # taken by the create above, so this is a check of the store
                return
            lease = registry.registered_model(self.client, self.name)
            if lease is None:
                continue  # released in between: take it
            seen = lease.tags or {}
            if _expiry(seen, lease, self.ttl) < time.time():
                self._break(seen.get(TOKEN))
                continue
            who = f"{seen.get(HOLDER, 'another writer')} since {seen.get(SINCE, '?')}"
            if deadline is not None and time.monotonic() > deadline:
                raise RegistryBusy(
                    f"the registry lease `{self.name}` is held by {who} for more than "
                    f"{timeout:.0f} s: another promotion is under way; try again (a dead "
                    f"holder's lease expires {self.ttl:.0f} s after its last renewal)")
            if not told and on_wait is not None:
                on_wait(f"waiting for the registry lease held by {who}")
                told = True
            time.sleep(POLL_S * (0.5 + random.random()))

    def verify(self) -> None:
        """Raise LeaseLost unless the lease is still this writer's; renew it past half its TTL."""
        lease = registry.registered_model(self.client, self.name)
        tags = (lease.tags or {}) if lease is not None else {}
        if tags.get(TOKEN) != self.token:
            now = tags.get(HOLDER, "nobody")
            raise LeaseLost(f"the registry lease `{self.name}` is no longer this writer's (held "
                            f"by {now}): it was not renewed within {self.ttl:.0f} s; nothing "
                            "more was moved, try again")
        if _expiry(tags, lease, self.ttl) - time.time() < self.ttl / 2:
            self.client.set_registered_model_tag(self.name, EXPIRES,
                                                 f"{time.time() + self.ttl:.3f}")

    def release(self) -> None:
        """Give the lease up: renamed to a grave named by this token, then deleted, so a lease
        another writer took after this one expired is never deleted by mistake."""
        lease = registry.registered_model(self.client, self.name)
        if lease is None or (lease.tags or {}).get(TOKEN) != self.token:
            return  # it expired and was broken: another writer's now, or nobody's
        grave = f"{self.name}.released.{self.token}"
        if not registry.rename_model(self.client, self.name, grave):
            return  # gone: it expired and was broken
        if (registry.registered_model(self.client, grave).tags or {}).get(TOKEN) != self.token:
            registry.rename_model(self.client, grave, self.name)  # another's: give it back
            return
        registry.delete_model(self.client, grave)

    def _break(self, stale: str | None) -> None:
        grave = f"{self.name}.stale.{stale or 'untagged'}"
        if not registry.rename_model(self.client, self.name, grave):
            return  # someone else broke or released it first
        moved = registry.registered_model(self.client, grave)
        if moved is not None and (moved.tags or {}).get(TOKEN) != stale:
            # A fresh lease was taken between reading the stale one and renaming: not ours to
            # break. Give it back (if that fails, its holder finds out at its next verify).
            registry.rename_model(self.client, grave, self.name)
            return
        self._sweep()

    def _sweep(self) -> None:
        """Delete graves of leases broken or released more than GRAVE_AGE_S ago."""
        cutoff = (time.time() - GRAVE_AGE_S) * 1000
        for kind in ("stale", "released"):
            prefix = f"{self.name}.{kind}."
            for model in registry.models_named_like(self.client, f"{prefix}%"):
                if model.name.startswith(prefix) and (model.last_updated_timestamp or 0) < cutoff:
                    registry.delete_model(self.client, model.name)


def _expiry(tags: dict[str, str], lease, ttl: float) -> float:
    """When the lease expires: its expiry tag; without a readable one (a read that caught the
    model without its tags, or a lease not made by ratchet), a TTL after it was last updated,
    so that a torn read never breaks a live lease."""
    try:
        return float(tags[EXPIRES])
    except (KeyError, ValueError):
        stamp = getattr(lease, "last_updated_timestamp", None) or getattr(
            lease, "creation_timestamp", None) or 0
        return stamp / 1000 + ttl


def store_uri(client) -> str:
    return str(getattr(client, "_registry_uri", None) or client.tracking_uri)


def lock_file(uri: str, ws: Path) -> Path | None:
    """The lock file of a local SQLite store (in the workspace's `.ratchet/` when the store is
    the workspace's, else beside the database file); None for a store other processes on other
    hosts reach, which needs a lease."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = Path(uri[len(prefix) :]).resolve()
    ws = ws.resolve()
    return ws / LOCK_FILE if db.is_relative_to(ws) else db.with_name(f"{db.name}.ratchet-lock")


_HELD: dict[tuple[int, str], list[Any]] = {}  # (thread, lock) -> [lock, depth]: re-entrant


@contextmanager
def registry_lock(client, name: str, ws: Path, *, timeout: float | None = WAIT_S,
                  on_wait: Log | None = None) -> Iterator[FileLock | Lease]:
    """Hold the registry's promotion lock for the model: the only writer of its aliases and
    of its move log until the block ends. Re-entrant within a thread (an undo moves aliases
    through `move_alias` too); `timeout` (seconds, None = forever) turns waiting into
    RegistryBusy."""
    uri = store_uri(client)
    path = lock_file(uri, ws)
    key = (threading.get_ident(), str(path) if path else f"{uri}#{name}{LEASE_SUFFIX}")
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield held[0]
        finally:
            held[1] -= 1
        return
    lock: FileLock | Lease = FileLock(path) if path else Lease(client, name)
    lock.acquire(timeout, on_wait)
    _HELD[key] = [lock, 1]
    try:
        yield lock
    finally:
        del _HELD[key]
        lock.release()


# --- the run journal ---------------------------------------------------------------------------


class Journal:
    """One run's record of what it did to the registry, one JSON object per line.

    Lines are only ever appended and each is fsync'd before the act it announces, so a run
    killed at any point leaves a journal that says at least what it did: an intent without its
    confirmation is a move that may or may not have happened (undo looks at the alias), and a
    version registered but not yet journaled is still found by its run's token tag.
    """

    def __init__(self, path: Path):
        self.path = path

    @property
    def token(self) -> str:
        return self.path.name.removesuffix(".jsonl")

    @classmethod
    def begin(cls, ws: Path, token: str, model_name: str) -> Journal:
        path = ws / JOURNALS / f"{token}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = cls(path)
        # `intents`: this run notes what it is about to do to the registry before doing it
        # (`about_to`, `intent`): an untouched journal means an untouched registry (`touched`).
        journal._write({"op": "start", "model": model_name, "time": registry.utc_now(),
                        "by": holder(), "intents": 1}, mode="x")
        _fsync_dir(path.parent)  # the file itself survives a crash, not only its lines
        return journal

    @classmethod
    def of_run(cls, ws: Path, token: str | None = None) -> Journal | None:
        """The journal of the run `token` (default $RATCHET_RUN_TOKEN), if one was begun."""
        token = token or os.environ.get(registry.RUN_TOKEN_ENV)
        if not token:
            return None
        path = ws / JOURNALS / f"{token}.jsonl"
        return cls(path) if path.is_file() else None

    @classmethod
    def _all(cls, ws: Path) -> list[Journal]:
        folder = ws / JOURNALS
        if not folder.is_dir():
            return []
        return [cls(p) for p in sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)]

    @classmethod
    def unfinished(cls, ws: Path) -> list[Journal]:
        """Journals of runs that ended without being recorded or undone, oldest first: the ones
        an undo may take back. A run is recorded once a commit names it (`trailer`), even if it
        was killed before it could say so in its journal: that is noted here, and the run is
        never undone (git would name versions the registry no longer has)."""
        out = []
        for journal in cls._all(ws):
            if journal.recorded_commit is not None:
                continue
            commit = commit_naming(ws, journal.token)
            if commit is not None:
                journal.recorded(commit)
                continue
            out.append(journal)
        return out

    @classmethod
    def unstamped(cls, ws: Path) -> list[Journal]:
        """Journals of recorded runs whose lineage stamp is still to do, oldest first."""
        return [j for j in cls._all(ws) if j.recorded_commit is not None]

    def _write(self, entry: dict[str, Any], mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill mid-write announces nothing that happened
            if isinstance(entry, dict):
                out.append(entry)
        return out

    @property
    def model_name(self) -> str | None:
        return next((e.get("model") for e in self.entries() if e.get("op") == "start"), None)

    def intent(self, alias: str, frm: str | None, to: str) -> str:
        """Announce a move before making it; returns its id for `confirm`."""
        move_id = uuid.uuid4().hex[:12]
        self._write({"op": "move", "id": move_id, "alias": alias, "from": frm, "to": to,
                     "time": registry.utc_now()})
        return move_id

    def confirm(self, move_id: str) -> None:
        self._write({"op": "moved", "id": move_id})

    def about_to(self, what: str) -> None:
        """Note, before the first registry write of the run (the gate registering a version),
        that one may follow: a run killed right after it is undone through the registry."""
        self._write({"op": "intent", "what": what, "time": registry.utc_now()})

    def touched(self) -> bool:
        """Whether the run may have changed the registry. False only for a journal that says
        it notes its intents and noted nothing: an undo then has nothing to do and needs no
        registry (which may be the very thing that is down)."""
        entries = self.entries()
        start = next((e for e in entries if e.get("op") == "start"), {})
        return not start.get("intents") or any(e.get("op") != "start" for e in entries)

    def version(self, version: str, *, registered: bool, run_id: str | None = None) -> None:
        """Note a version the run registered, or reused (found registered by an earlier run);
        the first note of a version stands."""
        if str(version) in self.versions():
            return
        self._write({"op": "version", "version": str(version), "registered": registered,
                     "run_id": run_id})

    def moves(self) -> list[dict[str, Any]]:
        """The run's moves in order: alias, from, to, and whether the move was confirmed."""
        entries = self.entries()
        done = {e.get("id") for e in entries if e.get("op") == "moved"}
        return [{"alias": e["alias"], "from": e.get("from"), "to": e["to"],
                 "confirmed": e["id"] in done} for e in entries if e.get("op") == "move"]

    def versions(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for e in self.entries():
            if e.get("op") == "version":
                out.setdefault(str(e["version"]), {"registered": bool(e.get("registered")),
                                                   "run_id": e.get("run_id")})
        return out

    def recorded(self, commit: str) -> None:
        """The run's commit is made: from here on nothing undoes it (`unfinished` skips it);
        the journal stays only until the version is stamped with that commit."""
        if self.recorded_commit is None:
            self._write({"op": "recorded", "commit": commit, "time": registry.utc_now()})

    @property
    def recorded_commit(self) -> str | None:
        """The commit that records the run, once made; None before (or once closed)."""
        if not self.path.is_file():
            return None
        return next((e.get("commit") for e in self.entries() if e.get("op") == "recorded"),
                    None)

    def close(self) -> None:
        """The run is recorded and stamped (or undone): its journal has nothing left to say."""
        self.path.unlink(missing_ok=True)


TRAILER = "Ratchet-Run"


def trailer(token: str) -> str:
    """The line a run's commit message ends with: names the run (its journal) in git."""
    return f"{TRAILER}: {token}"


def commit_naming(ws: Path, token: str) -> str | None:
    """The commit of the workspace's history whose message names the run `token`, if any."""
    import subprocess

    if not (ws / ".git").exists():
        return None
    proc = subprocess.run(["git", "log", "-1", "--format=%H", "--fixed-strings",
                           f"--grep={trailer(token)}"], cwd=ws, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- moving aliases ----------------------------------------------------------------------------


def move_alias(client, name: str, alias: str, version: str, *, ws: Path, by: registry.Mover,
               reason: str, expected: str | None, rollback: bool = False,
               journal: Journal | None = None, timeout: float | None = WAIT_S,
               on_wait: Log | None = None) -> dict[str, Any]:
    """`registry.move_alias` made a real compare-and-set: under the registry lock, so no other
    ratchet writer moves an alias between the check and the move; a lease is verified right
    before the move; with a `journal`, the move is announced there first and confirmed after.

    Raises AliasMoved when the alias no longer points at `expected` (the caller re-evaluates or
    reports it), RegistryBusy when the lock stays held past `timeout`.
    """
    target = str(version).strip() if version is not None else version
    with registry_lock(client, name, ws, timeout=timeout, on_wait=on_wait) as lock:
        announced: list[str] = []

        def before(current: str | None) -> None:
            lock.verify()
            if journal is not None:
                announced.append(journal.intent(alias, current, target))

        event = registry.move_alias(client, name, alias, target, by=by, reason=reason,
                                    expected=expected, rollback=rollback, before_move=before)
        if journal is not None and announced:
            journal.confirm(announced[0])
        return event


def record_manual_moves(client, name: str, ws: Path, *, timeout: float | None = WAIT_S,
                        on_wait: Log | None = None) -> list[dict[str, Any]]:
    """`registry.detect_manual_moves` under the lock, so its events take their seqs in turn."""
    if registry.registered_model(client, name) is None:
        return []
    with registry_lock(client, name, ws, timeout=timeout, on_wait=on_wait):
        return registry.detect_manual_moves(client, name)


# --- undo --------------------------------------------------------------------------------------


def undo(client, journal: Journal, *, ws: Path, reason: str, timeout: float | None = WAIT_S
         ) -> dict[str, Any]:
    """Revert what the journal's run did to the registry, then close the journal.

    - Its alias moves, newest first, each only if the alias still points where the run put it:
      a move someone else made since (a person in the UI, `ratchet promote`) is theirs and
      stays. An alias the run set where there was none is removed.
    - The versions it registered (journaled, or found by its token when it was killed before
      journaling one), unless an alias points at one after the reverts (someone chose it).
      Versions it reused from an earlier run stay. Their MLflow runs stay too, marked FAILED.

    Safe to repeat after a crash half-way: a reverted move no longer matches its alias.
    """
    name = journal.model_name
    done: dict[str, Any] = {"reverted_moves": [], "deleted_versions": [], "kept": []}
    why = reason.strip()[:2000] or "the run failed"
    if not name or registry.registered_model(client, name) is None:
        registry.fail_open_runs(client, journal.token, why)
        journal.close()
        return done
    with registry_lock(client, name, ws, timeout=timeout) as lock:
        moves = journal.moves()
        _log_unconfirmed(client, name, moves)
        for move in reversed(moves):
            _revert(client, name, move, lock, why, done)
        _delete_versions(client, name, journal, why, done)
    registry.fail_open_runs(client, journal.token, why)  # e.g. the retrain's own run
    journal.close()
    return done


def _log_unconfirmed(client, name: str, moves: list[dict[str, Any]]) -> None:
    """A run killed between a move and its log entry left the alias moved and unlogged: log it
    as the run's (before anything records it as a move made outside ratchet)."""
    for move in moves:
        if move["confirmed"] or registry.alias_target(client, name, move["alias"]) != move["to"]:
            continue
        last = next((e for e in reversed(registry.alias_history(client, name))
                     if e["alias"] == move["alias"]), None)
        if last is None or last.get("to") != move["to"]:
            registry.append_event(client, name, {
                "time": registry.utc_now(), "alias": move["alias"], "from": move["from"],
                "to": move["to"], "by": "gate", "actor": registry.actor(), "rollback": False,
                "reason": "moved by a run that stopped before logging it (logged by its undo)"})


def _revert(client, name: str, move: dict[str, Any], lock, why: str,
            done: dict[str, Any]) -> None:
    alias, was, put = move["alias"], move["from"], move["to"]
    now = registry.alias_target(client, name, alias)
    if now != put:
        if move["confirmed"] and now != was:
            done["kept"].append(f"`{alias}` stays at {now}: moved by someone else after this "
                                f"run moved it from {was} to {put}")
        return
    verify = lambda _current: lock.verify()  # noqa: E731
    try:
        if was is None:
            event = registry.remove_alias(client, name, alias, expected=put, by="gate",
                                          reason=f"removed: {why}", before_move=verify)
            if event is None:
                return
        else:
            registry.move_alias(client, name, alias, was, by="gate", expected=put,
                                rollback=True, reason=f"restored: {why}", before_move=verify)
    except AliasMoved as err:
        done["kept"].append(f"`{alias}` stays at {err.current}: moved by someone else during "
                            "the undo")
        return
    except RegistryError as err:  # e.g. the version it pointed at before has been deleted
        done["kept"].append(f"`{alias}` stays at {put}: cannot go back to {was} ({err})")
        return
    done["reverted_moves"].append({"alias": alias, "from": put, "to": was})


def _delete_versions(client, name: str, journal: Journal, why: str,
                     done: dict[str, Any]) -> None:
    noted = journal.versions()
    ours = {v: n["run_id"] for v, n in noted.items() if n["registered"]}
    for version, run_id in registry.run_versions(client, name, journal.token).items():
        if version not in noted or noted[version]["registered"]:
            ours.setdefault(version, run_id)
    existing = {str(mv.version): mv.run_id
                for mv in client.search_model_versions(f"name = '{name}'")}
    failed_runs = set()
    for version in sorted(ours, key=int):
        if version not in existing:
            continue  # deleted already (an undo that crashed half-way)
        held = registry.version_aliases(client, name, version)
        if held:
            done["kept"].append(f"version {version} stays: {', '.join(held)} point(s) at it")
            continue
        registry.delete_version(client, name, version)
        done["deleted_versions"].append(version)
        if existing[version]:
            failed_runs.add(existing[version])
    for run_id in sorted(failed_runs):
        registry.fail_run(client, run_id, why)


def recover(client, ws: Path, *, reason: str, timeout: float | None = WAIT_S
            ) -> dict[str, Any] | None:
    """Undo every run whose journal is still open in the workspace (a run that failed, or was
    killed before it could undo itself); None when there is none."""
    journals = Journal.unfinished(ws)
    if not journals:
        return None
    total: dict[str, Any] = {"reverted_moves": [], "deleted_versions": [], "kept": []}
    for journal in journals:
        for key, values in undo(client, journal, ws=ws, reason=reason, timeout=timeout).items():
            total[key] += values
    return total
