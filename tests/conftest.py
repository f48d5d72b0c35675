"""Test fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL's server), the app, HTTP clients, a libvirtd."""

import asyncio
import io
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from sqlalchemy import make_url, text

from app.service.db.embedded import start_embedded_postgres
from app.service.db.engine import asyncpg_dsn
from app.service.db.migrate import upgrade
from app.service.logs import log_handler
from app.service.main import create_app
from app.service.settings import Settings
from app.service.tracing import Tracing
from tests.real_libvirt import LibvirtDaemon, missing_requirement
from tests.real_parts import require


async def create_database(server_url: str) -> str:
    """A new, empty database on the server of `server_url`; its URL."""
    name = f"vtpm_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The PostgreSQL server the tests use: TEST_DATABASE_URL's, or an embedded one in a temporary folder
    that is stopped and deleted when the session ends."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    data_dir = Path(tempfile.mkdtemp(prefix="vtpm-test-pg-"))
    yield start_embedded_postgres(data_dir)
    from tests.pg_helpers import stop_postgres  # it imports this module: only once both are loaded

    stop_postgres(data_dir / "pgdata")
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> str:
    """A database for this test session, migrated to head."""
    url = await create_database(server_url)
    await asyncio.to_thread(upgrade, url)
    return url


def test_settings(**overrides: Any) -> Settings:
    """Settings with short intervals so that leases, retries and polls happen within a test."""
    values: dict[str, Any] = {
        "api_token": None,
        "agent_token": None,
        "agent_timeout_seconds": 2.0,
        "orphan_retry_seconds": 0.3,
        "orphan_retry_max_seconds": 1.0,
        "job_lease_seconds": 3.0,
        "worker_poll_seconds": 0.2,
        "db_pool_size": 10,
    }
    values.update(overrides)
    return Settings(**values)


AppFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_client(database_url: str) -> AsyncIterator[AppFactory]:
    """Start the app (lifespan, worker and all) with settings overrides (and `tracing`, else OpenTelemetry's
    variables'); an httpx client bound to it."""
    stack: list[tuple[FastAPI, Any, httpx.AsyncClient]] = []

    async def start(*, run_worker: bool = True, tracing: Tracing | None = None, **overrides: Any) -> httpx.AsyncClient:
        app = create_app(test_settings(**overrides), database_url=database_url, run_worker=run_worker, tracing=tracing)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        client.app = app  # type: ignore[attr-defined]
        stack.append((app, lifespan, client))
        return client

    yield start
    for _, lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the process logs during the test, down to DEBUG, through the service's own handler (JSON)."""
    stream = io.StringIO()
    handler = log_handler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
async def client(make_client: AppFactory) -> httpx.AsyncClient:
    """A client of the app with default test settings, worker running."""
    return await make_client()


async def setting_of_each_pool(client: httpx.AsyncClient, name: str) -> dict[str, str]:
    """A server setting as a connection of each of the app's two pools, the API's and the worker's, sees it."""
    settings = {}
    for pool in ("engine", "worker_engine"):
        async with getattr(client.app.state, pool).connect() as connection:  # type: ignore[attr-defined]
            settings[pool] = await connection.scalar(text(f"SHOW {name}"))
    return settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_libvirtd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LibvirtDaemon]:
    """One real libvirtd for a test module's tests, on a private socket (tests/real_libvirt.py)."""
    require(missing_requirement())
    daemon = LibvirtDaemon(tmp_path_factory.mktemp("libvirt"))
    await daemon.start()
    yield daemon
    await daemon.stop()


@pytest.fixture
async def libvirtd(module_libvirtd: LibvirtDaemon) -> AsyncIterator[LibvirtDaemon]:
    """The module's libvirtd, answering again after the test (whatever it did to it), with the test's secrets gone."""
    yield module_libvirtd
    module_libvirtd.thaw_if_frozen()
    if not module_libvirtd.running:
        await module_libvirtd.start()
    await module_libvirtd.undefine_leftovers()
