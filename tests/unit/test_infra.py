"""infra/ agrees with the code: compose, Dockerfile, Kubernetes manifests, prefect.yaml files.

No Docker engine runs here, so these are parsing checks: every secret compose interpolates is in
`.env.example`, the images compose builds are the ones the deployments and Kubernetes run, ports,
database names, work pool names and types agree, the deployments point at the real `retrain`
flows with their real parameters and the watcher's event, and the servers' commands use flags
that exist.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest
import yaml

from ratchet.runtime import TELEMETRY_OFF

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE_CPU, IMAGE_CUDA = f"ratchet:{VERSION}-cpu", f"ratchet:{VERSION}-cuda"
IMAGE_MLFLOW = f"ratchet-mlflow:{VERSION}"
PROCESS_POOL, K8S_POOL = "ratchet-process", "ratchet-kubernetes"
# deployment name -> (work pool, entrypoint); nightly ones are scheduled, landed ones triggered.
DEPLOYMENTS = {
    "local-nightly": (PROCESS_POOL, "flows/retrain.py:retrain"),
    "local-landed": (PROCESS_POOL, "flows/landed.py:on_batch_landed"),
    "kubernetes-nightly": (K8S_POOL, "flows/retrain.py:retrain"),
    "kubernetes-landed": (K8S_POOL, "flows/landed.py:on_batch_landed"),
}
PORTS = {"mlflow": 5000, "prefect-server": 4200, "minio": 9000, "minio-console": 9001,
         "postgres": 5432}
# Telemetry switches every ratchet-side container sets (values as in ratchet/runtime.py).
TELEMETRY_KEYS = ["DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY",
                  "DVC_NO_ANALYTICS", "GX_ANALYTICS_ENABLED", "HF_HUB_OFFLINE"]

# Flags of the server commands, read by hand from `mlflow server --help` (mlflow 3.17.2) and
# `prefect server start --help` / `prefect worker start --help` (prefect 3.8.8): the CLIs take
# 2-4 s each to start, too slow for a unit test. test_cli_versions_are_the_verified_ones fails
# when an upgrade makes these lists stale.
VERIFIED_VERSIONS = {"mlflow": "3.17.2", "prefect": "3.8.8"}
VERIFIED_FLAGS = {
    ("mlflow", "server"): {"--host", "--port", "--backend-store-uri", "--artifacts-destination",
                           "--app-name", "--allowed-hosts", "--workers",
                           "--default-artifact-root", "--serve-artifacts"},
    ("prefect", "server", "start"): {"--host", "--port", "--no-services", "--log-level",
                                     "--workers"},
    ("prefect", "worker", "start"): {"--pool", "--type", "--name", "--work-queue", "--limit",
                                     "--with-healthcheck", "--base-job-template"},
}
INTERPOLATION = re.compile(r"(?<!\$)\$(\{)?([A-Za-z_][A-Za-z0-9_]*)")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(INFRA / "compose.yaml")


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module")
def deployments() -> dict[str, tuple[dict, dict]]:
    """name -> (deployment, whole file) for the local and the Kubernetes prefect.yaml."""
    found = {}
    for path in (ROOT / "prefect.yaml", INFRA / "prefect.yaml"):
        doc = load_yaml(path)
        for dep in doc["deployments"]:
            found[dep["name"]] = (dep, doc)
    return found


@pytest.fixture(scope="module")
def job_template() -> dict:
    return json.loads((INFRA / "k8s" / "base-job-template.json").read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc["kind"] != "Kustomization":
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def strings(node):
    """Every string value (not key, not comment) in a parsed YAML/JSON tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing from {cmd}"
    return cmd[cmd.index(name) + 1]


def flags_of(cmd: list[str]) -> set[str]:
    return {part.split("=")[0] for part in cmd if part.startswith("--")}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def dockerfile() -> str:
    # Join continuation lines so each instruction is one line.
    return (INFRA / "Dockerfile").read_text().replace("\\\n", " ")


# --- secrets and variables ------------------------------------------------------------------


