"""The MLflow side: tracking set-up, the champion alias and its move log, logging and registering
candidates.

Every alias move is recorded IN the registry, as registered-model tags `ratchet.move.<seq>.<id>`
holding one JSON event each, so the history lives beside the aliases it describes and works the
same against a remote tracking server as against the workspace's SQLite file.

These are the primitives; `ratchet.promotion` owns a promotion (the lock or lease that serializes
writers, the run journal, the undo) and is what the gate and the CLI move aliases through.
"""

from __future__ import annotations

import getpass
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ratchet.config import RegistryConfig
from ratchet.errors import AliasMoved, RegistryError

CHAMPION, CHALLENGER = "champion", "challenger"
MOVE_TAG_PREFIX = "ratchet.move."
SEQ_WIDTH = 6  # zero-padded, so the tags also sort by name in the MLflow UI
# The registry tables store a tag value in String(5000) (MLflow 3.17 validates up to 100k, but
# a PostgreSQL or MySQL backend would refuse more than the column holds).
MAX_TAG_VALUE = 5000
MANUAL_REASON = "moved outside ratchet (e.g. in the MLflow UI)"
ACTOR_ENV = "RATCHET_ACTOR"
# Set by a retrain run for its stages: the gate tags the MLflow run it logs with it, so a failed
# run can find the versions it registered even if it was killed before its journal said so
# (see `run_versions` and `ratchet.promotion.undo`).
RUN_TOKEN_ENV = "RATCHET_RUN_TOKEN"
RUN_TOKEN_TAG = "ratchet.run_token"
# The split scheme (`prepare.split_key`, `prepare.salt`) a version was trained and tested under,
# as JSON; prepare refuses another scheme while that version is champion.
SPLIT_SCHEME_TAG = "split_scheme"
Mover = Literal["gate", "cli", "manual"]


def tracking_uri(cfg: RegistryConfig, workspace: Path) -> str:
    """The workspace's tracking URI, from params only; relative sqlite paths live in the workspace.

    MLFLOW_TRACKING_URI is deliberately not read: mlflow.set_tracking_uri exports it, so in a
    process that has touched another workspace it names that workspace's store, not this one's.
    """
    uri = cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((workspace / uri[len(prefix) :]).resolve())
    return uri


# Tracking servers found unreachable in this process, and the seconds waited for them: a second
# `connect` (the undo after a failed run, say) tries once more but does not wait the budget again.
_UNREACHABLE: dict[str, float] = {}


def http_budget(timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP retry settings that keep one request to a dead server within about
    `timeout_s`: urllib3 sleeps 0, 2f, 4f, ... seconds between tries (backoff factor f), so
    n retries sleep about f * (2**n - 2) s; MLflow's own default (7 retries, factor 2, 120 s a
    try) waits some 4 minutes."""
    retries = 1
    while 2 ** (retries + 1) - 2 <= timeout_s / 2 and retries < 7:
        retries += 1
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(5, int(timeout_s))),
    }


def _reachable(uri: str, timeout_s: float) -> None:
    """Wait, retrying, until a tracking server answers (any HTTP status below 500) or
    `timeout_s` has passed, then raise `RegistryUnreachable`; a local store (sqlite, a file) is
    not probed. Sets MLflow's HTTP retry policy (`http_budget`) unless the environment already
    does, so that a server going away later also fails a request within about the budget."""
    import requests

    from ratchet.errors import RegistryUnreachable

    if not uri.startswith(("http://", "https://")):
        return
    for key, value in http_budget(timeout_s).items():
        os.environ.setdefault(key, value)
    start = time.monotonic()
    deadline = start + (0.0 if uri in _UNREACHABLE else timeout_s)
    delay, cause = 0.5, "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            resp = requests.get(f"{uri.rstrip('/')}/health", timeout=max(1.0, min(10.0, left)))
            if resp.status_code < 500:
                _UNREACHABLE.pop(uri, None)
                return
            cause = f"HTTP {resp.status_code} {resp.reason}".strip()
        except requests.RequestException as err:
            cause = _cause(err)
        left = deadline - time.monotonic()
        if left <= 0:
            waited = _UNREACHABLE.get(uri, 0.0) + time.monotonic() - start
            _UNREACHABLE[uri] = waited
            raise RegistryUnreachable(uri, waited, cause)
        time.sleep(min(delay, left))
        delay = min(delay * 2, 5.0)


def _cause(err: Exception) -> str:
    """The reason inside a requests error, e.g. `[Errno 111] Connection refused`."""
    import re

    import requests

    if isinstance(err, requests.Timeout):
        return "timed out"
    found = re.search(r"\[Errno -?\d+\][^\"')]*", str(err))
    return found.group(0).strip() if found else f"{type(err).__name__}: {str(err)[:160]}"


def connect(cfg: RegistryConfig, workspace: Path):
    """Point MLflow at the workspace's store and make sure the experiment exists; a tracking
    server that does not answer within `cfg.timeout_s` fails as `RegistryUnreachable`."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, workspace)
    _reachable(uri, cfg.timeout_s)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    check_store_file(uri, workspace)  # before MlflowClient makes an empty store in its place
    with _store_init_lock(uri, workspace):  # the client makes (migrates) the store
        client = MlflowClient(uri, uri)
        if client.get_experiment_by_name(cfg.experiment) is None:
            check_store(client, cfg, workspace)  # a recorded store had it: refuse, create none
            location = None
            if uri.startswith("sqlite:"):
                location = (workspace / "mlartifacts").resolve().as_uri()
            client.create_experiment(cfg.experiment, artifact_location=location)
        check_store(client, cfg, workspace)
    mlflow.set_experiment(cfg.experiment)
    return client


