"""The `ratchet` command line: init, ingest, run, status, labels, promote, rollback, history,
demo."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ratchet.errors import RatchetError, WorkspaceError

app = typer.Typer(
    help="ratchet: continual fine-tuning of text classifiers that only ever moves forward.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # paths in errors stay whole

WorkspaceOpt = Annotated[
    Path, typer.Option("--workspace", "-w", help="Workspace directory.", show_default=True)
]


class Engine(StrEnum):
    prefect = "prefect"
    dvc = "dvc"


def _print_version(on: bool) -> None:
    if on:
        from importlib.metadata import version

        typer.echo(f"ratchet {version('ratchet')}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="On a failure, print the full traceback (the pipeline "
                     "stages' too) instead of one line and a log."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=lambda on: _print_version(on),
                     help="Print ratchet's version and exit."),
    ] = False,
) -> None:
    """ratchet: continual fine-tuning of text classifiers that only ever moves forward."""
    from ratchet.runtime import DEBUG_ENV

    if debug:
        os.environ[DEBUG_ENV] = "1"  # the stages (DVC's children) inherit it


class _Tee(io.TextIOBase):
    """A text stream that also copies what is written to a log file."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        self._log.flush()
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):  # noqa: D401 - the wrapped stream's
        return getattr(self._stream, "encoding", "utf-8")


# Commands whose progress (everything they print, and warnings logged) goes to their log too.
LOGGED = {"run", "demo"}


def _click():
    """The click that typer runs on: typer 0.2x vendors its own (`typer._click`)."""
    try:
        import typer._click as click
        import typer._click.globals  # noqa: F401 - the submodule, for get_current_context
    except ImportError:  # an older typer, on click itself
        import click
        import click.globals  # noqa: F401
    return click


def _command() -> tuple[Path | None, str]:
    """The workspace (if the command names one that exists) and the command's name."""
    try:
        ctx = _click().globals.get_current_context(silent=True)
        given = ctx.params.get("workspace_dir") or ctx.params.get("path")
        ws = Path(given).resolve() if given is not None else None
    except Exception:  # noqa: BLE001 - no context: the log goes to the temp folder
        return None, "ratchet"
    return (ws if ws is not None and (ws / "params.yaml").is_file() else None), ctx.info_name


@contextmanager
def _progress_log(ws: Path | None, what: str) -> Iterator[Path | None]:
    """For `run` and `demo`: a log file in the workspace that gets what the command prints."""
    import logging
    import sys

    from ratchet.runtime import log_file

    if what not in LOGGED or ws is None:
        yield None
        return
    path = log_file(ws, what)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"ratchet {' '.join(sys.argv[1:])} (pid {os.getpid()}, {time.ctime()})\n")
        handler = logging.StreamHandler(fh)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, fh), _Tee(err, fh)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = out, err
            logging.getLogger().removeHandler(handler)


def _log_traceback(ws: Path | None, what: str, err: BaseException, log: Path | None) -> Path:
    import traceback

    from ratchet.runtime import log_file

    log = log or log_file(ws, what)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("".join(traceback.format_exception(err)))
    return log