def test_every_compose_variable_is_in_env_example_and_none_is_stale(compose, env_example):
    used = {m.group(2) for s in strings(compose) for m in INTERPOLATION.finditer(s)}
    unbraced = {m.group(0) for s in strings(compose) for m in INTERPOLATION.finditer(s)
                if not m.group(1)}
    assert not unbraced, f"write ${{VAR}}, or $$VAR for the container's shell: {unbraced}"
    assert used, "compose interpolates no variable: secrets would be hard-coded"
    assert used <= set(env_example), f"not in .env.example: {sorted(used - set(env_example))}"
    assert set(env_example) <= used, f"unused in compose: {sorted(set(env_example) - used)}"
    assert all(env_example.values()), "every .env.example entry needs an example value"


def test_no_secret_is_written_into_compose(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert value.startswith("${"), f"{name}.{key} must come from .env"


def test_secrets_in_urls_are_url_safe(env_example):
    for key, value in env_example.items():
        if "PASSWORD" in key or key.endswith("_USER"):
            assert re.fullmatch(r"[A-Za-z0-9_-]+", value), f"{key} goes into a URL: {value!r}"


# --- images ---------------------------------------------------------------------------------


def test_compose_builds_the_images_the_deployments_run(services, deployments, job_template):
    built = {s["image"]: s["build"] for s in services.values() if "build" in s}
    assert set(built) == {IMAGE_CPU, IMAGE_CUDA, IMAGE_MLFLOW}
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile(), re.M | re.I))
    for image, build in built.items():
        assert build["dockerfile"] == "infra/Dockerfile"
        assert (INFRA / build["context"] / "pyproject.toml").is_file(), "context: repo root"
        assert build["target"] in stages, f"{image}: no stage {build['target']}"
        if image.startswith("ratchet:"):
            assert build["target"] == "runtime"
            assert image.endswith("-" + build["args"]["VARIANT"])
    assert services["prefect-worker"]["image"] == IMAGE_CPU
    assert services["mlflow"]["image"] == IMAGE_MLFLOW
    # The Kubernetes pool runs the GPU image, in prefect.yaml and in the pool's template.
    for name in ("kubernetes-nightly", "kubernetes-landed"):
        assert deployments[name][0]["work_pool"]["job_variables"]["image"] == IMAGE_CUDA, name
    assert job_template["variables"]["properties"]["image"]["default"] == IMAGE_CUDA


def test_dockerfile_variants_torch_pin_and_server_extra():
    text = dockerfile()
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert re.search(rf"pip install --index-url \S+ torch=={re.escape(makefile_torch)}\b", text)
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM base-\$\{VARIANT\} AS runtime$", text, re.M)
    for variant in ("cpu", "cuda"):
        assert re.search(rf"^FROM \S+ AS base-{variant}$", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M)
    assert 'pip install ".[server]"' in text
    # Non-root, and the smoke check is the CLI.
    runtime = text[text.index("AS runtime"):]
    assert re.search(r"^USER (?!root)\w+$", runtime, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["ratchet", "--help"\]$', runtime, re.M)
    assert re.search(r'^CMD \["ratchet", "--help"\]$', runtime, re.M)
    for key in TELEMETRY_KEYS:
        assert f"{key}={TELEMETRY_OFF[key]}" in runtime, key


def test_mlflow_image_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = dockerfile()
    stage = text[text.index("AS mlflow-server"):text.index("AS base-cpu")]
    mlflow_pin = next(d for d in project["dependencies"] if d.startswith("mlflow=="))
    assert f'"mlflow[auth]=={mlflow_pin.split("==")[1]}"' in stage
    for requirement in project["optional-dependencies"]["server"]:
        assert f'"{requirement}"' in stage, requirement


def test_dockerfile_ships_the_sources_the_pull_step_uses(deployments):
    text = dockerfile()
    workdir = re.findall(r"^WORKDIR (\S+)$", text[text.index("AS runtime"):], re.M)[-1]
    for dep, doc in deployments.values():
        pull = dep.get("pull", doc.get("pull"))
        step = pull[0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == workdir
    for part in ("ratchet", "tasks", "flows"):
        assert re.search(rf"^COPY {part} \./{part}$", text, re.M), part
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "dvc.yaml", "params.yaml", "ratchet", "tasks",
                   "flows", "infra/mlflow/basic_auth.ini"):
        assert f"!{needed}" in ignore, needed


# --- ports, databases, commands ---------------------------------------------------------------


def published(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        host, container = str(port).rsplit(":", 1)[0], str(port).rsplit(":", 1)[1]
        assert host.rsplit(":", 1)[-1] == container, f"host and container ports differ: {port}"
        ports.add(int(container))
    return ports


def test_ports_agree(services):
    assert published(services["mlflow"]) == {PORTS["mlflow"]}
    assert published(services["prefect-server"]) == {PORTS["prefect-server"]}
    assert published(services["minio"]) == {PORTS["minio"], PORTS["minio-console"]}
    assert services["postgres"]["expose"] == [str(PORTS["postgres"])]
    minio = command(services["minio"])
    assert flag(minio, "--address") == f":{PORTS['minio']}"
    assert flag(minio, "--console-address") == f":{PORTS['minio-console']}"
    mlflow = command(services["mlflow"])
    assert flag(mlflow, "--port") == str(PORTS["mlflow"])
    prefect = command(services["prefect-server"])
    assert flag(prefect, "--port") == str(PORTS["prefect-server"])
    assert f":{PORTS['mlflow']}/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert f":{PORTS['prefect-server']}/api/health" in " ".join(
        services["prefect-server"]["healthcheck"]["test"])
    worker_env = environment(services["prefect-worker"])
    assert worker_env["PREFECT_API_URL"] == f"http://prefect-server:{PORTS['prefect-server']}/api"
    assert environment(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == (
        f"http://minio:{PORTS['minio']}")
    assert worker_env["AWS_ENDPOINT_URL"] == f"http://minio:{PORTS['minio']}"
    init = " ".join(command(services["minio-init"]))
    assert f"http://minio:{PORTS['minio']}" in init


def test_databases_are_created_and_used():
    created = set(re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres" / "init.sql")
                             .read_text()))
    compose_text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(rf"@postgres:{PORTS['postgres']}/(\w+)", compose_text))
    assert used == {"mlflow", "prefect"}
    assert used <= created


