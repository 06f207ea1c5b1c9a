"""Label noise: the flagging rule, cleanlab's estimate, prepare's exclusion policy, the review
file and CLI, and the noise stage judging each batch once (cold start, then a real champion)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from ratchet.config import NoiseConfig, parse_params
from ratchet.data import split_of
from ratchet.errors import ConfigError, RatchetError
from ratchet.noise import (
    CHAMPION,
    CROSS_VALIDATED,
    NOT_JUDGED,
    cross_validated_probs,
    estimate,
    flag,
    read_review,
    write_review,
)

CFG = NoiseConfig()  # margin 0.1, ratio 2, max_rate 0.3, min_rows 30


@pytest.mark.parametrize(("entry", "expected"), [
    ({"method": CHAMPION, "rate": 0.48, "baseline": 0.05, "judged": 800}, True),
    ({"method": CHAMPION, "rate": 0.14, "baseline": 0.05, "judged": 800}, False),  # < b + margin
    ({"method": CHAMPION, "rate": 0.35, "baseline": 0.20, "judged": 800}, False),  # < ratio x b
    ({"method": CHAMPION, "rate": 0.45, "baseline": 0.20, "judged": 800}, True),
    ({"method": CHAMPION, "rate": 0.11, "baseline": 0.0, "judged": 800}, True),
    ({"method": CHAMPION, "rate": 0.90, "baseline": 0.05, "judged": 29}, False),  # too few rows
    ({"method": CHAMPION, "rate": 0.90, "baseline": None, "judged": 800}, False),  # no baseline
    ({"method": CHAMPION, "rate": None, "baseline": 0.05, "judged": 0}, False),
    ({"method": CROSS_VALIDATED, "rate": 0.31, "baseline": None, "judged": 300}, True),
    ({"method": CROSS_VALIDATED, "rate": 0.29, "baseline": None, "judged": 300}, False),
    ({"method": NOT_JUDGED, "rate": None, "baseline": None, "judged": 0}, False),
])
def test_the_flagging_rule(entry, expected):
    assert flag(entry, CFG) is expected


def test_the_rule_follows_its_params():
    entry = {"method": CHAMPION, "rate": 0.3, "baseline": 0.1, "judged": 100}
    assert flag(entry, CFG) is True
    assert flag(entry, NoiseConfig(margin=0.25)) is False
    assert flag(entry, NoiseConfig(ratio=3.5)) is False
    assert flag(entry, NoiseConfig(min_rows=101)) is False


def test_summary_lines():
    from ratchet.noise import summary

    entry = {"method": CHAMPION, "rate": 0.482, "baseline": 0.051, "judged": 855, "rows": 900,
             "suspects": 412, "flagged": True, "review": None}
    assert summary("0003-ab12", entry, CFG) == (
        "batch 0003-ab12: est. 48.2% label issues (412 of 855 judged rows; 45 of 900 rows not "
        "judged: labels the champion does not know) vs the champion's 5.1% on held-out rows: "
        "flagged")
    assert summary("0003-ab12", {**entry, "review": "accept"}, CFG).endswith(
        "flagged, labels accepted by review")
    skipped = {"method": NOT_JUDGED, "rate": None, "judged": 0, "rows": 50, "suspects": 0,
               "flagged": False, "reason": "no champion yet, and noise.cold_start is skip"}
    assert summary("0001-cd", skipped, CFG) == (
        "batch 0001-cd: label noise not judged (no champion yet, and noise.cold_start is skip)")


def _probs(true: np.ndarray, k: int, rng: np.random.Generator, sure: float = 0.9) -> np.ndarray:
    """A model that puts about `sure` on the true class and spreads the rest."""
    p = rng.dirichlet(np.ones(k), size=len(true)) * (1 - sure)
    p[np.arange(len(true)), true] += sure
    return p


def test_estimate_finds_flipped_labels_and_skips_unknown_ones():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d", "e"]
    true = rng.integers(0, 5, size=400)
    probs = _probs(true, 5, rng)
    clean = [classes[t] for t in true]
    est = estimate(clean, probs, classes)
    assert est.n_judged == 400 and est.rate < 0.03 and est.n_suspects < 10
    noisy = list(clean)
    flipped = rng.choice(400, size=160, replace=False)
    for i in flipped:
        noisy[i] = classes[(true[i] + 1 + rng.integers(0, 4)) % 5]
    noisy[:10] = ["zzz"] * 10  # a label the model does not know: not judged
    est = estimate(noisy, probs, classes)
    assert est.n_judged == 390 and not est.judged[:10].any()
    judged_flips = [i for i in flipped if i >= 10]
    assert abs(est.rate - len(judged_flips) / 390) < 0.05
    assert est.suspect[judged_flips].mean() > 0.9  # the flipped rows are the suspects
    assert est.suspect.sum() < len(judged_flips) + 10
    assert est.suggested[judged_flips[0]] == classes[true[judged_flips[0]]]
    assert est.suggested[0] is None and np.isnan(est.quality[0])


def test_cross_validated_probabilities_are_out_of_fold():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 3
    y = np.repeat(np.arange(4), 30)
    x = centres[y] + rng.normal(size=(120, 16))
    labels = [f"c{v}" for v in y] + ["rare", "rare"]
    x = np.vstack([x, rng.normal(size=(2, 16))])
    probs, classes = cross_validated_probs(x, labels, folds=5, seed=0)
    assert classes == ["c0", "c1", "c2", "c3"]  # `rare` has fewer rows than folds
    assert probs[:120].argmax(axis=1).tolist() == y.tolist()
    assert np.allclose(probs[:120].sum(axis=1), 1) and not probs[120:].any()
    est = estimate(labels, probs, classes)
    assert est.n_judged == 120 and est.rate < 0.05


def test_review_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "labels-review.yaml"
    assert read_review(path) == {}
    write_review(path, {"0002-b": "drop", "0001-a": "accept"})
    text = path.read_text()
    assert text.startswith("# Label-noise review") and "0001-a: accept\n0002-b: drop" in text
    assert read_review(path) == {"0001-a": "accept", "0002-b": "drop"}
    path.write_text("0001-a: maybe\n")
    with pytest.raises(ConfigError, match="batch `0001-a`: review must be accept or drop"):
        read_review(path)


# ---------------------------------------------------------------- prepare's exclusion policy

PREP = parse_params({}).prepare


def _split(text: str) -> str:
    return split_of(text, val_frac=PREP.val_frac, test_frac=PREP.test_frac, salt=PREP.salt)


def _batches(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    """Two batches of 200 rows; 60 rows of each are suspects (spread over every split)."""
    folder = tmp_path / "batches"
    folder.mkdir()
    suspects = {}
    for n, bid in enumerate(("0001-aaaa", "0002-bbbb")):
        texts = [f"batch {n} request number {i} please" for i in range(200)]
        labels = ["pay_bill" if i % 2 else "check_balance" for i in range(200)]
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(folder / f"{bid}.parquet")
        suspects[bid] = texts[:60]
    assert {_split(t) for t in suspects["0001-aaaa"]} == {"train", "val", "test"}
    return folder, suspects


def _noise_files(tmp_path: Path, suspects: dict[str, list[str]], batches: dict[str, dict]
                 ) -> tuple[Path, Path]:
    rows = [{"batch_id": b, "text": t, "label": "pay_bill", "suggested": "check_balance",
             "quality": 0.01} for b, texts in suspects.items() for t in texts]
    sus = tmp_path / "suspects.parquet"
    pd.DataFrame(rows).to_parquet(sus)
    report = tmp_path / "noise.json"
    report.write_text(json.dumps({"newest": "0002-bbbb", "flagged": False, "summary": "",
                                  "batches": batches}))
    return report, sus


def _prepare(tmp_path: Path, batches: Path, report: Path, sus: Path, **noise) -> dict:
    from tasks import prepare

    params = parse_params({"noise": noise})
    out = tmp_path / "prepared"
    prepare.run(params, batches=batches, out=out, replay=tmp_path / "replay.parquet",
                metrics=tmp_path / "prepare.json", noise=report, suspects=sus)
    return {s: pd.read_parquet(out / f"{s}.parquet") for s in ("train", "val", "test")}


@pytest.mark.parametrize("train", ["exclude", "keep"])
def test_prepare_keeps_a_flagged_batchs_suspects_out_of_test_and_reference(tmp_path, train):
    """Batch 1 (now reference) and batch 2 (recent) are flagged and not reviewed."""
    batches, suspects = _batches(tmp_path)
    flagged = {"flagged": True, "review": None}
    report, sus = _noise_files(tmp_path, suspects, {"0001-aaaa": flagged, "0002-bbbb": flagged})
    splits = _prepare(tmp_path, batches, report, sus, train=train)
    every = {t for texts in suspects.values() for t in texts}
    for name in ("val", "test"):
        assert not every & set(splits[name]["text"]), name
    assert not every & set(splits["test"][splits["test"]["slice"] == "reference"]["text"])
    in_train = every & set(splits["train"]["text"])
    if train == "exclude":
        assert not in_train
    else:
        assert in_train == {t for t in every if _split(t) == "train"}
    # The other rows are where their hash puts them, and batch 2 is still the recent slice.
    kept = set().union(*(set(df["text"]) for df in splits.values()))
    assert len(kept) == 400 - len(every) + len(in_train)
    assert set(splits["test"][splits["test"]["slice"] == "recent"]["text"]) == {
        t for t in kept if t.startswith("batch 1") and _split(t) == "test"}
    assert json.loads((tmp_path / "prepare.json").read_text())["noise/excluded"] == (
        len(every) - len(in_train))


def test_prepare_applies_the_review_and_leaves_unflagged_suspects_alone(tmp_path):
    batches, suspects = _batches(tmp_path)
    report, sus = _noise_files(tmp_path, suspects, {
        "0001-aaaa": {"flagged": True, "review": "accept"},
        "0002-bbbb": {"flagged": False, "review": "drop"},
    })
    splits = _prepare(tmp_path, batches, report, sus, train="keep")
    kept = set().union(*(set(df["text"]) for df in splits.values()))
    assert set(suspects["0001-aaaa"]) <= kept  # accepted: used as normal, tests included
    assert not set(suspects["0002-bbbb"]) & kept  # dropped: out of every split, train included
    report, sus = _noise_files(tmp_path, suspects, {
        "0001-aaaa": {"flagged": False, "review": None},
        "0002-bbbb": {"flagged": False, "review": None},
    })
    splits = _prepare(tmp_path, batches, report, sus)
    assert len(splits["test"]) + len(splits["val"]) + len(splits["train"]) == 400


# ---------------------------------------------------------------- the stage and the CLI

def _rows(seed: int, n: int, noisy: float = 0.0, domains: list[str] | None = None
          ) -> pd.DataFrame:
    from ratchet.demo_data import OLD_DOMAINS, all_labels, make_rows

    rng = random.Random(seed)
    df = make_rows(rng, domains or OLD_DOMAINS, n, set())
    known = sorted(set(df["label"]))
    for i in df.sample(frac=noisy, random_state=seed).index:
        df.loc[i, "label"] = rng.choice([x for x in known if x != df.at[i, "label"]])
    assert set(df["label"]) <= set(all_labels())
    return df


runner = CliRunner()


def _workspace(ws: Path) -> Path:
    """A workspace as the stage and `ratchet labels` see it (params, dvc.yaml, .dvc/, git, the
    review file), made without DVC so that it takes no time; `ratchet init` is tested below."""
    import shutil

    from ratchet import workspace
    from ratchet.runtime import write_json

    (ws / "data" / "batches").mkdir(parents=True)
    (ws / ".dvc").mkdir()
    shutil.copyfile(workspace.template("dvc.yaml"), ws / "dvc.yaml")
    raw = yaml.safe_load(workspace.template("params.yaml").read_text())
    raw["model"]["source"] = "tiny"
    (ws / "params.yaml").write_text(yaml.safe_dump(raw))
    write_review(ws / "labels-review.yaml", {})
    write_json(ws / "champion.json", {"name": None, "version": None, "fingerprint": None})
    workspace.git(ws, "init", "-q", "-b", "main")
    workspace.commit(ws, "a workspace")
    return ws


@pytest.mark.slow
def test_init_makes_the_review_file(tmp_path):
    from ratchet import workspace

    ws = workspace.init(tmp_path / "ws", {"model": {"source": "tiny"}})
    assert read_review(ws / "labels-review.yaml") == {}
    assert "labels-review.yaml" in workspace.git(ws, "ls-files")


def test_stage_review_cli_and_prepare_in_a_workspace(tmp_path, monkeypatch):
    """Cold start in a real workspace: the report's shape, then `ratchet labels` (list, a
    batch's suspects, accept, drop, an unknown id), and the review reaching the report."""
    from ratchet import workspace
    from ratchet.cli import app
    from tasks import noise

    ws = _workspace(tmp_path / "ws")
    bid = "0001-0123456789ab"  # as ingest names a batch (ingest itself is tested elsewhere)
    _rows(0, 160, noisy=0.6).to_parquet(ws / "data/batches" / f"{bid}.parquet")
    monkeypatch.chdir(ws)
    params = parse_params(yaml.safe_load((ws / "params.yaml").read_text()))
    paths = {"batches": ws / "data/batches", "champion": ws / "champion.json",
             "review": ws / "labels-review.yaml", "store": ws / "data/noise",
             "report": ws / "reports/validation/noise.json"}
    out = noise.run(params, **paths)
    assert set(out) == {"newest", "flagged", "summary", "batches"} and out["newest"] == bid
    entry = out["batches"][bid]
    assert set(entry) == {"rate", "baseline", "judged", "rows", "suspects", "flagged", "review",
                          "method", "champion"}
    assert entry["method"] == CROSS_VALIDATED and entry["champion"] is None
    # Every label but one with fewer rows than folds is judged (cross-validated probabilities).
    assert entry["rows"] == 160 and 140 <= entry["judged"] <= 160 and 0 <= entry["rate"] <= 1
    assert out["summary"].startswith(f"batch {bid}: est. ")
    sus = pd.read_parquet(ws / "data/noise/suspects.parquet")
    assert list(sus.columns) == ["batch_id", "text", "label", "suggested", "quality"]
    assert len(sus) == entry["suspects"] > 0

    listed = runner.invoke(app, ["labels", "-w", str(ws)], terminal_width=200)
    assert listed.exit_code == 0 and bid in listed.output and "cross-validated" in listed.output
    shown = runner.invoke(app, ["labels", "-w", str(ws), "--batch", bid[:4], "--limit", "0"],
                          terminal_width=250)
    assert shown.exit_code == 0, shown.output
    assert f"{len(sus)} suspect row(s)" in shown.output and sus["text"].iloc[0] in shown.output
    unknown = runner.invoke(app, ["labels", "accept", "0099", "-w", str(ws)])
    assert unknown.exit_code == 1 and "no batch `0099`" in unknown.output
    assert "Traceback" not in unknown.output and len(unknown.output.strip().splitlines()) == 1
    for decision in ("accept", "drop"):
        done = runner.invoke(app, ["labels", decision, bid[:4], "-w", str(ws)])
        assert done.exit_code == 0, done.output
        assert read_review(ws / "labels-review.yaml") == {bid: decision}
        assert workspace.git(ws, "log", "-1", "--format=%s").strip() == (
            f"labels: {decision} batch {bid}")
    again = noise.run(params, **paths)
    assert again["batches"][bid]["review"] == "drop" and again["flagged"] is False
    assert again["batches"][bid]["rate"] == entry["rate"]  # judged once: not measured again

    (ws / "labels-review.yaml").write_text("0042-nope: accept\n")
    with pytest.raises(RatchetError, match="batch `0042-nope` is not a batch of this workspace"):
        noise.run(params, **paths)