@contextmanager
def user_errors():
    """Every failure as one `error:` line, exit non-zero: the project's own errors as they are,
    Ctrl-C as `error: interrupted` (exit 130), anything else as `error: <type>: <message>
    (details: <log>)` with the traceback in that log (`.ratchet/logs/` of the workspace, else a
    `ratchet-logs` temp folder); with `--debug`, the traceback is printed instead."""
    from rich.markup import escape

    from ratchet.runtime import debug, disk_full, one_line, setup

    setup()
    ws, what = _command()
    with _progress_log(ws, what) as log:
        try:
            yield
        except (typer.Exit, typer.Abort, _click().ClickException):
            raise
        except KeyboardInterrupt:
            where = f" (log: {log})" if log else ""
            err_console.print(f"[bold red]error:[/] interrupted{where}", markup=True,
                              highlight=False)
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - every failure becomes one line (and a log)
            full = None if isinstance(err, RatchetError) else disk_full(
                err, Path(getattr(err, "filename", None) or ws or Path.cwd()))
            known = err if isinstance(err, RatchetError) else full
            if debug():
                raise
            if known is not None:
                if log is not None:
                    _log_traceback(ws, what, err, log)
                where = f" (log: {log})" if log else ""
                err_console.print(f"[bold red]error:[/] {escape(str(known))}{where}",
                                  markup=True, highlight=False)
                raise typer.Exit(1) from None
            path = _log_traceback(ws, what, err, log)
            err_console.print(f"[bold red]error:[/] {escape(one_line(err))} (details: {path})",
                              markup=True, highlight=False)
            raise typer.Exit(1) from None


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Directory to make the workspace in.")] = Path("."),
    model: Annotated[
        str | None, typer.Option(help="model.source: minilm-l6, tiny or a path.")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="registry.tracking_uri, e.g. http://mlflow:5000 (default: a SQLite "
                          "store in the workspace)."),
    ] = None,
    dvc_remote: Annotated[
        str | None,
        typer.Option(help="Default DVC remote, e.g. s3://ratchet/dvc (default: a local folder "
                          "under .ratchet/)."),
    ] = None,
    dvc_endpoint: Annotated[
        str | None,
        typer.Option(help="S3 endpoint of --dvc-remote for MinIO or another S3-compatible "
                          "server, e.g. http://minio:9000."),
    ] = None,
) -> None:
    """Make a workspace: git + DVC (a remote) + params + probes + MLflow store.

    Example: ratchet init /workspace --tracking-uri http://mlflow:5000 \\
        --dvc-remote s3://ratchet/dvc --dvc-endpoint http://minio:9000
    """
    from ratchet import workspace

    with user_errors():
        if dvc_endpoint and not dvc_remote:
            raise WorkspaceError("--dvc-endpoint needs --dvc-remote")
        overrides: dict[str, dict[str, Any]] = {}
        if model:
            overrides["model"] = {"source": model}
        if tracking_uri:
            overrides["registry"] = {"tracking_uri": tracking_uri}
        ws = workspace.init(path, overrides or None, dvc_remote=dvc_remote,
                            dvc_endpoint=dvc_endpoint)
        console.print(f"workspace ready at [bold]{ws}[/]; next: `ratchet ingest FILE -w {path}`")
        if model == "tiny":
            console.print(
                "[yellow]note:[/] `tiny` is a randomly initialised 2-layer BERT for tests and "
                "benchmarks: it has learned no language, and with the default params it "
                "predicts one class (the gate then rejects it as collapsed). For real data use "
                "the default `minilm-l6` or a local model folder.", highlight=False)


@app.command()
def ingest(
    file: Annotated[
        Path, typer.Argument(help="A .csv, .jsonl or .parquet file of text,label[,domain].")
    ],
    workspace_dir: WorkspaceOpt = Path("."),
    text_col: Annotated[str, typer.Option(help="Source column holding the text.")] = "text",
    label_col: Annotated[str, typer.Option(help="Source column holding the label.")] = "label",
    domain_col: Annotated[
        str | None,
        typer.Option(help="Source column holding the domain (default: `domain` if present)."),
    ] = None,
    id_col: Annotated[
        str | None, typer.Option(help="Source column holding a row id (default: `id` if present).")
    ] = None,
    timestamp_col: Annotated[
        str | None,
        typer.Option(help="Source column holding a timestamp (default: `timestamp` if present)."),
    ] = None,
    group_col: Annotated[
        str | None,
        typer.Option(help="Source column naming each row's group (a conversation, a writer): "
                     "a group's rows stay in one split (default: `group` if present)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate and show what would happen; change nothing."
        ),
    ] = False,
) -> None:
    """Validate a file and add it as a new immutable batch; a bad file is refused whole.

    The batch id is `<sequence>-<content hash>`: the same content twice is one batch.

    A refused file is copied with report.md and report.json to data/quarantine/.

    Exit code: 0 when the batch is (or would be) added or was already there; 1 when refused.
    """
    from ratchet import workspace
    from ratchet.data import ColumnMap

    with user_errors():
        columns = ColumnMap(text=text_col, label=label_col, domain=domain_col, id=id_col,
                            timestamp=timestamp_col, group=group_col)
        try:
            res = workspace.ingest(workspace_dir, file, columns, dry_run=dry_run,
                                   on_wait=lambda msg: err_console.print(msg, highlight=False))
        except RatchetError:
            if dry_run:
                err_console.print("dry run: nothing was changed or quarantined", highlight=False)
            raise
        if res.created:
            verb = "added as"
        elif res.path.exists():
            verb = "already ingested as"
        else:
            verb = "would be added as"
        prefix = "dry run: " if res.dry_run else ""
        console.print(f"{prefix}{file.name}: {res.rows} rows {verb} batch [bold]{res.batch_id}[/]"
                      + ("; nothing changed" if "already" in verb else ""), highlight=False)
        if res.redacted:
            console.print(f"  {res.redacted} row(s) had personal data replaced by placeholders",
                          highlight=False)
        for w in res.warnings:
            console.print(f"  [yellow]warning:[/] {w}", highlight=False)


