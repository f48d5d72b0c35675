"""The container setup, checked without a Docker engine: the compose file, the Dockerfile and its entrypoint."""

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import make_url

from tests.agent_helpers import running_agent

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
# The command that replaces the entrypoint's default one in these tests: it shows it ran, and with what.
SHOW_ENV = [
    sys.executable,
    "-c",
    "import os, json; print(json.dumps({'ran': True, 'url': os.environ['DATABASE_URL']}))",
]


def interpolate(value: str) -> str:
    """A compose value as compose resolves it with nothing set in the environment (`${X:-default}` -> default)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_compose_has_postgres_migrate_two_apis_and_two_agents(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "migrate", "api-1", "api-2", "agent-1", "agent-2", "jaeger"}
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pgdata:/var/lib/postgresql" in postgres["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    migrate = services["migrate"]
    assert migrate["command"] == ["python", "-m", "app", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_compose_api_replicas_wait_for_the_migration_and_share_the_database(
    services: dict[str, dict[str, Any]],
) -> None:
    postgres_env = services["postgres"]["environment"]
    host_ports = set()
    for name in ("api-1", "api-2"):
        api = services[name]
        assert api["build"] == "." and "command" not in api, "the image's default command serves the API"
        assert api["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
        (port,) = api["ports"]
        host_port, container_port = port.split(":")
        assert container_port == "8000"
        host_ports.add(host_port)
        url = make_url(api["environment"]["DATABASE_URL"])
        assert url.drivername == "postgresql+asyncpg" and url.host == "postgres"
        assert (url.username, url.password, url.database) == (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"],
        )
        assert interpolate(api["environment"]["API_TOKEN"])
    assert host_ports == {"8000", "8001"}
    assert services["migrate"]["environment"]["DATABASE_URL"] == services["api-1"]["environment"]["DATABASE_URL"]


def test_compose_traces_to_jaeger_only_with_the_tracing_profile_and_its_endpoint(
    services: dict[str, dict[str, Any]],
) -> None:
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["profiles"] == ["tracing"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true" and "16686:16686" in jaeger["ports"]
    assert [name for name, service in services.items() if "profiles" in service] == ["jaeger"]
    for name in ("api-1", "api-2"):
        environment = services[name]["environment"]
        # Nothing is exported unless the endpoint is given; the replicas start without Jaeger.
        assert interpolate(environment["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ""
        assert "jaeger" not in services[name]["depends_on"]
        assert interpolate(environment["OTEL_SERVICE_NAME"]) == "vtpm-cleanup"
        assert interpolate(environment["OTEL_PYTHON_FASTAPI_EXCLUDED_URLS"]).split(",") == [
            "healthz",
            "readyz",
            "metrics",
        ]
    # The endpoint the compose file's comment gives is Jaeger's OTLP over HTTP, the exporter the service has.
    assert (
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 docker compose --profile tracing up"
        in (ROOT / "docker-compose.yml").read_text()
    )


def test_compose_agents_run_the_shipped_agent_as_root_on_their_own_volume(
    services: dict[str, dict[str, Any]],
) -> None:
    agent_token = interpolate(services["api-1"]["environment"]["AGENT_TOKEN"])
    volumes = set()
    for name in ("agent-1", "agent-2"):
        agent = services[name]
        command = agent["command"]
        assert command[:4] == ["python", "-m", "app", "agent"]
        options = dict(zip(command[4::2], command[5::2], strict=True))
        assert options == {"--root": "/var/lib/libvirt", "--host": "0.0.0.0", "--port": "8100", "--libvirt-uri": "none"}
        assert agent["user"] == "root"
        (volume,) = agent["volumes"]
        assert volume.endswith(":/var/lib/libvirt")
        volumes.add(volume)
        assert interpolate(agent["environment"]["AGENT_TOKEN"]) == agent_token
        assert "8100/healthz" in " ".join(agent["healthcheck"]["test"])
    assert len(volumes) == 2, "each host has its own files"


def test_dockerfile_builds_wheels_then_runs_slim_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert stages == ["python:3.11-slim AS build", "python:3.11-slim"]
    assert any(keyword == "RUN" and "pip wheel" in args for keyword, args in instructions)
    (user,) = [args for keyword, args in instructions if keyword == "USER"]
    assert user not in ("root", "0")
    (healthcheck,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "curl" not in healthcheck
    (cmd,) = [args for keyword, args in instructions if keyword == "CMD"]
    assert json.loads(cmd) == ["python", "-m", "app", "serve", "--host", "0.0.0.0"]
    (entrypoint,) = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["/usr/local/bin/entrypoint.sh"]


def test_dockerfile_copies_only_files_that_exist_and_are_not_docker_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = [args.split()[:-1] for keyword, args in dockerfile_instructions() if keyword == "COPY"]
    sources = [source for sources in copied for source in sources if not source.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.split("/")[0] not in ignored, source


@pytest.mark.parametrize("snippet_source", ["Dockerfile", "docker-compose.yml"])
async def test_healthcheck_commands_pass_against_a_live_healthz_and_fail_without_one(
    snippet_source: str, tmp_path: Path
) -> None:
    """The healthcheck one-liners, run as written with only the port changed, against the shipped agent's /healthz."""
    snippets = re.findall(r'"python", "-c", "([^"]+)"', (ROOT / snippet_source).read_text())
    assert snippets

    async def exit_status(snippet: str, port: str) -> int:
        live = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", snippet)
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", live], capture_output=True)
        return result.returncode

    async with running_agent(tmp_path) as url:
        for snippet in snippets:
            assert await exit_status(snippet, url.rsplit(":", 1)[1]) == 0, snippet
    assert await exit_status(snippets[0], "1") != 0


def test_entrypoint_is_valid_bash() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0


def run_entrypoint(database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the entrypoint as the image does (from the project folder, `python` on the PATH) with SHOW_ENV."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        [str(ENTRYPOINT), *SHOW_ENV],
        cwd=ROOT,
        env={**os.environ, "PATH": path, "DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_entrypoint_migrates_then_runs_the_command_when_asked(database_url: str) -> None:
    result = await asyncio.to_thread(run_entrypoint, database_url, MIGRATE_ON_START="1")
    assert result.returncode == 0, result.stderr
    assert "database schema is up to date" in result.stderr
    assert json.loads(result.stdout) == {"ran": True, "url": database_url}


def test_entrypoint_runs_the_command_alone_by_default() -> None:
    unreachable = f"postgresql+asyncpg://nobody:nothing@127.0.0.1:1/{uuid.uuid4().hex}"
    result = run_entrypoint(unreachable, MIGRATE_ON_START="0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ran": True, "url": unreachable}


def test_entrypoint_does_not_start_the_command_when_the_migration_fails() -> None:
    unreachable = f"postgresql+asyncpg://nobody:nothing@127.0.0.1:1/{uuid.uuid4().hex}"
    result = run_entrypoint(unreachable, MIGRATE_ON_START="1")
    assert result.returncode != 0
    assert '"ran"' not in result.stdout
