"""A ratchet workspace: a git + DVC repo with the pipeline, its batches and its MLflow store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ratchet.config import Params, load_params, parse_params
from ratchet.errors import BatchRefused, WorkspaceError
from ratchet.registry import STORE_FILE
from ratchet.runtime import TELEMETRY_OFF, atomic_path, write_json, write_text_atomic

if TYPE_CHECKING:
    from ratchet.data import ColumnMap

BATCHES = Path("data/batches")
BATCHES_DVC = Path("data/batches.dvc")  # what DVC records of the batch folder, git-tracked
CORPUS = Path("data/corpus")  # optional unlabeled texts for pretrain (a DVC dependency)
INCOMING = Path("data/incoming")
QUARANTINE = Path("data/quarantine")
CHAMPION_FILE = Path("champion.json")
# The floor's models besides the champion (`ratchet.floor`): apart from champion.json, so that a
# change of the pool re-runs only evaluate and gate, not the stages that read the champion.
FLOOR_FILE = Path("floor.json")
# What finetune starts from (finetune.init: auto | champion | base, see `finetune_init`): apart
# from champion.json so that a champion move re-trains only when the training starts from it.
INIT_FILE = Path("finetune-init.json")
CANDIDATE = Path("models/candidate")  # the finetune stage's model
GATE_REPORT = Path("reports/gate.json")
MODEL_CARD = Path("reports/eval/model_card.md")  # written by the gate beside the eval report
# Label-noise review decisions (batch id -> accept | drop), git-tracked; the noise stage reads it.
LABELS_REVIEW = Path("labels-review.yaml")
NOISE_REPORT = Path("reports/validation/noise.json")
NOISE_SUSPECTS = Path("data/noise/suspects.parquet")
# Derived outputs that grow with the history and that their stage rebuilds in seconds from the
# per-batch parts it keeps under .ratchet/cache/ (or, for augment, from the prepared split and
# the DVC-cached encoder): dvc.yaml marks them `cache: false`, so dvc.lock keeps their hashes and
# neither the DVC cache nor git keeps a copy per run. See dvc.yaml's header.
REBUILT = (
    "reports/validation/docs",
    "data/prepared",
    "data/replay/buffer.parquet",
    "data/drift/weights.parquet",
    "data/augmented/train.parquet",
    "reports/eval/predictions.parquet",
)
GITIGNORE = """\
# ratchet workspace: heavy or local-only files stay out of git
/mlflow.db
/mlartifacts/
/.ratchet/
/data/incoming/
/data/quarantine/
# what `dvc plots show` / `dvc plots diff` write
/dvc_plots/
# derived outputs rebuilt by their stage (dvc.lock has their hashes; see dvc.yaml)
""" + "".join(f"/{path}\n" for path in REBUILT)


def template(name: str) -> Path:
    """dvc.yaml / params.yaml: from the wheel, or from the repo root in an editable install."""
    packaged = resources.files("ratchet") / "_workspace" / name
    if packaged.is_file():
        return Path(str(packaged))
    root = Path(__file__).resolve().parent.parent / name
    if root.is_file():
        return root
    raise WorkspaceError(f"the installed ratchet has no {name} template")


def tool_env() -> dict[str, str]:
    """Environment for DVC and git: this interpreter's bin first (stage commands say `python`)."""
    env = dict(os.environ)
    env.update({k: env.get(k, v) for k, v in TELEMETRY_OFF.items()})
    # Stages read the store from params.yaml; an inherited value may name another workspace's.
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "ratchet")
    env.setdefault("GIT_AUTHOR_EMAIL", "ratchet@localhost")
    env.setdefault("GIT_COMMITTER_NAME", env["GIT_AUTHOR_NAME"])
    env.setdefault("GIT_COMMITTER_EMAIL", env["GIT_AUTHOR_EMAIL"])
    return env


def _run(ws: Path, args: list[str], what: str, capture: bool = True) -> str:
    proc = subprocess.run(args, cwd=ws, env=tool_env(), text=True,
                          capture_output=capture, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()[-4000:] if capture else ""
        raise WorkspaceError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{detail}")
    return proc.stdout if capture else ""


def git(ws: Path, *args: str) -> str:
    return _run(ws, ["git", *args], f"git {args[0]}")


def dvc(ws: Path, *args: str, capture: bool = True) -> str:
    return _run(ws, [sys.executable, "-m", "dvc", *args], f"dvc {args[0]}", capture)


def commit(ws: Path, message: str, *, paths: list[Path] | None = None,
           leave: list[str] | None = None, log: Callable[[str], None] | None = None,
           untrack: bool | None = None) -> bool:
    """Commit what changed, or only under `paths`, but never `leave` (unstaged, as DVC's
    autostage may have staged it) and never a DVC-cached output; False if nothing changed.

    DVC's `.gitignore` entries alone do not keep its outputs out: a `dvc repro` whose stage
    fails (Ctrl-C included) takes back the entries it added, those of every stage that ran in
    it for the first time, and does not write them again while the stage stays cached. So the
    entries are written back first (`guard_outputs`), and whatever of an output is still in
    git's index after the `git add` (staged anyway, or taken by an earlier commit) is untracked
    in this commit; `log` (default: stderr) says so. `untrack` (default: when `paths` is
    None) does that for outputs an earlier commit took too.
    """
    outs = guard_outputs(ws, untrack=False, log=log)
    git(ws, "add", "-A", "--", *(str(p) for p in paths or ["."]))
    if leave:
        git(ws, "reset", "-q", "--", *leave)
    if paths is None if untrack is None else untrack:
        _untrack(ws, outs, log)  # also what an earlier commit took
    elif outs and (staged := _names(git(ws, "diff", "--cached", "--name-only", "-z", "--",
                                        *outs))):
        git(ws, "reset", "-q", "--", *staged)
    if not git(ws, "diff", "--cached", "--name-only").strip():
        return False
    git(ws, "commit", "-q", "-m", message)
    return True


def cached_outputs(ws: Path) -> list[str]:
    """The outputs git must not hold, as DVC itself resolves dvc.yaml (paths relative to `ws`):
    the DVC-cached ones (stage outs not `cache: false`, persist ones too, and those of `.dvc`
    files), and the `REBUILT` ones marked `cache: false`."""
    with _dvc_repo(ws) as repo:
        return _outputs(repo)


@contextmanager
def _dvc_repo(ws: Path) -> Iterator[Any]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(ws)) as repo:
            yield repo
    except DvcException as err:
        raise WorkspaceError(f"cannot read the pipeline's outputs ({err}), so nothing is "
                             f"committed: fix dvc.yaml in {ws}") from None


