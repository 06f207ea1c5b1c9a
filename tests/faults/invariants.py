"""The fault suite's invariant checker: what must hold in a real workspace after any fault.

`check(ws)` reads the workspace (git, the DVC cache, the files on disk, its run journals) and
its MLflow registry, and returns one precise line per broken invariant ([] when all hold).
It only reads: an SQLite store that is missing is reported, never created. Each line starts
with the invariant's name in brackets, so a report can be grouped by invariant:

- [tags]      every registered version carries the decision tags the gate sets on it
              (`tasks.gate.version_tags`, `ratchet.lineage`), and its MLflow run the run token;
- [lineage]   a version named by a commit is stamped `lineage: recorded` with a `git_commit`
              that is a commit naming it (`ratchet.lineage.stamp_commit`);
- [champion]  `champion` points at a version the gate promoted, or its last logged move
              (`ratchet.move.<seq>.<id>` tags) is a person's (`cli`) or a detected `manual` one;
              and the alias's last logged move says where it points;
- [failed-run] no version of a failed run remains: none whose MLflow run an undo marked
              failed, none whose run token is an unfinished journal of a run that is dead;
- [history]   every `retrain: <decision> (version N)` commit names a version the registry has
              (or is marked undone), with the same decision as the version's latest commit;
              every version a run decided is named by a commit; sequence numbers never reused;
- [batches]   data/batches holds exactly the batches in the committed data/batches.dvc (its
              DVC dir manifest), and, when the caller knows them, exactly the accepted ingests;
              every ingest commit adds exactly its batch; no refused batch is in any version;
- [outputs]   no DVC-cached stage output (a model, a data folder) is committed to git, nor a
              rebuilt one (`cache: false` derived data, `ratchet.workspace.REBUILT`);
- [tmp]       no `.tmp` file anywhere in the workspace (outside .git and .dvc).

"After a fault" means after the recovery the next run performs at its start (it undoes a run
that was killed before recording itself); the harness checks at that point. A version of a
run still in progress (its journal's holder process alive) is not judged.

`next_run_ok(ws)` is the last invariant: the next `ratchet run` succeeds and leaves git clean.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RETRAIN = re.compile(r"^retrain: (\w+) \(version (\d+)\)")
INGEST = re.compile(r"^ingest .* as batch ((\d+)-[0-9a-f]+) \(")
UNDONE = re.compile(r"undone|undo|revert", re.IGNORECASE)
DECIDED = ("promoted", "rejected", "deferred")
JOURNALS = Path(".ratchet/runs")
HOLDER_PID = re.compile(r"pid (\d+)")


def required_tags() -> list[str]:
    """The tags the gate stage sets on every version it decides, read from the code that sets
    them (`tasks.gate.version_tags`), without the per-path data hashes."""
    from ratchet.config import parse_params
    from ratchet.gate import Decision
    from tasks.gate import version_tags

    tags = version_tags(Decision(True, []), "promoted", fingerprint="-", compared_with=None,
                        params=parse_params({}, "defaults"), drift={}, validation={},
                        lock=Path("/nonexistent/dvc.lock"))
    return sorted(k for k in tags if not k.startswith("data_hash."))


# --- reading the workspace ----------------------------------------------------------------------


def _git(ws: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {ws}: {proc.stderr.strip()}")
    return proc.stdout


def commits(ws: Path) -> list[dict[str, str]]:
    """HEAD's history, oldest first: sha, subject, full message, git notes."""
    out = _git(ws, "log", "--reverse", "--format=%H%x1f%B%x1f%N%x1e", "HEAD")
    result = []
    for rec in out.split("\x1e"):
        rec = rec.strip("\n")
        if not rec.strip():
            continue
        sha, body, notes = (rec.split("\x1f") + ["", ""])[:3]
        result.append({"sha": sha.strip(), "subject": body.strip().splitlines()[0]
                       if body.strip() else "", "message": body.strip(), "notes": notes.strip()})
    return result