@contextmanager
def _store_init_lock(uri: str, workspace: Path) -> Iterator[None]:
    """One process at a time through a SQLite store's first request: MLflow creates and
    migrates the file on first use, and two commands started together on a new workspace (two
    runs, a run and `status`) would both migrate it, one failing with `duplicate column name`.
    A lock file in the workspace's `.ratchet/` (beside the database for one outside it); held
    for milliseconds once the store exists. Other stores migrate on their server."""
    import fcntl

    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield
        return
    db = Path(uri[len(prefix):]).resolve()
    ws = workspace.resolve()
    path = (ws / ".ratchet" / "store-init.lock" if db.is_relative_to(ws)
            else db.with_name(f"{db.name}.ratchet-init-lock"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- the store's identity -----------------------------------------------------------------------
# A workspace records which store holds its versions (STORE_FILE, git-tracked), the store says
# who it is (the STORE_TAG tag of the workspace's experiment): a deleted store (MLflow would
# quietly make an empty one) or another one in its place is refused instead of read as a
# registry with nothing in it.

STORE_TAG = "ratchet.store_id"
STORE_FILE = Path("registry.json")


def store_record(workspace: Path) -> dict[str, Any] | None:
    """The store the workspace recorded ({"store_id", "experiment", ...}), None before one."""
    path = workspace / STORE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or not record.get("store_id"):
        raise RegistryError(f"{path} is not a store record (restore it with "
                            f"`git checkout {STORE_FILE}`)")
    return record


def _store_mismatch(uri: str, record: dict[str, Any], found: str | None) -> RegistryError:
    return RegistryError(
        f"the registry at {uri} does not match this workspace's record (store id "
        f"{record['store_id']}; found {found or 'none'}): it was deleted or replaced; restore it "
        f"(e.g. from a backup) or point registry.tracking_uri at the right one (to start over "
        f"with this store, delete {STORE_FILE})")


def check_store_file(uri: str, workspace: Path) -> None:
    """A recorded workspace's SQLite store that is gone: refused before MLflow would create an
    empty one at its path."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists():
        record = store_record(workspace)
        if record is not None:
            raise _store_mismatch(uri, record, None)


def check_store(client, cfg: RegistryConfig, workspace: Path) -> str | None:
    """Refuse a store that is not the one the workspace recorded; in a workspace without a
    record, adopt the store it has (tag it if needed, write the record). Returns the store id.
    """
    from ratchet.runtime import write_json

    record = store_record(workspace)
    # The experiment the record was made on: a renamed registry.experiment keeps its store.
    name = (record or {}).get("experiment") or cfg.experiment
    experiment = client.get_experiment_by_name(name)
    found = (experiment.tags or {}).get(STORE_TAG) if experiment is not None else None
    if record is not None:
        if found != record["store_id"]:
            raise _store_mismatch(tracking_uri(cfg, workspace), record, found)
        return found
    if experiment is None or not (workspace / "dvc.yaml").is_file():
        return found  # not a workspace (a test's or a serving directory's store): nothing kept
    if found is None:
        # Derived from the experiment, not random: two processes adopting at once agree.
        found = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ratchet-store:{experiment.experiment_id}:"
                               f"{experiment.creation_time}:{experiment.name}"))
        client.set_experiment_tag(experiment.experiment_id, STORE_TAG, found)
    write_json(workspace / STORE_FILE, {"store_id": found, "experiment": experiment.name,
                                        "recorded_at": utc_now()})
    return found


@dataclass(frozen=True)
class ChampionRef:
    name: str
    version: str
    fingerprint: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def current_champion(client, name: str) -> ChampionRef | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return ChampionRef(name, str(mv.version), (mv.tags or {}).get("fingerprint"))


def split_scheme(client, name: str, version: str) -> dict[str, Any] | None:
    """The split scheme a version was trained under: its tag, else its run's logged params (a
    version registered before the tag; without `prepare.split_key` among them, key 1 was all
    there was); None when neither tells."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
        if (mv.tags or {}).get(SPLIT_SCHEME_TAG):
            return json.loads(mv.tags[SPLIT_SCHEME_TAG])
        logged = client.get_run(mv.run_id).data.params if mv.run_id else {}
    except (MlflowException, ValueError):
        return None
    if "prepare.salt" not in logged:
        return None
    return {"key": int(logged.get("prepare.split_key", 1)), "salt": logged["prepare.salt"]}


def find_version(client, name: str, fingerprint: str, compared_with: str) -> str | None:
    """The version already registered for this model and baseline: keeps the gate idempotent."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for mv in versions:
        tags = mv.tags or {}
        if tags.get("fingerprint") == fingerprint and tags.get("compared_with") == compared_with:
            return str(mv.version)
    return None


# --- aliases and their move log -----------------------------------------------------------------
# MLflow keeps only where an alias points now; the log below keeps how it got there. An alias move
# and its event cannot be one transaction (MLflow has none across alias and tag), so the event is
# written right after the move is confirmed, and anything that moved without an event is found by
# `detect_manual_moves` and recorded as `manual`.


def _not_found(err: Exception) -> bool:
    """True for MLflow's "no such model/version" errors; anything else (a server down, a
    permission) must not be mistaken for an empty registry."""
    return getattr(err, "error_code", None) in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


def registered_model(client, name: str):
    """The registered model, or None before its first registration (other errors raise)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _not_found(err):
            return None
        raise


