"""evaluate: candidate AND champion on every slice, with paired-bootstrap differences."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ratchet.config import Params
from ratchet.data import LABEL, TEXT, write_parquet_atomic
from ratchet.runtime import read_json, write_json
from ratchet.stage import stage_main

SLICES = ("all", "recent", "reference")


def slice_mask(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series(True, index=df.index) if name == "all" else df["slice"] == name


def champion_predictions(params: Params, champion: dict, texts: list[str]) -> list[str] | None:
    """Predictions of the registered champion, through its pyfunc (what would actually serve)."""
    if not champion.get("version"):
        return None
    import mlflow.pyfunc

    from ratchet.registry import connect

    connect(params.registry, Path.cwd())
    model = mlflow.pyfunc.load_model(f"models:/{champion['name']}/{champion['version']}")
    return model.predict(pd.DataFrame({"text": texts}))["label"].astype(str).tolist()


def run(params: Params, *, candidate: Path, test: Path, champion: Path, metrics: Path,
        predictions: Path) -> dict:
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
    write_json(metrics, out)
    write_parquet_atomic(df, predictions)
    return out


def main() -> None:
    stage_main("evaluate", __doc__, {
        "candidate": "folder of the candidate model",
        "test": "prepared test split (parquet)",
        "champion": "champion.json (resolved `champion` alias)",
        "metrics": "flat evaluation metrics JSON to write",
        "predictions": "per-example predictions parquet to write",
    }, run)


if __name__ == "__main__":
    main()