def _outputs(repo: Any) -> list[str]:
    # use_scm_ignore: what DVC git-ignores itself (cached, local, inside the repo); a REBUILT
    # output is ignored the same way, so that no commit takes it either.
    outs = set()
    for out in repo.index.outs:
        rel = os.path.relpath(out.fspath, repo.root_dir)
        if out.use_scm_ignore or (out.is_in_repo and Path(rel).as_posix() in REBUILT):
            outs.add(rel)
    return sorted(outs)


def repair_lockfile(ws: Path, *, log: Callable[[str], None] = print) -> bool:
    """Put back the recorded dvc.lock when the one on disk is not a valid lock file: DVC
    rewrites it in place, so a run killed while DVC wrote it leaves it empty or cut, and every
    later `dvc repro` would refuse it. dvc.lock only records what the stages last produced: with
    the recorded one, DVC re-runs the stages whose outputs no longer match. True if repaired."""
    from dvc.dvcfile import Lockfile

    path = ws / "dvc.lock"
    if not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        Lockfile.validate(data, fname="dvc.lock")
        return False
    except Exception:  # noqa: BLE001 - any reason it cannot be read: restore the recorded one
        pass
    try:
        recorded = git(ws, "show", "HEAD:dvc.lock")
    except WorkspaceError:  # never recorded: DVC rebuilds it from the stages
        path.unlink()
        log("dvc.lock was left half-written by a run killed while DVC wrote it; removed it "
            "(no recorded one yet: the stages re-run)")
        return True
    write_text_atomic(path, recorded)
    log("dvc.lock was left half-written by a run killed while DVC wrote it; restored the "
        "recorded one (the stages whose outputs no longer match re-run)")
    return True


def guard_outputs(ws: Path, *, untrack: bool = True,
                  log: Callable[[str], None] | None = None) -> list[str]:
    """Keep DVC's outputs out of git: write back a missing `.gitignore` entry of an output on
    disk as DVC writes it (`/<name>` in the `.gitignore` beside it), and with `untrack` take
    files of outputs out of git's index (`git rm --cached`: the files stay, DVC has them).

    Repairs a workspace an earlier commit broke (DVC then refuses the stage: `output ... is
    already tracked by SCM`); safe to call before a run too. Returns the outputs.
    """
    ws = ws.resolve()
    with _dvc_repo(ws) as repo:
        outs = _outputs(repo)
        # scm.ignore: DVC's own writer of the entry; None when git already ignores the path.
        # An output not on disk has nothing for git to take (DVC writes its entry on saving).
        restored = [out for out in outs
                    if os.path.lexists(ws / out) and repo.scm.ignore(str(ws / out))]
    if restored:
        _say(log, f"wrote back the .gitignore entries of DVC outputs that a failed `dvc repro` "
                  f"had taken back: {', '.join(restored)}")
    if untrack:
        _untrack(ws, outs, log)
    return outs


def _untrack(ws: Path, outs: list[str], log: Callable[[str], None] | None) -> None:
    tracked = _names(git(ws, "ls-files", "-z", "--", *outs)) if outs else []
    if not tracked:
        return
    holders = [o for o in outs if any(t == o or t.startswith(f"{o}/") for t in tracked)]
    git(ws, "rm", "-r", "-q", "--cached", "--", *holders)
    _say(log, f"{len(tracked)} file(s) of DVC outputs were tracked or staged in git "
              f"({', '.join(holders)}): untracked them (the files stay; DVC versions them)")


def _names(out: str) -> list[str]:
    return [name for name in out.split("\0") if name]


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)
    else:
        print(f"ratchet: {msg}", file=sys.stderr)


def unused_inputs(ws: Path) -> list[str]:
    """The `.dvc` files of stage inputs (data/batches) that name another version than the one
    the run's dvc.lock records: a batch added by hand (file + `dvc add`) while the run was
    between stages. The run's commit leaves them out, so it names what the run used; the next
    run's commit takes them. Raises when the run's stages saw different versions of one input.
    """
    lock = ws / "dvc.lock"
    if not lock.is_file():
        return []
    seen: dict[str, set[str]] = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for dep in stage.get("deps", []):
            if (ws / f"{dep['path']}.dvc").is_file() and dep.get("md5"):
                seen.setdefault(dep["path"], set()).add(dep["md5"])
    unused = []
    for path, md5s in sorted(seen.items()):
        if len(md5s) > 1:
            raise WorkspaceError(f"{path} changed while the run was in progress (its stages saw "
                                 f"{len(md5s)} versions): nothing is recorded; run again")
        outs = (yaml.safe_load((ws / f"{path}.dvc").read_text()) or {}).get("outs") or [{}]
        if outs[0].get("md5") not in md5s:
            unused.append(f"{path}.dvc")
    return unused


def require(ws: Path) -> Path:
    ws = ws.resolve()
    if not (ws / "dvc.yaml").is_file() or not (ws / ".dvc").is_dir():
        raise WorkspaceError(f"{ws} is not a ratchet workspace (run `ratchet init {ws}` first)")
    return ws


PROBES_HEADER = """\
# Minimum-functionality probes: for each label, texts the model must always get right.
# The gate fails a candidate whose worst class passes fewer than gate.min_probe_accuracy of its
# probes. Labels the candidate does not know yet are skipped. Example:
#   check_balance:
#     - what is my checking balance
#     - how much money do i have
"""


def write_probes(ws: Path, probes: dict[str, list[str]] | None = None) -> Path:
    """Write the workspace's probes file (the header alone when there are no probes)."""
    path = ws / "probes.yaml"
    body = yaml.safe_dump(probes, sort_keys=True, allow_unicode=True) if probes else ""
    path.write_text(PROBES_HEADER + body, encoding="utf-8")
    return path


