"""The demo story, end to end and real, in a temporary workspace with the tiny model.

By default one workspace is retrained through both engines in turn: batch 1 (cold start) and
batch 3 (label noise) through the Prefect flow `retrain` against a real ephemeral Prefect
server, batch 2 (a new domain) through `dvc repro` alone. Both engines run the same DVC stages,
so one history must come out: the same champion, versions, tags and a DVC pipeline that is up
to date afterwards. The whole story through each engine alone is the same test with the `slow`
mark (`make test-all`): together they take longer than the ten-minute budget of `make test`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ratchet.cli import Engine, run_demo
from ratchet.config import load_params
from ratchet.registry import CHALLENGER, CHAMPION, alias_history, connect
from ratchet.workspace import tool_env
from tests.conftest import TINY

MIXED = [Engine.prefect, Engine.dvc, Engine.prefect]
STORY: dict[str, Any] = {}  # the mixed story's workspace and rows, for the browser check


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True,
                          env=tool_env()).stdout


@pytest.mark.e2e
@pytest.mark.parametrize("engines", [
    pytest.param(MIXED, id="prefect+dvc"),
    pytest.param([Engine.dvc] * 3, id="dvc", marks=pytest.mark.slow),
    pytest.param([Engine.prefect] * 3, id="prefect", marks=pytest.mark.slow),
])
def test_story(tmp_path, prefect_server, engines):
    ws = tmp_path / "ws"
    rows = run_demo(ws, model="tiny", scale=0.5, engine=engines, seed=0, overrides=TINY)
    assert [r.get("engine") for r in rows] == [str(e) for e in engines] + [None]
    assert_story(ws, rows)
    assert_dvc_views(ws)
    assert_no_leakage(ws, rows)
    assert_prefect_runs(ws, [r for r, e in zip(rows, engines, strict=False)
                             if e is Engine.prefect])
    if engines == MIXED:
        assert_trigger_skips(ws, rows)
        STORY.update(ws=ws, rows=rows)


@pytest.mark.e2e
def test_the_storys_pages_read_in_a_browser_with_no_network(tmp_path):
    """After the story, as its user would look, in headless Chromium that resolves no host name:
    the Data Docs list every validation, styled; `dvc plots show` draws every curve and shows
    every PNG; the champion's page in a local MLflow UI shows the gate's tables, their cells
    apart. Screenshots are left in this test's tmp_path."""
    from tests.browser import INSTALL_HINT, Browser, chromium
    from tests.integration import servers

    if "ws" not in STORY:
        pytest.skip("the story did not run to its end here: no workspace to look at")
    executable = chromium()
    if executable is None:
        pytest.skip(INSTALL_HINT)
    ws, rows = STORY["ws"], STORY["rows"]
    landed = [p.stem for p in (ws / "data" / "batches").glob("*.parquet")]

    def remote(urls: list[str]) -> list[str]:
        return [u for u in urls if not u.startswith(("file:", "data:", "blob:", "about:",
                                                     "http://127.0.0.1:"))]

    with Browser(executable) as page:
        # Data Docs: every landed batch's validation listed, Bootstrap's styles and jQuery on.
        page.open((ws / "reports/validation/docs/index.html").as_uri(),
                  until="document.readyState === 'complete'")
        links = page.eval("[...document.querySelectorAll('tr.clickable-row')]"
                          ".map(r => r.dataset.href)")
        validations = [x for x in links if x.startswith("validations/")]
        assert len(validations) == len(landed) >= 3, links
        assert all(any(batch in x for x in validations) for batch in landed), (landed, links)
        assert "Segoe UI" in page.eval("getComputedStyle(document.body).fontFamily")
        assert page.eval("typeof jQuery === 'function' && !!jQuery.fn.tab")
        assert "Font Awesome 6 Free" in page.eval(  # the status icons' font, loaded
            "(async () => { await document.fonts.ready; return [...document.fonts]"
            ".filter(f => f.status === 'loaded').map(f => f.family) })()")
        assert not remote(page.requests), page.requests
        page.screenshot(tmp_path / "data-docs.png")
        page.open((ws / "reports/validation/docs" / validations[0]).as_uri(),
                  until="document.readyState === 'complete'")
        assert page.eval("document.querySelectorAll('table tr').length") > 5
        assert not remote(page.requests), page.requests

        # dvc plots show: a drawn vega view per CSV plot, every PNG loaded.
        subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=ws, check=True,
                       capture_output=True, env=tool_env())
        import yaml

        plots = [p for stage in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"].values()
                 for p in stage.get("plots", [])]
        curves = sum(1 for p in plots if next(iter(p)).endswith(".csv"))
        images = sum(1 for p in plots if next(iter(p)).endswith(".png"))
        assert curves >= 2 and images >= 2
        page.open((ws / "dvc_plots" / "index.html").as_uri(), until=(
            f"document.querySelectorAll('.vega-embed').length >= {curves} && "
            "[...document.images].every(i => i.complete)"), timeout=60)
        drawn = page.eval("[...document.querySelectorAll('.vega-embed')]"
                          ".map(v => v.querySelectorAll('canvas, svg.marks').length)")
        assert len(drawn) == curves and all(drawn), drawn  # a vega view drawn per CSV plot
        assert page.eval("[...document.images].filter(i => i.naturalWidth > 0).length") == images
        assert not remote(page.requests), page.requests
        page.screenshot(tmp_path / "dvc-plots.png")

        # The champion's version page in `mlflow server` on the workspace's own store.
        port = servers.free_port()
        params = load_params(ws / "params.yaml")
        ui = servers.start("mlflow ui", [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
            f"sqlite:///{ws / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"], url=f"http://127.0.0.1:{port}", env=tool_env(),
            log=tmp_path / "mlflow.log", cwd=ws)
        try:
            servers.wait_ready(ui, "/health", 120)
            champion = rows[1]["gate"]["version"]
            page.open(f"{ui.url}/#/models/{params.registry.model_name}/versions/{champion}",
                      until="document.querySelectorAll("
                            "'[data-testid=note-editor-preview-content] table').length >= 2",
                      timeout=90)
            tables = page.eval(
                "[...document.querySelectorAll('[data-testid=note-editor-preview-content] table')]"
                ".map(t => [...t.rows].map(r => [...r.cells].map(c => c.textContent)))")
            page.screenshot(tmp_path / "mlflow-version.png")
        finally:
            servers.stop(ui)
    checks, slices = tables[0], tables[1]
    assert [c.strip() for c in checks[0]] == ["check", "passed", "reason"]
    assert {"recent", "reference", "weighted", "min_score"} <= {r[0].strip() for r in checks}
    assert [r[0].strip() for r in slices[1:5]] == ["all", "recent", "reference", "weighted"]
    for row in checks + slices:  # cells apart: an em space ends each but the last
        assert all(cell.endswith("\u2003") for cell in row[:-1] if cell.strip()), row