def _params_raw(ws: Path) -> dict[str, Any]:
    """params.yaml as the workspace has it; HEAD's copy if the file on disk is unreadable (a
    corruption under test must not blind the checker)."""
    for text in (lambda: (ws / "params.yaml").read_text(),
                 lambda: _git(ws, "show", "HEAD:params.yaml")):
        try:
            raw = yaml.safe_load(text())
        except (OSError, yaml.YAMLError, RuntimeError):
            continue
        if isinstance(raw, dict) and raw.get("registry"):
            return raw
    return {}


def store(ws: Path) -> tuple[str, str, Path | None]:
    """(tracking URI, model name, SQLite file or None) of the workspace's registry."""
    reg = _params_raw(ws).get("registry") or {}
    uri = str(reg.get("tracking_uri") or "sqlite:///mlflow.db")
    name = str(reg.get("model_name") or "ratchet-classifier")
    db = None
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        db = Path(path) if path.startswith("/") else (ws / path).resolve()
        uri = f"sqlite:///{db}"
    return uri, name, db


def client_for(ws: Path):
    from mlflow import MlflowClient

    uri, _name, _db = store(ws)
    return MlflowClient(uri, uri)


def manifest(ws: Path, dvc_text: str) -> list[str] | None:
    """The file names a data/batches.dvc text records (its .dir manifest in the DVC cache);
    None when the manifest is not in the cache."""
    outs = (yaml.safe_load(dvc_text) or {}).get("outs") or [{}]
    md5 = str(outs[0].get("md5") or "")
    if not md5.endswith(".dir"):
        return None
    path = ws / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not path.is_file():
        return None
    return sorted(e["relpath"] for e in json.loads(path.read_text()))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def open_journals(ws: Path) -> dict[str, bool]:
    """Unfinished run journals: token -> whether the run that holds it is still alive."""
    folder = ws / JOURNALS
    out: dict[str, bool] = {}
    if not folder.is_dir():
        return out
    for path in folder.glob("*.jsonl"):
        alive = False
        try:
            first = json.loads(path.read_text().splitlines()[0])
            m = HOLDER_PID.search(str(first.get("by", "")))
            alive = bool(m) and pid_alive(int(m.group(1)))
        except (OSError, ValueError, IndexError):
            pass
        out[path.name.removesuffix(".jsonl")] = alive
    return out


# --- the checker ----------------------------------------------------------------------------------


def check(ws: Path, *, accepted: set[str] | None = None, refused: set[str] | None = None
          ) -> list[str]:
    """Every broken invariant of the workspace, one line each; [] when all hold.

    Args:
        accepted: batch ids of the ingests that reported success (None: not known).
        refused: batch ids (or file stems) of ingests that reported failure.
    """
    ws = Path(ws).resolve()
    problems: list[str] = []
    history = commits(ws)
    problems += _check_batches(ws, history, accepted, refused)
    problems += _check_tmp(ws)
    problems += _check_outs_untracked(ws)
    problems += _check_registry(ws, history)
    return problems


def _check_outs_untracked(ws: Path) -> list[str]:
    """DVC-cached stage outputs (models, data) are DVC's, and rebuilt ones (derived data that
    dvc.yaml leaves uncached) are their stage's: none may be committed to git."""
    from ratchet.workspace import REBUILT

    stages = (yaml.safe_load((ws / "dvc.yaml").read_text()) or {}).get("stages", {})
    cached = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, opts = (next(iter(out.items())) if isinstance(out, dict) else (out, {}))
            if (opts or {}).get("cache", True) or str(path) in REBUILT:
                cached.append(str(path))
    tracked = _git(ws, "ls-files", "--", *cached).split() if cached else []
    if not tracked:
        return []
    return [f"[outputs] {len(tracked)} file(s) of DVC-cached or rebuilt stage outputs are "
            "committed to git "
            f"(e.g. {', '.join(tracked[:3])})"]