def init(ws: Path, overrides: dict[str, dict[str, Any]] | None = None, *,
         probes: dict[str, list[str]] | None = None, dvc_remote: str | None = None,
         dvc_endpoint: str | None = None) -> Path:
    """Make a workspace: git, DVC with a remote, params, probes, an empty batch folder.

    The DVC remote is `dvc_remote` (e.g. `s3://bucket/ratchet`, with `dvc_endpoint` for MinIO
    or another S3-compatible server) or, by default, a local folder under `.ratchet/`.
    """
    ws = ws.resolve()
    if (ws / "dvc.yaml").exists():
        raise WorkspaceError(f"{ws} is already a workspace")
    raw = yaml.safe_load(template("params.yaml").read_text())
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    from ratchet.models import source_dir

    source_dir(parse_params(raw, "params overrides").model.source)  # fail before touching disk
    ws.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template("dvc.yaml"), ws / "dvc.yaml")
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_probes(ws, probes)
    from ratchet.noise import write_review

    write_review(ws / LABELS_REVIEW, {})
    (ws / ".gitignore").write_text(GITIGNORE)
    for d in (BATCHES, INCOMING):
        (ws / d).mkdir(parents=True, exist_ok=True)
    (ws / BATCHES / ".gitkeep").touch()
    (ws / CORPUS).mkdir(parents=True, exist_ok=True)
    (ws / CORPUS / "README.md").write_text(
        "Unlabeled texts for the pretrain stage's MLM training, beside the batches' texts:\n"
        ".txt files (one text per line) or .csv/.jsonl/.parquet files with a `text` column.\n"
        "Version big files with `dvc add`.\n")
    write_json(ws / FLOOR_FILE, {"floor": []})
    write_json(ws / CHAMPION_FILE, {"name": None, "version": None, "fingerprint": None,
                                    "split_scheme": None})
    write_json(ws / INIT_FILE, {"init": "base"})
    if not (ws / ".git").exists():
        git(ws, "init", "-q", "-b", "main")
    dvc(ws, "init", "-q")
    dvc(ws, "config", "core.analytics", "false")
    dvc(ws, "config", "core.autostage", "true")
    if dvc_remote:
        dvc(ws, "remote", "add", "-d", "-f", "storage", dvc_remote)
        if dvc_endpoint:
            dvc(ws, "remote", "modify", "storage", "endpointurl", dvc_endpoint)
    else:
        remote = ws / ".ratchet" / "dvc-remote"
        remote.mkdir(parents=True, exist_ok=True)
        dvc(ws, "remote", "add", "-d", "-f", "local", str(remote))
    dvc(ws, "add", "-q", str(BATCHES))
    commit(ws, "ratchet init: empty workspace")
    return ws


@dataclass(frozen=True)
class IngestResult:
    batch_id: str
    path: Path
    rows: int
    created: bool
    warnings: list[str]
    dry_run: bool = False
    redacted: int = 0  # rows whose text had PII replaced by placeholders


def batch_memory(params: Params, batches_dir: Path) -> tuple[list[str], dict[str, set[str]]]:
    """What the stored batches tell a new one, from one read of each file: the label set it must
    keep to (declared in params, else the labels earlier batches had) and normalised text ->
    labels (what it may repeat or defy)."""
    import pandas as pd

    from ratchet.data import LABEL, batch_files
    from ratchet.validation import remember

    labels: set[str] = set(params.data.labels)
    texts: dict[str, set[str]] = {}
    for f in batch_files(batches_dir):
        df = pd.read_parquet(f)
        remember(texts, df)
        if not params.data.labels and LABEL in df.columns:
            labels.update(df[LABEL].dropna().astype(str))
    return sorted(labels), texts


def quarantine(ws: Path, source: Path, problems: list[str], report: Any = None) -> Path:
    """Keep a refused input and why, for a person to inspect: never versioned, never trained on.

    The folder is assembled under a temporary name and renamed, so a half-written quarantine
    entry never appears. Its own `.gitignore` keeps git (and so `dvc status`) unaware of it even
    in a workspace made before quarantine existed.
    """
    import re

    root = ws / QUARANTINE
    root.mkdir(parents=True, exist_ok=True)
    ignore = root / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# refused batches: local evidence only, never versioned\n*\n")
    now = time.gmtime()
    safe_name = re.sub(r"[^\w.-]+", "_", source.name)
    stem = f"{time.strftime('%Y%m%dT%H%M%SZ', now)}-{safe_name}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{stem}."))
    copied = False
    try:
        if source.is_file():  # False for a directory, a dangling link or a symlink loop
            shutil.copyfile(source, tmp / source.name)
            copied = True
        write_json(tmp / "report.json", {
            "source": str(source),
            "refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
            "copied": copied,
            "problems": problems,
            "validation": report.to_dict() if report is not None else None,
        })
        md = report.to_markdown() if report is not None else (
            f"# `{source.name}`: REFUSED\n\n" + "\n".join(f"- {p}" for p in problems) + "\n")
        if not copied:
            md += "\n(the input was not copied: it is not a regular file)\n"
        (tmp / "report.md").write_text(md)
        for n in range(1, 1000):
            target = root / (stem if n == 1 else f"{stem}-{n}")
            try:
                tmp.rename(target)  # fails if target exists and is not empty
                return target
            except OSError:
                if not target.exists():
                    raise
        raise WorkspaceError(f"cannot find a free quarantine folder name for {stem}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ingest(ws: Path, source: Path, columns: ColumnMap | None = None, *,
           dry_run: bool = False, on_wait: Callable[[str], None] | None = None) -> IngestResult:
    """Validate an incoming file and, only if it passes, add it as a new immutable batch.

    The same content twice is one batch (the id carries the content hash). A refused file goes
    to the quarantine folder with a report, and nothing else changes: no batch, no commit, no
    DVC change. With `dry_run` nothing changes at all, refused or not.

    A batch lands between retrains, never inside one: ingest takes the retrain lock (waiting,
    with `on_wait` told why, for a run in progress), so no run trains on part of a batch set or
    records a batch it did not train on, and its commit holds the batch alone.
    """
    if dry_run:
        return _ingest(ws, source, columns, dry_run=True)
    with retrain_lock(require(ws), on_wait=on_wait):
        return _ingest(ws, source, columns, dry_run=False)