def _run(ws: Path, engine: Engine, full: bool = False) -> dict[str, Any]:
    from ratchet import workspace
    from ratchet.config import load_params
    from ratchet.registry import connect

    ws = workspace.require(ws)  # before a Prefect server starts for nothing
    # A config error or a missing batch is one line now, not a traceback after a server start.
    params = load_params(ws / "params.yaml")
    workspace.check_batches(ws)
    connect(params.registry, ws)  # a deleted or replaced store (see registry.check_store)
    if engine is Engine.prefect:
        from flows.retrain import run_once

        return run_once(ws, full=full)
    return workspace.run_pipeline(ws, full=full)


@app.command()
def run(
    workspace_dir: WorkspaceOpt = Path("."),
    engine: Annotated[
        Engine, typer.Option(help="prefect: the `retrain` flow; dvc: dvc only.")
    ] = Engine.prefect,
    full: Annotated[
        bool, typer.Option("--full", help="Retrain from base this time, whatever "
                           "`finetune.init` would choose (the gate record says so).")
    ] = False,
) -> None:
    """Retrain once: refresh the champion, run the stages, gate the candidate."""
    import signal

    def terminated(signum, _frame):
        # SIGTERM as Ctrl-C: the run stops its stage, undoes and exits (by default Python
        # would die at once, leaving the stage, dvc and the temporary Prefect server running).
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with user_errors():
            gate = _run(workspace_dir.resolve(), engine, full)
            _print_gate(gate)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_gate(gate: dict[str, Any]) -> None:
    if gate.get("unchanged"):
        console.print(
            "nothing to run: no stage's inputs changed since the last run (no new batch, "
            f"params or champion); that run's decision stands: {gate.get('decision', '?')} "
            f"(version {gate.get('version') or '(none)'}, champion "
            f"{gate.get('champion_after') or '(none)'}). `ratchet status` shows every version.",
            highlight=False)
        return
    console.print(
        f"decision: [bold]{gate['decision']}[/] (version {gate.get('version') or '(none)'}, "
        f"champion {gate.get('champion_before') or '(none)'} -> "
        f"{gate.get('champion_after') or '(none)'})"
    )
    for c in gate.get("checks", []):
        mark = ("[red]FAIL[/]" if not c["passed"] else
                "[yellow]WARN[/]" if c.get("warning") else "[green]ok[/]")
        console.print(f"  {mark} {c['reason']}", highlight=False)


def _registry(workspace_dir: Path) -> tuple[Any, str]:
    """The workspace's MLflow client and model name, as every registry command needs them."""
    from ratchet import workspace
    from ratchet.config import load_params
    from ratchet.registry import connect

    ws = workspace.require(workspace_dir)
    params = load_params(ws / "params.yaml")
    return connect(params.registry, ws), params.registry.model_name


def _wide() -> Console:
    """The console for tables: when the output is not a terminal (a pipe, a CI log), the width
    `COLUMNS` asks for, else a readable 150 rather than the 80 of a pipe."""
    if console.is_terminal:
        return console
    asked = os.environ.get("COLUMNS", "")
    return Console(width=int(asked) if asked.isdigit() and int(asked) > 0 else
                   max(console.width, 150))


@app.command()
def status(workspace_dir: WorkspaceOpt = Path(".")) -> None:
    """Show the champion and the gate decisions of every registered version."""
    from ratchet.promotion import record_manual_moves
    from ratchet.registry import CHAMPION, alias_history, registered_model

    with user_errors():
        client, name = _registry(workspace_dir)
        record_manual_moves(client, name, workspace_dir.resolve())  # a move made in the UI
        model = registered_model(client, name)
        versions = client.search_model_versions(f"name = '{name}'") if model else []
        aliases: dict[str, list[str]] = {}
        for alias, v in (model.aliases if model else {}).items():
            aliases.setdefault(str(v), []).append(alias)
        table = Table(title=f"{name}: {len(versions)} version(s)")
        from ratchet.continual import INIT_TAG

        for col in ("version", "aliases", "decision", "trained", "vs", "created", "reasons"):
            table.add_column(col, overflow="fold")
        for mv in sorted(versions, key=lambda v: int(v.version)):
            tags = mv.tags or {}
            table.add_row(
                str(mv.version),
                ", ".join(aliases.get(str(mv.version), [])),
                tags.get("decision", "?"),
                tags.get(INIT_TAG, "-"),  # full | continual (`finetune.init`)
                tags.get("compared_with", "-").replace("None", "-"),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
                "\n".join(_short(r) for r in _deciding(tags)),
            )
        _wide().print(table)
        champion = next((v for v, names in aliases.items() if CHAMPION in names), None)
        if champion is not None:
            console.print(_champion_line(alias_history(client, name), champion), highlight=False)
        from ratchet.floor import stored

        pool = stored(client, name)
        if pool:
            shown = ", ".join(f"{m['version']} ({m.get('macro_f1', float('nan')):.4f})"
                              for m in pool)
            console.print(f"floor (best served, {pool[0].get('slice', 'reference')} macro-F1 "
                          f"of their last run): {shown}", highlight=False)
        from ratchet.workspace import read_noise

        noise = read_noise(workspace_dir.resolve())
        if noise.get("summary"):
            mark = "[bold red]label noise:[/]" if noise.get("flagged") else "label noise:"
            console.print(f"{mark} {noise['summary']}"
                          + (" (`ratchet labels` to review)" if noise.get("flagged") else ""),
                          highlight=False)


