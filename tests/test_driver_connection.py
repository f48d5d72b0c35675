"""A connection of the pool that asyncpg can no longer use is dropped, not handed to the next request."""

import asyncpg
import pytest

from app.service.db.engine import create_engine, driver_connection, is_database_unavailable
from app.service.errors import NotFoundError


async def backend_pid_after(database_url: str, error: Exception) -> tuple[int, int]:
    """The server process of a one-connection pool before a checkout that raised `error`, and after it."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with driver_connection(engine) as connection:
            before: int = await connection.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(type(error)):
            async with driver_connection(engine):
                raise error
        async with driver_connection(engine) as connection:
            after: int = await connection.fetchval("SELECT pg_backend_pid()")
        return before, after
    finally:
        await engine.dispose()


async def test_a_connection_asyncpg_left_mid_operation_is_replaced(database_url: str) -> None:
    error = asyncpg.exceptions.InternalClientError("cannot switch to state 11; another operation (2) is in progress")
    before, after = await backend_pid_after(database_url, error)
    assert before != after
    # And the request that met it answers 503, as during any outage, not 500.
    assert is_database_unavailable(error)


async def test_a_connection_is_kept_when_the_request_failed_for_another_reason(database_url: str) -> None:
    before, after = await backend_pid_after(database_url, NotFoundError("VM does not exist"))
    assert before == after
