"""Writers in processes of their own against a real `mlflow server` whose backend store is a
fresh PostgreSQL database (dropped afterwards): they serialize through the lease held in the
registry, exactly one of those with the same `expected` wins, and the move log loses no event.
One server for the module; its log is in every failure message."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration import servers, writers
from tests.integration.test_servers import (
    BIN,
    PG_HOST,
    PG_PORT,
    START_TIMEOUT,
    MlflowGlobals,
    base_env,
    create_database,
    drop_database,
)

NAME = "ratchet-classifier"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[servers.ServerProcess]:
    root = tmp_path_factory.mktemp("promotion-server")
    user, database = create_database()
    port = servers.free_port()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{database}",
        "--artifacts-destination", (root / "artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = servers.start("mlflow server", cmd, url=f"http://127.0.0.1:{port}",
                         env={**base_env(root), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                         log=root / "mlflow.log", cwd=root)
    try:
        servers.wait_ready(proc, "/health", START_TIMEOUT)
        yield proc
    finally:
        servers.stop(proc)
        drop_database(database)


def registered(url: str, n: int):
    """A client on the server and `NAME` with n versions, `champion` at 1."""
    from mlflow import MlflowClient

    from ratchet.registry import CHAMPION, move_alias

    client = MlflowClient(url, url)
    experiment = client.create_experiment(f"writers-{time.time_ns()}")
    client.create_registered_model(NAME)
    for _ in range(n):
        run = client.create_run(experiment)
        client.create_model_version(NAME, source=f"{run.info.artifact_uri}/model",
                                    run_id=run.info.run_id)
    move_alias(client, NAME, CHAMPION, "1", by="cli", expected=None, reason="first")
    return client


def test_writers_serialize_through_the_lease_on_a_postgresql_server(server, tmp_path):
    with MlflowGlobals():
        client = registered(server.url, 5)
        try:
            writers.race(client, server.url, tmp_path, NAME, n=4, log_dir=tmp_path)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{server.log_tail()}") from None
        # The lease is released: only the model itself is registered (no lease, no grave).
        assert [m.name for m in client.search_registered_models()] == [NAME]
        assert server.proc.poll() is None, server.log_tail()
