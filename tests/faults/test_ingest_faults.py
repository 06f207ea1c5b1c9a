"""Faults around ingest and the workspace's own records, on real git, DVC and MLflow stores:
three ingests at once, batch files deleted by hand, the store deleted or replaced, params.yaml
emptied or truncated, a config error before any server starts."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ratchet import workspace
from ratchet.demo_data import all_labels, demo_batches
from ratchet.workspace import tool_env

RATCHET = Path(sys.executable).with_name("ratchet")


def make_ws(root: Path) -> Path:
    """A real workspace on the tiny model with the demo's labels declared."""
    return workspace.init(root / "ws", {"model": {"source": "tiny"},
                                        "data": {"labels": all_labels()}})


@functools.cache
def _template(root: Path) -> tuple[Path, list[Path]]:
    ws = make_ws(root)
    files = csv_files(root, 3)
    for f in files[:2]:
        workspace.ingest(ws, f)
    return ws, files


def copy_ws(tmp_path: Path, tmpl: Path) -> tuple[Path, list[Path]]:
    """A copy of a workspace with two real ingested batches (made once: `init` and two
    ingests take seconds), its DVC remote repointed at the copy's own folder."""
    src, files = _template(tmpl)
    ws = tmp_path / "ws"
    shutil.copytree(src, ws, symlinks=True)
    config = ws / ".dvc" / "config"
    config.write_text(config.read_text().replace(str(src), str(ws)))
    git(ws, "commit", "-qm", "test: the copy's own DVC remote", "--", ".dvc/config")
    return ws, [Path(shutil.copy(f, tmp_path)) for f in files]


