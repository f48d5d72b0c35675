"""The engine hands connections out so that no checkout is passed over again and again (`checkout`, db/engine.py).

Each test uses a real pool of one connection to a real PostgreSQL, so that the order of checkouts is plain.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from app.service.db.engine import CONNECT_TIMEOUT_SECONDS, Engine, checkout, create_engine


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[Engine]:
    engine = create_engine(database_url, pool_size=1)
    yield engine
    await engine.dispose()


async def use_connection(engine: Engine, name: str, order: list[str]) -> None:
    async with checkout(engine) as connection:
        assert await connection.scalar(text("SELECT 1")) == 1
        order.append(name)


async def waiting_in_line(engine: Engine, name: str, order: list[str]) -> "asyncio.Task[None]":
    """A checkout that uses the connection once it gets it, started and given the time to wait in line."""
    task = asyncio.create_task(use_connection(engine, name, order))
    await asyncio.sleep(0.05)
    return task


async def held_connection(engine: Engine) -> AsyncExitStack:
    """A connection checked out until the stack returned is closed."""
    stack = AsyncExitStack()
    await stack.enter_async_context(checkout(engine))
    return stack


def checked_out(engine: Engine) -> int:
    return engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


async def test_a_checkout_that_waited_gets_the_connection_before_one_that_just_came(engine: Engine) -> None:
    order: list[str] = []
    held = await held_connection(engine)
    waited = await waiting_in_line(engine, "waited", order)
    # The newcomer's first step runs before the waiter's, right after the connection is put back: with
    # asyncio.Queue's order it would take the connection, and the waiter would go to the back of the line.
    newcomer = asyncio.create_task(use_connection(engine, "newcomer", order))
    await held.aclose()
    await asyncio.gather(waited, newcomer)
    assert order == ["waited", "newcomer"]


async def test_a_checkout_waits_no_longer_than_the_pool_timeout_and_the_pool_goes_on(engine: Engine) -> None:
    held = await held_connection(engine)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(sa_exc.TimeoutError):
        await held_connection(engine)
    assert loop.time() - started >= CONNECT_TIMEOUT_SECONDS * 0.9
    await held.aclose()
    order: list[str] = []
    async with asyncio.timeout(1):
        await use_connection(engine, "after", order)
    assert order == ["after"] and checked_out(engine) == 0


async def test_a_connection_handed_to_a_checkout_cancelled_meanwhile_goes_to_the_next(engine: Engine) -> None:
    order: list[str] = []
    held = await held_connection(engine)
    cancelled = await waiting_in_line(engine, "cancelled", order)
    next_in_line = await waiting_in_line(engine, "next", order)
    await held.aclose()  # handed to the first waiter, which is cancelled before it runs
    cancelled.cancel()
    async with asyncio.timeout(1):  # not the pool timeout: the connection was not lost with the cancelled one
        await next_in_line
    assert cancelled.cancelled() and order == ["next"] and checked_out(engine) == 0