def aliases(client, name: str) -> dict[str, str]:
    """Every alias of the model and the version it points at; {} before the first registration."""
    model = registered_model(client, name)
    return {} if model is None else {a: str(v) for a, v in (model.aliases or {}).items()}


def alias_target(client, name: str, alias: str) -> str | None:
    """The version `alias` points at now, or None (unset, or the model is not registered)."""
    return aliases(client, name).get(alias)


def model_version(client, name: str, version: str):
    """The registered version, or a RegistryError that lists the versions there are."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not _not_found(err) and getattr(err, "error_code", None) != "INVALID_PARAMETER_VALUE":
            raise
    if registered_model(client, name) is None:
        raise RegistryError(f"no model `{name}` is registered yet (a `ratchet run` registers one)")
    known = sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'"))
    listed = ", ".join(map(str, known)) or "none"
    raise RegistryError(f"`{name}` has no version {version} (registered versions: {listed})")


def actor() -> str:
    """Who is acting: $RATCHET_ACTOR (a CI job, a service account) or else the OS user name."""
    named = os.environ.get(ACTOR_ENV, "").strip()
    if named:
        return named
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):  # e.g. a container uid with no passwd entry
        return "unknown"


def utc_now() -> str:
    """ISO 8601 UTC to the second: sortable, and the same wherever the reader is."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _seq_of_key(key: str) -> int | None:
    """The seq a move-log key names: `ratchet.move.000007.<id>`, or `ratchet.move.000007` as
    written before keys carried a writer's id."""
    suffix = key[len(MOVE_TAG_PREFIX) :] if key.startswith(MOVE_TAG_PREFIX) else ""
    seq = suffix.split(".", 1)[0]
    return int(seq) if seq.isdigit() else None


