"""The pipeline against real servers on loopback: an `mlflow server` whose backend store is a
PostgreSQL database and whose artifacts go to an S3 bucket served by `moto`, and a DVC S3 remote
in the same bucket.

Once for the module: a fresh PostgreSQL database (dropped afterwards), `moto_server` with one
bucket, and `mlflow server --artifacts-destination s3://<bucket>/mlflow`. A tiny-model workspace
whose `registry.tracking_uri` is the server's URL ingests the first demo batch and runs the
Prefect flow `retrain` twice: first with a git hook that makes the run fail after its gate
promoted (the registry must be left as found), then successfully. The
tests read the outcome back over HTTP, from the bucket and from the database, and push/pull the
workspace's data through an S3 remote. Each phase's seconds are
printed at the end of the module; every failure message carries the servers' logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY
from tests.integration import servers
from tests.integration.servers import ServerProcess

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("root", "postgres")  # trust auth on every machine of the project
BUCKET = "ratchet-it"
START_TIMEOUT = 90.0
BIN = Path(sys.executable).parent
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@dataclass
class Stack:
    root: Path
    pg_user: str
    database: str
    moto: ServerProcess
    mlflow: ServerProcess
    env: dict[str, str]  # AWS credentials and endpoints for clients of the bucket
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def s3_endpoint(self) -> str:
        return self.moto.url

    def logs(self) -> str:
        return f"{self.mlflow.log_tail()}\n{self.moto.log_tail(1500)}"

    def s3(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(proxies={}))

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def query(self, sql: str, *args: Any) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=self.pg_user,
                                dbname=self.database, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()


# --- PostgreSQL ----------------------------------------------------------------------------------


def admin_connection():
    """An autocommit connection to the `postgres` database as the first user that is accepted."""
    import psycopg2

    errors = []
    for user in PG_USERS:
        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="postgres",
                                    connect_timeout=5)
        except psycopg2.OperationalError as err:
            errors.append(f"{user}: {err}".strip())
            continue
        conn.autocommit = True
        return conn
    pytest.fail(f"cannot connect to PostgreSQL at {PG_HOST}:{PG_PORT}: {errors}")


def create_database() -> tuple[str, str]:
    """A fresh database with a unique name; returns (user, database)."""
    name = f"ratchet_it_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn = admin_connection()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        return conn.info.user, name
    finally:
        conn.close()


def drop_database(name: str) -> None:
    conn = admin_connection()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        conn.close()


# --- the servers ---------------------------------------------------------------------------------


def base_env(root: Path) -> dict[str, str]:
    """This environment with dummy AWS credentials (no profile or file of the machine's), the
    telemetry off, no tracking URI inherited, and the venv first on PATH."""
    from ratchet.runtime import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items()
           if k not in {"AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                        "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME"}}
    env.update(TELEMETRY_OFF)
    env.update(AWS)
    env["AWS_CONFIG_FILE"] = str(root / "aws-config")  # absent: nothing of the machine's is read
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(root / "aws-credentials")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_moto(root: Path, env: dict[str, str]) -> ServerProcess:
    port = servers.free_port()
    return servers.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                         url=f"http://127.0.0.1:{port}", env=env, log=root / "moto.log",
                         cwd=root)


def start_mlflow(root: Path, env: dict[str, str], user: str, database: str,
                 s3_endpoint: str) -> ServerProcess:
    port = servers.free_port()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{database}",
        "--artifacts-destination", f"s3://{BUCKET}/mlflow",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    return servers.start("mlflow server", cmd, url=f"http://127.0.0.1:{port}",
                         # No job runner: it starts 8 more processes the registry never needs.
                         env={**env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                         log=root / "mlflow.log", cwd=root)


class MlflowGlobals:
    """Save and restore what `mlflow.set_tracking_uri/set_registry_uri/set_experiment` change in
    this process, so no later test talks to a server this module has stopped."""

    ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
           "MLFLOW_EXPERIMENT_NAME")

    def __enter__(self) -> MlflowGlobals:
        from mlflow.tracking import fluent
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        self.modules = (tracking_utils, registry_utils, fluent)
        self.saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
                      fluent._active_experiment_id)
        self.env = {k: os.environ.get(k) for k in self.ENV}
        return self

    def __exit__(self, *exc: object) -> None:
        tracking_utils, registry_utils, fluent = self.modules
        tracking_utils.set_tracking_uri(self.saved[0])  # also resets the tracer provider
        registry_utils._registry_uri = self.saved[1]
        fluent._active_experiment_id = self.saved[2]
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def timed(phases: dict[str, float], name: str, *, start: bool = False) -> None:
    """Called twice: with `start` it notes the time, without it stores the seconds since."""
    now = time.perf_counter()
    if start:
        phases[name] = now
    else:
        phases[name] = now - phases.get(name, now)


def report_phases(config: pytest.Config, phases: dict[str, float]) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    line = "test_servers phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
          ) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("servers")
    env = base_env(root)
    phases: dict[str, float] = {}
    with ExitStack() as cleanup:
        cleanup.callback(report_phases, request.config, phases)
        cleanup.callback(timed, phases, "stop servers + drop database")
        cleanup.enter_context(MlflowGlobals())

        t = time.perf_counter()
        user, database = create_database()
        cleanup.callback(drop_database, database)
        phases["create database"] = time.perf_counter() - t

        moto = start_moto(root, env)
        cleanup.callback(servers.stop, moto)
        phases["moto ready"] = servers.wait_ready(moto, "/moto-api/", START_TIMEOUT)
        s3_endpoint = moto.url

        # Not waited for here: it migrates the new database while `pipeline` makes the
        # workspace. It writes to the bucket only when artifacts are logged.
        mlflow = start_mlflow(root, env, user, database, s3_endpoint)
        cleanup.callback(servers.stop, mlflow)
        cleanup.callback(timed, phases, "stop servers + drop database", start=True)
        made = Stack(root, user, database, moto, mlflow, env, phases)
        made.s3().create_bucket(Bucket=BUCKET)
        yield made
        for server in (mlflow, moto):
            assert server.proc.poll() is None, f"{server.name} died\n{made.logs()}"


@pytest.fixture(scope="module")
def pipeline(stack: Stack) -> dict[str, Any]:
    """A tiny-model workspace on the server, one demo batch ingested, and two runs of the Prefect
    flow `retrain`:

    1. a git hook refuses the run's commit after the gate promoted its version: the run fails
       and must leave the registry as it found it;
    2. with the hook gone, the run succeeds.

    Returns the second gate record, with `ws` and `failed` (the state after run 1) added."""
    from flows.retrain import retrain
    from ratchet import workspace
    from ratchet.demo_data import all_labels, demo_batches, demo_probes, write_batch
    from ratchet.registry import alias_history, aliases, connect

    ws = stack.root / "ws"
    overrides = {section: dict(values) for section, values in TINY.items()}
    overrides.update(model={"source": "tiny"},
                     data={"labels": all_labels(), "require_domain": True},
                     registry={"tracking_uri": stack.mlflow.url})
    t = time.perf_counter()
    workspace.init(ws, overrides, probes=demo_probes(0))
    batch = demo_batches(seed=0, scale=0.5)[0]
    workspace.ingest(ws, write_batch(batch, ws / workspace.INCOMING))
    stack.phases["init + ingest"] = time.perf_counter() - t
    # Started by `stack`: it was migrating the database meanwhile.
    stack.phases["then mlflow server ready"] = servers.wait_ready(stack.mlflow, "/health",
                                                                  START_TIMEOUT)
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'policy: no commits during the freeze' >&2\nexit 1\n")
    hook.chmod(0o755)
    t = time.perf_counter()
    with pytest.raises(Exception) as refused:
        retrain(str(ws))
    stack.phases["failing run (gate promoted, commit refused)"] = time.perf_counter() - t
    from ratchet.config import load_params

    client = connect(load_params(ws / "params.yaml").registry, ws)
    name = load_params(ws / "params.yaml").registry.model_name
    failed = {"error": str(refused.value), "aliases": aliases(client, name),
              "versions": [str(mv.version) for mv in
                           client.search_model_versions(f"name = '{name}'")],
              "history": alias_history(client, name),
              "inflight": any((ws / ".ratchet" / "runs").glob("*")),
              "gate_report": (ws / "reports" / "gate.json").exists()}
    hook.unlink()
    t = time.perf_counter()
    try:
        record = retrain(str(ws))
    except Exception as err:  # noqa: BLE001 - the servers' logs say more than the traceback
        pytest.fail(f"the pipeline failed against the server: {err}\n{stack.logs()}")
    stack.phases["second run (gate, commit, push)"] = time.perf_counter() - t
    return {**record, "ws": ws, "failed": failed}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- (a) the registry on the server --------------------------------------------------------------


def test_the_run_registers_tags_and_promotes_a_version_over_http(stack, pipeline):
    from mlflow import MlflowClient

    from ratchet.config import load_params
    from ratchet.registry import CHALLENGER, CHAMPION, alias_history
    from ratchet.workspace import fingerprint
    from tasks.gate import data_hashes

    ws, logs = pipeline["ws"], stack.logs()
    params = load_params(ws / "params.yaml")
    name, version = params.registry.model_name, pipeline["version"]
    assert pipeline["decision"] == "promoted", (pipeline.get("checks"), logs)
    client = MlflowClient(stack.mlflow.url, stack.mlflow.url)

    versions = {str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")}
    assert versions == {version}, logs
    tags = client.get_model_version(name, version).tags
    assert tags["decision"] == "promoted", tags
    assert tags["fingerprint"] == pipeline["fingerprint"] == fingerprint(ws / "models/candidate")
    assert tags["compared_with"] == "None", tags  # a cold start: no champion to compare with
    lock = data_hashes(ws / "dvc.lock")
    for path in ("data/batches", "models/candidate"):
        assert re.fullmatch(r"[0-9a-f]{32}\.dir", tags[f"data_hash.{path}"]), tags
        assert tags[f"data_hash.{path}"] == lock[path]

    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {CHAMPION: version, CHALLENGER: version}, aliases
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == version
    moves = [(e["alias"], e["from"], e["to"], e["by"], e["rollback"])
             for e in alias_history(client, name)]
    # The failed run promoted version 1, its failure undid that, the second run promoted 2.
    assert [m for m in moves if m[0] == CHAMPION] == [
        (CHAMPION, None, "1", "gate", False), (CHAMPION, "1", None, "gate", True),
        (CHAMPION, None, version, "gate", False)], moves
    assert version == "2"


def test_the_artifacts_go_through_the_server_into_the_bucket(stack, pipeline, tmp_path):
    import mlflow.artifacts
    from mlflow import MlflowClient

    from ratchet.config import load_params

    ws, logs = pipeline["ws"], stack.logs()
    name = load_params(ws / "params.yaml").registry.model_name
    client = MlflowClient(stack.mlflow.url, stack.mlflow.url)
    run = client.get_run(pipeline["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "label_map.json", "reports"} <= top, top

    # The registered version's files, downloaded back through the server.
    with MlflowGlobals():
        got = Path(mlflow.artifacts.download_artifacts(
            f"models:/{name}/{pipeline['version']}", dst_path=str(tmp_path),
            tracking_uri=stack.mlflow.url))
    files = {p.relative_to(got).as_posix(): p for p in got.rglob("*") if p.is_file()}
    for want in ("MLmodel", "artifacts/candidate/model.safetensors",
                 "artifacts/candidate/config.json", "artifacts/label_map.json",
                 "artifacts/model_card.md"):
        assert want in files, (sorted(files), logs)
    weights = ws / "models/candidate/model.safetensors"
    assert sha256(files["artifacts/candidate/model.safetensors"]) == sha256(weights)
    assert "## Gate decision" in files["artifacts/model_card.md"].read_text()

    # ... and they really are objects in the moto bucket, under the destination's prefix.
    keys = stack.keys("mlflow/")
    for suffix in ("/model_card.md", "/label_map.json", "/candidate/model.safetensors",
                   "/MLmodel"):
        assert any(k.endswith(suffix) for k in keys), (suffix, keys[:50], logs)
    assert any(run.info.run_id in k for k in keys), keys[:50]
    key = next(k for k in keys if k.endswith("/candidate/model.safetensors"))
    body = stack.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256(weights)


def test_the_registry_rows_are_in_postgresql(stack, pipeline):
    from ratchet.config import load_params

    name = load_params(pipeline["ws"] / "params.yaml").registry.model_name
    version = int(pipeline["version"])
    # The failed run's version 1 is deleted (MLflow keeps the row, marked deleted).
    assert sorted(stack.query("SELECT version, current_stage FROM model_versions WHERE name = %s",
                              name)) == [(1, "Deleted_Internal"), (version, "None")]
    assert sorted(stack.query("SELECT alias, version FROM registered_model_aliases "
                              "WHERE name = %s", name)) == [("challenger", version),
                                                            ("champion", version)]
    assert stack.query("SELECT value FROM model_version_tags WHERE name = %s AND version = %s "
                       "AND key = 'decision'", name, version) == [("promoted",)]
    assert stack.query("SELECT count(*) FROM runs WHERE run_uuid = %s",
                       pipeline["run_id"]) == [(1,)]


# --- the failed run, on the server -------------------------------------------------------------


def test_the_failed_run_reported_why_and_left_no_version_and_no_alias(stack, pipeline):
    failed = pipeline["failed"]
    assert "no commits during the freeze" in failed["error"]
    assert failed["versions"] == [] and failed["aliases"] == {}, stack.logs()
    moves = [(e["alias"], e["to"], e["rollback"]) for e in failed["history"]]
    assert ("champion", "1", False) in moves and ("champion", None, True) in moves
    undo = next(e for e in failed["history"] if e["rollback"] and e["alias"] == "champion")
    assert "no commits during the freeze" in undo["reason"]
    assert not failed["inflight"] and not failed["gate_report"]


def test_the_failed_runs_mlflow_run_stays_marked_failed(stack, pipeline):
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow.url, stack.mlflow.url)
    exp = client.get_experiment_by_name("ratchet").experiment_id
    runs = client.search_runs([exp], filter_string="tags.decision = 'failed'")
    # The candidate's run and its retrain's parent run: neither left running or finished.
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    [child] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    [parent] = [r for r in runs if r is not child]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name.startswith("retrain ")
    for run in runs:
        assert "no commits during the freeze" in run.data.tags["ratchet.failure"]


def test_after_the_second_run_the_workspace_is_clean(stack, pipeline):
    from ratchet import workspace

    ws = pipeline["ws"]
    assert not any((ws / ".ratchet" / "runs").glob("*"))  # no run journal left open
    assert workspace.changed_stages(ws) == set()
    assert workspace.git(ws, "status", "--porcelain").strip() == ""


# --- (b) a DVC S3 remote on the same endpoint ----------------------------------------------------


def dvc(stack: Stack, ws: Path, *args: str) -> str:
    from ratchet.workspace import tool_env

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, text=True,
                          capture_output=True, check=False, env={**tool_env(), **stack.env})
    assert proc.returncode == 0, (f"dvc {' '.join(args)} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n"
                                  f"{stack.moto.log_tail(3000)}")
    return proc.stdout


def test_dvc_pushes_to_and_pulls_from_an_s3_remote(stack, pipeline):
    ws = pipeline["ws"]
    dvc(stack, ws, "remote", "add", "-d", "-f", "s3", f"s3://{BUCKET}/dvc")
    dvc(stack, ws, "remote", "modify", "s3", "endpointurl", stack.s3_endpoint)
    batches = sorted((ws / "data/batches").glob("*.parquet"))
    weights = ws / "models/candidate/model.safetensors"
    assert len(batches) == 1 and weights.is_file()
    before = {p: sha256(p) for p in (*batches, weights)}

    t = time.perf_counter()
    dvc(stack, ws, "push")
    stack.phases["dvc push"] = time.perf_counter() - t
    keys = set(stack.keys("dvc/"))
    for path in before:  # DVC 3 stores a file under files/md5/<2>/<30> of its plain md5
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys, (path, sorted(keys)[:50])
    assert any(k.endswith(".dir") for k in keys), sorted(keys)[:50]

    shutil.rmtree(ws / ".dvc" / "cache")
    for path in before:
        path.unlink()
    t = time.perf_counter()
    dvc(stack, ws, "pull")
    stack.phases["dvc pull"] = time.perf_counter() - t
    assert {p: sha256(p) for p in before if p.is_file()} == before
    assert "up to date" in dvc(stack, ws, "status"), dvc(stack, ws, "status")
