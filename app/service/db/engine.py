"""The database engine and session factory, and how a settings object becomes a database URL."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from app.service.db.embedded import start_embedded_postgres
from app.service.settings import Settings

# How long a connection attempt may take before the database counts as unreachable (answers 503).
CONNECT_TIMEOUT_SECONDS = 3.0
# How long one statement of the service may wait for the database's answer: a database that accepts
# connections but does not answer (frozen, cut off by the network) makes calls fail (503) instead of hang.
COMMAND_TIMEOUT_SECONDS = 5.0


class Engine(AsyncEngine):
    """The service's engine: SQLAlchemy's, with a line that its checkouts wait in, first come first served.

    SQLAlchemy's asyncio pool lets a checkout that arrives just as a connection is put back take it before the
    checkout that waited for it, which goes to the back of the line: under overload, a tail of requests waits long.
    A FIFO semaphore of the pool's size in front of `checkout` keeps the order; the pool itself then has a connection
    for the one whose turn it is. Sessions check their connection out lazily, past the line.
    """

    __slots__ = ("line",)

    def __init__(self, engine: AsyncEngine, pool_size: int) -> None:
        super().__init__(engine.sync_engine)
        self.line = asyncio.Semaphore(pool_size)


def resolve_database_url(settings: Settings) -> str:
    """The SQLAlchemy URL to use: DATABASE_URL, or the embedded server's, started on demand."""
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings.data_dir)


def asyncpg_dsn(database_url: str) -> str:
    """The same URL in the plain form asyncpg.connect takes (for the LISTEN connection)."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(
    database_url: str,
    *,
    pool_size: int = 20,
    command_timeout: float | None = None,
    idle_transaction_timeout: float = 0,
    synchronous_commit: bool = True,
) -> Engine:
    """An engine whose pool survives database restarts and fails fast while the database is down.

    `command_timeout` bounds every statement in seconds; None leaves long statements alone.
    `idle_transaction_timeout` has the server end a session that sits inside a transaction that many seconds
    without a statement: its process is stalled (paused, starved), and the row locks it holds must not keep
    other processes from taking its jobs over. 0 leaves such sessions be.
    `synchronous_commit=False` lets a commit return before its WAL is on disk: for work that is redone when
    lost (see app.service.main), not for anything a caller is told is done.
    """
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        # A fixed pool: overflow connections opened and closed under load are each a new server process.
        max_overflow=0,
        pool_timeout=CONNECT_TIMEOUT_SECONDS,
        pool_recycle=1800,
        connect_args={
            "timeout": CONNECT_TIMEOUT_SECONDS,
            "command_timeout": command_timeout,
            "server_settings": {
                "application_name": "vtpm",
                "idle_in_transaction_session_timeout": str(round(idle_transaction_timeout * 1000)),
                "synchronous_commit": "on" if synchronous_commit else "off",
            },
        },
    )
    # Not pool_pre_ping, three round trips per checkout: a connection the server closed is known closed to asyncpg
    # and replaced here; one that breaks during a statement fails that call (503) and is replaced then.
    event.listen(engine.sync_engine.pool, "checkout", _replace_if_closed)
    return Engine(engine, pool_size)


def _replace_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    if dbapi_connection.driver_connection.is_closed():
        raise sa_exc.DisconnectionError("connection closed by the database server")


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit, as the API answers from them."""
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def _turn(engine: Engine) -> AsyncIterator[None]:
    """Hold a place of the engine's line, once every checkout that asked before has had its turn; after
    CONNECT_TIMEOUT_SECONDS of waiting, SQLAlchemy's pool timeout error (answered 503)."""
    if engine.line.locked():
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await engine.line.acquire()
        except TimeoutError as error:
            raise sa_exc.TimeoutError(f"no connection free within {CONNECT_TIMEOUT_SECONDS:g} s") from error
    else:
        await engine.line.acquire()  # free: no wait, so no timer to set
    try:
        yield
    finally:
        engine.line.release()


@asynccontextmanager
async def checkout(engine: Engine) -> AsyncIterator[AsyncConnection]:
    """A SQLAlchemy connection of the engine's pool, in its turn."""
    async with _turn(engine), engine.connect() as connection:
        yield connection


@asynccontextmanager
async def driver_connection(engine: Engine) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the engine's pool, in its turn, as asyncpg's own, outside any transaction: each statement
    commits alone. For the named statements (app.service.db.queries).

    Checked out without a SQLAlchemy Connection around it, which costs more CPU than the statement itself
    (`python -m bench.statements`); handed back at once, as nothing of SQLAlchemy's began on it. A connection whose
    statement failed for its connection's sake (broken by a database restart, or left by asyncpg in the middle of
    an operation) is never handed out again.
    """
    dbapi_error = engine.dialect.loaded_dbapi.Error
    async with _turn(engine):
        try:
            pooled = await engine.raw_connection()
        except dbapi_error as error:
            # As engine.connect() does, so that the outage handling knows it.
            raise sa_exc.DBAPIError.instance(None, None, error, dbapi_error) from error
        try:
            yield pooled.driver_connection
        except BaseException as error:
            if is_database_unavailable(error):
                pooled.invalidate(error)
            raise
        finally:
            pooled.close()


@asynccontextmanager
async def recorded_statements(engine: AsyncEngine) -> AsyncIterator[list[tuple[str, tuple[Any, ...]]]]:
    """Every statement sent on connections the engine hands out while the block runs, with its parameter values:
    SQLAlchemy's and the named statements' alike. For the tests and the benchmark that count a job's statements."""
    statements: list[tuple[str, tuple[Any, ...]]] = []
    logged: set[asyncpg.Connection] = set()

    def on_sqlalchemy(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        values = parameters.values() if isinstance(parameters, dict) else parameters or ()
        statements.append((statement, tuple(values)))

    def on_driver(query: asyncpg.connection.LoggedQuery) -> None:
        statements.append((query.query, tuple(query.args)))

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver not in logged:
            driver.add_query_logger(on_driver)
            logged.add(driver)

    event.listen(engine.sync_engine, "before_cursor_execute", on_sqlalchemy)
    event.listen(engine.sync_engine.pool, "checkout", on_checkout)
    try:
        yield statements
    finally:
        # asyncpg calls its query loggers soon after each statement, not during it.
        await asyncio.sleep(0)
        event.remove(engine.sync_engine.pool, "checkout", on_checkout)
        event.remove(engine.sync_engine, "before_cursor_execute", on_sqlalchemy)
        for driver in logged:
            driver.remove_query_logger(on_driver)


def is_database_unavailable(error: BaseException) -> bool:
    """Whether an error means the database could not be reached, as opposed to a bad statement."""
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
        # asyncpg's own error travels as __cause__ of the DBAPI adapter's exception.
        if error.__cause__ is not None:
            error = error.__cause__
    if isinstance(error, sa_exc.TimeoutError):  # the pool could not hand out a connection in time
        return True
    return isinstance(
        error,
        OSError
        | asyncio.TimeoutError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.ConnectionFailureError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.InterfaceError
        # asyncpg's word for a connection still busy with an operation an outage cut short (seen in
        # tests/reliability/test_database_restart.py): the connection is unusable, the database may be fine.
        | asyncpg.exceptions.InternalClientError,
    ) or (
        isinstance(error, asyncpg.exceptions.PostgresError) and getattr(error, "sqlstate", "").startswith(("08", "57P"))
    )


async def ping(engine: Engine, timeout: float = 1.0) -> bool:
    """Whether the database answers a trivial query within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            async with checkout(engine) as conn:
                await conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
