"""`python -m bench.statements`: CPU per statement, via SQLAlchemy and as a named statement (app.service.db.queries).

The measured reason why a removal's fixed statements run on asyncpg past SQLAlchemy (docs/design.md, "How a removal
works"): the same statement, on connections of the same pool, 16 at a time, each on a connection checked out for it
as the service does. Prints the CPU time of this process (user + system) per statement for each way, over several
rounds.
"""

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text

from app.service.db.engine import create_engine, driver_connection
from app.service.db.queries import NamedStatements
from bench import loop
from bench.database import fresh_database, postgres_server

_SQL = "SELECT id, state FROM jobs WHERE id = :job_id AND vm_uuid = :vm_uuid"
_STATEMENT = text(_SQL)
_IN_FLIGHT = 16


async def cpu_per_statement(run_one: Callable[[], Awaitable[object]], statements: int) -> float:
    """Run `statements` statements, `_IN_FLIGHT` at a time, after a warm-up; this process's CPU seconds per one."""
    for _ in range(200):
        await run_one()

    async def run_share() -> None:
        for _ in range(statements // _IN_FLIGHT):
            await run_one()

    started = time.process_time()
    await asyncio.gather(*(run_share() for _ in range(_IN_FLIGHT)))
    return (time.process_time() - started) / (statements // _IN_FLIGHT * _IN_FLIGHT)


async def measure(statements: int, rounds: int) -> None:
    """Both ways, `rounds` times each, on a fresh database."""
    async with postgres_server() as (server_url, _), fresh_database(server_url) as database_url:
        engine = create_engine(database_url)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "queries.sql").write_text(f"-- read_job --\n{_SQL}\n")
            named = NamedStatements(str(Path(folder) / "bench.py"))
        params = {"job_id": uuid.uuid4(), "vm_uuid": uuid.uuid4()}

        async def through_sqlalchemy() -> object:
            # As the service ran these statements before named statements ran on the driver: alone, without BEGIN
            # and COMMIT.
            async with engine.connect() as connection:
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                return (await connection.execute(_STATEMENT, params)).all()

        async def as_named_statement() -> object:
            async with driver_connection(engine) as connection:
                return await named.run(connection, "read_job", params)

        try:
            ways = {"SQLAlchemy execute": through_sqlalchemy, "named statement": as_named_statement}
            for _ in range(rounds):
                for name, run_one in ways.items():
                    seconds = await cpu_per_statement(run_one, statements)
                    print(f"{name:<20} {seconds * 1e6:6.1f} µs of CPU per statement ({statements} statements)")
        finally:
            await engine.dispose()


def main() -> None:
    """Parse the command line and measure."""
    parser = argparse.ArgumentParser(prog="python -m bench.statements", description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=5000, help="statements per measurement (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each way (default 3)")
    args = parser.parse_args()
    loop.run(measure(args.statements, args.rounds))


if __name__ == "__main__":
    main()