def _ingest(ws: Path, source: Path, columns: ColumnMap | None, *, dry_run: bool
            ) -> IngestResult:
    from ratchet.data import (
        TEXT,
        ColumnMap,
        batch_files,
        canonical,
        content_hash,
        read_table,
        value_types,
        write_parquet_atomic,
    )
    from ratchet.validation import Validator, redact

    ws = require(ws)
    params = load_params(ws / "params.yaml")
    check_batches(ws)
    batches = ws / BATCHES
    columns = columns or ColumnMap()

    def refuse(problems: list[str], report: Any = None) -> BatchRefused:
        where = None
        if not dry_run and (source.exists() or source.is_symlink() or source.is_dir()):
            where = str(quarantine(ws, source, problems, report).relative_to(ws))
        return BatchRefused(source.name, problems, where)

    try:
        raw = read_table(source)
    except BatchRefused as err:
        raise refuse(err.problems) from None
    mapped, unused = columns.apply(raw)
    df = canonical(mapped)
    stored = redact(df) if params.validate_.pii == "redact" else df
    digest = content_hash(stored)
    existing = batch_files(batches)
    for f in existing:
        if f.stem.endswith(digest[:12]):  # the same content again: one batch, nothing to do
            return IngestResult(f.stem, f, len(df), False, [], dry_run)
    validator = Validator(params.validate_, params.data, model_source=params.model.source)
    known, seen = batch_memory(params, batches)
    report = validator.validate(
        df, known, source.name, history=seen,
        types=value_types(mapped), columns=list(raw.columns), mapping=columns.sources(),
        require=columns.required(),
    )
    if unused:
        from ratchet.validation import WARNING, Problem

        report.problems.append(Problem(
            "unused columns", WARNING,
            "not part of the batch and dropped: " + ", ".join(f"`{c}`" for c in unused),
            len(unused)))
    if not report.passed:
        raise refuse([str(p) for p in report.critical], report)
    warnings = [str(p) for p in report.warnings]
    redacted = int((stored[TEXT] != df[TEXT]).fillna(False).sum()) if TEXT in df else 0
    batch_id = f"{next_sequence(ws):04d}-{digest[:12]}"
    path = batches / f"{batch_id}.parquet"
    if dry_run:
        return IngestResult(batch_id, path, len(df), False, warnings, True, redacted)
    recorded = {p: (ws / p).read_bytes() if (ws / p).is_file() else None
                for p in (BATCHES_DVC, BATCHES.parent / ".gitignore")}
    write_parquet_atomic(stored, path)
    try:
        dvc(ws, "add", "-q", str(BATCHES))
        # With the store record when the first connect wrote it since (see check_store).
        store = [STORE_FILE] if (ws / STORE_FILE).is_file() else []
        commit(ws, f"ingest {source.name} as batch {batch_id} ({len(df)} rows)",
               paths=[*recorded, *store])
    except WorkspaceError:
        # Leave no trace of a batch that could not be versioned: neither its file nor a
        # data/batches.dvc that names it (the next ingest or run would record that).
        path.unlink(missing_ok=True)
        for rel, content in recorded.items():
            if content is not None:
                with atomic_path(ws / rel) as tmp:
                    tmp.write_bytes(content)
        with suppress(WorkspaceError):  # nothing staged, or the index is what failed
            git(ws, "reset", "-q", "--", *(str(p) for p in recorded))
        raise
    return IngestResult(batch_id, path, len(df), True, warnings, False, redacted)


def _sequence(name: str) -> int | None:
    """The sequence number a batch file name starts with (`0003-<hash>.parquet` -> 3)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() and "-" in name else None


def _manifest(ws: Path, md5: str) -> list[str] | None:
    """The file names a DVC directory record (`<md5>.dir`) lists, from the local cache; None
    when the cache does not hold it (a clone that has not pulled)."""
    for cache in (ws / ".dvc" / "cache" / "files" / "md5", ws / ".dvc" / "cache"):
        path = cache / md5[:2] / md5[2:]
        if path.is_file():
            try:
                return [e["relpath"] for e in json.loads(path.read_text())]
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _dvc_out(text: str) -> dict[str, Any]:
    try:
        outs = (yaml.safe_load(text) or {}).get("outs") or [{}]
    except yaml.YAMLError:
        return {}
    return outs[0] if isinstance(outs[0], dict) else {}


def check_batches(ws: Path) -> None:
    """Refuse when a batch the committed data/batches.dvc records is not in data/batches/:
    a file deleted by hand must not be committed away by the next ingest or run.

    Cheap: one `git show` and one read of the DVC directory manifest in the local cache (a
    count of files when the cache lacks it)."""
    try:
        out = _dvc_out(git(ws, "show", f"HEAD:{BATCHES_DVC}"))
    except WorkspaceError:
        return  # no commit yet, or data/batches is not tracked: nothing recorded to lose
    md5 = str(out.get("md5") or "")
    folder = ws / BATCHES
    names = _manifest(ws, md5) if md5.endswith(".dir") else None
    restore = (f"restore with `dvc checkout {BATCHES}` (or `git checkout {BATCHES_DVC}` and "
               f"`dvc pull {BATCHES}` if the DVC cache lacks them); nothing was changed")
    if names is None:
        want = int(out.get("nfiles") or 0)
        have = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        if have < want:
            raise WorkspaceError(f"{BATCHES}/ holds {have} files but the committed "
                                 f"{BATCHES_DVC} records {want}: batches are missing; {restore}")
        return
    missing = sorted(n for n in names if n.endswith(".parquet") and not (folder / n).is_file())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if missing[5:] else "")
        raise WorkspaceError(f"batch file(s) {shown} recorded in the committed {BATCHES_DVC} are "
                             f"missing from {BATCHES}/ (deleted by hand?): batches are never "
                             f"removed; {restore}")


def next_sequence(ws: Path) -> int:
    """1 + the highest sequence number ever recorded: on disk, in data/batches.dvc now and in
    every version of it git holds (its manifests in the DVC cache, and the ingest commits'
    subjects), so a removed batch's number is never given to another batch."""
    import re

    from ratchet.data import batch_files

    seqs = [_sequence(f.name) for f in batch_files(ws / BATCHES)]
    texts = [(ws / BATCHES_DVC).read_text()] if (ws / BATCHES_DVC).is_file() else []
    with suppress(WorkspaceError):  # no commit yet
        texts.append(git(ws, "log", "--format=%s", "-p", "--", str(BATCHES_DVC)))
    for text in texts:
        seqs += [int(n) for n in re.findall(r"\bas batch (\d+)-", text)]
        for md5 in set(re.findall(r"md5: ([0-9a-f]{32}\.dir)", text)):
            seqs += [_sequence(n) for n in _manifest(ws, md5) or []]
    return 1 + max((n for n in seqs if n is not None), default=0)