def _events(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The events in the tags, in log order: by seq, then time, then key (two writers that did
    not share a lock may have taken the same seq; both events are kept)."""
    events = []
    for key, value in tags.items():
        if _seq_of_key(key) is None:
            continue
        try:
            event = json.loads(value)
        except ValueError:
            continue  # a tag edited by hand into something else is not an event
        if isinstance(event, dict) and isinstance(event.get("seq"), int) and "alias" in event:
            events.append((event["seq"], str(event.get("time", "")), key, event))
    return [event for *_, event in sorted(events, key=lambda e: e[:3])]


def alias_history(client, name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of the model, oldest first (by seq)."""
    model = registered_model(client, name)
    return [] if model is None else _events(model.tags or {})


def _fit(event: dict[str, Any], suffix: str = " [truncated]") -> dict[str, Any]:
    """The event with its reason cut so that its JSON fits one MLflow tag value.

    Escaped characters (quotes, non-ASCII) take up to six, so the cut is searched for, not
    computed from the overflow.
    """
    if len(json.dumps(event)) <= MAX_TAG_VALUE:
        return event
    reason = str(event.get("reason") or "")

    def cut(n: int) -> dict[str, Any]:
        return {**event, "reason": reason[:n] + suffix}

    lo, hi = 0, len(reason)  # the longest prefix that fits lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(json.dumps(cut(mid))) <= MAX_TAG_VALUE else (lo, mid - 1)
    return cut(lo)


def append_event(client, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Store the event under the next seq and return it as stored.

    MLflow tags have no create-if-absent, so the key carries a fresh id beside the seq: a tag is
    never overwritten, and an event is never lost even if two writers take the same seq. Writers
    that go through `ratchet.promotion` append under its lock, so their seqs do not collide.
    """
    tags = client.get_registered_model(name).tags or {}
    seqs = [s for s in map(_seq_of_key, tags) if s is not None]
    seqs += [e["seq"] for e in _events(tags)]
    stored = _fit({"seq": max(seqs, default=0) + 1, **event})
    key = f"{MOVE_TAG_PREFIX}{stored['seq']:0{SEQ_WIDTH}d}.{uuid.uuid4().hex[:12]}"
    client.set_registered_model_tag(name, key, json.dumps(stored))
    return stored


def detect_manual_moves(client, name: str) -> list[dict[str, Any]]:
    """Record, as `manual`, every alias whose target differs from its last logged event.

    That covers a move in the MLflow UI, an alias set or removed through the API, and an alias
    that predates the log. MLflow keeps no time or author for an alias move, so `time` is when
    ratchet noticed (also in `detected_at`), `actor` is None and `detected_by` says who noticed.
    Running it again finds nothing new: the event it wrote is now the last one.
    """
    model = registered_model(client, name)
    if model is None:
        return []
    current = {a: str(v) for a, v in (model.aliases or {}).items()}
    logged: dict[str, str | None] = {}
    for event in _events(model.tags or {}):
        logged[event["alias"]] = event.get("to")
    found = []
    for alias in sorted(set(current) | set(logged)):
        if current.get(alias) == logged.get(alias):
            continue
        now = utc_now()
        found.append(append_event(client, name, {
            "time": now, "alias": alias, "from": logged.get(alias), "to": current.get(alias),
            "by": "manual", "actor": None, "reason": MANUAL_REASON,
            "detected_at": now, "detected_by": actor(),
        }))
    return found


def move_alias(
    client,
    name: str,
    alias: str,
    version: str,
    *,
    by: Mover,
    reason: str,
    expected: str | None,
    rollback: bool = False,
    before_move: Callable[[str | None], None] | None = None,
) -> dict[str, Any]:
    """Point `alias` at `version` if it still points at `expected`, and log it.

    A run or a person decided against the version they saw; if someone moved the alias since,
    overwriting would silently discard that decision, so AliasMoved is raised instead (with
    `.current`) and nothing changes. MLflow offers no atomic compare-and-set: on its own this is
    check-then-set, and two writers that both pass the check both move. `ratchet.promotion`
    makes it a compare-and-set by calling it under a lock every ratchet writer takes; the check
    repeated after the move still reports a writer outside ratchet (the MLflow UI) that got in
    between.

    Args:
        version: the target; an alias cannot be removed through ratchet (rollback moves it back).
        by: "gate" or "cli"; "manual" is for moves ratchet did not make.
        expected: the version (or None for unset) the caller believes the alias points at now.
        rollback: the move undoes an earlier one; `rollback_target` skips such moves.
        before_move: called with the alias's current target once the check passed, right
            before the move (a journal writes its intent there; a lease is verified there).

    Returns:
        The logged event; if the alias already points at `version`, the event that put it there.
    """
    if by not in ("gate", "cli"):
        raise ValueError(f"by must be 'gate' or 'cli', not {by!r}")
    if version is None or not str(version).strip():
        raise RegistryError(f"`{alias}` cannot be removed, only moved to another version")
    if not reason or not reason.strip():
        raise RegistryError(f"moving `{alias}` needs a reason (it is kept in the history)")
    version = str(version).strip()
    expected = None if expected is None else str(expected)
    model_version(client, name, version)
    detect_manual_moves(client, name)  # earlier unlogged moves first: the history stays in order
    current = alias_target(client, name, alias)
    if current == version:  # already there, whoever put it there: nothing to overwrite
        return next(e for e in reversed(alias_history(client, name)) if e["alias"] == alias)
    if current != expected:
        raise AliasMoved(name, alias, expected, current)
    if before_move is not None:
        before_move(current)
    client.set_registered_model_alias(name, alias, version)
    confirmed = alias_target(client, name, alias)
    if confirmed != version:
        raise AliasMoved(name, alias, version, confirmed)
    return append_event(client, name, {
        "time": utc_now(), "alias": alias, "from": current, "to": version, "by": by,
        "actor": actor(), "reason": reason.strip(), "rollback": rollback,
    })


def rollback_target(events: list[dict[str, Any]], current: str | None) -> str:
    """The champion before the current one: the `from` of the latest forward move (not itself a
    rollback) that made `current` champion.

    Rollbacks are skipped so that rolling back twice goes further back instead of returning to
    the version the first rollback left.
    """
    if current is None:
        raise RegistryError("there is no champion to roll back")
    for event in reversed(events):
        if event["alias"] == CHAMPION and event.get("to") == current and not event.get("rollback"):
            if event.get("from") is None:
                break
            return str(event["from"])
    raise RegistryError(f"the history has no champion before version {current}; "
                        "name one with `--to VERSION`")


def run_versions(client, name: str, token: str) -> dict[str, str]:
    """The versions of `name` registered from MLflow runs tagged with this retrain's token, and
    their runs: {version: run_id}, oldest first."""
    if registered_model(client, name) is None:
        return {}
    ours = {}
    for mv in client.search_model_versions(f"name = '{name}'"):
        if not mv.run_id:
            continue
        try:
            tags = client.get_run(mv.run_id).data.tags
        except Exception:  # noqa: BLE001 - a deleted run is not ours to judge
            continue
        if tags.get(RUN_TOKEN_TAG) == token:
            ours[str(mv.version)] = mv.run_id
    return dict(sorted(ours.items(), key=lambda kv: int(kv[0])))


def remove_alias(client, name: str, alias: str, *, expected: str, by: Mover, reason: str,
                 before_move: Callable[[str | None], None] | None = None
                 ) -> dict[str, Any] | None:
    """Remove `alias` if it still points at `expected`, and log it as a rollback; None (and
    nothing changes) if it points elsewhere.

    Only an undo removes an alias (it pointed at nothing before the run that set it); people
    move aliases, they do not remove them through ratchet.
    """
    detect_manual_moves(client, name)
    current = alias_target(client, name, alias)
    if current != str(expected):
        return None
    if before_move is not None:
        before_move(current)
    client.delete_registered_model_alias(name, alias)
    return append_event(client, name, {"time": utc_now(), "alias": alias, "from": current,
                                       "to": None, "by": by, "actor": actor(), "rollback": True,
                                       "reason": reason.strip()})


def _error_code(err: Exception) -> str | None:
    return getattr(err, "error_code", None)


def create_model_once(client, name: str, *, tags: dict[str, str], description: str) -> bool:
    """Create the registered model `name`; False if it exists already.

    The registry's name is a unique key of its table (SQLite, PostgreSQL, MySQL alike), so of
    any number of concurrent creators, through a server or not, exactly one gets True: the one
    atomic create-if-absent MLflow offers. The tags are written in the same transaction.
    """
    # A creator that lost the race may also see the winner's model gone already, when the
    # store looks it up to word its error.
    return _lost_race_is_false(lambda: client.create_registered_model(
        name, tags=tags, description=description))


def _lost_race_is_false(call) -> bool:
    """True when `call` succeeds; False when the name it creates or renames is taken or gone."""
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as err:
        if _error_code(err) in {"RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                                "NOT_FOUND"}:
            return False
        raise
    return True


def rename_model(client, name: str, new_name: str) -> bool:
    """Rename a registered model; False if `name` is gone or `new_name` is taken (the new name
    is a unique key too, so a rename to a fresh name happens once)."""
    return _lost_race_is_false(lambda: client.rename_registered_model(name, new_name))


def delete_model(client, name: str) -> None:
    """Delete a registered model (a lease or its grave); gone already is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise


def models_named_like(client, pattern: str) -> list:
    """Registered models whose name matches the SQL LIKE `pattern`."""
    return list(client.search_registered_models(filter_string=f"name LIKE '{pattern}'"))


def version_aliases(client, name: str, version: str) -> list[str]:
    """The aliases that point at `version` now."""
    return sorted(a for a, v in aliases(client, name).items() if v == str(version))


def delete_version(client, name: str, version: str) -> None:
    client.delete_model_version(name, str(version))


def fail_run(client, run_id: str, reason: str) -> None:
    """Mark an MLflow run as a failed retrain's, kept for the post-mortem; its retrain's parent
    run too (`open_retrain_run`), which would otherwise show as running for ever."""
    _mark_failed(client, run_id, reason)
    parent = client.get_run(run_id).data.tags.get(PARENT_TAG)
    if parent:
        _mark_failed(client, parent, reason)


def _mark_failed(client, run_id: str, reason: str) -> None:
    client.set_tag(run_id, "decision", "failed")
    client.set_tag(run_id, "ratchet.failure", reason[:4900])
    client.set_terminated(run_id, "FAILED")


def fail_open_runs(client, token: str, reason: str) -> list[str]:
    """Mark FAILED the runs of the retrain `token` that are still running: a retrain's parent
    run (`open_retrain_run`) whose gate was killed before its candidate's run existed, or
    before it ended. Returns their ids."""
    failed = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return failed
    for run in client.search_runs(experiments, filter_string=(
            f"tags.`{RUN_TOKEN_TAG}` = '{token}' and attributes.status = 'RUNNING'")):
        _mark_failed(client, run.info.run_id, reason)
        failed.append(run.info.run_id)
    return failed


def token_tag() -> dict[str, str]:
    """The tag that ties an MLflow run to the guarded retrain running it (none outside one)."""
    token = os.environ.get(RUN_TOKEN_ENV)
    return {RUN_TOKEN_TAG: token} if token else {}


PARENT_TAG = "mlflow.parentRunId"
RETRAIN_KIND = "retrain"  # tag `ratchet.kind` of a retrain's parent run


def open_retrain_run(experiment: str, *, batch: str | None, start: float,
                     tags: dict[str, str]) -> str:
    """The MLflow run of one whole retrain, begun at `start` (time.time(), its first stage's
    start): named `retrain <batch>`, left running; the candidate's run is logged as its child
    and `close_retrain_run` ends it. Returns its id."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(
        exp_id, start_time=int(start * 1000), run_name=f"retrain {batch}" if batch else "retrain",
        tags={**tags, "ratchet.kind": RETRAIN_KIND, **token_tag(), **source_tags(Path.cwd())})
    return run.info.run_id


def close_retrain_run(client, child_run_id: str, *, decision: str, version: str | None,
                      metrics: dict[str, float], note: str) -> str | None:
    """End the retrain's parent run of `child_run_id` now, with the decision, the version and
    the stages' measurements; returns its id (None when the child has no parent)."""
    import math

    from mlflow.entities import Metric

    parent = client.get_run(child_run_id).data.tags.get(PARENT_TAG)
    if not parent:
        return None
    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and math.isfinite(v)],
                     tags=[])
    client.set_tag(parent, "decision", decision)
    if version is not None:
        client.set_tag(parent, "version", str(version))
    client.set_tag(parent, "mlflow.note.content", note[:MAX_TAG_VALUE])
    client.set_terminated(parent, "FINISHED", end_time=now)
    return parent