def _check_tmp(ws: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(ws):
        rel = Path(root).relative_to(ws)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in (".git", ".dvc")]
        for name in files + dirs:
            if name.endswith(".tmp") or ".tmp." in name:
                found.append(str(rel / name))
    return [f"[tmp] a temporary file was left behind: {p}" for p in sorted(found)]


def _check_batches(ws: Path, history: list[dict[str, str]], accepted: set[str] | None,
                   refused: set[str] | None) -> list[str]:
    problems = []
    folder = ws / "data" / "batches"
    on_disk = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    head_text = _git(ws, "show", "HEAD:data/batches.dvc", check=False)
    if not head_text:
        return ["[batches] data/batches.dvc is not committed at HEAD"]
    committed = manifest(ws, head_text)
    if committed is None:
        problems.append("[batches] the committed data/batches.dvc names a manifest that is not "
                        "in the DVC cache")
    else:
        for f in sorted(set(on_disk) - set(committed)):
            problems.append(f"[batches] data/batches/{f} is on disk but not in the committed "
                            "data/batches.dvc")
        for f in sorted(set(committed) - set(on_disk)):
            problems.append(f"[batches] data/batches/{f} is in the committed data/batches.dvc "
                            "but missing on disk")
    work = ws / "data" / "batches.dvc"
    if work.is_file() and work.read_text() != head_text:
        problems.append("[batches] data/batches.dvc differs from its committed version "
                        "(a batch set recorded by DVC but not committed)")
    ids = [Path(f).stem for f in on_disk if f.endswith(".parquet")]
    seqs: dict[str, list[str]] = {}
    for b in ids:
        seqs.setdefault(b.split("-", 1)[0], []).append(b)
    for seq, names in sorted(seqs.items()):
        if len(names) > 1:
            problems.append(f"[batches] sequence number {seq} is used by {len(names)} batches "
                            f"on disk: {', '.join(names)}")
    if accepted is not None:
        for b in sorted(set(ids) - accepted):
            problems.append(f"[batches] batch {b} is in data/batches but no ingest reported "
                            "it accepted")
        for b in sorted(accepted - set(ids)):
            problems.append(f"[batches] batch {b} was reported accepted but is not in "
                            "data/batches")
    problems += _check_batch_history(ws, history, accepted, refused)
    return problems


def _check_batch_history(ws: Path, history: list[dict[str, str]], accepted: set[str] | None,
                         refused: set[str] | None) -> list[str]:
    """Across every commit that changed data/batches.dvc: each ingest commit adds exactly the
    batch its message names; a sequence number names one batch only, ever; no batch an ingest
    reported refused (or that was not accepted) is in any version."""
    problems = []
    changed = set(_git(ws, "log", "--format=%H", "HEAD", "--", "data/batches.dvc").split())
    seen_seq: dict[str, str] = {}
    previous: list[str] = []
    ever: set[str] = set()
    for c in history:
        if c["sha"] not in changed:
            continue
        text = _git(ws, "show", f"{c['sha']}:data/batches.dvc", check=False)
        files = manifest(ws, text) if text else None
        if files is None:
            continue  # the dir manifest of an old version is not in the local cache
        added = sorted(Path(f).stem for f in set(files) - set(previous) if f.endswith(".parquet"))
        ever.update(Path(f).stem for f in files if f.endswith(".parquet"))
        m = INGEST.match(c["subject"])
        if m and added != [m.group(1)]:
            problems.append(f"[batches] commit {c['sha'][:10]} `{c['subject']}` adds "
                            f"{added or 'no batch'} to data/batches.dvc, not exactly its batch")
        for b in added:
            seq = b.split("-", 1)[0]
            if seen_seq.setdefault(seq, b) != b:
                problems.append(f"[history] sequence number {seq} reused: batch {b} (commit "
                                f"{c['sha'][:10]}) after batch {seen_seq[seq]}")
        previous = files
    for b in sorted(ever):
        if (refused and (b in refused)) or (accepted is not None and b not in accepted):
            problems.append(f"[batches] git history records batch {b}, which no ingest "
                            "reported accepted")
    return problems