@pytest.mark.slow
def test_a_champion_judges_new_batches_and_old_ones_are_not_judged_again(tmp_path, monkeypatch):
    """Cold start on batch 1, then a tiny model fine-tuned on it is registered as the
    champion: a clean batch 2 that brings a new domain is not flagged (the champion's head has
    the declared insurance labels but never learnt them: those rows are not judged), a
    70%-scrambled batch 3 is; batch 1 keeps its cold-start judgement."""
    from ratchet.registry import CHAMPION as ALIAS
    from ratchet.registry import connect, log_candidate, move_alias
    from ratchet.runtime import write_json
    from tasks import finetune, noise
    from tests.conftest import TINY

    monkeypatch.chdir(tmp_path)
    from ratchet.demo_data import NEW_DOMAIN, all_labels

    # Long enough for the tiny model to learn the templates (a champion that knows nothing
    # disagrees with every label and, by the ratio rule, flags nothing).
    raw = {**TINY, "model": {"source": "tiny"}, "data": {"labels": all_labels()},
           "finetune": {**TINY["finetune"], "epochs": 20.0, "patience": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    batches = tmp_path / "batches"
    batches.mkdir()
    first = _rows(0, 320)
    first.to_parquet(batches / "0001-aaaa.parquet")
    write_json(tmp_path / "champion.json", {"name": None, "version": None})
    paths = {"batches": batches, "champion": tmp_path / "champion.json",
             "store": tmp_path / "store", "report": tmp_path / "noise.json"}
    cold = noise.run(params, **paths)["batches"]["0001-aaaa"]
    assert cold["method"] == CROSS_VALIDATED

    train = first[[_split(t) == "train" for t in first["text"]]]
    train.to_parquet(tmp_path / "train.parquet")
    first[[_split(t) == "val" for t in first["text"]]].to_parquet(tmp_path / "val.parquet")
    from ratchet.models import load_base_mlm

    base, tok = load_base_mlm("tiny", params.model.seed)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    finetune.run(params, train=tmp_path / "train.parquet", val=tmp_path / "val.parquet",
                 pretrained=tmp_path / "base", out=tmp_path / "model",
                 metrics=tmp_path / "ft.json", curve=tmp_path / "curve.csv")
    client = connect(params.registry, tmp_path)
    name = params.registry.model_name
    _, version = log_candidate(tmp_path / "model", name=name, params={}, metrics={},
                               artifacts=[], run_tags={})
    move_alias(client, name, ALIAS, version, by="cli", reason="test", expected=None)
    write_json(tmp_path / "champion.json", {"name": name, "version": version})
    second = pd.concat([_rows(1, 120), _rows(3, 80, domains=[NEW_DOMAIN])], ignore_index=True)
    second.to_parquet(batches / "0002-bbbb.parquet")
    _rows(2, 200, noisy=0.7).to_parquet(batches / "0003-cccc.parquet")
    out = noise.run(params, **paths)
    b = out["batches"]
    assert b["0001-aaaa"] == {**cold, "flagged": b["0001-aaaa"]["flagged"]}
    assert b["0002-bbbb"]["method"] == b["0003-cccc"]["method"] == CHAMPION
    assert b["0003-cccc"]["champion"] == version
    assert b["0002-bbbb"]["flagged"] is False and b["0002-bbbb"]["judged"] == 120, out
    assert b["0003-cccc"]["flagged"] is True and out["flagged"] is True, out
    assert b["0003-cccc"]["rate"] > 0.5


def test_noise_is_a_stage_between_validate_and_prepare():
    from tests.conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("validate") < names.index("noise") < names.index("prepare")
    noise = stages["noise"]
    assert {"data/batches", "champion.json", "labels-review.yaml"} <= set(noise["deps"])
    assert {"data/noise": {"persist": True}} in noise["outs"]
    assert "reports/validation/noise.json" in stages["prepare"]["deps"]
    assert "noise.train" in stages["prepare"]["params"]


@pytest.mark.parametrize("command", [["labels"], ["labels", "accept"], ["labels", "drop"]])
def test_labels_help(command):
    from ratchet.cli import app

    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_the_flow_artifact_has_a_label_noise_line():
    from flows.retrain import decision_markdown, skipped_markdown

    gate = {"decision": "rejected", "checks": [],
            "label_noise": {"flagged": True, "summary": "batch 0003-ab: est. 70.0% ...: flagged"}}
    text = decision_markdown(gate, {}, {"flagged": False, "summary": "ignored"})
    assert "Label noise: **flagged**: batch 0003-ab: est. 70.0% ...: flagged" in text
    report = {"flagged": False, "summary": "batch 0002-cd: est. 1.0% ...: ok"}
    assert "Label noise: batch 0002-cd: est. 1.0% ...: ok" in decision_markdown(
        {"decision": "promoted", "checks": []}, {}, report)
    skip = {"checks": [{"reason": "no drift"}], "skipped_stages": ["augment"]}
    assert "Label noise: batch 0002-cd" in skipped_markdown(skip, {}, report)
    assert "Label noise: n/a" in decision_markdown({"decision": "promoted", "checks": []}, {})
