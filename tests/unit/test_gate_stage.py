"""The evaluate and gate stages on real tiny models and a real MLflow store: the metrics and
reports they write, and compare-and-set when `champion` moves during the run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ratchet.config import parse_params
from ratchet.registry import CHALLENGER, CHAMPION, connect, current_champion, log_candidate
from ratchet.runtime import write_json
from tests.conftest import save_tiny_classifier

LABELS = ["book_flight", "check_balance", "play_music"]
TEXTS = {
    "book_flight": ["book a flight to paris", "i need a plane ticket to rome",
                    "fly me to tokyo on friday", "find flights to berlin tomorrow"],
    "check_balance": ["what is my checking balance", "how much money is in savings",
                      "show my account balance", "tell me my balance please"],
    "play_music": ["play some jazz music", "put on rock songs", "play my workout playlist",
                   "i want to hear classical music"],
}


def tiny_classifier(path: Path, seed: int, *, touch_unused: bool = False) -> Path:
    """A random-init tiny classifier; `touch_unused` changes a position embedding that short
    texts never reach: same predictions, different weights (a different model)."""
    import torch

    model = save_tiny_classifier(path, LABELS, seed=seed)
    if touch_unused:
        with torch.no_grad():
            model.bert.embeddings.position_embeddings.weight[-1] += 1.0
        model.save_pretrained(path)
    return path


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A stage working directory: params, a test split with two slices, reports."""
    monkeypatch.chdir(tmp_path)
    params = {"model": {"source": "tiny"}, "evaluate": {"bootstrap_resamples": 200,
                                                         "latency_examples": 8,
                                                         "behaviour_rows": 20}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    rows = [{"text": t, "label": lab, "domain": "travel" if lab == "book_flight" else "home",
             "slice": "recent" if i % 2 else "reference"}
            for lab, texts in TEXTS.items() for i, t in enumerate(texts)]
    pd.DataFrame(rows * 3).to_parquet(tmp_path / "test.parquet")
    write_json(tmp_path / "validation.json", {"passed": True, "warnings": []})
    write_json(tmp_path / "drift.json", {"summary": "no drift"})
    (tmp_path / "probes.yaml").write_text("play_music: [play jazz]\nunknown_label: [hi]\n")
    return tmp_path


def _register(ws: Path, params, model_dir: Path) -> str:
    connect(params.registry, ws)
    _, version = log_candidate(model_dir, name=params.registry.model_name, params={},
                               metrics={}, artifacts=[], run_tags={"fingerprint": model_dir.name})
    return version


def test_gate_reevaluates_when_champion_moves_during_the_run(ws):
    from ratchet.registry import alias_history, move_alias
    from ratchet.workspace import fingerprint
    from tasks import evaluate, gate

    params = parse_params(json.loads((ws / "params.yaml").read_text()))
    name = params.registry.model_name
    client = connect(params.registry, ws)
    v1 = _register(ws, params, tiny_classifier(ws / "m1", seed=1))
    client.set_model_version_tag(name, v1, "fingerprint", fingerprint(ws / "m1"))
    move_alias(client, name, CHAMPION, v1, by="cli", reason="first", expected=None)
    v2 = _register(ws, params, tiny_classifier(ws / "m2", seed=2))
    client.set_model_version_tag(name, v2, "fingerprint", fingerprint(ws / "m2"))
    candidate = tiny_classifier(ws / "candidate", seed=2, touch_unused=True)
    write_json(ws / "champion.json", {"name": name, "version": v1})

    m = evaluate.run(params, candidate=candidate, test=ws / "test.parquet",
                     champion=ws / "champion.json", metrics=ws / "eval.json",
                     predictions=ws / "pred.parquet", report=ws / "eval" / "report.json")
    # Both models on every slice, the candidate's measurements, the report and the plot.
    for key in ("n/recent", "n/reference", "n/domain:travel", "champion/recent/macro_f1",
                "diff/recent/macro_f1_low", "test/reference/p_value", "mcnemar/all/p_value",
                "candidate/all/ece", "candidate/latency/best_p95_ms_bs1",
                "candidate/latency/p95_ms_bs32", "candidate/size/parameters",
                "champion/latency/best_p95_ms_bs1", "latency/ratio_bs1",
                "behaviour/candidate/casing", "behaviour/champion/typos",
                "behaviour/candidate/probes"):
        assert key in m, key
    report = json.loads((ws / "eval" / "report.json").read_text())
    assert report["behaviour"]["probes"]["not_applicable"] == ["unknown_label"]
    assert report["new_classes"] == []
    assert (ws / "eval" / "confusion_candidate.png").read_bytes()[:4] == b"\x89PNG"
    preds = pd.read_parquet(ws / "pred.parquet")
    assert {"candidate", "champion", "candidate_score", "champion_score"} <= set(preds.columns)

    # A person moves `champion` to v2 in the MLflow UI while the run is between stages.
    client.set_registered_model_alias(name, CHAMPION, v2)
    curve = ws / "curve.csv"
    pd.DataFrame({"step": [1, 2, 3], "epoch": [1, 1, 2], "loss": [1.5, 1.0, 0.7],
                  "lr": [1e-4, 2e-4, 1e-4], "val_macro_f1": [None, 0.6, 0.8]}).to_csv(curve,
                                                                                  index=False)
    pretrain_curve = ws / "pretrain_curve.csv"
    pd.DataFrame({"step": [1, 2], "loss": [9.0, 8.5], "lr": [1e-3, 5e-4],
                  "perplexity": [None, 40.0]}).to_csv(pretrain_curve, index=False)
    (ws / "finetune.json").write_text(json.dumps({
        "samples_per_s": 120.5, "init": "continual", "init_from": f"champion v{v1}",
        "init_reason": "a routine batch: 1 batch(es) since the last full retrain",
        "batch": "0002-bbbbbbbbbbbb", "new_rows": 40, "replay_rows": 80, "train_rows": 120,
        "stopped_early": False}))
    (ws / "pretrain.json").write_text('{"perplexity_before": NaN, "perplexity_after": 40.0, '
                                      '"enabled": "auto", "trained": 1, "steps": 2}')
    # This retrain's finetune began 5 minutes ago; an earlier retrain's gate ended before it.
    import time

    from ratchet.stage import record_timing

    began = time.time() - 300
    record_timing("gate", began - 600, 20.0, ws)
    record_timing("finetune", began, 240.0, ws)
    record = gate.run(params, eval_metrics=ws / "eval.json", eval_report=ws / "eval" /
                      "report.json", validation=ws / "validation.json", drift=ws / "drift.json",
                      candidate=candidate, champion=ws / "champion.json", test=ws / "test.parquet",
                      weights=ws / "absent.parquet", lock=ws / "dvc.lock",
                      report=ws / "gate.json", curve=curve, pretrain_curve=pretrain_curve,
                      finetune_metrics=ws / "finetune.json", pretrain_metrics=ws / "pretrain.json")
    assert {k: record["pretrain"][k] for k in ("enabled", "trained", "steps")} == {
        "enabled": "auto", "trained": 1, "steps": 2}  # what the candidate's encoder went through
    # The training curves are the run's metric histories (the UI charts them per step).
    history = client.get_metric_history(record["run_id"], "train/loss")
    assert [(h.step, h.value) for h in history] == [(1, 1.5), (2, 1.0), (3, 0.7)]
    assert [h.step for h in client.get_metric_history(record["run_id"], "val/macro_f1")] == [2, 3]
    assert [(h.step, h.value) for h in client.get_metric_history(
        record["run_id"], "pretrain/perplexity")] == [(2, 40.0)]
    # ... and the stages' numeric measurements its metrics (not text, flags or NaN).
    logged = client.get_run(record["run_id"]).data.metrics
    assert logged["finetune/samples_per_s"] == 120.5 and logged["pretrain/perplexity_after"] == 40.0
    skipped = {"finetune/init", "finetune/stopped_early", "pretrain/perplexity_before"}
    assert not skipped & set(logged)
    # Both curves are kept, each in its stage's folder (the files share a name).
    for stage, source in (("finetune", curve), ("pretrain", pretrain_curve)):
        [logged_curve] = client.list_artifacts(record["run_id"], f"reports/{stage}")
        saved = client.download_artifacts(record["run_id"], logged_curve.path, str(ws / stage))
        assert Path(saved).read_text() == source.read_text()
    # Judged against v2 (whose predictions it shares: no gain), not against v1; v2 stays.
    # Through the prediction cache: each model predicts each of the 12 distinct texts once.
    assert record["reevaluations"] == [{"from": v1, "to": v2,
                                        "predicted": {"candidate": 12, "champion": 12}}]
    assert record["evaluated_against"] == v2
    assert record["decision"] == "rejected" and record["metrics"]["diff/all/macro_f1"] == 0.0
    # Latency and behaviour were measured anew beside v2 (not kept from beside v1).
    assert {"latency/ratio_bs1", "behaviour/champion/typos"} <= set(record["metrics"])
    assert current_champion(client, name).version == v2
    mv = client.get_model_version(name, record["version"])
    assert mv.tags["compared_with"] == v2 and mv.tags["decision"] == "rejected"
    # How it was trained, and why, is in the record, the version's and run's tags and the card
    # (what the next run's `finetune.init: auto` counts from); the gate judged it as any other.
    assert record["training"]["init"] == "continual"
    assert record["training"]["init_reason"].startswith("a routine batch")
    assert json.loads((ws / "gate.json").read_text())["training"] == record["training"]
    assert mv.tags["finetune.init"] == "continual"
    assert mv.tags["finetune.batch"] == "0002-bbbbbbbbbbbb"
    assert mv.tags["finetune.init_reason"].startswith("a routine batch")
    assert client.get_run(record["run_id"]).data.tags["finetune.init"] == "continual"
    # The runs table: named after the batch, filterable by batch, decision, mode and init, and
    # no source commit of ratchet's own beside the workspace's (MLflow guesses it from the
    # stage's script, which lives in ratchet's repository).
    import subprocess

    run = client.get_run(record["run_id"])
    assert run.info.run_name == "candidate 0002-bbbbbbbbbbbb"
    assert {k: run.data.tags.get(k) for k in ("batch", "decision", "mode", "init")} == {
        "batch": "0002-bbbbbbbbbbbb", "decision": "rejected", "mode": "full",
        "init": "continual"}
    # ... as the child of the retrain's own run, which spans the whole retrain (from the first
    # stage that ran for it to the gate's end) and holds the stages' measurements.
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert record["retrain_run_id"] == parent.info.run_id
    assert parent.info.run_name == "retrain 0002-bbbbbbbbbbbb"
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time == int(began * 1000) < run.info.start_time
    assert parent.info.end_time >= run.info.end_time
    assert {k: parent.data.tags.get(k) for k in ("batch", "decision", "mode", "init")} == {
        "batch": "0002-bbbbbbbbbbbb", "decision": "rejected", "mode": "full",
        "init": "continual"}
    assert parent.data.metrics["stage/finetune/seconds"] == 240.0
    assert "stage/gate/seconds" not in parent.data.metrics  # gate.run outside a stage here
    assert parent.data.metrics["finetune/samples_s"] == 120.5
    assert parent.data.metrics["evaluate/f1"] == record["metrics"]["candidate/all/macro_f1"]
    assert "rejected" in parent.data.tags["mlflow.note.content"]
    ours = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(gate.__file__).parent,
                          capture_output=True, text=True).stdout.strip()
    assert ours and run.data.tags.get("mlflow.source.git.commit") != ours
    assert "tasks/gate.py" not in run.data.tags.get("mlflow.source.name", "")
    # Integers read as integers in the version's description (a count, not 2033285.0000).
    import re

    [count] = re.findall(r"\| candidate/size/parameters&emsp; \| ([^|]+) \|", mv.description)
    assert re.fullmatch(r"\d{1,3}(,\d{3})+", count.strip()), count
    # The UI draws table cells with no padding and strips styles: every cell but a row's last
    # ends in an em space, so that `1.0000+0.2810` does not run together (rendered: the story's
    # browser check).
    rows = [line for line in mv.description.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]
    assert len(rows) > 10
    for row in rows:
        cells = row[2:-2].split(" | ")
        assert all(c.endswith("&emsp;") for c in cells[:-1] if c), row
        assert not cells[-1].endswith("&emsp;"), row
    assert (f"- Start: continual from champion v{v1} (a routine batch: 1 batch(es) since the "
            "last full retrain); newest batch `0002-bbbbbbbbbbbb`, 40 new rows + 80 replayed."
            ) in (ws / "eval" / "model_card.md").read_text()
    assert "| slice&emsp; | n&emsp; |" in mv.description
    assert "Gate decision: rejected" in mv.description
    assert str(client.get_registered_model(name).aliases[CHALLENGER]) == record["version"]
    card = client.download_artifacts(record["run_id"], "reports/model_card.md", str(ws / "dl"))
    assert "## Gate decision: rejected" in Path(card).read_text()
    # The registered model itself carries the card and the label map beside the weights.
    import mlflow.artifacts

    model_dir = Path(mlflow.artifacts.download_artifacts(
        f"models:/{name}/{record['version']}", dst_path=str(ws / "model")))
    assert "## Evaluation" in (model_dir / "artifacts" / "model_card.md").read_text()
    assert json.loads((model_dir / "artifacts" / "label_map.json").read_text()) == {
        "labels": LABELS}
    assert list((model_dir / "artifacts").rglob("model.safetensors"))
    # Run again (e.g. `dvc exp run` of the gate alone): the version is found, not registered
    # twice, and the card (a DVC output) is written again.
    (ws / "eval" / "model_card.md").unlink()
    again = gate.run(params, eval_metrics=ws / "eval.json", eval_report=ws / "eval" /
                     "report.json", validation=ws / "validation.json", drift=ws / "drift.json",
                     candidate=candidate, champion=ws / "champion.json", test=ws / "test.parquet",
                     weights=ws / "absent.parquet", lock=ws / "dvc.lock", report=ws / "gate.json")
    assert again["version"] == record["version"] and again["decision"] == "rejected"
    # Re-evaluated against v2 again, every prediction from the cache: no model predicted a row.
    assert again["reevaluations"] == [{"from": v1, "to": v2,
                                       "predicted": {"candidate": 0, "champion": 0}}]
    assert again["metrics"]["diff/all/macro_f1"] == record["metrics"]["diff/all/macro_f1"]
    assert (ws / "eval" / "model_card.md").is_file()
    assert len(client.search_model_versions(f"name = '{name}'")) == 3
    # The hand move was noticed and recorded as manual before the gate's own record.
    events = alias_history(client, name)
    assert [(e["alias"], e["by"]) for e in events] == [
        (CHAMPION, "cli"), (CHAMPION, "manual"), (CHALLENGER, "gate")]

    # Someone removes `champion` on purpose (stop serving): the gate does not undo that.
    client.delete_registered_model_alias(name, CHAMPION)
    gone = gate.run(params, eval_metrics=ws / "eval.json", eval_report=ws / "eval" /
                    "report.json", validation=ws / "validation.json", drift=ws / "drift.json",
                    candidate=candidate, champion=ws / "champion.json", test=ws / "test.parquet",
                    weights=ws / "absent.parquet", lock=ws / "dvc.lock", report=ws / "gate.json")
    assert gone["decision"] == "deferred" and gone["champion_after"] is None
    assert [c["name"] for c in gone["checks"] if not c["passed"]][-1] == "compare_and_set"
    assert client.get_model_version(name, gone["version"]).tags["decision"] == "deferred"