def _champion_line(events: list[dict[str, Any]], champion: str) -> str:
    """One line on how the champion got where it is, from the last logged move (no writes)."""
    from ratchet.registry import CHAMPION

    last = next((e for e in reversed(events) if e["alias"] == CHAMPION), None)
    if last is None or last.get("to") != champion:
        return (f"champion {champion}: moved outside ratchet and not yet recorded "
                "(`ratchet history` records it)")
    who = last["by"] if last.get("actor") is None else f"{last['by']}, {last['actor']}"
    return f"champion {champion} since {_when(last)} ({who}): {_short(last.get('reason', ''))}"


def _when(event: dict[str, Any]) -> str:
    return str(event.get("time", "?")).replace("T", " ").replace("Z", " UTC")


ReasonOpt = Annotated[
    str,
    typer.Option(
        "--reason", "-r", help="Why; required, and kept with the move in `ratchet history`."
    ),
]


def _print_failed(mv: Any) -> None:
    """Warn before serving a version the gate rejected, with the checks it failed."""
    tags = mv.tags or {}
    decision = tags.get("decision")
    if decision == "rejected":
        err_console.print(f"[yellow]warning:[/] the gate rejected version {mv.version}:",
                          highlight=False)
        for reason in _deciding(tags):
            err_console.print(f"  - {reason}", highlight=False)
    elif decision is None:
        err_console.print(f"[yellow]warning:[/] version {mv.version} has no gate decision",
                          highlight=False)


def _print_move(event: dict[str, Any]) -> None:
    console.print(
        f"{event['alias']}: {event.get('from')} -> [bold]{event['to']}[/] "
        f"(history #{event['seq']}, by {event['by']} as {event.get('actor')})",
        highlight=False,
    )


def _move_champion(client, name: str, version: str, current: str | None, reason: str, *,
                   workspace_dir: Path, rollback: bool = False) -> None:
    """Move `champion` by hand, warning about a version the gate rejected; a no-op when it is
    already there.

    Compare-and-set against `current` (what the person saw) under the registry lock: a gate or
    another person promoting meanwhile is waited for (seconds), and if they moved `champion`,
    nothing is overwritten and the error says where it is now.
    """
    from ratchet.promotion import move_alias
    from ratchet.registry import CHAMPION, model_version

    mv = model_version(client, name, version)
    if current == str(mv.version):
        console.print(f"version {current} is already the champion; nothing changed")
        return
    _print_failed(mv)
    waited = lambda msg: err_console.print(f"{msg} ...", highlight=False)  # noqa: E731
    _print_move(move_alias(client, name, CHAMPION, str(mv.version), ws=workspace_dir.resolve(),
                           by="cli", reason=reason, expected=current, rollback=rollback,
                           on_wait=waited))


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The registered model version to serve.")],
    reason: ReasonOpt,
    workspace_dir: WorkspaceOpt = Path("."),
) -> None:
    """Point `champion` at VERSION by hand, overriding the gate, and record why.

    Any registered version; one the gate rejected is promoted with a warning listing its failures.

    Compare-and-set: a promotion in progress (a run's gate, another person's) is waited for, and
    if it moved `champion` from the version seen here, nothing is overwritten (exit 1).

    Example: ratchet promote 3 --reason "v4 mislabels refunds in production"
    """
    from ratchet.registry import CHAMPION, alias_target

    with user_errors():
        client, name = _registry(workspace_dir)
        _move_champion(client, name, version, alias_target(client, name, CHAMPION), reason,
                       workspace_dir=workspace_dir)