def source_tags(workspace: Path) -> dict[str, str]:
    """The run's source as the workspace's, not ratchet's: MLflow names the running script
    (`tasks/gate.py`) and the commit of the repository it lives in, which is ratchet's own,
    beside the workspace's `git_commit`. The workspace's HEAD here (the record step moves it
    to the run's own commit), its dvc.yaml's gate stage, and ratchet's version apart."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=workspace,
                          capture_output=True, text=True)
    try:
        ours = version("ratchet")
    except PackageNotFoundError:
        ours = "unknown"
    return {"mlflow.source.name": f"{workspace / 'dvc.yaml'}:gate",
            "mlflow.source.type": "PROJECT",
            "mlflow.source.git.commit": head.stdout.strip() if head.returncode == 0 else "",
            "ratchet.version": ours}


def log_candidate(
    model_dir: Path,
    *,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: list[Path],
    run_tags: dict[str, str],
    model_card: Path | None = None,
    parent_run_id: str | None = None,
) -> tuple[str, str]:
    """Log a run with the pyfunc model and register it; returns (run_id, version).

    With `parent_run_id` (the retrain's run, `open_retrain_run`) the run is its child, named
    `candidate <batch>`; alone it is named `retrain <batch>`.

    The logged model holds the Hugging Face directory (safetensors, tokenizer), the label map
    and, when given, the model card (markdown), so the registered version carries all three.
    """
    import json
    import math
    import tempfile

    import mlflow
    import pandas as pd

    from ratchet.pyfunc import MODEL_ARTIFACT, TextClassifier, signature

    example = pd.DataFrame({"text": ["I lost my card", "book a table for two"]})
    labels = [v for _, v in sorted(json.loads((model_dir / "config.json").read_text())
                                   ["id2label"].items(), key=lambda kv: int(kv[0]))]
    batch = run_tags.get("batch")
    kind = "candidate" if parent_run_id else "retrain"
    run_name = f"{kind} {batch}" if batch else run_tags.get("fingerprint", "candidate")[:12]
    with (tempfile.TemporaryDirectory(prefix="ratchet-log-") as side_dir,
          mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id) as run):
        mlflow.set_tags({**run_tags, **token_tag(), **source_tags(Path.cwd())})
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        for path in artifacts:
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="reports")
            elif path.is_dir():  # e.g. the Data Docs site, kept whole so its links work
                mlflow.log_artifacts(str(path), artifact_path=f"reports/{path.name}")
        mlflow.log_dict({"labels": labels}, "label_map.json")
        side = Path(side_dir)
        (side / "label_map.json").write_text(json.dumps({"labels": labels}, indent=2))
        model_artifacts = {MODEL_ARTIFACT: str(model_dir),
                           "label_map": str(side / "label_map.json")}
        if model_card is not None:
            model_artifacts["model_card"] = str(model_card)
            mlflow.log_artifact(str(model_card))  # beside the model at the run's top level too
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextClassifier(),
            artifacts=model_artifacts,
            signature=signature(),
            input_example=example,
            pip_requirements=_requirements(),
            registered_model_name=name,
        )
    return run.info.run_id, str(info.registered_model_version)


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["mlflow", "torch", "transformers", "pandas", "numpy", "safetensors", "tokenizers"]
    # The pyfunc class lives in ratchet: serve with `--env-manager local` where it is installed.
    return [f"{p}=={version(p)}" for p in pkgs]


def load_version(params, name: str, version: str, workspace: Path | None = None):
    """A registered version's pyfunc (e.g. a floor model of the gate)."""
    import mlflow.pyfunc

    connect(params.registry, workspace or Path.cwd())
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}", suppress_warnings=True)


