"""Lineage, quickly: the data hashes a stage reads from dvc.lock in a real DVC pipeline run
twice, and a version pointed at the commit that records its run (a real workspace, MLflow store
and DVC remote). The whole story, with fresh clones and `dvc exp run`: tests/e2e/test_lineage.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ratchet import workspace
from ratchet.workspace import tool_env
from tests.conftest import REPO, save_tiny_classifier

TRAIN = ("import pathlib, yaml; n = yaml.safe_load(open('params.yaml'))['train']['n']; "
         "p = pathlib.Path('models/candidate'); p.mkdir(parents=True, exist_ok=True); "
         "(p / 'w.txt').write_text(str(n) + open('data/batches/b.txt').read())")
# What the gate stage does with dvc.lock while it runs, written out to compare.
GATE = ("import json, pathlib; from tasks.gate import data_hashes; "
        "pathlib.Path('reports').mkdir(exist_ok=True); "
        "pathlib.Path('reports/hashes.json').write_text("
        "json.dumps(data_hashes(pathlib.Path('dvc.lock'))))")


def _dvc(repo: Path, *args: str) -> str:
    env = {**tool_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_gate_reads_this_runs_hashes_from_dvc_lock_not_its_own_stale_entry(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data/batches").mkdir(parents=True)
    (repo / "data/batches/b.txt").write_text("batch one")
    (repo / "params.yaml").write_text("train:\n  n: 1\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "finetune": {"cmd": f'python -c "{TRAIN}"', "params": ["train"],
                     "deps": ["data/batches"], "outs": ["models/candidate"]},
        "gate": {"cmd": f'python -c "{GATE}"', "deps": ["models/candidate"],
                 "outs": [{"reports/hashes.json": {"cache": False}}]},
    }}))
    workspace.git(repo, "init", "-q", "-b", "main")
    _dvc(repo, "init", "-q")
    _dvc(repo, "add", "-q", "data/batches")
    seen = []
    for n in (1, 2):
        (repo / "params.yaml").write_text(f"train:\n  n: {n}\n")
        if n == 2:
            (repo / "data/batches/c.txt").write_text("batch two")
            _dvc(repo, "add", "-q", "data/batches")
        _dvc(repo, "repro", "-q")
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        [out] = lock["finetune"]["outs"]
        [batches] = lock["finetune"]["deps"]
        hashes = json.loads((repo / "reports/hashes.json").read_text())
        assert hashes["models/candidate"] == out["md5"], f"run {n}"
        assert hashes["data/batches"] == batches["md5"], f"run {n}"
        seen.append(out["md5"])
    assert seen[0] != seen[1]


def test_finish_run_points_the_version_at_the_commit_that_records_the_run(tmp_path):
    """The gate can only tag the run's parent; once the run is committed (on both the flow's
    and `run_pipeline`'s path: `finish_run`), the version and its logged card name the run's
    own commit, which holds the params the run used."""
    import mlflow.artifacts

    from ratchet.config import load_params
    from ratchet.gate import Decision
    from ratchet.registry import connect, log_candidate
    from tasks.gate import model_card

    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    params = load_params(ws / "params.yaml")
    name = params.registry.model_name
    client = connect(params.registry, ws)
    parent = workspace.git(ws, "rev-parse", "HEAD").strip()
    # The run changed params.yaml (`ratchet run --set`, a flow override), then the gate ran.
    workspace.apply_overrides(ws, {"finetune": {"epochs": 2.0}})
    card = ws / "reports/eval/model_card.md"  # where the gate writes it
    card.parent.mkdir(parents=True)
    card.write_text(model_card(params, name, "rejected", Decision(False, []), {}, val={},
                               drift={}, evaluated={}, lock=ws / "dvc.lock"))
    model = tmp_path / "model"
    save_tiny_classifier(model, ["a", "b"])
    run_id, version = log_candidate(model, name=name, params={}, metrics={}, artifacts=[card],
                                    run_tags={"fingerprint": "f"}, model_card=card)
    client.set_model_version_tag(name, version, "git_commit", parent)
    (ws / "reports/gate.json").write_text(json.dumps({
        "decision": "rejected", "version": version, "run_id": run_id, "model_name": name}))

    workspace.finish_run(ws)

    head = workspace.git(ws, "rev-parse", "HEAD").strip()
    assert head != parent
    assert yaml.safe_load(workspace.git(ws, "show", f"{head}:params.yaml"))["finetune"][
        "epochs"] == 2.0
    tags = client.get_model_version(name, version).tags
    assert tags["git_commit"] == head and tags["lineage"] == "recorded"
    assert client.get_run(run_id).data.tags["git_commit"] == head
    for where, path in (("run", "reports/model_card.md"), ("run top", "model_card.md")):
        logged = Path(client.download_artifacts(run_id, path, str(tmp_path / where)))
        assert f"- Code: git commit `{head}`" in logged.read_text(), where
    served = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}",
                                                      dst_path=str(tmp_path / "served")))
    assert f"git commit `{head}`" in (served / "artifacts/model_card.md").read_text()
    # The workspace's card is as the gate wrote it (DVC's hash of it stays true), committed.
    assert f"git commit `{head}`" not in card.read_text()
    assert not workspace.git(ws, "status", "--porcelain").strip()
    workspace.finish_run(ws)  # a retried record step changes nothing
    assert workspace.git(ws, "rev-parse", "HEAD").strip() == head
    assert client.get_model_version(name, version).tags["git_commit"] == head


def test_a_runs_commit_takes_the_pipelines_files_not_whatever_lies_in_the_workspace(tmp_path):
    """The run's commit holds what the stages name (params, dvc.lock, metrics, reports, the
    champion file); a person's notes stay untracked and `dvc plots show`'s page is ignored."""
    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    workspace.apply_overrides(ws, {"finetune": {"epochs": 2.0}})
    (ws / "metrics").mkdir(exist_ok=True)
    (ws / "metrics" / "validation.json").write_text('{"batches": 1}')
    (ws / "notes.txt").write_text("try a lower learning rate next week\n")
    (ws / "dvc_plots").mkdir()
    (ws / "dvc_plots" / "index.html").write_text("<html>plots</html>")
    workspace._record(ws, "retrain: test")
    committed = set(workspace.git(ws, "show", "--name-only", "--format=", "HEAD").split())
    assert {"params.yaml", "metrics/validation.json"} <= committed
    assert not {"notes.txt", "dvc_plots/index.html"} & committed
    status = workspace.git(ws, "status", "--porcelain", "--ignored")
    assert "?? notes.txt" in status and "!! dvc_plots/" in status