@app.command()
def rollback(
    reason: ReasonOpt,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Version to go back to (default: the champion before the current one, by the "
            "history).",
        ),
    ] = None,
    workspace_dir: WorkspaceOpt = Path("."),
) -> None:
    """Move `champion` back to the previous champion (or --to VERSION), and record why.

    Rolling back again goes further back; a move made in the MLflow UI can be rolled back too.

    Example: ratchet rollback --reason "latency doubled after the last promotion"
    """
    from ratchet.promotion import record_manual_moves
    from ratchet.registry import CHAMPION, alias_history, alias_target, rollback_target

    with user_errors():
        client, name = _registry(workspace_dir)
        # The default target is read from a complete history.
        record_manual_moves(client, name, workspace_dir.resolve())
        current = alias_target(client, name, CHAMPION)
        target = to if to is not None else rollback_target(alias_history(client, name), current)
        _move_champion(client, name, target, current, reason, workspace_dir=workspace_dir,
                       rollback=True)


class AliasChoice(StrEnum):
    champion = "champion"
    challenger = "challenger"
    all = "all"


@app.command()
def history(
    alias: Annotated[
        AliasChoice, typer.Option(help="Show the moves of this alias only, or of all of them.")
    ] = AliasChoice.all,
    workspace_dir: WorkspaceOpt = Path("."),
) -> None:
    """Every alias move: when, from, to, by the gate, by hand (`cli`) or outside ratchet.

    A move made elsewhere (e.g. in the MLflow UI) is found and recorded here as `manual`.

    MLflow keeps no time or author for an alias move: a manual move's time is when it was noticed.
    """
    from ratchet.promotion import record_manual_moves
    from ratchet.registry import alias_history

    with user_errors():
        client, name = _registry(workspace_dir)
        record_manual_moves(client, name, workspace_dir.resolve())
        events = [e for e in alias_history(client, name)
                  if alias is AliasChoice.all or e["alias"] == alias.value]
        if not events:
            console.print(f"{name}: no alias moves recorded yet")
            return
        table = Table(title=f"{name}: alias moves", caption=_history_caption(events))
        for col in ("seq", "when (UTC)", "alias", "from -> to", "by", "actor", "reason"):
            table.add_column(col, overflow="fold")
        for e in events:
            manual = e["by"] == "manual"
            by = "[yellow]manual*[/]" if manual else e["by"] + (" (rollback)" if e.get("rollback")
                                                               else "")
            table.add_row(
                str(e["seq"]),
                _when(e).removesuffix(" UTC") + ("*" if manual else ""),
                e["alias"],
                f"{e.get('from') or '-'} -> {e.get('to') or '(removed)'}",
                by,
                e.get("actor") or f"? (noticed by {e.get('detected_by', '?')})",
                e.get("reason", ""),
            )
        _wide().print(table)


def _history_caption(events: list[dict[str, Any]]) -> str | None:
    if not any(e["by"] == "manual" for e in events):
        return None
    return ("* moved outside ratchet; MLflow keeps no time or author for an alias move, so the "
            "time is when ratchet noticed")


def _deciding(tags: dict[str, str]) -> list[str]:
    """The reasons that decided: the failed checks, else the comparisons that passed."""
    if tags.get("failed"):
        return tags["failed"].split(" | ")
    reasons = [r for r in tags.get("reasons", "").split(" | ") if r]
    key = [r for r in reasons if r.startswith(("recent", "reference", "weighted", "no champion"))]
    return key or reasons


labels_app = typer.Typer(
    help="Label noise: each batch's estimated share of wrong labels, its suspect rows, and your "
    "review (accept or drop).",
    no_args_is_help=False,
)
app.add_typer(labels_app, name="labels")


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