@pytest.fixture(scope="module")
def tmpl(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("template")


def csv_files(root: Path, n: int) -> list[Path]:
    """n small CSV files with distinct demo rows (no text in two of them)."""
    frame = demo_batches(seed=0, scale=0.1)[0].frame.sample(frac=1.0, random_state=0)
    size = len(frame) // n
    files = []
    for i in range(n):
        path = root / f"part{i + 1}.csv"
        frame.iloc[i * size:(i + 1) * size].to_csv(path, index=False)
        files.append(path)
    return files


def ratchet(*args: str, cwd: Path | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    env = tool_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return subprocess.run([str(RATCHET), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def git(ws: Path, *args: str) -> str:
    return workspace.git(ws, *args)


def recorded_batches(ws: Path, rev: str = "HEAD") -> list[str]:
    """The files data/batches.dvc at `rev` records, from its DVC .dir manifest in the cache."""
    dvc_file = yaml.safe_load(git(ws, "show", f"{rev}:data/batches.dvc"))
    md5 = dvc_file["outs"][0]["md5"]
    assert md5.endswith(".dir")
    manifest = ws / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    return sorted(e["relpath"] for e in json.loads(manifest.read_text())
                  if e["relpath"].endswith(".parquet"))


@pytest.mark.slow  # three real CLI processes, serialized by the lock (~30-60 s)
def test_three_concurrent_ingests_get_three_numbers_and_three_commits(tmp_path):
    ws = make_ws(tmp_path)
    files = csv_files(tmp_path, 3)
    env = tool_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([str(RATCHET), "ingest", str(f), "-w", str(ws)], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for f in files]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs

    names = sorted(p.name for p in (ws / "data" / "batches").glob("*.parquet"))
    assert [n[:4] for n in names] == ["0001", "0002", "0003"], names  # no reuse, no skip
    assert len({n[5:] for n in names}) == 3  # three distinct contents

    subjects = git(ws, "log", "--format=%s").splitlines()
    ingests = [s for s in subjects if s.startswith("ingest ")]
    assert len(ingests) == 3, subjects
    for name in names:  # each commit names one batch, each batch one commit
        assert sum(Path(name).stem in s for s in ingests) == 1, (name, ingests)
    assert recorded_batches(ws) == names
    assert workspace.dvc(ws, "status", "data/batches.dvc").strip() in (
        "", "Data and pipelines are up to date.")
    assert not git(ws, "status", "--porcelain", "--", "data").strip()


# --- a batch file deleted by hand ----------------------------------------------------------------


def _two_batches(tmp_path: Path, tmpl: Path) -> tuple[Path, list[Path], list[Path]]:
    ws, files = copy_ws(tmp_path, tmpl)
    return ws, files, sorted((ws / "data" / "batches").glob("*.parquet"))


def test_an_ingest_after_a_batch_file_was_deleted_by_hand_refuses_and_names_it(tmp_path, tmpl):
    ws, files, (first, second) = _two_batches(tmp_path, tmpl)
    head = git(ws, "rev-parse", "HEAD")
    first.unlink()
    with pytest.raises(workspace.WorkspaceError) as err:
        workspace.ingest(ws, files[2])
    msg = str(err.value)
    assert first.name in msg and "dvc checkout data/batches" in msg, msg
    assert "\n" not in msg
    # Nothing recorded: no commit, no new batch, data/batches.dvc as it was.
    assert git(ws, "rev-parse", "HEAD") == head
    assert sorted(p.name for p in first.parent.glob("*.parquet")) == [second.name]
    assert recorded_batches(ws) == sorted([first.name, second.name])
    assert not git(ws, "status", "--porcelain", "--", "data/batches.dvc").strip()
    # The restore the message names works, and the next batch gets the next number.
    workspace.dvc(ws, "checkout", "-q", "data/batches")
    assert first.is_file()
    assert workspace.ingest(ws, files[2]).batch_id.startswith("0003-")


def test_a_batch_removed_and_committed_by_hand_never_gives_its_number_again(tmp_path, tmpl):
    """Removed on purpose (file deleted, `dvc add`, commit): the numbers recorded in the
    history of data/batches.dvc are still taken."""
    ws, files, (first, second) = _two_batches(tmp_path, tmpl)
    first.unlink()
    workspace.dvc(ws, "add", "-q", "data/batches")
    git(ws, "commit", "-qam", "drop batch 0001 by hand")
    landed = workspace.ingest(ws, files[2])
    assert landed.batch_id.startswith("0003-"), landed.batch_id  # len+1 would reuse 0002
    assert recorded_batches(ws) == sorted([second.name, landed.path.name])


def test_a_run_with_a_batch_file_deleted_by_hand_refuses_before_any_stage(tmp_path, tmpl):
    ws, _, (first, _second) = _two_batches(tmp_path, tmpl)
    first.unlink()
    with pytest.raises(workspace.WorkspaceError, match=first.name):
        workspace.run_pipeline(ws)
    assert not (ws / "dvc.lock").exists()  # no stage ran
    assert not (ws / "mlflow.db").exists()  # nor did the run reach the registry
    for engine in ("dvc", "prefect"):  # the CLI checks before a Prefect server starts
        res = ratchet("run", "--engine", engine, "-w", str(ws))
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert out.count("error:") == 1 and first.name in out, out
        assert "Traceback" not in out and "prefect" not in out.lower(), out
    assert not (ws / "dvc.lock").exists()


# --- params.yaml emptied or truncated ------------------------------------------------------------


def _ws_files(tmp_path: Path) -> Path:
    """A workspace's dvc.yaml and params.yaml (what load_params reads), as init writes them."""
    shutil.copyfile(workspace.template("dvc.yaml"), tmp_path / "dvc.yaml")
    shutil.copyfile(workspace.template("params.yaml"), tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def _cut_before(path: Path, line: str) -> None:
    """Truncate a file at a line boundary: everything from `line` on is lost."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:lines.index(line)]))


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "{}\n"])
def test_an_empty_params_yaml_is_an_error(tmp_path, text):
    from ratchet.config import ConfigError, load_params

    path = _ws_files(tmp_path)
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"params.yaml is empty.*git checkout params.yaml"):
        load_params(path)


def test_a_params_yaml_truncated_between_sections_names_the_missing_ones(tmp_path):
    from ratchet.config import ConfigError, load_params

    path = _ws_files(tmp_path)
    _cut_before(path, "gate:\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "missing sections gate, registry" in msg and "truncated" in msg, msg
    assert "`git checkout params.yaml`" in msg and "\n" not in msg


def test_a_params_yaml_truncated_inside_a_section_names_the_key_dvc_reads(tmp_path):
    """Cut at a line boundary inside `evaluate`: every section is there, but dvc.yaml
    interpolates ${evaluate.probes}, which DVC reported only mid-run."""
    from ratchet.config import ConfigError, load_params

    path = _ws_files(tmp_path)
    text = path.read_text()
    path.write_text(text.replace(next(ln for ln in text.splitlines(keepends=True)
                                      if ln.lstrip().startswith("probes:")), ""))
    with pytest.raises(ConfigError, match=r"missing `evaluate\.probes`.*git checkout"):
        load_params(path)


def test_a_partial_params_file_outside_a_workspace_still_loads(tmp_path):
    """Stage tests and callers that pass partial params on purpose: only a workspace's
    params.yaml (beside its dvc.yaml) must be complete."""
    from ratchet.config import load_params, parse_params

    (tmp_path / "params.yaml").write_text("model: {source: tiny}\n")
    assert load_params(tmp_path / "params.yaml").model.source == "tiny"
    assert parse_params({"gate": {"min_score": 0.5}}).gate.min_score == 0.5


# --- config errors before any server starts ------------------------------------------------------


def test_a_typo_in_params_yaml_stops_ratchet_run_before_any_server_starts(tmp_path, tmpl):
    ws, _ = copy_ws(tmp_path, tmpl)
    path = ws / "params.yaml"
    path.write_text(path.read_text().replace("  epochs:", "  epochz:", 1))
    res = ratchet("run", "-w", str(ws))  # the Prefect engine, the default
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert out.count("error:") == 1 and "finetune.epochz" in out and "`epochs`" in out, out
    assert "Traceback" not in out
    assert "prefect" not in out.lower(), out  # no server was started to report it
    assert not (ws / "dvc.lock").exists()


# --- the MLflow store deleted or replaced --------------------------------------------------------


def cli(ws: Path, *args: str):
    from typer.testing import CliRunner

    from ratchet.cli import app

    return CliRunner().invoke(app, [*args, "-w", str(ws)], terminal_width=200)


def _store_id(ws: Path) -> str:
    from ratchet.config import load_params
    from ratchet.registry import STORE_TAG, connect

    cfg = load_params(ws / "params.yaml").registry
    client = connect(cfg, ws)
    tag = client.get_experiment_by_name(cfg.experiment).tags[STORE_TAG]
    assert json.loads((ws / "registry.json").read_text())["store_id"] == tag
    return tag


def _refused(ws: Path, found: str, *, processes: bool = False) -> None:
    """status, history and a run each refuse with one error line. `processes`: each a real
    `ratchet` process (a store replaced under this process's open SQLite connection would still
    be read through it; a command is a new process): `status` alone, as every command meets the
    store through the same `connect`."""
    commands = [["status"]] if processes else [["status"], ["history"], ["run", "--engine", "dvc"]]
    for args in commands:
        if processes:
            proc = ratchet(*args, "-w", str(ws))
            code, output = proc.returncode, "\n".join(
                ln for ln in (proc.stdout + proc.stderr).splitlines() if " INFO " not in ln)
        else:
            res = cli(ws, *args)
            code, output = res.exit_code, res.output
        assert code == 1, (args, output)
        errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and len(output.strip().splitlines()) == 1, output
        assert "does not match this workspace's record" in errors[0], errors
        assert f"found {found}" in errors[0] and "restore it" in errors[0], errors
        recorded = json.loads((ws / "registry.json").read_text())["store_id"]
        assert f"store id {recorded};" in errors[0], errors
        assert "Traceback" not in output
    assert not (ws / "dvc.lock").exists()  # the run stopped before any stage


def test_a_deleted_store_is_refused_not_read_as_empty(tmp_path, tmpl):
    ws, _ = copy_ws(tmp_path, tmpl)
    assert cli(ws, "status").exit_code == 0  # the first connect records the store
    recorded = _store_id(ws)
    (ws / "mlflow.db").unlink()
    _refused(ws, "none")
    assert json.loads((ws / "registry.json").read_text())["store_id"] == recorded
    assert not (ws / "mlflow.db").exists()  # no empty store made in its place


def test_a_replaced_store_is_refused(tmp_path, tmpl):
    from mlflow import MlflowClient

    from ratchet.registry import STORE_TAG

    ws, _ = copy_ws(tmp_path, tmpl)
    assert cli(ws, "status").exit_code == 0
    ours = _store_id(ws)
    # Another workspace's store: a real one (a copy, to spare MLflow's migrations) that says
    # it is another.
    other = tmp_path / "other.db"
    shutil.copyfile(ws / "mlflow.db", other)
    client = MlflowClient(f"sqlite:///{other}")
    theirs = "0f1e2d3c-another-store"
    client.set_experiment_tag(client.get_experiment_by_name("ratchet").experiment_id,
                              STORE_TAG, theirs)
    shutil.copyfile(other, ws / "mlflow.db")
    _refused(ws, theirs, processes=True)
    assert json.loads((ws / "registry.json").read_text())["store_id"] == ours


def test_a_workspace_without_a_record_adopts_its_store_and_commits_the_record(tmp_path, tmpl):
    """Workspaces made before the record: the first connect writes it (the store is kept as
    it is), and ratchet's next commit takes it."""
    ws, files = copy_ws(tmp_path, tmpl)
    assert not (ws / "registry.json").exists()
    assert cli(ws, "history").exit_code == 0
    recorded = _store_id(ws)
    workspace.ingest(ws, files[2])
    assert not git(ws, "status", "--porcelain").strip()
    assert json.loads(git(ws, "show", "HEAD:registry.json"))["store_id"] == recorded
    assert cli(ws, "status").exit_code == 0  # the same store: accepted


def test_commands_creating_the_store_at_once_all_succeed(tmp_path):
    """The SQLite store is made on first use, by whichever command comes first; two runs (or a
    run and a `status`) started together on a new workspace both ran MLflow's migrations on
    the same file, and one failed with `duplicate column name`. The fault suite's two
    concurrent runs found it."""
    ws = make_ws(tmp_path)
    assert not (ws / "mlflow.db").exists()
    procs = [subprocess.Popen([str(RATCHET), "status", "-w", str(ws)], env=tool_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in outs] == [0, 0, 0], [err[-600:] for _, _, err in outs]
