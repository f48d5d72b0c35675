"""The engine's pool hands connections out so that no checkout is passed over again and again (service/db/fair_pool.py).

Each test uses a real pool of one connection to a real PostgreSQL, so that the order of checkouts is plain.
"""

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.service.db.engine import CONNECT_TIMEOUT_SECONDS, create_engine


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=1)
    yield engine
    await engine.dispose()


async def use_connection(engine: AsyncEngine, name: str, order: list[str]) -> None:
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT 1")) == 1
        order.append(name)


async def waiting_in_line(engine: AsyncEngine, name: str, order: list[str]) -> "asyncio.Task[None]":
    """A checkout that uses the connection once it gets it, started and given the time to wait in line."""
    task = asyncio.create_task(use_connection(engine, name, order))
    await asyncio.sleep(0.05)
    return task


def checked_out(engine: AsyncEngine) -> int:
    return engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


async def test_a_checkout_that_waited_gets_the_connection_before_one_that_just_came(engine: AsyncEngine) -> None:
    order: list[str] = []
    held = await engine.connect()
    waited = await waiting_in_line(engine, "waited", order)
    # The newcomer's first step runs before the waiter's, right after the connection is put back: with
    # asyncio.Queue's order it would take the connection, and the waiter would go to the back of the line.
    newcomer = asyncio.create_task(use_connection(engine, "newcomer", order))
    await held.close()
    await asyncio.gather(waited, newcomer)
    assert order == ["waited", "newcomer"]


async def test_a_checkout_waits_no_longer_than_the_pool_timeout_and_the_pool_goes_on(engine: AsyncEngine) -> None:
    held = await engine.connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(sa_exc.TimeoutError):
        await engine.connect()
    assert loop.time() - started >= CONNECT_TIMEOUT_SECONDS * 0.9
    await held.close()
    order: list[str] = []
    async with asyncio.timeout(1):
        await use_connection(engine, "after", order)
    assert order == ["after"] and checked_out(engine) == 0


async def test_a_connection_handed_to_a_checkout_cancelled_meanwhile_goes_to_the_next(engine: AsyncEngine) -> None:
    order: list[str] = []
    held = await engine.connect()
    cancelled = await waiting_in_line(engine, "cancelled", order)
    next_in_line = await waiting_in_line(engine, "next", order)
    await held.close()  # handed to the first waiter, which is cancelled before it runs
    cancelled.cancel()
    async with asyncio.timeout(1):  # not the pool timeout: the connection was not lost with the cancelled one
        await next_in_line
    assert cancelled.cancelled() and order == ["next"] and checked_out(engine) == 0