def batch_ids(ws: Path) -> list[str]:
    """The workspace's batch ids in arrival order."""
    from ratchet.data import batch_files

    return [f.stem for f in batch_files(ws / BATCHES)]


def find_batch(ws: Path, ref: str) -> str:
    """The batch id `ref` names: the whole id or a unique prefix (`0003`); else one clear error."""
    ids = batch_ids(ws)
    if ref in ids:
        return ref
    hits = [b for b in ids if b.startswith(ref)] if ref else []
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(ids) if ids else "none yet"
    if hits:
        raise WorkspaceError(f"batch `{ref}` is ambiguous: {', '.join(hits)}")
    raise WorkspaceError(f"no batch `{ref}` in {ws} (batches: {known})")


def refresh_champion(ws: Path, *, full: bool = False) -> dict[str, Any]:
    """Resolve the `champion` alias into champion.json, rewriting it only when it changed.

    The evaluate stage depends on this file, so a move made by hand in the MLflow UI re-runs
    exactly evaluate and gate, and nothing else. Every run passes here, so this is also where
    such a move is first noticed and recorded in the alias history (as `manual`). It also
    writes what finetune starts from (finetune-init.json; `full`: a full retrain requested).
    """
    from ratchet.promotion import record_manual_moves
    from ratchet.registry import connect, current_champion, split_scheme

    forget_experiment(ws)
    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    record_manual_moves(client, params.registry.model_name, ws)
    ref = current_champion(client, params.registry.model_name)
    content = {
        "name": params.registry.model_name if ref else None,
        "version": ref.version if ref else None,
        "fingerprint": ref.fingerprint if ref else None,
        # What prepare holds fixed while this champion serves (see tasks.prepare).
        "split_scheme": split_scheme(client, ref.name, ref.version) if ref else None,
    }
    init = finetune_init(ws, params, content, client=client, full=full)
    floor: dict[str, Any] = {"floor": []}
    if ref and params.gate.floor_models:
        from ratchet.floor import members

        # The best models served before, which the candidate may not fall behind either.
        floor["floor"] = members(client, params.registry.model_name, exclude=ref.version,
                                 limit=params.gate.floor_models)
    for path, value in ((ws / CHAMPION_FILE, content), (ws / INIT_FILE, init),
                        (ws / FLOOR_FILE, floor)):
        if not path.is_file() or json.loads(path.read_text()) != value:
            write_json(path, value)
    return content


def finetune_init(ws: Path, params: Params, champion: dict[str, Any], *, client=None,
                  full: bool = False) -> dict[str, Any]:
    """What finetune starts from (finetune-init.json), by `finetune.init`:
    base: {"init": "base"}; champion: the champion and the newest batch; auto: the plan
    (`full` | `continual`), why, and the facts it was made from (`ratchet.continual`), with
    the champion and the newest batch. `full`: a full retrain requested for this batch.

    The file is kept as it is while no batch arrived and the champion is the one it was made
    for, or is the model that was trained on the current data (the workspace's candidate, just
    promoted): rewriting it would make the next run fine-tune the new champion again on the
    batch it was trained on, or redo a requested full retrain's batch continually. A new
    batch, or a champion moved to another model (a rollback), does move it.
    """
    from ratchet.continual import FULL, REQUESTED, auto_plan

    cfg = params.finetune
    if cfg.init == "base":
        return {"init": "base"}
    ids = batch_ids(ws)
    newest = ids[-1] if ids else None
    every = cfg.full_every if cfg.init == "auto" else None
    path = ws / INIT_FILE
    have = json.loads(path.read_text()) if path.is_file() else {}
    try:
        trained_here = champion["fingerprint"] == fingerprint(ws / CANDIDATE)
    except OSError:  # no candidate in this checkout yet
        trained_here = False
    if (not full and have.get("init") == cfg.init and have.get("batch") == newest
            and have.get("full_every") == every
            and (trained_here or have.get("version") == champion.get("version"))):
        return have
    if full:
        return {"init": cfg.init, "plan": FULL, "reason": REQUESTED, **champion,
                "batch": newest, **({"full_every": every} if every else {})}
    if cfg.init == "champion":
        return {"init": "champion", **champion, "batch": newest}
    if client is None:
        from ratchet.registry import connect

        client = connect(params.registry, ws)
    plan = auto_plan(client, params.registry.model_name, champion.get("version"), ws=ws,
                     batches_dir=ws / BATCHES, full_every=cfg.full_every)
    return {"init": "auto", **plan, **champion, "batch": newest, "full_every": every}


def forget_experiment(ws: Path) -> bool:
    """Drop a gate record a `dvc exp run` left (decision `experiment`), so that a real run after
    `dvc exp apply` gates the model for real instead of DVC finding the gate up to date."""
    path = ws / GATE_REPORT
    if not path.is_file():
        return False
    try:
        decision = json.loads(path.read_text()).get("decision")
    except ValueError:
        return False
    if decision != "experiment":
        return False
    path.unlink()
    return True


def stage_names(ws: Path) -> list[str]:
    """Stages in the order dvc.yaml lists them (which is a topological order)."""
    return list(yaml.safe_load((ws / "dvc.yaml").read_text())["stages"])


def fingerprint(model_dir: Path) -> str:
    """Content hash of a model's weights: the identity of a trained model."""
    h = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _pump(fd: int, on_line: Callable[[str], None]) -> None:
    """Copy a stage's output from `fd` to this process's stdout as it comes (progress bars
    included) and hand each finished line to `on_line`: a bar's last state, no escapes."""
    out = getattr(sys.stdout, "buffer", None)
    rest = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pseudo-terminal's other side closed
            chunk = b""
        if not chunk:
            break
        if out is not None:
            with suppress(OSError, ValueError):
                out.write(chunk)
                out.flush()
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            text = ANSI.sub("", line.decode(errors="replace").rstrip("\r")).split("\r")[-1]
            if text.strip():
                with suppress(Exception):  # a log sink must not stop the stage
                    on_line(text.rstrip())
    text = ANSI.sub("", rest.decode(errors="replace")).split("\r")[-1].strip()
    if text:
        with suppress(Exception):
            on_line(text)
    os.close(fd)