def _check_registry(ws: Path, history: list[dict[str, str]]) -> list[str]:
    from mlflow.exceptions import MlflowException

    uri, name, db = store(ws)
    if db is not None and not db.is_file():
        if not any(RETRAIN.match(c["subject"]) for c in history):
            return []  # no run has made the store yet
        return [f"[store] the registry's SQLite store {db} is missing"]
    try:
        client = client_for(ws)
        try:
            model = client.get_registered_model(name)
        except MlflowException as err:
            if getattr(err, "error_code", None) not in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
                raise
            model = None
        versions = client.search_model_versions(f"name = '{name}'") if model else []
    except Exception as err:  # noqa: BLE001 - the checker reports, it does not crash
        return [f"[store] cannot read the registry at {uri}: {type(err).__name__}: {err}"]
    problems: list[str] = []
    live = {t for t, alive in open_journals(ws).items() if alive}
    dead = {t for t, alive in open_journals(ws).items() if not alive}
    required = required_tags()
    info: dict[str, dict[str, Any]] = {}
    for mv in versions:
        v = str(mv.version)
        tags = mv.tags or {}
        run_tags: dict[str, str] = {}
        status = None
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
                run_tags, status = run.data.tags or {}, run.info.status
            except MlflowException:
                problems.append(f"[tags] version {v}'s MLflow run {mv.run_id} is gone")
        token = run_tags.get("ratchet.run_token")
        info[v] = {"tags": tags, "token": token, "in_progress": token in live}
        if token in live:
            continue  # a run in progress: judged once it ends
        missing = [k for k in required if k not in tags]
        if tags.get("decision") not in DECIDED:
            problems.append(f"[tags] version {v} has decision {tags.get('decision')!r}, not one "
                            f"of {', '.join(DECIDED)}")
        if missing:
            problems.append(f"[tags] version {v} lacks the decision tag(s) {', '.join(missing)}")
        if mv.run_id and not token:
            problems.append(f"[tags] version {v}'s MLflow run has no ratchet.run_token tag")
        if run_tags.get("decision") == "failed" or status == "FAILED":
            why = run_tags.get("ratchet.failure", "")[:120]
            problems.append(f"[failed-run] version {v} remains although an undo marked its "
                            f"MLflow run {mv.run_id} failed ({why})")
        if token in dead:
            problems.append(f"[failed-run] version {v} belongs to run {token}, whose journal "
                            f"{JOURNALS}/{token}.jsonl is unfinished and whose process is gone "
                            "(not undone after recovery)")
    problems += _check_champion(client, name, model, info)
    problems += _check_history(ws, history, info)
    return problems


def _check_champion(client, name: str, model, info: dict[str, dict[str, Any]]) -> list[str]:
    from ratchet.registry import alias_history

    aliases = {a: str(v) for a, v in ((model.aliases if model else None) or {}).items()}
    champ = aliases.get("champion")
    events = alias_history(client, name) if model else []
    last = next((e for e in reversed(events) if e.get("alias") == "champion"), None)
    if champ is None:
        if last is not None and last.get("to") is not None:
            return [f"[champion] `champion` is unset but its last logged move (#{last['seq']}) "
                    f"put it at version {last['to']}"]
        return []
    if champ not in info:
        return [f"[champion] `champion` points at version {champ}, which is not registered"]
    problems = []
    if last is None or str(last.get("to")) != champ:
        problems.append(f"[champion] `champion` points at version {champ} but its last logged "
                        f"move says {last.get('to') if last else 'nothing'} (an unlogged move)")
    decision = info[champ]["tags"].get("decision")
    by = last.get("by") if last else None
    if decision != "promoted" and by not in ("cli", "manual") and not info[champ]["in_progress"]:
        problems.append(f"[champion] `champion` points at version {champ}, whose decision is "
                        f"{decision!r}, and its move is not a logged manual one (by {by!r})")
    return problems


