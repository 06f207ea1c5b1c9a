"""The champion behind `mlflow models serve`: a real server process, real HTTP requests.

A random-init tiny classifier is logged and registered in a temporary sqlite store, the
`champion` alias is set on it, and `mlflow models serve -m models:/<name>@champion
--env-manager local` is started once for the module and always stopped (its whole process group).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ratchet.config import RegistryConfig
from ratchet.registry import CHAMPION, connect, log_candidate, tracking_uri
from tests.conftest import save_tiny_classifier
from tests.integration.servers import (
    OPENER,
    ServerProcess,
    free_port,
    group_alive,
    start,
    stop,
    wait_ready,
)

LABELS = ["balance", "booking", "greeting"]
NAME = "serving-test"
TEXTS = ["what is my balance", "book a table for two tonight", "hi"]
START_TIMEOUT = 120.0


def build_classifier(out: Path) -> Path:
    """A random-init tiny BERT classifier with the MiniLM tokenizer, saved like a fine-tune."""
    save_tiny_classifier(out, LABELS, max_length=32)
    return out


def register_champion(model_dir: Path, workspace: Path) -> str:
    """Log and register the classifier, point `champion` at it; returns the store's URI."""
    cfg = RegistryConfig(model_name=NAME)
    client = connect(cfg, workspace)
    _, version = log_candidate(
        model_dir,
        name=NAME,
        params={"source": "tiny"},
        metrics={},
        artifacts=[],
        run_tags={"fingerprint": "serving-test"},
    )
    client.set_registered_model_alias(NAME, CHAMPION, version)
    return tracking_uri(cfg, workspace)


def server_env(uri: str, tmp: Path) -> dict[str, str]:
    """The test's environment plus the store, telemetry off, and the venv first on PATH: the
    CLI starts `uvicorn` by name, and the pyfunc class must import from this environment."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "TMPDIR": str(tmp),  # where the CLI downloads the model to
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("serving")
    workspace = root / "ws"
    workspace.mkdir()
    uri = register_champion(build_classifier(root / "classifier"), workspace)
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve",
        "-m", f"models:/{NAME}@{CHAMPION}", "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    served = start("mlflow models serve", cmd, url=f"http://127.0.0.1:{port}",
                   env=server_env(uri, root), log=root / "server.log")
    try:
        wait_ready(served, "/ping", START_TIMEOUT)
        yield served
    finally:
        stop(served)
        assert not group_alive(served.proc.pid), (
            f"server processes left over\n{served.log_tail()}")


def post(server: ServerProcess, payload: Any) -> tuple[int, dict[str, Any]]:
    """POST JSON to /invocations; the status and the decoded body, for errors too."""
    request = urllib.request.Request(
        f"{server.url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with OPENER.open(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def predictions(server: ServerProcess, payload: Any) -> list[dict[str, Any]]:
    status, body = post(server, payload)
    assert status == 200, f"{status}: {body}\n{server.log_tail()}"
    return body["predictions"]


def assert_well_formed(preds: list[dict[str, Any]], rows: int) -> None:
    assert len(preds) == rows
    for pred in preds:
        probs = pred["probabilities"]
        assert pred["label"] in LABELS
        assert len(probs) == len(LABELS)
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= pred["score"] <= 1.0
        assert pred["score"] == pytest.approx(max(probs))
        assert pred["label"] == LABELS[probs.index(max(probs))]


def test_dataframe_split_gets_a_label_score_and_probabilities_per_row(server):
    payload = {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
    assert_well_formed(predictions(server, payload), len(TEXTS))


def test_inputs_list_and_records_answer_like_dataframe_split(server):
    split = predictions(server, {"dataframe_split": {"columns": ["text"],
                                                     "data": [[t] for t in TEXTS]}})
    for payload in ({"inputs": TEXTS}, {"dataframe_records": [{"text": t} for t in TEXTS]}):
        preds = predictions(server, payload)
        assert_well_formed(preds, len(TEXTS))
        assert [p["label"] for p in preds] == [p["label"] for p in split]
        for got, want in zip(preds, split, strict=True):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


def test_a_request_without_a_text_column_is_a_400_naming_it(server):
    status, body = post(server, {"dataframe_split": {"columns": ["wrong"], "data": [["hi"]]}})
    assert status == 400, body
    assert "text" in body.get("message", ""), body


def test_a_null_text_is_a_400_naming_the_row(server):
    status, body = post(server, {"dataframe_split": {"columns": ["text"],
                                                     "data": [["hi"], [None]]}})
    assert status == 400, body
    assert "null in row(s) [1]" in body.get("message", ""), body


def test_to_texts_reads_a_text_column_a_list_or_one_string():
    import numpy as np
    import pandas as pd

    from ratchet.pyfunc import to_texts

    want = ["a", "b"]
    for given in (pd.DataFrame({"text": want, "extra": [1, 2]}), {"text": want}, want,
                  pd.Series(want), np.array([["a"], ["b"]])):
        assert to_texts(given) == want
    assert to_texts("a") == ["a"]
    assert to_texts([]) == []


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"wrong": ["a"]}, "needs a `text` column; got columns ['wrong']"),
        (["a", None, float("nan")], "null in row(s) [1, 2]"),
        ([["a", "b"]], "one string per row; row(s) [0]"),
        (42, "unsupported input type `int`"),
    ],
)
def test_to_texts_says_what_is_wrong_with_a_bad_input(given, says):
    from mlflow.exceptions import MlflowException

    from ratchet.pyfunc import to_texts

    with pytest.raises(MlflowException) as err:
        to_texts(given)
    assert says in err.value.message
    assert err.value.get_http_status_code() == 400