def test_slices_keep_domains_apart_and_weights_are_checked(tmp_path):
    from ratchet.errors import RatchetError
    from ratchet.evaluation import load_test_weights, slice_masks

    df = pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "y", "x"],
                       "slice": ["recent", "reference", "recent"],
                       "domain": ["home office", "home/office", None]})
    masks = slice_masks(df)
    domains = sorted(k for k in masks if k.startswith("domain:"))
    assert len(domains) == 2 and domains[0] == "domain:home_office"
    assert [m.sum() for m in (masks["recent"], masks["reference"], masks["all"])] == [2, 1, 3]
    for bad in ([1.0, float("nan"), 1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0]):
        pd.DataFrame({"text": df["text"], "weight": bad}).to_parquet(tmp_path / "w.parquet")
        with pytest.raises(RatchetError, match="finite, non-negative"):
            load_test_weights(tmp_path / "w.parquet", df)


def test_gate_in_a_dvc_experiment_logs_a_run_and_registers_nothing(ws, monkeypatch):
    """In a `dvc exp run` (DVC sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV in the stage's
    environment) the gate logs an MLflow run named after the experiment, with the decision it
    would have made, and registers no version and moves no alias; `gate.experiments:
    register` opts into gating it like a real run."""
    from ratchet.registry import alias_history, aliases, move_alias
    from ratchet.workspace import fingerprint
    from tasks import evaluate, gate

    raw = json.loads((ws / "params.yaml").read_text())
    params = parse_params(raw)
    name = params.registry.model_name
    client = connect(params.registry, ws)
    v1 = _register(ws, params, tiny_classifier(ws / "m1", seed=1))
    client.set_model_version_tag(name, v1, "fingerprint", fingerprint(ws / "m1"))
    move_alias(client, name, CHAMPION, v1, by="cli", reason="first", expected=None)
    candidate = tiny_classifier(ws / "candidate", seed=2)
    write_json(ws / "champion.json", {"name": name, "version": v1})
    evaluate.run(params, candidate=candidate, test=ws / "test.parquet",
                 champion=ws / "champion.json", metrics=ws / "eval.json",
                 predictions=ws / "pred.parquet", report=ws / "eval" / "report.json")
    paths = dict(eval_metrics=ws / "eval.json", eval_report=ws / "eval" / "report.json",
                 validation=ws / "validation.json", drift=ws / "drift.json", candidate=candidate,
                 champion=ws / "champion.json", test=ws / "test.parquet",
                 weights=ws / "absent.parquet", lock=ws / "dvc.lock", report=ws / "gate.json")
    baseline = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("DVC_EXP_NAME", "spiky-oboe")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    found, history = aliases(client, name), alias_history(client, name)

    record = gate.run(params, **paths)

    assert record["decision"] == "experiment" and record["version"] is None
    assert record["would_be"] in ("promoted", "rejected")
    assert record["experiment"] == {"name": "spiky-oboe", "baseline": baseline}
    assert record["champion_after"] == v1
    assert [str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")] == [v1]
    assert aliases(client, name) == found and alias_history(client, name) == history
    [run] = client.search_runs([client.get_experiment_by_name(params.registry.experiment)
                                .experiment_id], "attributes.run_name = 'spiky-oboe'")
    assert run.info.run_id == record["run_id"]
    assert run.data.tags["dvc.experiment"] == "spiky-oboe"
    assert run.data.tags["dvc.baseline_rev"] == baseline
    assert (run.data.tags["decision"], run.data.tags["would_be"]) == ("experiment",
                                                                      record["would_be"])
    metrics = json.loads((ws / "eval.json").read_text())
    assert run.data.metrics["candidate/all/macro_f1"] == metrics["candidate/all/macro_f1"]
    assert run.data.params["model.source"] == "tiny"
    assert "experiment" in [c["name"] for c in record["checks"] if not c["passed"]]
    assert "DVC experiment `spiky-oboe`" in (ws / "eval" / "model_card.md").read_text()

    # Opted in: gated and registered like a run, its lineage saying it is an experiment.
    registered = gate.run(parse_params({**raw, "gate": {"experiments": "register"}}), **paths)
    assert registered["decision"] in ("promoted", "rejected") and registered["version"] != v1
    tags = client.get_model_version(name, registered["version"]).tags
    assert tags["dvc.experiment"] == "spiky-oboe" and tags["lineage"] == "experiment"
    assert tags["git_commit"] == baseline


def _stored_bytes(*folders: Path) -> int:
    """Bytes the folders hold on disk, a file hard-linked from several places once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in folders:
        for f in folder.rglob("*"):
            st = f.lstat()
            if f.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def test_a_logged_candidate_is_stored_once_beside_dvcs_copy(ws):
    """The gate registers the candidate DVC has already cached: the DVC cache and the MLflow
    artifact store together hold one copy of the model, not two, and the model MLflow serves
    is the one trained. The stamped model card keeps its own file."""
    import subprocess
    import sys

    import mlflow.artifacts

    from tasks import evaluate, gate

    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=ws, check=True)
    params = parse_params(json.loads((ws / "params.yaml").read_text()))
    candidate = tiny_classifier(ws / "candidate", seed=3)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "candidate"], cwd=ws, check=True)
    model_bytes = sum(f.stat().st_size for f in candidate.rglob("*") if f.is_file())
    cached = _stored_bytes(ws / ".dvc" / "cache")
    assert cached >= model_bytes > 4 * 2**20  # DVC holds the model (a few MB, tiny as it is)
    write_json(ws / "champion.json", {})
    evaluate.run(params, candidate=candidate, test=ws / "test.parquet",
                 champion=ws / "champion.json", metrics=ws / "eval.json",
                 predictions=ws / "pred.parquet", report=ws / "eval" / "report.json")
    record = gate.run(params, eval_metrics=ws / "eval.json", eval_report=ws / "eval" /
                      "report.json", validation=ws / "validation.json", drift=ws / "drift.json",
                      candidate=candidate, champion=ws / "champion.json", test=ws / "test.parquet",
                      weights=ws / "absent.parquet", lock=ws / "dvc.lock",
                      report=ws / "gate.json")
    assert record["version"]
    added = _stored_bytes(ws / ".dvc" / "cache", ws / "mlartifacts") - cached
    assert added < model_bytes / 4, (added, model_bytes)  # reports and the card, not the model
    served = Path(mlflow.artifacts.download_artifacts(
        f"models:/{params.registry.model_name}/{record['version']}", dst_path=str(ws / "dl")))
    [weights] = served.rglob("model.safetensors")
    assert weights.read_bytes() == (candidate / "model.safetensors").read_bytes()
    # The record step stamps the card in place: it is the run's own file, linked to nothing.
    cards = [f for f in (ws / "mlartifacts").rglob("model_card.md")]
    assert cards and all(f.stat().st_nlink == 1 for f in cards)


def test_unchanged_data_docs_pages_are_stored_once_across_runs(ws):
    """Each run logs the Data Docs of every batch; a page an earlier run logged unchanged is
    the same file, a changed or new page its own, and the model card never a shared one."""
    from ratchet.registry import share_stored_copies

    params = parse_params(json.loads((ws / "params.yaml").read_text()))
    name = params.registry.model_name
    client = connect(params.registry, ws)
    docs = ws / "docs"
    (docs / "validations").mkdir(parents=True)
    page = "<html>" + "batch one validated " * 800 + "</html>"
    (docs / "validations" / "0001.html").write_text(page)
    (docs / "index.html").write_text("<html>" + "index of one " * 800 + "</html>")
    card = ws / "model_card.md"
    card.write_text("# card\n" + "same words " * 800)
    runs = []
    for seed in (1, 2):
        model = tiny_classifier(ws / f"m{seed}", seed=seed)
        if seed == 2:  # a second batch arrives: its page is new, the index changes
            (docs / "validations" / "0002.html").write_text(page.replace("one", "two"))
            (docs / "index.html").write_text("<html>" + "index of two " * 800 + "</html>")
        run_id, version = log_candidate(model, name=name, params={}, metrics={},
                                        artifacts=[docs, card], run_tags={"fingerprint": "f"},
                                        model_card=card)
        runs.append((run_id, share_stored_copies(client, name, version, run_id, ws)))
    roots = [Path(client.get_run(r).info.artifact_uri.removeprefix("file://")) / "reports"
             for r, _ in runs]

    def inode(path: Path) -> int:
        return path.stat().st_ino

    first, second = roots
    assert inode(second / "docs/validations/0001.html") == inode(
        first / "docs/validations/0001.html")
    assert inode(second / "docs/index.html") != inode(first / "docs/index.html")
    assert (second / "docs/index.html").read_text().count("two") == 800
    assert (second / "docs/validations/0002.html").stat().st_nlink == 1
    assert runs[1][1]["files"] == 1  # no DVC cache here: the model files are not linked
    for root in roots:  # identical cards, yet each run's own file (the record step stamps it)
        assert (root / "model_card.md").stat().st_nlink == 1
