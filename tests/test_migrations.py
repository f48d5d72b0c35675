"""Tests of the Alembic migrations: up from an empty database, down to base, up again, and equal to the models."""

import asyncio
import logging
import uuid
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.service.db.engine import asyncpg_dsn
from app.service.db.migrate import downgrade, upgrade
from app.service.db.models import Base
from tests.conftest import create_database

OUR_TABLES = set(Base.metadata.tables)
TRIGGER_FUNCTIONS = {"notify_job_changed", "notify_job_host_changed"}
PRUNED_TABLES = ("jobs", "job_hosts", "job_files", "confirmed_deletions", "file_ledger")


@pytest.fixture
async def empty_database_url(server_url: str) -> str:
    """A new database with nothing in it."""
    return await create_database(server_url)


async def run_sync(database_url: str, check: Any) -> Any:
    """Run `check(connection)` on a synchronous view of a connection to the database; its result."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(check)
    finally:
        await engine.dispose()


def tables(connection: Connection) -> set[str]:
    """The tables of the public schema."""
    return set(inspect(connection).get_table_names())


def our_functions(connection: Connection) -> set[str]:
    """The trigger functions of ours that exist in the database."""
    rows = connection.execute(
        text("SELECT proname FROM pg_proc WHERE proname = ANY(:names)"), {"names": list(TRIGGER_FUNCTIONS)}
    )
    return {row[0] for row in rows}


def triggers(connection: Connection) -> set[str]:
    """The names of the user-defined triggers in the database."""
    return {row[0] for row in connection.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"))}


def schema_differences(connection: Connection) -> list[Any]:
    """What autogenerate would change to make the database match app/service/db/models.py (nothing, when they agree)."""
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, Base.metadata))


async def test_upgrade_from_empty_creates_every_table_and_trigger(empty_database_url: str) -> None:
    assert await run_sync(empty_database_url, tables) == set()
    await asyncio.to_thread(upgrade, empty_database_url)
    assert await run_sync(empty_database_url, tables) == OUR_TABLES | {"alembic_version"}
    assert await run_sync(empty_database_url, our_functions) == TRIGGER_FUNCTIONS
    assert await run_sync(empty_database_url, triggers) == {
        "jobs_notify_insert",
        "jobs_notify_update",
        "job_hosts_notify",
    }


async def test_downgrade_to_base_leaves_nothing_of_ours_and_upgrade_works_again(empty_database_url: str) -> None:
    await asyncio.to_thread(upgrade, empty_database_url)
    await asyncio.to_thread(downgrade, empty_database_url, "base")
    assert await run_sync(empty_database_url, tables) <= {"alembic_version"}
    assert await run_sync(empty_database_url, our_functions) == set()
    assert await run_sync(empty_database_url, triggers) == set()

    await asyncio.to_thread(upgrade, empty_database_url)
    assert await run_sync(empty_database_url, tables) == OUR_TABLES | {"alembic_version"}
    assert await run_sync(empty_database_url, schema_differences) == []


def vacuum_cost_delays(connection: Connection) -> dict[str, str | None]:
    """The autovacuum cost delay each table that job retention prunes has of its own (None: the server's)."""
    rows = connection.execute(
        text(
            "SELECT relname, (SELECT option_value FROM pg_options_to_table(reloptions) "
            "WHERE option_name = 'autovacuum_vacuum_cost_delay') FROM pg_class WHERE relname = ANY(:names)"
        ),
        {"names": list(PRUNED_TABLES)},
    )
    return {row[0]: row[1] for row in rows}


async def test_the_pruned_tables_are_vacuumed_as_the_server_says_once_0008_resets_what_0006_set(
    empty_database_url: str,
) -> None:
    await asyncio.to_thread(upgrade, empty_database_url, "0007")
    assert await run_sync(empty_database_url, vacuum_cost_delays) == dict.fromkeys(PRUNED_TABLES, "10")

    await asyncio.to_thread(upgrade, empty_database_url)
    assert await run_sync(empty_database_url, vacuum_cost_delays) == dict.fromkeys(PRUNED_TABLES, None)

    # 0008's downgrade sets nothing again, and 0006's resets what is no longer set without failing.
    await asyncio.to_thread(downgrade, empty_database_url, "0005")
    assert await run_sync(empty_database_url, vacuum_cost_delays) == dict.fromkeys(PRUNED_TABLES, None)


def flush_after(connection: Connection) -> str:
    """`backend_flush_after` as a new session in the database sees it: what autovacuum's workers see too."""
    return str(connection.execute(text("SHOW backend_flush_after")).scalar())


async def test_every_session_flushes_as_the_server_says_once_0008_resets_what_0007_set(
    empty_database_url: str,
) -> None:
    assert await run_sync(empty_database_url, flush_after) == "0"
    await asyncio.to_thread(upgrade, empty_database_url, "0007")
    assert await run_sync(empty_database_url, flush_after) == "256kB"

    await asyncio.to_thread(upgrade, empty_database_url)
    assert await run_sync(empty_database_url, flush_after) == "0"

    await asyncio.to_thread(downgrade, empty_database_url, "0007")
    assert await run_sync(empty_database_url, flush_after) == "0"
    await asyncio.to_thread(downgrade, empty_database_url, "0006")
    assert await run_sync(empty_database_url, flush_after) == "0"


def warnings_about(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    """The messages logged so far that contain `words`."""
    return [record.getMessage() for record in caplog.records if words in record.getMessage()]


async def test_a_role_that_does_not_own_the_database_migrates_and_leaves_the_owner_s_flush_setting_alone(
    server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    role, password = f"vtpm_not_owner_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    database_url = await create_database(server_url)
    superuser = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await superuser.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await superuser.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
        role_url = make_url(database_url).set(username=role, password=password).render_as_string(hide_password=False)

        with caplog.at_level(logging.WARNING):
            await asyncio.to_thread(upgrade, role_url)
            assert await run_sync(role_url, tables) == OUR_TABLES | {"alembic_version"}
            assert await run_sync(role_url, flush_after) == "0"
            await asyncio.to_thread(downgrade, role_url, "base")
            # 0007 could set nothing, up or down; 0008 finds nothing set and says nothing.
            assert len(warnings_about(caplog, "does not own the database")) == 2
            assert warnings_about(caplog, "keeps backend_flush_after") == []

            # The owner sets it, as 0007's warning suggests; 0008, run by the other role, leaves it and says so.
            await asyncio.to_thread(upgrade, role_url, "0007")
            database = make_url(database_url).database
            await superuser.execute(f"ALTER DATABASE \"{database}\" SET backend_flush_after = '512kB'")
            await asyncio.to_thread(upgrade, role_url)
            assert await run_sync(role_url, flush_after) == "512kB"
            assert len(warnings_about(caplog, "keeps backend_flush_after")) == 1
            assert await run_sync(role_url, vacuum_cost_delays) == dict.fromkeys(PRUNED_TABLES, None)
    finally:
        await superuser.close()
        # A shared server (TEST_DATABASE_URL's) is left as it was; the role's grant goes with the database.
        server = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await server.execute(f'DROP DATABASE "{make_url(database_url).database}"')
            await server.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await server.close()


async def test_upgrade_twice_changes_nothing(empty_database_url: str) -> None:
    await asyncio.to_thread(upgrade, empty_database_url)
    await asyncio.to_thread(upgrade, empty_database_url)
    assert await run_sync(empty_database_url, schema_differences) == []


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    assert await run_sync(database_url, schema_differences) == []


async def test_schema_comparison_notices_a_missing_index(empty_database_url: str) -> None:
    """The comparison above is not vacuous: a schema that lost an index differs from the models."""
    await asyncio.to_thread(upgrade, empty_database_url)

    def drop_index_and_compare(connection: Connection) -> list[Any]:
        connection.execute(text("DROP INDEX ix_host_files_vm_uuid"))
        return schema_differences(connection)

    differences = await run_sync(empty_database_url, drop_index_and_compare)
    assert [(d[0], d[1].name) for d in differences] == [("add_index", "ix_host_files_vm_uuid")]