def _named(message: str, version: str) -> bool:
    return re.search(rf"\bversion {re.escape(version)}\b", message) is not None


def _check_history(ws: Path, history: list[dict[str, str]], info: dict[str, dict[str, Any]]
                   ) -> list[str]:
    problems = []
    latest: dict[str, tuple[str, dict[str, str]]] = {}  # version -> (decision, commit)
    for i, c in enumerate(history):
        m = RETRAIN.match(c["subject"])
        if not m:
            continue
        decision, version = m.group(1), m.group(2)
        later = history[i + 1 :]
        undone = (UNDONE.search(c["message"]) or UNDONE.search(c["notes"]) or any(
            UNDONE.search(x["message"]) and (_named(x["message"], version)
                                             or c["sha"][:7] in x["message"]) for x in later))
        if version not in info:
            if not undone:
                problems.append(f"[history] commit {c['sha'][:10]} `{c['subject']}` names "
                                f"version {version}, which the registry does not have (and the "
                                "commit is not marked undone)")
            continue
        if not undone and decision in DECIDED:
            latest[version] = (decision, c)
    for v, data in sorted(info.items(), key=lambda kv: int(kv[0])):
        if data["in_progress"] or not data["token"]:
            continue
        tags = data["tags"]
        if v not in latest:
            problems.append(f"[history] version {v} (decision {tags.get('decision')!r}, run "
                            f"{data['token']}) is named by no `retrain:` commit")
            continue
        decision, c = latest[v]
        if tags.get("decision") in DECIDED and tags.get("decision") != decision:
            problems.append(f"[history] version {v} is {tags.get('decision')!r} in the registry "
                            f"but {decision!r} in its latest commit {c['sha'][:10]}")
        commit = tags.get("git_commit", "")
        if tags.get("lineage") != "recorded":
            problems.append(f"[lineage] version {v} is named by commit {c['sha'][:10]} but its "
                            f"lineage tag is {tags.get('lineage')!r}, not 'recorded'")
        elif not any(x["sha"] == commit and _named(x["message"], v) for x in history):
            problems.append(f"[lineage] version {v}'s git_commit {commit[:10]} is not a commit "
                            "of HEAD's history that names it")
    return problems


# --- the next run ---------------------------------------------------------------------------------


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the suite runs ratchet in: this checkout's code, telemetry off."""
    env = dict(os.environ)
    env.update({"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                "GX_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONDONTWRITEBYTECODE": "",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    env.update(extra or {})
    return env


def ratchet_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ratchet"), *args]


def next_run_ok(ws: Path, *, engine: str = "dvc", env: dict[str, str] | None = None,
                timeout: float = 900) -> list[str]:
    """The last invariant: the next `ratchet run` succeeds and leaves `git status` clean.

    Returns one line per failure ([] when it held)."""
    ws = Path(ws).resolve()
    proc = subprocess.run(ratchet_cmd("run", "--engine", engine, "-w", str(ws)), cwd=ws,
                          env=tool_env(env), capture_output=True, text=True, timeout=timeout,
                          check=False)
    problems = []
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        problems.append(f"[next-run] `ratchet run --engine {engine}` failed (exit "
                        f"{proc.returncode}): {tail[-600:]}")
    elif "Traceback" in proc.stderr:
        problems.append("[next-run] `ratchet run` succeeded but printed a traceback")
    dirty = _git(ws, "status", "--porcelain", check=False).strip()
    if dirty:
        problems.append(f"[next-run] git status is not clean after the run: "
                        f"{' '.join(dirty.split())[:400]}")
    return problems
