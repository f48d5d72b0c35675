"""Tests that without DATABASE_URL the service runs on an embedded PostgreSQL whose data survives any restart.

`migrate` and `serve` run as real processes, as `make run` starts them; the serve process is SIGKILLed,
in one variant together with its PostgreSQL (leaving a stale postmaster.pid behind), and started again.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from app.service.db.embedded import start_embedded_postgres
from app.service.db.engine import asyncpg_dsn
from app.service.db.models import Base
from devtools.local_stack import free_port
from tests.pg_helpers import is_running, server_processes, stop_postgres

REPO_ROOT = Path(__file__).resolve().parent.parent
# Generous: the first start runs initdb, and the machine is small and shared.
READY_SECONDS = 90.0
COMMAND_SECONDS = 180.0


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """An empty folder to run the service in; the PostgreSQL started under its .data/ is stopped afterwards."""
    # Short, so that pgserver's unix socket fits in pgdata itself.
    path = Path(tempfile.mkdtemp(prefix="vtpm-emb-"))
    yield path
    pgdata = path / ".data" / "pgdata"
    if is_running(pgdata):
        stop_postgres(pgdata)
    assert not server_processes(pgdata)
    shutil.rmtree(path, ignore_errors=True)


def service_env(**settings: str) -> dict[str, str]:
    """The environment of a service process: no DATABASE_URL (so the embedded database), no token, `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "API_TOKEN", "DATA_DIR"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return {**env, **settings}


@contextmanager
def serving(cwd: Path, **settings: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m app serve` as a process in `cwd`, once /readyz answers 200; its process and base URL.

    A process still running when the block ends is killed.
    """
    port = free_port()
    log_path = cwd / f"serve-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port)],
            cwd=cwd,
            env=service_env(**settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_SECONDS
        while not ready(url):
            log = log_path.read_text(errors="replace")
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"serve was not ready within {READY_SECONDS:g} s:\n{log}"
            time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ready(url: str) -> bool:
    """Whether the service at `url` answers /readyz with 200."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """Kill the process at once, as the kernel's OOM killer or `kill -9` would."""
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def sigkill_postgres(pgdata: Path) -> None:
    """Kill the server of `pgdata` and all its processes at once, leaving its postmaster.pid behind."""
    processes = server_processes(pgdata)
    assert processes, "no PostgreSQL server runs on that data"
    for process in processes:
        process.kill()
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive
    assert (pgdata / "postmaster.pid").exists()


async def our_tables(data_dir: Path) -> set[str]:
    """The tables in the embedded database under `data_dir` (which this starts or takes over)."""
    connection = await asyncpg.connect(asyncpg_dsn(start_embedded_postgres(data_dir)))
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    return {row["tablename"] for row in rows}


async def test_migrate_without_database_url_creates_the_database_under_dot_data(work_dir: Path) -> None:
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "migrate", cwd=work_dir, env=service_env()
    )
    assert await asyncio.wait_for(migrate.wait(), COMMAND_SECONDS) == 0
    assert (work_dir / ".data" / "pgdata" / "PG_VERSION").is_file()
    assert await our_tables(work_dir / ".data") == set(Base.metadata.tables) | {"alembic_version"}


@pytest.mark.parametrize("kill_postgres", [False, True], ids=["serve-killed", "serve-and-postgres-killed"])
def test_serve_keeps_its_data_after_sigkill(work_dir: Path, kill_postgres: bool) -> None:
    data_dir = work_dir / ".data"
    vm_uuid = str(uuid.uuid4())
    with serving(work_dir, DATA_DIR=str(data_dir)) as (process, url):
        answer = httpx.put(f"{url}/vms/{vm_uuid}", json={"name": "survivor", "secure_boot": True}, timeout=10)
        assert answer.status_code == 201, answer.text
        sigkill(process)
    pgdata = data_dir / "pgdata"
    if kill_postgres:
        sigkill_postgres(pgdata)

    with serving(work_dir, DATA_DIR=str(data_dir)) as (_, url):
        answer = httpx.get(f"{url}/vms/{vm_uuid}", timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"uuid": vm_uuid, "name": "survivor", "secure_boot": True}
