"""evaluate: candidate AND champion on every slice, with the statistics the gate rule reads.

Slices: `all`, `recent` (the newest batch's test rows), `reference` (every earlier batch's),
`domain:<name>` for each domain, and `weighted`: the test rows the drift stage weighted (a
bounded sample of them; the others have weight 0), each weighted by its importance weight, an
estimate of how each model does on data distributed like the recent batch. For each slice and
model: accuracy, macro/micro/weighted F1 and expected calibration error; for each slice, the
paired bootstrap of the difference (macro-F1 and accuracy: bounds and p-values) and McNemar's
test on accuracy. Also: per-class precision/recall/F1, a confusion matrix PNG, the candidate's
latency and size, and its behavioural checks (casing and typo invariance,
minimum-functionality probes). Per-example predictions of both models are kept.
With `--cache` every model predicts through the prediction cache (`ratchet.cache`): a row a
model predicted in an earlier run is not predicted again (`predicted` in the report counts the
rows each model predicted now).
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ratchet.config import Params
from ratchet.data import LABEL, TEXT, write_parquet_atomic
from ratchet.evaluation import champion_labels, predict_frame, score, serving
from ratchet.headline import FULL_HELP, write_metrics
from ratchet.runtime import read_json, write_json
from ratchet.stage import stage_main


def details(df: pd.DataFrame, params: Params, clf, champ, candidate: Path,
            plots: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """What is measured on the candidate beyond the slices: latency and behaviour (beside the
    champion's), size, probes, per class.

    Returns (flat metrics, the report's extra sections).
    """
    from ratchet import behaviour
    from ratchet import metrics as project_metrics
    from ratchet.latency import measure, model_size

    cfg = params.evaluate
    texts = df[TEXT].astype(str).tolist()
    flat: dict[str, float] = {}
    rng = np.random.default_rng(cfg.seed)
    sample = [texts[i] for i in sorted(rng.permutation(len(texts))[: cfg.latency_examples])]
    if cfg.latency_examples:  # batch 1 is timed beside the champion in `serving`
        flat.update({f"candidate/{k}": v
                     for k, v in measure(clf, sample, batch_sizes=(32,)).items()})
    flat.update({f"candidate/{k}": v for k, v in model_size(candidate).items()})
    side_by_side, inv = serving(df, params, clf, champ)
    flat.update(side_by_side)

    def predict(batch: list[str]) -> list[str]:
        return clf.predict(batch)[0] if batch else []

    # Probes apply to the classes the candidate has seen data for: its head may also hold
    # declared labels (`data.labels`) that no batch has brought yet.
    seen = sorted(set(clf.labels) & set(df[LABEL].astype(str)))
    probe_file = behaviour.load_probes(Path(cfg.probes), required=True)
    probes = behaviour.probe_results(predict, probe_file, seen)
    if probes["worst"] is not None:
        flat["behaviour/candidate/probes"] = float(probes["worst"])

    # A model that predicts one class for every row is unchanged by any perturbation: the gate
    # reads these two to tell a collapse from robustness.
    flat["behaviour/candidate/predicted_classes"] = float(df["candidate"].astype(str).nunique())
    flat["behaviour/test_classes"] = float(df[LABEL].astype(str).nunique())
    refs = df[LABEL].astype(str).tolist()
    plots.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "behaviour": {"invariance": inv.get("candidate"), "probes": probes,
                      "champion_invariance": inv.get("champion")},
        "per_class": {"candidate": project_metrics.per_class(df["candidate"].astype(str).tolist(),
                                                              refs)},
        "candidate_labels": list(clf.labels),
    }
    project_metrics.confusion_png(df["candidate"].astype(str).tolist(), refs,
                                  plots / "confusion_candidate.png", "candidate: all test rows")
    if "champion" in df.columns:
        report["per_class"]["champion"] = project_metrics.per_class(
            df["champion"].astype(str).tolist(), refs)
        labels = champion_labels(champ)
        report["champion_labels"] = labels
        if labels is not None:
            report["new_classes"] = sorted(set(refs) - set(labels))
            flat["n/new_classes"] = len(report["new_classes"])
    return flat, report


def run(params: Params, *, candidate: Path, test: Path, champion: Path, metrics: Path,
        predictions: Path, report: Path, weights: Path | None = None,
        floor: Path | None = None, cache: Path | None = None,
        all_metrics: Path | None = None) -> dict:
    judged = read_json(champion)
    if floor is not None and floor.is_file():
        judged["floor"] = read_json(floor).get("floor") or []
    df, clf, champ = predict_frame(params, candidate, test, judged, weights, cache=cache)
    out = score(df, params)
    extra, sections = details(df, params, clf, champ, candidate, report.parent)
    out.update(extra)
    out = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
           for k, v in out.items()}
    sections["predicted"] = df.attrs.get("predicted", {})
    sections["floor"] = judged.get("floor") or []  # the served models the candidate faced
    write_json(report, sections)
    write_metrics("evaluate", out, metrics, all_metrics)
    write_parquet_atomic(df, predictions)
    return out


def main() -> None:
    stage_main("evaluate", __doc__, {
        "candidate": "folder of the candidate model",
        "test": "prepared test split (parquet)",
        "champion": "champion.json (resolved `champion` alias)",
        "weights": "importance weights of the test rows from the drift stage (parquet)",
        "metrics": "flat evaluation metrics JSON to write",
        "all_metrics": FULL_HELP,
        "predictions": "per-example predictions parquet to write",
        "report": "evaluation details JSON to write (behaviour, per class, label sets); the "
                  "confusion matrix PNG goes beside it",
        "floor": "floor.json: the served models kept as the floor (`ratchet.floor`)",
        "cache": "folder of the prediction cache (by model fingerprint and text): each model "
                 "predicts a text once across runs",
    }, run, optional=("floor", "cache", "all_metrics"))


if __name__ == "__main__":
    main()