@labels_app.callback(invoke_without_command=True)
def labels(
    ctx: typer.Context,
    workspace_dir: WorkspaceOpt = Path("."),
    batch: Annotated[
        str | None, typer.Option("--batch", "-b", help="Show this batch's suspect rows (an id "
                                 "or its unique prefix, e.g. 0003).")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="Suspect rows to show, lowest label quality first (0: all).")
    ] = 20,
) -> None:
    """List each batch's estimated label noise; with --batch, its suspect rows.

    A batch is flagged when its estimate is far above the champion's own on held-out rows (at
    cold start: above noise.max_rate). A flagged batch's suspect rows stay out of val and test
    (and of training with noise.train: exclude) until you decide:

      ratchet labels accept BATCH   the labels are right: rows used as normal, no longer flagged

      ratchet labels drop BATCH     the suspect rows leave every split

    The decision goes to labels-review.yaml (committed); the next `ratchet run` applies it.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ratchet import workspace
    from ratchet.noise import read_review

    with user_errors():
        ws = workspace.require(workspace_dir)
        report = workspace.read_noise(ws)
        reviews = read_review(ws / workspace.LABELS_REVIEW)
        if batch is not None:
            _print_suspects(ws, workspace.find_batch(ws, batch), report, limit)
            return
        ids = workspace.batch_ids(ws)
        if not ids:
            console.print("no batches yet: `ratchet ingest FILE` first")
            return
        entries = report.get("batches", {})
        table = Table(title="label noise per batch (cleanlab on out-of-sample probabilities)")
        for col in ("batch", "rows", "judged", "est. issues", "champion's own", "suspects",
                    "method", "judged by", "flagged", "review"):
            table.add_column(col, overflow="fold")
        for b in ids:
            e = entries.get(b)
            if e is None:
                table.add_row(b, "-", "-", "-", "-", "-", "not yet (run the pipeline)", "-", "-",
                              reviews.get(b, "-"))
                continue
            flagged = "[red]yes[/]" if e["flagged"] and e.get("review") is None else (
                "yes" if e["flagged"] else "no")
            table.add_row(b, str(e["rows"]), str(e["judged"]), _pct(e["rate"]),
                          _pct(e["baseline"]), str(e["suspects"]), e["method"],
                          f"v{e['champion']}" if e.get("champion") else "-", flagged,
                          e.get("review") or "-")
        _wide().print(table)
        if report.get("summary"):
            console.print(f"newest: {report['summary']}", highlight=False)


def _print_suspects(ws: Path, batch_id: str, report: dict[str, Any], limit: int) -> None:
    import pandas as pd

    from ratchet import workspace
    from ratchet.data import BATCH

    entry = report.get("batches", {}).get(batch_id)
    path = ws / workspace.NOISE_SUSPECTS
    if entry is None or not path.is_file():
        console.print(f"batch {batch_id}: not judged yet (run the pipeline: `ratchet run`)")
        return
    from ratchet.config import load_params
    from ratchet.noise import summary

    console.print(summary(batch_id, entry, load_params(ws / "params.yaml").noise),
                  highlight=False)
    rows = pd.read_parquet(path)
    rows = rows[rows[BATCH] == batch_id].sort_values("quality", kind="stable")
    shown = rows if limit <= 0 else rows.head(limit)
    table = Table(title=f"batch {batch_id}: {len(rows)} suspect row(s)"
                  + (f", the {len(shown)} least likely labels" if len(shown) < len(rows) else ""))
    for col in ("text", "given label", "suggested", "label quality"):
        table.add_column(col, overflow="fold")
    for r in shown.itertuples(index=False):
        table.add_row(str(r.text), str(r.label), str(r.suggested), f"{r.quality:.3f}")
    _wide().print(table)


def _review(workspace_dir: Path, batch: str, decision: str) -> None:
    from ratchet import workspace
    from ratchet.noise import read_review, write_review

    with user_errors():
        ws = workspace.require(workspace_dir)
        batch_id = workspace.find_batch(ws, batch)
        path = ws / workspace.LABELS_REVIEW
        reviews = read_review(path)
        if reviews.get(batch_id) == decision:
            console.print(f"batch {batch_id}: already reviewed `{decision}`; nothing changed")
            return
        reviews[batch_id] = decision
        write_review(path, reviews)
        workspace.commit(ws, f"labels: {decision} batch {batch_id}")
        console.print(f"batch {batch_id}: `{decision}` recorded in {workspace.LABELS_REVIEW}; "
                      "the next `ratchet run` applies it", highlight=False)


BatchArg = Annotated[str, typer.Argument(help="Batch id, or its unique prefix (e.g. 0003).")]


@labels_app.command("accept")
def labels_accept(batch: BatchArg, workspace_dir: WorkspaceOpt = Path(".")) -> None:
    """The batch's labels are right: its rows are used as normal and it is no longer flagged."""
    _review(workspace_dir, batch, "accept")


@labels_app.command("drop")
def labels_drop(batch: BatchArg, workspace_dir: WorkspaceOpt = Path(".")) -> None:
    """Remove the batch's suspect rows from every split (they stay listed in the report)."""
    _review(workspace_dir, batch, "drop")