def load_champion(params, champion: dict, workspace: Path | None = None):
    """The registered champion's pyfunc (what actually serves), or None before there is one.

    `champion` is the resolved alias (champion.json: name, version); the stages that judge
    against it (evaluate, noise, finetune's continual mode) load it here.
    """
    if not champion.get("version"):
        return None
    import mlflow.pyfunc

    connect(params.registry, workspace or Path.cwd())
    # The champion was logged from this same environment: skip MLflow's requirement check (~2 s).
    return mlflow.pyfunc.load_model(f"models:/{champion['name']}/{champion['version']}",
                                    suppress_warnings=True)



SHARED_MIN_BYTES = 4096  # smaller files are not worth a link (and a block holds them anyway)
LAST_LOGGED = ".ratchet/last-logged.json"  # the artifact folders of the run logged last


def _local_dir(uri: str | None) -> Path | None:
    from urllib.parse import unquote, urlparse

    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None  # a server's or a bucket's store: its files are not ours to link
    path = Path(unquote(parsed.path))
    return path if path.is_dir() else None


def dvc_cache_dir(workspace: Path) -> Path:
    """The workspace's DVC object folder (`cache.dir` where a config sets it)."""
    import configparser

    base = workspace / ".dvc" / "cache"
    for name in ("config", "config.local"):
        cfg = configparser.ConfigParser()
        try:
            cfg.read(workspace / ".dvc" / name)
        except configparser.Error:
            continue
        if cfg.has_option("cache", "dir"):
            base = (workspace / ".dvc" / cfg.get("cache", "dir").strip("'\"")).resolve()
    return base / "files" / "md5"


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shareable(kind: str, rel: Path) -> bool:
    """Files nothing logs again: MLflow overwrites a re-logged artifact in place, so the model
    card (which the record step stamps) keeps its own copy; of a run, the Data Docs pages."""
    if kind == "model":
        return rel.name != "model_card.md"
    return rel.parts[:2] == ("reports", "docs")