def assert_prefect_runs(ws: Path, rows: list[dict[str, Any]]) -> None:
    """Each Prefect retrain completed and left a markdown decision linking its version."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs()
                if r.name and r.parameters.get("workspace_dir") == str(ws.resolve())]
        assert len(runs) == len(rows) and all(r.state.is_completed() for r in runs)
        every = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs]),
        )) if runs else []
        arts = [a for a in every if a.key == "gate-decision"]
        # Each stage's own lines are in its task run's log, not only "Finished in state".
        for run in runs:
            tasks = {t.name: t.id for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))}
            logs, page = [], None
            while page is None or len(page) == 200:  # the API serves 200 at a time
                page = client.read_logs(log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200,
                    offset=len(logs))
                logs += page
            by_task: dict[Any, list[str]] = {}
            for entry in logs:
                by_task.setdefault(entry.task_run_id, []).append(entry.message)
            assert {"validate", "drift"} <= set(tasks), tasks
            for stage in {"validate", "drift", "evaluate", "gate"} & set(tasks):
                lines = by_task.get(tasks[stage], [])
                assert f"Running stage '{stage}':" in lines, (stage, lines)
                assert any(line.startswith(f"{stage}: ") and "done in" in line
                           for line in lines), (stage, lines)
    # Beside the markdown: the metrics as a table and a link to the MLflow version.
    for run in runs:  # (Prefect stores a link artifact as markdown: the link is checked below)
        kinds = {(a.key, a.type) for a in every if a.flow_run_id == run.id}
        assert ("gate-metrics", "table") in kinds and "model-version" in dict(kinds), kinds
    links = [a for a in every if a.key == "model-version"]
    for row in rows:
        name = row["gate"]["model_name"]
        assert any(f"/#/models/{name}/versions/{row['version']}" in str(a.data)
                   for a in links), [a.data for a in links]
    texts = sorted(a.data for a in arts)
    assert len(texts) == len(rows)
    for row in rows:
        name = row["gate"]["model_name"]
        assert any(f"Gate decision: **{row['decision']}**" in t
                   and f"models:/{name}/{row['version']}" in t
                   and "Data Docs: `reports/validation/docs/index.html`" in t for t in texts), texts


def assert_story(ws: Path, rows: list[dict[str, Any]]) -> None:
    """Promoted after batches 1 and 2, rejected after 3, batch 4 refused with nothing landed."""
    assert [r["decision"] for r in rows] == ["promoted", "promoted", "rejected",
                                            "refused at ingest"], [r.get("reasons") for r in rows]
    g1, g2, g3 = (r["gate"] for r in rows[:3])
    assert g1["champion_before"] is None and g1["champion_after"] == g1["version"]
    assert g2["champion_before"] == g1["version"] and g2["champion_after"] == g2["version"]
    assert g2["drift_summary"].startswith("DRIFT")
    assert g3["champion_after"] == g2["version"]
    assert {c["name"] for c in g3["checks"] if not c["passed"]} & {"recent", "reference",
                                                                    "label_noise"}
    # The recent gain after the new domain is real, by the bootstrap's lower bound.
    assert g2["metrics"]["diff/recent/macro_f1_low"] > 0.01
    # Every check of the rule ran on a run with a champion, on both models' numbers.
    names = {c["name"] for c in g2["checks"]}
    assert {"min_score", "label_noise", "latency", "invariance_casing", "invariance_typos",
            "probes", "recent", "reference", "weighted"} <= names, names
    for key in ("champion/weighted/macro_f1", "test/weighted/p_value", "mcnemar/recent/p_value",
                "candidate/latency/p95_ms_bs32", "candidate/size/mb", "champion/all/ece"):
        assert key in g2["metrics"], key
    assert (ws / "reports" / "eval" / "confusion_candidate.png").is_file()
    assert "## Gate decision" in (ws / "reports" / "eval" / "model_card.md").read_text()

    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    name = params.registry.model_name
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == sorted([g1["version"], g2["version"], g3["version"]])
    model = client.get_registered_model(name)
    assert str(model.aliases[CHAMPION]) == g2["version"]
    assert str(model.aliases[CHALLENGER]) == g3["version"]
    # Every alias move was the gate's, in order, and recorded in the registry.
    moves = [(e["alias"], e["from"], e["to"], e["by"]) for e in alias_history(client, name)
             if e["alias"] == CHAMPION]
    assert moves == [(CHAMPION, None, g1["version"], "gate"),
                     (CHAMPION, g1["version"], g2["version"], "gate")]
    commits = set(_git(ws, "log", "--format=%H").split())
    for gate in (g1, g2, g3):
        tags = versions[gate["version"]].tags
        assert tags["decision"] == gate["decision"] and tags["reasons"]
        assert tags["git_commit"] in commits
        assert re.fullmatch(r"[0-9a-f]{32}\.dir", tags["data_hash.data/batches"])
        assert re.fullmatch(r"[0-9a-f]{32}\.dir", tags["data_hash.models/candidate"])
        assert tags["fingerprint"] == gate["fingerprint"] and tags["params_hash"]
        assert tags["validation"] == "passed"
        assert tags["data_docs"] == "reports/validation/docs/index.html"
        docs = client.list_artifacts(gate["run_id"], "reports/docs")
        assert any(a.path.endswith("index.html") for a in docs)
        # One run per retrain, named after its batch, spanning every stage that ran for it,
        # with the candidate's run as its child.
        run = client.get_run(gate["run_id"])
        parent = client.get_run(gate["retrain_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.info.run_name == f"retrain {tags['finetune.batch']}"
        assert parent.data.tags["decision"] == gate["decision"]
        assert parent.info.start_time < run.info.start_time
        assert parent.info.end_time >= run.info.end_time and parent.info.status == "FINISHED"
        assert {"stage/finetune/seconds", "stage/evaluate/cpu_seconds", "stage/gate/seconds",
                "evaluate/f1"} <= set(parent.data.metrics), parent.data.metrics
        assert parent.data.metrics["stage/finetune/seconds"] < (
            parent.info.end_time - parent.info.start_time) / 1000
    # Each version trained on different data: the batch hashes differ.
    assert len({versions[g["version"]].tags["data_hash.data/batches"] for g in (g1, g2, g3)}) == 3

    commits_before = _git(ws, "log", "--format=%H")
    # Batch 4 left no trace: no batch file, no commit, no model version.
    assert len(list((ws / "data" / "batches").glob("*.parquet"))) == 3
    assert "04-malformed" not in _git(ws, "log", "--format=%s")
    assert not _git(ws, "status", "--porcelain").strip()
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, capture_output=True,
                            text=True, check=True, env=tool_env())
    assert "up to date" in status.stdout
    # A run with nothing new says so; it does not reprint the last decision as a new one.
    from typer.testing import CliRunner

    from ratchet.cli import app

    again = CliRunner().invoke(app, ["run", "-w", str(ws), "--engine", "dvc"])
    assert again.exit_code == 0, again.output
    assert again.output.startswith("nothing to run: no stage's inputs changed")
    assert f"decision stands: {g3['decision']} (version {g3['version']}" in again.output
    assert "decision:" not in again.output and _git(ws, "log", "--format=%H") == commits_before

    # The champion is a pyfunc that serves labels and probabilities.
    import mlflow.pyfunc
    import pandas as pd

    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    out = served.predict(pd.DataFrame({"text": ["file a claim for my car", "wake me up at 6 am"]}))
    assert list(out.columns) == ["label", "score", "probabilities"]
    assert all(abs(sum(p) - 1) < 1e-4 for p in out["probabilities"])


def assert_dvc_views(ws: Path) -> None:
    """What a DVC user sees: every stage's metrics file holds numbers only and
    `dvc metrics show` of it fits a 100-column terminal; so does `dvc metrics diff` against the
    previous run's commit."""
    import json

    import yaml

    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    files = [next(iter(m)) if isinstance(m, dict) else m
             for stage in stages.values() for m in stage.get("metrics", [])]
    assert len(files) == 7, files

    from tests.unit.test_headline import numbers_only

    for path in files:
        data = json.loads((ws / path).read_text())
        assert data and numbers_only(data), (path, data)
    runs = _git(ws, "log", "--format=%h", "--", "metrics/eval.json").split()
    assert len(runs) >= 2
    # DVC's own commands, side by side (each start costs a second or two)
    commands = [["metrics", "show", path] for path in files] + [
        ["metrics", "diff", runs[1], "--all"]]
    procs = [subprocess.Popen([sys.executable, "-m", "dvc", *c], cwd=ws, env=tool_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate()
        assert proc.returncode == 0, (command, err)
        assert command[2] in out or command[1] == "diff", (command, out)
        assert "metrics/eval.json" in out or command[1] == "show", (command, out)
        assert max(map(len, out.splitlines())) <= 100, (command, out)


def assert_no_leakage(ws: Path, rows: list[dict[str, Any]]) -> None:
    """No text (by the test's own key: case, width, spacing, punctuation ignored) of val or test
    is in train or among the augmented rows, and each version records its split scheme."""
    import json

    import pandas as pd

    from tests.unit.test_leakage import same_text

    prepared = ws / "data" / "prepared"
    held = {same_text(t) for s in ("val", "test")
            for t in pd.read_parquet(prepared / f"{s}.parquet")["text"]}
    trained = pd.concat([pd.read_parquet(prepared / "train.parquet")["text"],
                         pd.read_parquet(ws / "data" / "augmented" / "train.parquet")["text"]])
    assert not {same_text(t) for t in trained} & held
    augment = json.loads((ws / "reports" / "augment" / "metrics.json").read_text())
    assert augment["leak/checked"] == 1 and augment["leak/dropped"] >= 0
    params = load_params(ws / "params.yaml")
    client = connect(params.registry, ws)
    scheme = params.prepare.scheme()
    for row in rows[:3]:
        mv = client.get_model_version(params.registry.model_name, row["version"])
        assert json.loads(mv.tags["split_scheme"]) == scheme
    assert json.loads((ws / "champion.json").read_text())["split_scheme"] == scheme


def assert_trigger_skips(ws: Path, rows: list[dict[str, Any]]) -> None:
    """A small batch under `drift.trigger.mode: rows` stops after drift: no version, no move."""
    import random

    import yaml

    from ratchet import workspace
    from ratchet.demo_data import OLD_DOMAINS, make_rows

    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["drift"]["trigger"] = {"mode": "rows", "min_new_rows": 10_000}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    small = make_rows(random.Random(99), OLD_DOMAINS, 40, set())
    small.to_csv(ws / "data" / "incoming" / "05-small.csv", index=False)
    workspace.ingest(ws, ws / "data" / "incoming" / "05-small.csv")
    record = workspace.run_pipeline(ws)
    assert record["decision"] == "skipped" and record["version"] is None
    assert "rows" in record["checks"][0]["reason"]
    assert record["skipped_stages"][-1] == "gate"
    assert record["champion_after"] == rows[1]["version"]
    p = load_params(ws / "params.yaml")
    client = connect(p.registry, ws)
    assert len(client.search_model_versions(f"name = '{p.registry.model_name}'")) == 3
    assert "retrain: skipped" in _git(ws, "log", "-1", "--format=%s")
    assert not _git(ws, "status", "--porcelain").strip()
