"""Two workspaces in one process keep their own MLflow stores (MLflow exports the last URI)."""

import os

from ratchet.config import RegistryConfig
from ratchet.registry import connect, tracking_uri
from ratchet.workspace import tool_env


def test_each_workspace_resolves_its_own_store(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    cfg = RegistryConfig()
    connect(cfg, a)
    assert os.environ.get("MLFLOW_TRACKING_URI", "").endswith("/a/mlflow.db")  # what MLflow does
    assert tracking_uri(cfg, b) == f"sqlite:///{b / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in tool_env()
    assert tracking_uri(RegistryConfig(tracking_uri="http://mlflow:5000"), b) == "http://mlflow:5000"
