"""evaluate: candidate AND champion on every slice, with paired-bootstrap differences.

Besides the slices (`all`, `recent`, `reference`) it reports drift-weighted metrics under the
slice name `weighted`: every test row weighted by the drift stage's importance weights, an
estimate of how each model does on data distributed like the recent batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ratchet.config import Params
from ratchet.data import LABEL, RECENT, REFERENCE, TEXT, write_parquet_atomic
from ratchet.drift import effective_sample_size
from ratchet.errors import RatchetError
from ratchet.runtime import read_json, write_json
from ratchet.stage import stage_main

SLICES = ("all", RECENT, REFERENCE)


def slice_mask(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series(True, index=df.index) if name == "all" else df["slice"] == name


def champion_predictions(params: Params, champion: dict, texts: list[str]) -> list[str] | None:
    """Predictions of the registered champion, through its pyfunc (what would actually serve)."""
    if not champion.get("version"):
        return None
    import mlflow.pyfunc

    from ratchet.registry import connect

    connect(params.registry, Path.cwd())
    # The champion was logged from this same environment: skip MLflow's requirement check (~2 s).
    model = mlflow.pyfunc.load_model(f"models:/{champion['name']}/{champion['version']}",
                                     suppress_warnings=True)
    return model.predict(pd.DataFrame({"text": texts}))["label"].astype(str).tolist()


def load_test_weights(weights: Path, df: pd.DataFrame) -> np.ndarray:
    """The drift stage's importance weights, checked to belong to exactly these test rows."""
    table = pd.read_parquet(weights)
    if len(table) != len(df) or table["text"].astype(str).tolist() != df[TEXT].astype(str).tolist():
        raise RatchetError(
            f"{weights}: the importance weights are for {len(table)} rows that do not match the "
            f"{len(df)} rows of the test split (re-run the drift stage: `dvc repro drift`)"
        )
    return table["weight"].to_numpy(dtype=float)


def run(params: Params, *, candidate: Path, test: Path, champion: Path, metrics: Path,
        predictions: Path, weights: Path | None = None) -> dict:
    from ratchet import metrics as project_metrics
    from ratchet.models import Classifier
    from ratchet.stats import paired_bootstrap

    cfg = params.evaluate
    df = pd.read_parquet(test)
    texts = df[TEXT].tolist()
    cand_labels, cand_probs = Classifier(candidate, batch_size=cfg.batch_size).predict(texts)
    df["candidate"] = cand_labels
    df["candidate_score"] = cand_probs.max(axis=1)
    champ = champion_predictions(params, read_json(champion), texts)
    if champ is not None:
        df["champion"] = champ
    out: dict[str, float] = {}
    for name in SLICES:
        part = df[slice_mask(df, name)]
        refs = part[LABEL].tolist()
        out[f"n/{name}"] = len(part)
        for model in ("candidate", "champion"):
            if model in part.columns:
                for metric, value in project_metrics.compute(part[model].tolist(), refs).items():
                    out[f"{model}/{name}/{metric}"] = value
        if champ is not None:
            cmp = paired_bootstrap(refs, part["candidate"].tolist(), part["champion"].tolist(),
                                   resamples=cfg.bootstrap_resamples, confidence=cfg.confidence,
                                   seed=cfg.seed)
            for key in ("diff", "low", "high", "p_value"):
                out[f"diff/{name}/macro_f1_{key}" if key != "diff" else f"diff/{name}/macro_f1"] = (
                    getattr(cmp, key)
                )
    if weights is not None:
        # Drift-weighted: every test row, weighted toward the recent batch's distribution.
        w = load_test_weights(weights, df)
        df["weight"] = w
        out["n/weighted"] = len(df)
        out["ess/weighted"] = effective_sample_size(w)
        refs = df[LABEL].tolist()
        for model in ("candidate", "champion"):
            if model in df.columns:
                for metric, value in project_metrics.compute(df[model].tolist(), refs,
                                                             sample_weight=w).items():
                    out[f"{model}/weighted/{metric}"] = value
        if champ is not None:
            out["diff/weighted/macro_f1"] = (
                out["candidate/weighted/macro_f1"] - out["champion/weighted/macro_f1"]
            )
    write_json(metrics, out)
    write_parquet_atomic(df, predictions)
    return out


def main() -> None:
    stage_main("evaluate", __doc__, {
        "candidate": "folder of the candidate model",
        "test": "prepared test split (parquet)",
        "champion": "champion.json (resolved `champion` alias)",
        "weights": "importance weights of the test rows from the drift stage (parquet)",
        "metrics": "flat evaluation metrics JSON to write",
        "predictions": "per-example predictions parquet to write",
    }, run)


if __name__ == "__main__":
    main()