@app.command()
def serve(
    workspace_dir: WorkspaceOpt = Path("."),
    interval: Annotated[
        float, typer.Option(min=0.5, help="Seconds between two scans of data/incoming/.")
    ] = 5.0,
    cron: Annotated[
        str,
        typer.Option(help='Cron schedule (UTC) of the `retrain` deployment; "" for none.'),
    ] = "0 2 * * *",
    watch: Annotated[
        bool,
        typer.Option("--watch/--no-watch",
                     help="Watch data/incoming/ and emit `ratchet.batch.landed` per new file."),
    ] = True,
) -> None:
    """Serve the workspace's deployments on a running Prefect server until Ctrl-C.

    `retrain/<workspace name>` runs on the --cron schedule; `on-batch-landed/<workspace name>`
    runs for each `ratchet.batch.landed` event of this workspace: it ingests the file named in
    the event, then retrains if the file became a new batch. One run at a time.

    The watcher emits the event for each new file in data/incoming/ once its size stopped
    changing between two scans; dotfiles and .tmp/.part files are ignored, and emitted files
    are remembered in .ratchet/watch.json (a restart does not emit them again).

    Needs `prefect server start` and PREFECT_API_URL (e.g. http://127.0.0.1:4200/api).

    Example: ratchet serve -w ws --cron "0 2 * * *" --interval 10
    """
    with user_errors():
        from flows.landed import serve_workspace

        serve_workspace(workspace_dir, cron=cron or None, interval=interval, watch=watch)


