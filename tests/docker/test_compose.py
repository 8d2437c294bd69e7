"""The cluster's compose files and images, checked on a machine without a Docker engine.

Images cannot be built or run here, so what can be checked without an engine is checked
against the real thing it must agree with: the compose files against the Compose
Specification's JSON schema (docker/schema/, taken from Docker Compose itself), every
command against the real fl-* argument parser, every FL_SERVER_* / FL_CLIENT_* variable
against the settings models (the values too, as the container would see them), the ports
and image pins against each other and against pyproject.toml, and the server's health
check against a real fl-server process on loopback.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from fedstream.client.settings import ENV_PREFIX as CLIENT_PREFIX
from fedstream.client.settings import ClientSettings
from fedstream.common.config import load_settings
from fedstream.server.healthcheck import default_target
from fedstream.server.settings import ENV_PREFIX as SERVER_PREFIX
from fedstream.server.settings import ServerSettings
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel

from tests.certs import CertificateAuthority
from tests.docker import composefile as cf
from tests.procs import Cluster, free_port

SCHEMA_PATH = cf.DOCKER / "schema" / "compose-spec.json"
DOCKERFILES = (cf.DOCKER / "Dockerfile", cf.DOCKER / "Dockerfile.cuda")
PYPROJECT = tomllib.loads((cf.REPO / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
VENV_BIN = Path(sys.executable).parent
# The shell of someone typing `docker compose up` with none of the files' knobs set.
NO_KNOBS: dict[str, str] = {}
# Values for the environment entries that pass through from the shell when set there.
PASS_THROUGH = {"FL_CLIENT_NUM_THREADS": "1"}
SETTINGS: dict[str, tuple[type[BaseModel], str]] = {
    "fl-server": (ServerSettings, SERVER_PREFIX),
    "fl-client": (ClientSettings, CLIENT_PREFIX),
}


def schema_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(schema)


def schema_errors(document: dict[str, Any]) -> list[str]:
    errors = schema_validator().iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def all_services() -> list[tuple[Path, str]]:
    return [(path, name) for path in cf.COMPOSE_FILES for name in cf.services(path, NO_KNOBS)]


def service_id(value: object) -> str:
    return value.name if isinstance(value, Path) else str(value)


def real_parser(script: str) -> Callable[[], Any]:
    """``build_parser`` of the module behind a console script of pyproject.toml."""
    module_name, _, function = SCRIPTS[script].partition(":")
    assert function == "main", f"{script} should enter through main()"
    module = importlib.import_module(module_name)
    return module.build_parser  # type: ignore[no-any-return]


def with_venv_path(env: dict[str, str]) -> dict[str, str]:
    """The image puts the fl-* commands first on PATH; here they are in this venv."""
    return {**env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def server_of(path: Path, knobs: dict[str, str] = NO_KNOBS) -> dict[str, Any]:
    return cf.services(path, knobs)["server"]


def client_services(path: Path, knobs: dict[str, str] = NO_KNOBS) -> dict[str, dict[str, Any]]:
    found = cf.services(path, knobs).items()
    return {name: svc for name, svc in found if cf.command(svc)[0] == "fl-client"}


# --- the Compose Specification -------------------------------------------------------


def test_shipped_schema_is_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"
    assert {"services", "volumes", "networks"} <= set(schema["properties"])


@pytest.mark.parametrize("path", cf.COMPOSE_FILES, ids=service_id)
def test_compose_file_conforms_to_the_specification(path: Path) -> None:
    # Compose validates after interpolation; the file as written must pass too.
    assert schema_errors(cf.load(path)) == []
    assert schema_errors(cf.interpolate(cf.load(path), NO_KNOBS)) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda doc: doc["services"]["server"].update(healthchek=doc["services"]["server"]),
        lambda doc: doc["services"]["client"]["depends_on"]["server"].update(
            condition="service_ready"
        ),
        lambda doc: doc["services"]["server"]["healthcheck"].update(test={"cmd": "x"}),
        lambda doc: doc["services"]["client"]["deploy"].update(replica=2),
    ],
    ids=["unknown-key", "bad-condition", "bad-test-type", "misspelled-deploy-key"],
)
def test_schema_check_refuses_broken_files(break_it: Callable[[dict[str, Any]], None]) -> None:
    document = copy.deepcopy(cf.interpolate(cf.load(cf.CPU_FILE), NO_KNOBS))
    break_it(document)
    assert schema_errors(document) != []


def test_compose_cli_accepts_the_files() -> None:
    """Where a Compose CLI exists (FEDSTREAM_COMPOSE, docker-compose or `docker compose`),
    its own loader, which needs no engine for `config`, must accept both files."""
    candidates = [os.environ.get("FEDSTREAM_COMPOSE", ""), "docker-compose", "docker compose"]
    cli: list[str] | None = None
    for candidate in filter(None, candidates):
        argv = candidate.split()
        if shutil.which(argv[0]) is None:
            continue
        probe = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            cli = argv
            break
    if cli is None:
        pytest.skip("no Docker Compose CLI here (set FEDSTREAM_COMPOSE to its path)")
    for path in cf.COMPOSE_FILES:
        result = subprocess.run(
            [*cli, "-f", str(path), "config", "--quiet"], capture_output=True, text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


# --- commands and settings -----------------------------------------------------------


@pytest.mark.parametrize(("path", "name"), all_services(), ids=service_id)
def test_command_is_an_installed_script_and_parses(path: Path, name: str) -> None:
    argv = cf.command(cf.services(path, NO_KNOBS)[name])
    assert argv[0] in SETTINGS, f"{name} runs {argv[0]}, not fl-server or fl-client"
    assert argv[0] in SCRIPTS
    real_parser(argv[0])().parse_args(argv[1:])  # exits (fails the test) on an unknown flag


@pytest.mark.parametrize(("path", "name"), all_services(), ids=service_id)
def test_environment_names_settings_and_validates(path: Path, name: str) -> None:
    service = cf.services(path, NO_KNOBS)[name]
    model, prefix = SETTINGS[cf.command(service)[0]]
    env = cf.environment(service, PASS_THROUGH)
    fields = set(model.model_fields)
    for key in env:
        assert key.startswith(prefix), f"{name}: {key} is not a {prefix}* variable"
        assert key[len(prefix) :].lower() in fields, f"{name}: {key} names no setting"
    # What the process builds from that environment, with nothing on the command line.
    settings = load_settings(model, prefix, flags={}, environ=env)
    written = {k[len(prefix) :].lower() for k in env}
    assert written <= set(settings.model_dump())


@pytest.mark.parametrize("path", cf.COMPOSE_FILES, ids=service_id)
def test_health_check_command_parses(path: Path) -> None:
    test = server_of(path)["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] in SCRIPTS
    parser = importlib.import_module(SCRIPTS[test[1]].partition(":")[0]).build_parser
    parser(cf.environment(server_of(path), NO_KNOBS)).parse_args(test[2:])


def test_knobs_scale_clients_and_rounds() -> None:
    knobs = {
        "FL_CLIENTS": "5",
        "FL_ROUNDS": "3",
        "FL_SERVER_ADDRESS": "10.231.0.9:6000",
        "FL_PUBLISH": "0.0.0.0:6000",
    }
    server_service = server_of(cf.CPU_FILE, knobs)
    server = cf.environment(server_service, knobs)
    assert server_service["ports"] == ["0.0.0.0:6000:50051"]
    client = client_services(cf.CPU_FILE, knobs)["client"]
    assert int(client["deploy"]["replicas"]) == 5
    assert server["FL_SERVER_MIN_CLIENTS"] == "5" and server["FL_SERVER_ROUNDS"] == "3"
    assert cf.environment(client, knobs)["FL_CLIENT_SERVER"] == "10.231.0.9:6000"
    # Without the knobs: a 2-client run, the smallest federation that means anything,
    # and a server port published on the host's loopback only (no TLS yet).
    assert int(client_services(cf.CPU_FILE)["client"]["deploy"]["replicas"]) == 2
    assert server_of(cf.CPU_FILE)["ports"] == ["127.0.0.1:50051:50051"]


# --- wiring between services ---------------------------------------------------------


@pytest.mark.parametrize("path", cf.COMPOSE_FILES, ids=service_id)
def test_ports_agree_everywhere(path: Path) -> None:
    server = server_of(path)
    port = int(cf.environment(server, NO_KNOBS)["FL_SERVER_PORT"])
    assert [cf.container_port(p) for p in server["ports"]] == [port]
    for dockerfile in DOCKERFILES:
        assert re.search(rf"^EXPOSE {port}$", dockerfile.read_text(), re.MULTILINE), dockerfile
    for name, client in client_services(path).items():
        target = cf.environment(client, NO_KNOBS)["FL_CLIENT_SERVER"]
        assert target == f"server:{port}", f"{name} dials {target}"


@pytest.mark.parametrize("path", cf.COMPOSE_FILES, ids=service_id)
def test_clients_start_once_the_server_is_healthy(path: Path) -> None:
    assert server_of(path)["healthcheck"]["test"][:2] == ["CMD", "fl-healthcheck"]
    clients = client_services(path)
    assert len(clients) >= 1
    for name, client in clients.items():
        assert client["depends_on"]["server"]["condition"] == "service_healthy", name


@pytest.mark.parametrize("path", cf.COMPOSE_FILES, ids=service_id)
def test_output_and_data_live_in_volumes(path: Path) -> None:
    declared = set(cf.load(path)["volumes"])
    server = server_of(path)
    server_mounts = cf.mounts(server)
    assert set(server_mounts.values()) <= declared
    env = cf.environment(server, NO_KNOBS)
    assert Path(env["FL_SERVER_OUT"]).parts[1] == "runs" and "/runs" in server_mounts
    assert env["FL_SERVER_DATA_DIR"] in server_mounts
    for name, client in client_services(path).items():
        data_dir = cf.environment(client, NO_KNOBS)["FL_CLIENT_DATA_DIR"]
        mount = next(v for v in client["volumes"] if str(v).split(":")[1] == data_dir)
        # The same volume as the server's data, read-only: only the server downloads.
        assert mount.split(":")[0] == server_mounts[env["FL_SERVER_DATA_DIR"]], name
        assert mount.endswith(":ro"), name


def test_cpu_cluster_reserves_no_gpu() -> None:
    for name, client in client_services(cf.CPU_FILE).items():
        assert "resources" not in client.get("deploy", {}), name
        assert "FL_CLIENT_GPU" not in cf.environment(client, NO_KNOBS), name


def test_gpu_cluster_gives_each_client_its_own_gpu() -> None:
    clients = client_services(cf.GPU_FILE)
    device_ids = []
    for name, client in clients.items():
        assert int(client["deploy"]["replicas"]) == 1, name
        (device,) = client["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        (device_id,) = device["device_ids"]
        device_ids.append(device_id)
        # The engine shows a container only its own GPU, as cuda:0.
        assert cf.environment(client, NO_KNOBS)["FL_CLIENT_GPU"] == "0", name
        assert client["build"]["dockerfile"] == "docker/Dockerfile.cuda", name
    assert len(set(device_ids)) == len(device_ids) >= 2
    min_clients = cf.environment(server_of(cf.GPU_FILE), NO_KNOBS)["FL_SERVER_MIN_CLIENTS"]
    assert int(min_clients) == len(clients)


# --- images ------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(
        rest.split("=", 1) for keyword, rest in instructions(dockerfile)
        if keyword == "ARG" and "=" in rest
    )


def pinned(package: str) -> str:
    requirements: list[str] = PYPROJECT["project"]["dependencies"]
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        if name == package:
            return version
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def test_images_pin_torch_as_pyproject_does() -> None:
    cpu = build_args(cf.DOCKER / "Dockerfile")
    assert cpu["TORCH_VERSION"] == pinned("torch")
    assert cpu["TORCHVISION_VERSION"] == pinned("torchvision")
    cuda = build_args(cf.DOCKER / "Dockerfile.cuda")
    assert cuda["TORCH_VERSION"] == pinned("torch")
    image, _, tag = cuda["BASE_IMAGE"].partition(":")
    assert image == "pytorch/pytorch"
    assert tag.startswith(f"{pinned('torch')}-cuda") and tag.endswith("-runtime"), tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=service_id)
def test_image_is_multi_stage_and_runs_as_a_user(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    stages = [rest for keyword, rest in steps if keyword == "FROM"]
    # Optional wheels (an empty stage by default), the builder, and the runtime on the same
    # base as the builder.
    assert stages == [
        "${BASE_IMAGE} AS no-wheels",
        "${WHEELS_IMAGE} AS wheels",
        "${BASE_IMAGE} AS builder",
        "${BASE_IMAGE} AS runtime",
    ], stages
    assert build_args(dockerfile)["WHEELS_IMAGE"] == "no-wheels"
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    assert ("COPY", "--from=builder /opt/fedstream /opt/fedstream") in final
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, users
    assert any(k == "ENV" and "PATH=/opt/fedstream/bin:" in r for k, r in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=service_id)
def test_build_context_holds_what_the_image_copies(dockerfile: Path) -> None:
    patterns = [
        line.strip() for line in (cf.REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context is an allowlist"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    for keyword, rest in instructions(dockerfile):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        *sources, _destination = rest.split()
        for source in sources:
            assert (cf.REPO / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is not sent to the builder"
    assert not allowed & {".venv", ".git", "runs", "data", "tests"}


def test_build_context_makes_a_wheel_that_runs_every_command(tmp_path: Path) -> None:
    """The images install a wheel built from the build context, not the editable install
    the tests otherwise use: build it from exactly what .dockerignore lets through, install
    it on its own and run each command the compose files run."""
    context = tmp_path / "context"
    for line in (cf.REPO / ".dockerignore").read_text().splitlines():
        if line.startswith("!"):
            source = cf.REPO / line[1:]
            if source.is_dir():
                shutil.copytree(source, context / line[1:], ignore=shutil.ignore_patterns(
                    "__pycache__", "*.pyc"))
            else:
                context.mkdir(exist_ok=True)
                shutil.copy2(source, context / line[1:])
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # No build isolation: it would fetch setuptools from the network; the venv has it.
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"),
         str(context)], capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("fedstream-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    # The wheel's copy comes first on the path, ahead of the editable install.
    env = {**os.environ, "PYTHONPATH": str(site)}
    commands = {cf.command(cf.services(p, NO_KNOBS)[name])[0] for p, name in all_services()}
    commands |= {server_of(p)["healthcheck"]["test"][1] for p in cf.COMPOSE_FILES}
    assert commands == {"fl-server", "fl-client", "fl-healthcheck"}
    for script in sorted(commands):
        ran = subprocess.run(
            [str(site / "bin" / script), "--help"], env=env, capture_output=True, text=True,
            timeout=60,
        )
        assert ran.returncode == 0 and f"usage: {script}" in ran.stdout, ran.stderr
    where = subprocess.run(
        [sys.executable, "-c", "import fedstream.server.healthcheck as m; print(m.__file__)"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where


@pytest.mark.parametrize("path", cf.COMPOSE_FILES, ids=service_id)
def test_services_build_from_the_repository(path: Path) -> None:
    for name, service in cf.services(path, NO_KNOBS).items():
        context = (path.parent / service["build"]["context"]).resolve()
        assert context == cf.REPO, name
        assert (context / service["build"]["dockerfile"]).is_file(), name


# --- the health check against a real server ------------------------------------------


def test_probe_defaults_to_the_servers_own_address() -> None:
    assert default_target({}) == ("localhost", 50051)
    assert default_target({"FL_SERVER_HOST": "[::]", "FL_SERVER_PORT": "6001"}) == (
        "localhost",
        6001,
    )
    assert default_target({"FL_SERVER_HOST": "10.231.0.1"}) == ("10.231.0.1", 50051)


@pytest.mark.e2e
def test_health_check_passes_only_while_the_server_serves(
    cluster: Cluster, tmp_path: Path
) -> None:
    server_service = server_of(cf.CPU_FILE)
    port = free_port()
    folders = {"/runs": tmp_path / "runs", "/data": tmp_path / "data"}
    env = cf.on_host(cf.environment(server_service, NO_KNOBS), folders)
    # Loopback only here; the compose value [::] is exercised in tests/docker/test_multihost.
    env |= {"FL_SERVER_PORT": str(port), "FL_SERVER_HOST": "127.0.0.1"}
    env = with_venv_path(env)
    probe = server_service["healthcheck"]["test"][1:]  # what the engine runs, after "CMD"

    def run_probe(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*probe, *extra], env={**os.environ, **env}, capture_output=True, text=True,
            timeout=30,
        )

    before = run_probe()
    assert before.returncode == 1, before
    assert "UNAVAILABLE" in before.stderr

    server = cluster.start("server", cf.command(server_service), env=env)
    server.wait_for(rf"listening on 127\.0\.0\.1:{port}", timeout=120)

    serving = run_probe()
    assert serving.returncode == 0, serving
    assert f"127.0.0.1:{port} service '': SERVING" in serving.stdout
    assert run_probe("--service", "fedstream.v1.Federation").returncode == 0
    unknown = run_probe("--service", "fedstream.v1.NoSuchService")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr, unknown


async def test_health_check_fails_while_the_server_is_not_serving() -> None:
    # fl-server reports NOT_SERVING only in its last seconds (graceful shutdown), too short
    # a window to probe reliably; the same health servicer on a real port stands in for it.
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def probe() -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedstream.server.healthcheck",
            "--host", "127.0.0.1", "--port", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
        return process.returncode, output.decode()

    try:
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        code, output = await probe()
        assert code == 1 and "NOT_SERVING" in output, output
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        code, output = await probe()
        assert code == 0 and "SERVING" in output, output
    finally:
        await server.stop(None)


@pytest.mark.e2e
def test_health_check_probes_a_tls_server_over_tls(cluster: Cluster, tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    pair = ca.issue("localhost", server=True)
    server_service = server_of(cf.CPU_FILE)
    port = free_port()
    folders = {"/runs": tmp_path / "runs", "/data": tmp_path / "data"}
    env = cf.on_host(cf.environment(server_service, NO_KNOBS), folders)
    # What a user adds to the server's environment to serve TLS.
    env |= {
        "FL_SERVER_PORT": str(port),
        "FL_SERVER_HOST": "127.0.0.1",
        "FL_SERVER_TLS_CERT": str(pair.cert),
        "FL_SERVER_TLS_KEY": str(pair.key),
    }
    env = with_venv_path(env)
    server = cluster.start("server", cf.command(server_service), env=env)
    server.wait_for(rf"listening on 127\.0\.0\.1:{port}", timeout=120)
    probe = server_service["healthcheck"]["test"][1:]

    def run_probe(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*probe, *extra], env={**os.environ, **env}, capture_output=True, text=True,
            timeout=30,
        )

    plain = run_probe()
    assert plain.returncode == 1 and "pass --tls-ca" in plain.stderr, plain
    verified = run_probe("--tls-ca", str(ca.bundle), "--host", "localhost")
    assert verified.returncode == 0 and "SERVING" in verified.stdout, verified
    stranger = CertificateAuthority(tmp_path / "other-pki", name="another CA")
    refused = run_probe("--tls-ca", str(stranger.bundle), "--host", "localhost")
    assert refused.returncode == 1, refused