def share_stored_copies(client, name: str, version: str, run_id: str,
                        workspace: Path) -> dict[str, int]:
    """Store the candidate once: hard-link each file MLflow just copied into a local artifact
    store to the identical file already stored, so that a batch adds one model, not two.

    A logged model's files are the ones DVC cached when finetune ended (found by md5 in the
    workspace's DVC cache); the run's Data Docs (a page per batch of history) are mostly the
    pages the run logged before this one held under the same names. DVC never rewrites a
    cache object and MLflow never rewrites these files (`_shareable`), and deleting either side
    keeps the other's file. Stores that are not a local folder (a tracking server's, a
    bucket) are left alone. Returns the files and bytes shared."""
    shared = {"files": 0, "bytes": 0}
    from ratchet.lineage import logged_model_id

    mv = client.get_model_version(name, version)
    model_id = getattr(mv, "model_id", None) or logged_model_id(mv.source)
    roots = {"run": _local_dir(client.get_run(run_id).info.artifact_uri),
             "model": _local_dir(client.get_logged_model(model_id).artifact_location)
             if model_id else None}
    record = workspace / LAST_LOGGED
    try:
        previous = {k: Path(v) for k, v in json.loads(record.read_text()).items() if v}
    except (OSError, ValueError, AttributeError):
        previous = {}
    cache = dvc_cache_dir(workspace)
    for kind, root in roots.items():
        if root is None:
            continue
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if not f.is_file() or f.is_symlink() or not _shareable(kind, rel):
                continue
            st = f.stat()
            if st.st_size < SHARED_MIN_BYTES or st.st_nlink > 1:
                continue
            digest = _md5(f)
            if kind == "model":  # the object DVC stored for models/candidate
                match = cache / digest[:2] / digest[2:]
            elif kind in previous:  # the same page, logged by the run before
                match = previous[kind] / rel
            else:
                continue
            try:
                same = (match.is_file() and match.stat().st_dev == st.st_dev
                        and match.stat().st_size == st.st_size
                        and (kind == "model" or _md5(match) == digest))
            except OSError:
                same = False
            if not same:
                continue
            link = f.with_name(f".{f.name}.ratchet-link")
            try:
                link.unlink(missing_ok=True)
                os.link(match, link)
                os.replace(link, f)  # atomic: the artifact is never missing, only re-pointed
            except OSError:
                link.unlink(missing_ok=True)
                continue
            shared["files"] += 1
            shared["bytes"] += st.st_size
    if any(roots.values()):
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({k: str(v) if v else None for k, v in roots.items()}))
        os.replace(tmp, record)
    return shared