@app.command()
def watch(
    workspace_dir: WorkspaceOpt = Path("."),
    interval: Annotated[
        float, typer.Option(min=0.5, help="Seconds between two scans of data/incoming/.")
    ] = 5.0,
) -> None:
    """Only the watcher of `ratchet serve`: emit `ratchet.batch.landed` for each new file in
    data/incoming/, for deployments served by a work pool (`prefect deploy`, infra/).

    Needs PREFECT_API_URL (the server the deployments' triggers live on). Runs until Ctrl-C.
    """
    import threading

    from prefect.settings import PREFECT_API_URL

    from ratchet import workspace
    from ratchet.watch import Watcher

    with user_errors():
        ws = workspace.require(workspace_dir)
        if not PREFECT_API_URL.value():
            raise WorkspaceError("`ratchet watch` sends events to a Prefect server: set "
                                 "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
        console.print(f"watching {ws / workspace.INCOMING} every {interval:g} s (Ctrl-C stops)")
        stop = threading.Event()
        try:
            Watcher(ws).run(stop, interval)
        except KeyboardInterrupt:
            stop.set()


MARKER = ".ratchet-demo"


@app.command()
def demo(
    workspace_dir: Annotated[
        Path,
        typer.Option(
            "--workspace",
            "-w",
            help="Where to build the demo workspace (recreated if it is a previous demo).",
        ),
    ] = Path("demo-workspace"),
    model: Annotated[str, typer.Option(help="model.source for the demo.")] = "minilm-l6",
    scale: Annotated[float, typer.Option(help="Multiplies the synthetic batch sizes.")] = 1.0,
    engine: Annotated[
        Engine, typer.Option(help="Run each retrain through Prefect or DVC only.")
    ] = Engine.prefect,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
) -> None:
    """Run the whole story on synthetic data: cold start, drift, label noise, a malformed batch."""
    with user_errors():
        rows = run_demo(workspace_dir, model=model, scale=scale, engine=engine, seed=seed)
        print_story(rows)
        console.print(
            f"\nworkspace: {workspace_dir.resolve()}  —  try `ratchet status -w "
            f"{workspace_dir}` or `cd {workspace_dir} && mlflow ui "
            "--backend-store-uri sqlite:///mlflow.db`"
        )


def run_demo(
    ws: Path,
    *,
    model: str,
    scale: float,
    engine: Engine | Sequence[Engine],
    seed: int,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Build a fresh demo workspace and play the four batches; one result row per batch.

    Args:
        engine: one engine for every batch, or one per batch (the last repeats), e.g. to show
            that a workspace retrained by `dvc repro` and by the Prefect flow is one history.
    """
    from ratchet import workspace
    from ratchet.demo_data import all_labels, demo_batches, demo_probes, write_batch
    from ratchet.errors import BatchRefused

    ws = ws.resolve()
    if ws.exists() and any(ws.iterdir()):
        if not (ws / MARKER).exists():
            raise WorkspaceError(
                f"{ws} exists and is not a previous demo; choose another --workspace"
            )
        shutil.rmtree(ws)
    settings = {
        "model": {"source": model},
        "data": {"labels": all_labels(), "require_domain": True},
    }
    for section, values in (overrides or {}).items():
        settings.setdefault(section, {}).update(values)
    workspace.init(ws, settings, probes=demo_probes(seed))
    (ws / MARKER).write_text("made by `ratchet demo`; the next demo may delete this folder\n")
    engines = [engine] if isinstance(engine, Engine) else list(engine)
    rows = []
    for i, batch in enumerate(demo_batches(seed=seed, scale=scale), start=1):
        path = write_batch(batch, ws / workspace.INCOMING)
        console.rule(f"batch {i}: {batch.filename} — {batch.story}")
        row: dict[str, Any] = {
            "batch": batch.filename,
            "story": batch.story,
            "rows": len(batch.frame),
        }
        try:
            workspace.ingest(ws, path)
        except BatchRefused as err:
            row.update(decision="refused at ingest", reasons=err.problems)
            rows.append(row)
            console.print(f"[red]refused:[/] {err}", highlight=False)
            continue
        run_engine = engines[min(i, len(engines)) - 1]
        gate = _run(ws, run_engine)
        noise = workspace.read_noise(ws)
        row.update(
            engine=str(run_engine),
            gate=gate,
            noise={**noise.get("batches", {}).get(noise.get("newest"), {}),
                   "flagged": bool(noise.get("flagged")), "summary": noise.get("summary")},
            decision=gate["decision"],
            version=gate.get("version"),
            reasons=[c["reason"] for c in gate["checks"] if not c["passed"]]
            or [c["reason"] for c in gate["checks"]][-2:],
        )
        rows.append(row)
        _print_gate(gate)
    (ws / "reports").mkdir(exist_ok=True)
    (ws / "reports" / "demo.json").write_text(json.dumps(rows, indent=2, default=str))
    workspace.commit(ws, "demo: the story's results")
    return rows


def _pair(m: dict[str, float], name: str) -> str:
    cand = m.get(f"candidate/{name}/macro_f1")
    champ = m.get(f"champion/{name}/macro_f1")
    if cand is None or cand != cand:
        return "-"
    if champ is None:
        return f"{cand:.3f} vs -"
    return f"{cand:.3f} vs {champ:.3f}"


def _noise_cell(noise: dict[str, Any]) -> str:
    """The demo table's label-noise cell: the estimate, against what, and the verdict."""
    if noise.get("rate") is None:
        return "-"
    against = (f" vs {noise['baseline']:.0%}" if noise.get("baseline") is not None
               else " (cross-val.)")
    return f"{noise['rate']:.0%}{against}" + (": FLAGGED" if noise.get("flagged") else "")


def _short(text: str, limit: int = 70) -> str:
    """At most `limit` characters, cut at a word (never inside a number) and marked `…`."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:(") + "…"


def print_story(rows: list[dict[str, Any]]) -> None:
    """The story in two tables: the decisions, then where the time went.

    Cells stay short (the full reasons and drift numbers are printed above each batch's run);
    when the output is not a terminal, e.g. a CI log, the tables get a readable width.
    """
    out = _wide()
    table = Table(title="ratchet demo: candidate vs champion (macro-F1)", show_lines=True)
    for col in ("batch", "rows", "drift", "label noise", "recent", "reference", "decision",
                "reasons"):
        table.add_column(col, overflow="fold")
    for r in rows:
        gate = r.get("gate", {})
        m = gate.get("metrics", {})
        drift = str(gate.get("drift_summary") or "-").split(":")[0]
        if "gate" in r:
            failed = [c["reason"] for c in gate.get("checks", []) if not c["passed"]]
            reasons = failed or [c["reason"] for c in gate.get("checks", [])
                                 if c["name"] in {"recent", "reference", "cold_start"}]
        else:  # refused at ingest: what each failed expectation found (not its name)
            reasons = [p.split(": ", 1)[-1].split("; e.g.")[0] for p in r.get("reasons", [])]
        table.add_row(
            r["batch"],
            str(r["rows"]),
            drift,
            _noise_cell(r.get("noise") or {}),
            _pair(m, "recent"),
            _pair(m, "reference"),
            f"{r['decision']}" + (f" (v{r['version']})" if r.get("version") else ""),
            "\n".join(_short(x) for x in reasons),
        )
    out.print(table)
    timed = [r for r in rows if r.get("gate", {}).get("timings")]
    if not timed:
        return
    stages = list(timed[0]["gate"]["timings"])
    times = Table(title="seconds per stage (Prefect task wall time)")
    for col in ("batch", *stages, "total"):
        times.add_column(col, justify="left" if col == "batch" else "right")
    for r in timed:
        t = r["gate"]["timings"]
        times.add_row(r["batch"], *(f"{t.get(s, 0):.0f}" for s in stages),
                      f"{r['gate'].get('wall_s', sum(t.values())):.0f}")
    out.print(times)


if __name__ == "__main__":
    app()