def repro(ws: Path, stage: str | None = None, *, upstream: bool = False,
          on_line: Callable[[str], None] | None = None) -> float:
    """`dvc repro`: everything, one stage (`--single-item`), or a stage and what it needs
    (`upstream`); returns the wall time in seconds. `on_line`: also given each line the stage
    prints (the flow's task-run log), while the output still reaches this process's stdout."""
    start, started = time.perf_counter(), time.time()
    args = ["repro"] + ([stage] if upstream else ["--single-item", stage]) if stage else ["repro"]
    # Streamed, not captured: the stages' progress bars and errors reach the person watching.
    # In this process's group, so that a terminal's Ctrl-C and a kill of the group reach the
    # stage as they reach the run. With `on_line`, through a pseudo-terminal where this
    # process has one (so the stage still draws its bars), else a pipe.
    cmd = [sys.executable, "-m", "dvc", *args]
    pump = None
    if on_line is None:
        proc = subprocess.Popen(cmd, cwd=ws, env=tool_env())
    else:
        import pty

        tty = sys.stdout.isatty() if hasattr(sys.stdout, "isatty") else False
        reader, writer = pty.openpty() if tty else os.pipe()
        try:
            proc = subprocess.Popen(cmd, cwd=ws, env=tool_env(), stdout=writer,
                                    stderr=writer, stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(reader)
            raise
        finally:
            os.close(writer)
        pump = threading.Thread(target=_pump, args=(reader, on_line), daemon=True)
        pump.start()
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM (see cli `run`), a flow cancelled: stop the stage
        stop_tree(proc)
        raise
    finally:
        if pump is not None:
            pump.join(timeout=10)
    if code != 0:
        from ratchet.stage import last_failure

        failed = last_failure(ws, since=started)
        if failed is not None:  # the stage's own line (printed above too), and its log
            raise WorkspaceError(f"stage `{failed['stage']}` failed: {failed['message']}")
        from ratchet.errors import DiskFull
        from ratchet.runtime import FULL_BELOW, free_bytes, size_text

        free = free_bytes(ws)
        if free is not None and free < FULL_BELOW:  # DVC itself could not write (exit 255)
            raise DiskFull(str(ws), size_text(free))
        what = f"stage `{stage}`" if stage and not upstream else "the pipeline"
        raise WorkspaceError(f"{what} failed (exit {code}); DVC's and the stage's output is "
                             f"above (`dvc {' '.join(args)}` in {ws})")
    return time.perf_counter() - start


STOP_GRACE_S = 3.0  # how long an interrupted stage may take to stop before it is killed


def _descendants(pid: int) -> list[int]:
    """The live processes under `pid`, from /proc (Linux), children before grandchildren."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(raw[raw.rindex(")") + 2:].split()[1])
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop(0)
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        frontier += kids
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_tree(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop `proc` (dvc) and everything under it, bounded: SIGINT to the stages (dvc ignores
    SIGINT while a stage runs and ends when its stage does), then SIGKILL to whatever is left
    after `grace` seconds. Without this a signal sent to the run alone would leave the stage
    running on, reparented, after the run had exited."""
    import signal

    tree = _descendants(proc.pid)
    _signal(tree, signal.SIGINT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not [p for p in tree if _alive(p)]:
            return
        time.sleep(0.05)
    _signal([proc.pid, *tree, *_descendants(proc.pid)], signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def changed_stages(ws: Path) -> set[str]:
    """The stages `dvc status` finds out of date (changed deps, params, outs or command).

    Stages downstream of a changed one are not listed until it has run; callers that skip by
    this set must run everything after the first stage that ran.
    """
    out = dvc(ws, "status", "--json")
    try:
        status = json.loads(out or "{}")
    except ValueError as err:
        raise WorkspaceError(f"`dvc status --json` printed something else: {out[:200]}") from err
    return {name.split(":")[-1] for name in status}


def _report(ws: Path, name: str) -> dict[str, Any]:
    path = ws / "reports" / name
    return json.loads(path.read_text()) if path.is_file() else {}


def read_drift(ws: Path) -> dict[str, Any]:
    return _report(ws, "drift.json")


def read_noise(ws: Path) -> dict[str, Any]:
    """The noise stage's report ({} before the stage has run)."""
    path = ws / NOISE_REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def read_gate(ws: Path) -> dict[str, Any]:
    """The gate's decision record; a run that reached the gate always leaves one."""
    path = ws / "reports" / "gate.json"
    if not path.is_file():
        raise WorkspaceError(f"{path} is missing: the gate stage did not run")
    return json.loads(path.read_text())


def skipped_decision(drift: dict, champion: dict, skipped: list[str]) -> dict[str, Any]:
    """The record of a run that the trigger policy (`drift.trigger`) stopped after drift."""
    reason = drift.get("retrain_reason", "the trigger policy said no")
    return {
        "decision": "skipped",
        "promote": False,
        "version": None,
        "model_name": champion.get("name"),
        "champion_before": champion.get("version"),
        "champion_after": champion.get("version"),
        "drift_summary": drift.get("summary"),
        "skipped_stages": skipped,
        "checks": [{"name": "trigger", "passed": False, "reason": f"not retrained: {reason}"}],
    }


def _warn(message: str) -> None:
    print(f"ratchet: warning: {message}", file=sys.stderr)


def io_delays() -> list[float]:
    """Pauses between tries of the I/O that follows a run's commit (seconds;
    $RATCHET_IO_RETRY_DELAYS, comma-separated, as the flow's I/O tasks use)."""
    raw = os.environ.get("RATCHET_IO_RETRY_DELAYS", "2,10,30")
    return [float(x) for x in raw.split(",") if x.strip()]


# beside what dvc.yaml names: the store record (`registry.STORE_FILE`), a sweep's report
RUN_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".gitignore", "registry.json",
             "reports/sweep.json")


def pipeline_paths(ws: Path) -> list[Path]:
    """What a run's commit may take: dvc.yaml, dvc.lock, params.yaml and every path a stage
    names (deps, outs, metrics, plots; a `.dvc` file beside one, the `.gitignore` DVC keeps in
    its folder), where it exists or git tracks it. Not `git add -A` of the whole workspace,
    which took whatever else lay there (a `dvc plots show` page, a person's notes)."""
    spec = yaml.safe_load((ws / "dvc.yaml").read_text()) or {}
    named: set[str] = set(RUN_FILES)
    for stage in (spec.get("stages") or {}).values():
        for key in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                for path in (entry if isinstance(entry, dict) else {entry: None}):
                    if "${" not in str(path):
                        named.update({str(path), f"{path}.dvc",
                                      str(Path(path).parent / ".gitignore")})
    params = _params_file(ws)  # the probes file dvc.yaml names through a parameter
    if params.get("evaluate", {}).get("probes"):
        named.add(str(params["evaluate"]["probes"]))
    tracked = set(_names(git(ws, "ls-files", "-z")))
    present = sorted(p for p in named if (ws / p).exists() or p in tracked
                     or any(t.startswith(f"{p}/") for t in tracked))
    # git refuses a named path its ignore rules cover (a DVC-cached output): leave those out
    found = subprocess.run(["git", "check-ignore", "-z", "--stdin"], cwd=ws, text=True,
                           input="\0".join(present), capture_output=True)
    ignored = set(_names(found.stdout)) if found.returncode in (0, 1) else set()
    return [ws / p for p in present if p not in ignored]


def _params_file(ws: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((ws / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _record(ws: Path, message: str) -> str:
    """Push the run's data, then commit it: the step after which the run counts as recorded.

    The commit message ends with the run's trailer (`promotion.trailer`) and the journal is
    marked recorded right after, so nothing undoes the registry from here on: not a failure of
    what follows, not an interrupt, not the next run (which finds the trailer even when the
    run was killed between the commit and the journal). Returns the commit.
    """
    from ratchet.promotion import Journal, trailer

    journal = Journal.of_run(ws)
    if journal is not None:
        message = f"{message}\n\n{trailer(journal.token)}"
    dvc(ws, "push", "-q")  # before the commit: a commit never names data the remote lacks
    commit(ws, message, paths=pipeline_paths(ws), leave=unused_inputs(ws), untrack=True)
    head = git(ws, "rev-parse", "HEAD").strip()
    if journal is not None:
        journal.recorded(head)
    return head


def record_skip(ws: Path, record: dict[str, Any]) -> None:
    """Record a skipped run in git (dvc.lock, the drift report) and push what it produced."""
    from ratchet.promotion import Journal

    _record(ws, f"retrain: skipped ({record['checks'][0]['reason']})")
    journal = Journal.of_run(ws)
    if journal is not None:
        journal.close()  # a skipped run tagged no version: no stamp to do


def finish_run(ws: Path, *, publish: Callable[[], None] | None = None,
               log: Callable[[str], None] = _warn) -> None:
    """Record the run: `publish` (the flow's artifact; best effort, before anything is
    recorded), push data to the remote, commit (dvc.lock, metrics, champion.json), then point
    the version at that commit (`lineage.stamp_commit`).

    Once the commit is made the run is recorded; the stamp is retried, and if it still fails
    that is a warning, never an undo: the version stays `lineage: pending` and the next run
    finishes the stamp (`finish_stamps`).
    """
    from ratchet.promotion import Journal

    g = _report(ws, "gate.json")
    summary = f": {g.get('decision', '?')} (version {g.get('version', '-')})" if g else ""
    if publish is not None:
        publish()
    head = _record(ws, f"retrain{summary}")
    journal = Journal.of_run(ws)
    if _stamp(ws, head, log) and journal is not None:
        journal.close()


def _stamp(ws: Path, head: str, log: Callable[[str], None], *, gate: Path | None = None,
           card: Path | None = None) -> bool:
    """Stamp the version with `head`, retried; a warning (False) when it still fails."""
    from ratchet.lineage import stamp_commit

    delays = io_delays()
    for attempt in range(len(delays) + 1):
        try:
            stamp_commit(ws, gate or ws / GATE_REPORT, card or ws / MODEL_CARD, commit=head)
            return True
        except Exception as err:  # noqa: BLE001 - the run is recorded; this must not undo it
            if attempt == len(delays):
                log(f"the run is recorded in commit {head[:12]}, but pointing its model "
                    f"version at that commit failed ({type(err).__name__}: "
                    f"{str(err).strip()[:300]}); the version's lineage stays `pending` and "
                    f"the next run finishes the stamp")
                return False
            time.sleep(delays[attempt])
    return False


def stamp_lineage(ws: Path) -> dict[str, Any] | None:
    """The version's `git_commit` tag and logged card, once the run's commit and data exist."""
    from ratchet.lineage import stamp_commit

    return stamp_commit(ws, ws / GATE_REPORT, ws / MODEL_CARD)


def finish_stamps(ws: Path, log: Callable[[str], None] = _warn) -> list[str]:
    """Finish the lineage stamps of recorded runs whose stamp failed (see `finish_run`), from
    the gate report and card of each run's own commit; returns the commits stamped."""
    from ratchet.promotion import Journal

    done = []
    for journal in Journal.unstamped(ws):
        head = journal.recorded_commit or ""
        with tempfile.TemporaryDirectory(prefix="ratchet-stamp-") as tmp:
            files = {}
            for key, path in (("gate", GATE_REPORT), ("card", MODEL_CARD)):
                files[key] = Path(tmp) / path.name
                with suppress(WorkspaceError):  # not in that commit: nothing to stamp from it
                    files[key].write_text(git(ws, "show", f"{head}:{path.as_posix()}"))
            if _stamp(ws, head, log, gate=files["gate"], card=files["card"]):
                journal.close()
                done.append(head)
    return done


def apply_overrides(ws: Path, overrides: dict[str, dict[str, Any]]) -> None:
    """Merge `{section: {key: value}}` into the workspace's params.yaml, validated first.

    The new params are committed with the run that uses them, so the version they produce
    names a commit that reproduces it.
    """
    path = ws / "params.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise WorkspaceError(f"override `{section}` must map keys to values, got {values!r}")
        raw.setdefault(section, {}).update(values)
    parse_params(raw, "params overrides")  # refuse a bad key before touching the file
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(raw, sort_keys=False))


_HELD: set[tuple[str, int]] = set()  # (lock file, thread) pairs this process holds


@contextmanager
def retrain_lock(ws: Path, *, timeout: float | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """One retrain at a time per workspace: an exclusive lock on `.ratchet/retrain.lock`.

    A second trigger (a schedule, an event, a person) waits for the first to finish instead of
    racing it over `dvc.lock`, the models and the aliases. The OS drops the lock when its holder
    dies, so a killed run never leaves the workspace locked. `timeout` (seconds) turns the wait
    into an error; None waits as long as it takes.
    """
    import fcntl

    path = ws / ".ratchet" / "retrain.lock"
    held = (str(path.resolve()), threading.get_ident())
    if held in _HELD:  # this thread holds it (the flow's `batch` ingests inside its run)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another run"
            if on_wait is not None:
                on_wait(f"waiting for the retrain in progress ({holder}) to finish")
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise WorkspaceError(
                            f"{ws}: a retrain is still running ({holder}) after {timeout:.0f} s"
                        ) from None
                    time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        _HELD.add(held)
        try:
            yield
        finally:
            _HELD.discard(held)
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def recover(ws: Path, *, reason: str) -> dict[str, Any] | None:
    """Undo what an unfinished run left in the registry, from its journal (see
    `promotion.undo`), if there is one.

    Called when a run fails, from the flow's failure hooks, and at the start of the next run for
    a run that was killed before it could clean up. Its gate report goes too, so the gate stage
    runs again instead of DVC replaying a decision about a version that no longer exists.
    """
    from ratchet import promotion
    from ratchet.registry import connect

    journals = promotion.Journal.unfinished(ws)
    if not journals:
        return None
    if not any(j.touched() for j in journals):  # failed before its gate: nothing to undo
        for journal in journals:
            journal.close()
        return None
    params = load_params(ws / "params.yaml")
    undone = promotion.recover(connect(params.registry, ws), ws, reason=reason)
    if undone and (undone["deleted_versions"] or undone["reverted_moves"]):
        (ws / GATE_REPORT).unlink(missing_ok=True)
    return undone


@contextmanager
def run_guard(ws: Path, *, log: Callable[[str], None] = print) -> Iterator[str]:
    """Bracket a retrain (inside `retrain_lock`): on any failure, including Ctrl-C, what the run
    did to the registry is undone (its alias moves and the versions it registered; see
    `promotion.undo`), and nothing anyone else did meanwhile.

    Yields the run's token, which the stages inherit in $RATCHET_RUN_TOKEN: the gate tags its
    MLflow run with it and finds the run's journal by it.
    """
    import uuid

    from ratchet.promotion import Journal
    from ratchet.registry import RUN_TOKEN_ENV

    # Outputs an earlier version committed (an interrupted repro took back their .gitignore
    # entries) would stop the first stage with `already tracked by SCM`: out of git first.
    if (ws / ".dvc").is_dir():
        repair_lockfile(ws, log=log)
        guard_outputs(ws, log=log)
        from ratchet.offline import install_plots_template

        try:  # `dvc plots show` reads offline; a page that needs a CDN is no reason to stop
            install_plots_template(ws)
        except Exception as err:  # noqa: BLE001
            log(f"`dvc plots show` keeps DVC's own page (it loads vega from a CDN): {err}")
    leftover = recover(ws, reason="an earlier retrain stopped before it was recorded")
    if leftover is not None:
        log(f"an earlier retrain was killed mid-run; undone in the registry: {leftover}")
    for head in finish_stamps(ws, log):
        log(f"an earlier run's model version now points at its commit {head[:12]}")
    params = load_params(ws / "params.yaml")
    token = uuid.uuid4().hex
    journal = Journal.begin(ws, token, params.registry.model_name)
    previous = os.environ.get(RUN_TOKEN_ENV)
    os.environ[RUN_TOKEN_ENV] = token
    try:
        yield token
    except BaseException as err:
        why = f"the retrain failed: {type(err).__name__}: {err}"
        recorded = journal.recorded_commit
        if recorded is not None:  # `unfinished` skips it: an undo here is impossible
            log(f"the run is recorded in commit {recorded[:12]}, and nothing of it is undone; "
                f"what failed after that: {type(err).__name__}: {err}")
            raise
        try:
            undone = recover(ws, reason=why[:1000])
            if undone:
                log(f"retrain failed; undone in the registry: {undone}")
        except Exception as undo_err:  # noqa: BLE001 - the run's own error matters more
            log(f"retrain failed, and undoing it failed too ({undo_err}); "
                f"the next run retries the undo")
        raise
    else:
        if journal.recorded_commit is None:  # else kept until its stamp is done
            journal.close()
    finally:
        if previous is None:
            os.environ.pop(RUN_TOKEN_ENV, None)
        else:
            os.environ[RUN_TOKEN_ENV] = previous


UNCHANGED = "unchanged"  # a run's record key: no stage had anything to do, nothing was decided


def run_pipeline(ws: Path, *, full: bool = False) -> dict[str, Any]:
    """The pipeline through DVC alone (no Prefect): refresh champion, `dvc repro`, record.

    Like the flow, it stops after the drift stage when the trigger policy says not to retrain.
    `full`: retrain from base this time (`ratchet run --full`).
    """
    ws = require(ws)
    check_batches(ws)
    start = time.perf_counter()
    say = lambda msg: print(f"ratchet: {msg}", file=sys.stderr)  # noqa: E731
    with retrain_lock(ws, on_wait=say), run_guard(ws, log=say):
        champion = refresh_champion(ws, full=full)
        if not changed_stages(ws) and (ws / "reports" / "gate.json").is_file():
            record = read_gate(ws) | {UNCHANGED: True}  # the last run's, not a new decision
            record.update(timings={}, wall_s=time.perf_counter() - start)
            return record
        repro(ws, "drift", upstream=True)
        drift = read_drift(ws)
        if drift.get("retrain", True) is False:
            stages = stage_names(ws)
            record = skipped_decision(drift, champion, stages[stages.index("drift") + 1 :])
            record_skip(ws, record)
        else:
            repro(ws)
            record = read_gate(ws)
            finish_run(ws, log=lambda msg: say(f"warning: {msg}"))
    record.update(timings={}, wall_s=time.perf_counter() - start)
    return record