def test_mlflow_server_command(services):
    cmd = command(services["mlflow"])
    assert cmd[:2] == ["mlflow", "server"]
    assert flags_of(cmd) <= VERIFIED_FLAGS[("mlflow", "server")]
    assert flag(cmd, "--backend-store-uri").startswith("postgresql+psycopg2://")
    assert flag(cmd, "--artifacts-destination") == "s3://${MINIO_BUCKET}/mlflow"
    app = flag(cmd, "--app-name")
    assert app in {e.name for e in entry_points(group="mlflow.app")}
    assert app == "basic-auth"
    env = environment(services["mlflow"])
    # Basic auth: the admin from .env, the config file mounted where the variable says.
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "${MLFLOW_ADMIN_PASSWORD}"
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "${MLFLOW_ADMIN_USERNAME}"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["mlflow"]["volumes"]}
    assert mounts[env["MLFLOW_AUTH_CONFIG_PATH"]] == "./mlflow/basic_auth.ini"
    assert (INFRA / "mlflow" / "basic_auth.ini").is_file()
    # The worker's runs authenticate as that admin.
    worker = environment(services["prefect-worker"])
    assert worker["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert worker["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_basic_auth_config_has_no_secret_and_a_persistent_store(services):
    import configparser

    config = configparser.ConfigParser()
    config.read(INFRA / "mlflow" / "basic_auth.ini")
    section = config["mlflow"]
    assert "admin_password" not in section
    store = section["database_uri"].removeprefix("sqlite:///")
    volumes = [v.split(":")[1] for v in services["mlflow"]["volumes"]]
    assert any(store.startswith(v + "/") for v in volumes), "auth store must be on a volume"


def test_prefect_server_command(services):
    cmd = command(services["prefect-server"])
    assert cmd[:3] == ["prefect", "server", "start"]
    assert flags_of(cmd) <= VERIFIED_FLAGS[("prefect", "server", "start")]
    assert flag(cmd, "--host") == "0.0.0.0"
    env = environment(services["prefect-server"])
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["prefect-server"]["image"].startswith(
        f"prefecthq/prefect:{VERIFIED_VERSIONS['prefect']}-python3.11")


def test_process_worker_serves_the_local_pool(services, deployments):
    from prefect.workers.process import ProcessWorker

    cmd = command(services["prefect-worker"])
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert flags_of(cmd) <= VERIFIED_FLAGS[("prefect", "worker", "start")]
    assert flag(cmd, "--type") == ProcessWorker.type
    assert flag(cmd, "--pool") == PROCESS_POOL
    assert flag(cmd, "--limit") == "1"  # the two deployments share one workspace
    # --with-healthcheck serves the port the healthcheck polls (Prefect's default 8080).
    assert "--with-healthcheck" in cmd
    assert ":8080/health" in " ".join(services["prefect-worker"]["healthcheck"]["test"])
    # The workspace the deployment names is the worker's volume.
    mounts = [v.split(":")[1] for v in services["prefect-worker"]["volumes"]]
    assert deployments["local-nightly"][0]["parameters"]["workspace_dir"] in mounts


def test_cli_versions_are_the_verified_ones():
    for package, verified in VERIFIED_VERSIONS.items():
        assert version(package) == verified, f"re-read the --help of {package} and update"


def test_services_are_healthchecked_and_ordered(services):
    one_shot = {"minio-init", "ratchet-cuda"}
    for name, service in services.items():
        if name not in one_shot:
            assert "healthcheck" in service, name
            assert service.get("restart") == "unless-stopped", name
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            wanted = ("service_completed_successfully" if dep in one_shot
                      else "service_healthy")
            assert spec["condition"] == wanted, f"{name} -> {dep}"
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "minio-init"}
    assert set(services["prefect-server"]["depends_on"]) == {"postgres"}
    assert set(services["prefect-worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert services["ratchet-cuda"]["profiles"] == ["cuda"]


def test_telemetry_is_off_where_ratchet_mlflow_and_prefect_run(services):
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        env = environment(services[name])
        for key in TELEMETRY_KEYS:
            assert env.get(key) == TELEMETRY_OFF[key], f"{name}: {key}"


# --- prefect.yaml ---------------------------------------------------------------------------


def test_deployments_run_the_flows_with_their_parameters(deployments):
    import importlib
    import inspect

    from prefect import Flow

    assert set(deployments) == set(DEPLOYMENTS)
    for name, (dep, _) in deployments.items():
        assert dep["entrypoint"] == DEPLOYMENTS[name][1]
        path, function = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file(), name
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function, None)
        assert isinstance(flow, Flow), f"{name}: {dep['entrypoint']} is not a Prefect flow"
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, name
        required = {p.name for p in inspect.signature(flow.fn).parameters.values()
                    if p.default is inspect.Parameter.empty}
        for trigger in dep.get("triggers", []):
            assert set(trigger["parameters"]) <= accepted, name
            assert required <= set(trigger["parameters"]), name
        for schedule in dep.get("schedules", []):
            assert set(schedule.get("parameters", {})) <= accepted, name
            assert required <= set(dep.get("parameters", {})) | set(schedule.get("parameters", {}))


def test_prefect_yaml_validates_with_prefect(deployments, tmp_path):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from flows.landed import LANDED_PARAMETERS
    from ratchet.watch import EVENT, landed_event, resource_id

    for name, (dep, doc) in deployments.items():
        model = PrefectYamlModel.model_validate(doc)
        assert [d.name for d in model.deployments if d.name == name] == [name]
        assert dep["concurrency_limit"]["limit"] == 1
        if name.endswith("-nightly"):
            assert "triggers" not in dep, name
            (schedule,) = dep["schedules"]
            built = _schedule_config_to_deployment_schedule(schedule)
            assert built["schedule"].cron == "0 2 * * *", name  # nightly
            assert built["schedule"].timezone == "UTC", name
            continue
        assert "schedules" not in dep, name
        (trigger,) = _initialize_deployment_triggers(name, [dict(t) for t in dep["triggers"]])
        assert trigger.expect == {EVENT}, name
        assert trigger.posture == "Reactive"
        # The same parameters and resource as `ratchet serve`'s trigger, for the workspace the
        # nightly deployment of that pool names.
        assert trigger.parameters == LANDED_PARAMETERS, name
        pool = dep["work_pool"]["name"]
        (workspace,) = {d["parameters"]["workspace_dir"] for d, _ in deployments.values()
                        if d["work_pool"]["name"] == pool and "parameters" in d}
        assert trigger.match.root == {"prefect.resource.id": resource_id(Path(workspace))}
        # ...which the watcher's event fills in.
        (tmp_path / "batch.csv").write_text("text,label\n")
        payload = landed_event(tmp_path, tmp_path / "batch.csv")["payload"]
        for value in LANDED_PARAMETERS.values():
            key = re.fullmatch(r"\{\{ event\.payload\.(\w+) \}\}", value).group(1)
            assert key in payload, key


def test_work_pools_and_types_agree(deployments, k8s):
    for name, (pool, _) in DEPLOYMENTS.items():
        assert deployments[name][0]["work_pool"]["name"] == pool, name
    container = k8s[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert flags_of(args) <= VERIFIED_FLAGS[("prefect", "worker", "start")]
    assert flag(args, "--pool") == K8S_POOL
    assert flag(args, "--type") == "kubernetes"
    assert flag(args, "--limit") == "1"
    namespace = deployments["kubernetes-nightly"][0]["work_pool"]["job_variables"]["namespace"]
    assert namespace == k8s[("Namespace", "ratchet")]["metadata"]["name"]


# --- Kubernetes -------------------------------------------------------------------------------


def test_k8s_worker_image_api_url_and_template_mount(k8s):
    pod = k8s[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == f"prefecthq/prefect:{VERIFIED_VERSIONS['prefect']}-python3.11"
    env = {e["name"]: e for e in container["env"]}
    assert env["EXTRA_PIP_PACKAGES"]["value"].startswith("prefect-kubernetes")
    # `command` would bypass the image entrypoint that installs EXTRA_PIP_PACKAGES.
    assert "command" not in container
    assert "PREFECT_API_URL" in env
    kustomization = load_yaml(INFRA / "k8s" / "kustomization.yaml")
    literals = {g["name"]: g.get("literals", []) for g in kustomization["configMapGenerator"]}
    ref = env["PREFECT_API_URL"]["valueFrom"]["configMapKeyRef"]
    api_url = dict(item.split("=", 1) for item in literals[ref["name"]])[ref["key"]]
    assert re.fullmatch(rf"https?://[^/]+:{PORTS['prefect-server']}/api", api_url)
    # The template the pool is created with is the mounted ConfigMap's file.
    template_path = flag(container["args"], "--base-job-template")
    mount = next(m for m in container["volumeMounts"] if template_path.startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    files = {g["name"]: g.get("files", []) for g in kustomization["configMapGenerator"]}
    assert Path(template_path).name in files[volume["configMap"]["name"]]
    for resource in kustomization["resources"]:
        assert (INFRA / "k8s" / resource).is_file(), resource
    assert pod["serviceAccountName"] == k8s[("ServiceAccount", "prefect-worker")]["metadata"][
        "name"]


def test_k8s_worker_may_create_jobs(k8s):
    binding = k8s[("RoleBinding", "prefect-worker")]
    role = k8s[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
    assert {"kind": "ServiceAccount", "name": "prefect-worker", "namespace": "ratchet"} in (
        binding["subjects"])
    rules = [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]
    assert any("batch" in g and "jobs" in res and {"create", "watch", "delete"} <= set(v)
               for g, res, v in rules)
    assert any("" in g and "pods" in res and "list" in v for g, res, v in rules)


def test_job_template_requests_a_gpu_and_runs_the_project_image(job_template, k8s):
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    # What the Prefect server checks when the pool is created (every placeholder declared).
    WorkPoolCreate(name=K8S_POOL, type="kubernetes", base_job_template=job_template)
    defaults = {k: v["default"] for k, v in job_template["variables"]["properties"].items()
                if "default" in v}
    job = apply_values(job_template["job_configuration"]["job_manifest"], defaults)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job"  # the container the worker fills in
    assert container["image"] == IMAGE_CUDA
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # MLflow and S3 credentials come from Secrets, never from the template.
    secrets = {e["secretRef"]["name"] for e in container["envFrom"]}
    assert {"ratchet-mlflow", "ratchet-s3"} <= secrets
    assert not any(re.search(r"PASSWORD|SECRET", s) for s in strings(job_template))
    # The workspace claim exists, and the pod runs under the image's non-root uid.
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s
    assert pod["securityContext"]["runAsUser"] == 1000
    assert re.search(r"useradd --uid 1000 ", dockerfile())
    assert ("ServiceAccount", pod["serviceAccountName"]) in k8s
    assert job["metadata"]["namespace"] == "ratchet"
