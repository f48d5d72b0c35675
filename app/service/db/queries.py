"""Named SQL statements, kept together in a domain's `queries.sql` as procrastinate keeps its own, and run by name.

A file holds statements under headers `-- name --`; the comment lines of a statement document it in the file and
are left out of the text that is sent, so that a colon in a comment is never taken for a parameter. A line
`-- include name --` stands for the lines of a section above it, and `-- include name from folder --` for those of a
section of a sibling domain's file: CTEs that two statements share are written once.

Every named statement runs the same way: `await STATEMENTS.run(connection, "claim_jobs", params)`, on the driver's
own connection (`app.service.db.engine.driver_connection`, or `driver_of(session)` inside a session's transaction).
The driver runs a fixed statement with far less CPU than SQLAlchemy's execution (docs/BENCHMARK.md).
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession

_HEADER = re.compile(r"^-- ([a-z_]+) --$")
_INCLUDE = re.compile(r"^-- include ([a-z_]+)(?: from ([a-z_]+))? --$")


def load_queries(beside: str, file_name: str = "queries.sql") -> dict[str, str]:
    """The statements of the `file_name` in the folder of the module file `beside` (pass `__file__`), by name."""
    return _load(Path(beside).parent / file_name)


def _load(path: Path) -> dict[str, str]:
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        if include := _INCLUDE.match(line):
            name, folder = include.groups()
            section = queries.get(name) if folder is None else _section_of(path, folder, name)
            if current is None or section is None:
                raise ValueError(f"{line!r} names no section above it")
            current.extend(section)
        elif header := _HEADER.match(line):
            current = queries.setdefault(header.group(1), [])
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in queries.items()}


def _section_of(path: Path, folder: str, name: str) -> list[str] | None:
    """The lines of the section `name` of the sibling domain `folder`'s file, or None."""
    section = _load(path.parent.parent / folder / "queries.sql").get(name)
    return None if section is None else section.splitlines()


@dataclass(frozen=True)
class _DriverStatement:
    """A statement written with named parameters, compiled once into the driver's numbered ones."""

    sql: str
    names: tuple[str, ...]


class NamedStatements:
    """A domain's named statements, compiled once for the driver and run by name."""

    def __init__(self, beside: str, file_name: str = "queries.sql") -> None:
        dialect = asyncpg_dialect()  # type: ignore[no-untyped-call]
        self._statements = {}
        for name, sql in load_queries(beside, file_name).items():
            compiled = text(sql).compile(dialect=dialect)
            self._statements[name] = _DriverStatement(str(compiled), tuple(compiled.positiontup or ()))

    async def run(
        self, connection: asyncpg.Connection, name: str, params: Mapping[str, Any] | None = None
    ) -> list[asyncpg.Record]:
        """Run the statement `name` with `params` (by name; those it does not take are ignored); its rows."""
        statement = self._statements[name]
        given = params or {}
        rows: list[asyncpg.Record] = await connection.fetch(statement.sql, *(given[n] for n in statement.names))
        return rows


async def driver_of(session: AsyncSession) -> asyncpg.Connection:
    """The driver's connection under a session, inside its transaction: for a named statement in an ORM unit of
    work."""
    connection = await session.connection()
    driver: asyncpg.Connection = (await connection.get_raw_connection()).driver_connection
    if not driver.is_in_transaction():
        # SQLAlchemy's adapter sends BEGIN, with the session's isolation level, along with its first statement.
        await connection.exec_driver_sql("SELECT 1")
    return driver
