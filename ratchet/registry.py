"""The MLflow side: tracking set-up, the champion alias, logging and registering candidates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratchet.config import RegistryConfig

CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri(cfg: RegistryConfig, workspace: Path) -> str:
    """The workspace's tracking URI, from params only; relative sqlite paths live in the workspace.

    MLFLOW_TRACKING_URI is deliberately not read: mlflow.set_tracking_uri exports it, so in a
    process that has touched another workspace it names that workspace's store, not this one's.
    """
    uri = cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((workspace / uri[len(prefix) :]).resolve())
    return uri


def connect(cfg: RegistryConfig, workspace: Path):
    """Point MLflow at the workspace's store and make sure the experiment exists."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, workspace)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    if client.get_experiment_by_name(cfg.experiment) is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (workspace / "mlartifacts").resolve().as_uri()
        client.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.experiment)
    return client


@dataclass(frozen=True)
class ChampionRef:
    name: str
    version: str
    fingerprint: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def current_champion(client, name: str) -> ChampionRef | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return ChampionRef(name, str(mv.version), (mv.tags or {}).get("fingerprint"))


def find_version(client, name: str, fingerprint: str, compared_with: str) -> str | None:
    """The version already registered for this model and baseline: keeps the gate idempotent."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for mv in versions:
        tags = mv.tags or {}
        if tags.get("fingerprint") == fingerprint and tags.get("compared_with") == compared_with:
            return str(mv.version)
    return None


def log_candidate(
    model_dir: Path,
    *,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: list[Path],
    run_tags: dict[str, str],
) -> tuple[str, str]:
    """Log a run with the pyfunc model and register it; returns (run_id, version)."""
    import json
    import math

    import mlflow
    import pandas as pd

    from ratchet.pyfunc import MODEL_ARTIFACT, TextClassifier, signature

    example = pd.DataFrame({"text": ["I lost my card", "book a table for two"]})
    labels = [v for _, v in sorted(json.loads((model_dir / "config.json").read_text())
                                   ["id2label"].items(), key=lambda kv: int(kv[0]))]
    with mlflow.start_run(run_name=run_tags.get("fingerprint", "candidate")[:12]) as run:
        mlflow.set_tags(run_tags)
        mlflow.log_params(params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)})
        for path in artifacts:
            if path.is_file():
                mlflow.log_artifact(str(path), artifact_path="reports")
            elif path.is_dir():  # e.g. the Data Docs site, kept whole so its links work
                mlflow.log_artifacts(str(path), artifact_path=f"reports/{path.name}")
        mlflow.log_dict({"labels": labels}, "label_map.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextClassifier(),
            artifacts={MODEL_ARTIFACT: str(model_dir)},
            signature=signature(),
            input_example=example,
            pip_requirements=_requirements(),
            registered_model_name=name,
        )
    return run.info.run_id, str(info.registered_model_version)


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["mlflow", "torch", "transformers", "pandas", "numpy", "safetensors", "tokenizers"]
    # The pyfunc class lives in ratchet: serve with `--env-manager local` where it is installed.
    return [f"{p}=={version(p)}" for p in pkgs]
