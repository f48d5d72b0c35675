"""Keyset pagination: a page of rows and the cursor that names where the next page starts.

A cursor is the sort key of the last row of a page, written so that a regular expression says exactly which
cursors exist: the OpenAPI schema states that pattern, and every string that matches it names a place in the
list (rows after it, possibly none).
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar, TypeVarTuple
from uuid import UUID

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.service.errors import ServiceError

T = TypeVar("T")
Columns = TypeVarTuple("Columns")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_UUID_HEX = "[0-9a-f]{32}"
# Microseconds since the epoch, the precision of PostgreSQL's timestamptz; 17 digits reach the year 5138.
_MICROSECONDS = "[0-9]{1,17}"
UUID_CURSOR_PATTERN = f"^({_UUID_HEX})$"
"""The cursor of a list sorted by UUID: the last row's UUID as 32 hex digits."""
TIME_UUID_CURSOR_PATTERN = rf"^({_MICROSECONDS})\.({_UUID_HEX})$"
"""The cursor of a list sorted by time, then UUID: microseconds since the epoch, a dot, the UUID's hex digits."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class BadCursorError(ServiceError):
    """The `after` cursor does not have the shape of this list's cursors."""

    status = 400
    title = "Bad Request"


@dataclass(frozen=True)
class Page(Generic[T]):
    """Up to `limit` items, and the cursor of the next page when there is one."""

    items: list[T]
    next_cursor: str | None


def uuid_cursor(value: UUID) -> str:
    """The cursor after the row of this UUID (see UUID_CURSOR_PATTERN)."""
    return value.hex


def time_uuid_cursor(time: datetime, value: UUID) -> str:
    """The cursor after the row of this time and UUID (see TIME_UUID_CURSOR_PATTERN)."""
    return f"{(time - _EPOCH) // _MICROSECOND}.{value.hex}"


def after_uuid(cursor: str) -> UUID:
    """The UUID in a cursor of UUID_CURSOR_PATTERN; any other string is a 400."""
    (value,) = _parts(UUID_CURSOR_PATTERN, cursor)
    return UUID(hex=value)


def after_time_uuid(cursor: str) -> tuple[datetime, UUID]:
    """The time and UUID in a cursor of TIME_UUID_CURSOR_PATTERN; any other string is a 400."""
    microseconds, value = _parts(TIME_UUID_CURSOR_PATTERN, cursor)
    return _EPOCH + int(microseconds) * _MICROSECOND, UUID(hex=value)


def _parts(pattern: str, cursor: str) -> tuple[str, ...]:
    match = re.fullmatch(pattern, cursor)
    if match is None:
        raise BadCursorError("the 'after' cursor is not valid")
    return match.groups()


def page_of(rows: list[T], limit: int, cursor: Callable[[T], str]) -> Page[T]:
    """The first `limit` of `limit + 1` fetched rows; the extra row only says that a next page exists."""
    if len(rows) > limit:
        return Page(rows[:limit], cursor(rows[limit - 1]))
    return Page(rows, None)


def in_uuid_order(
    statement: Select[*Columns], key: InstrumentedAttribute[UUID], *, limit: int, after: str | None
) -> Select[*Columns]:
    """`statement` in the order of its UUID column `key`, from the cursor `after` on, one row more than a page."""
    statement = statement.order_by(key).limit(limit + 1)
    if after is not None:
        statement = statement.where(key > after_uuid(after))
    return statement


async def page_by_uuid(
    session: AsyncSession,
    statement: Select[T],
    key: InstrumentedAttribute[UUID],
    *,
    limit: int,
    after: str | None,
) -> Page[T]:
    """A page of the rows `statement` selects, in the order of their UUID column `key`, from the cursor `after` on."""
    rows = list(await session.scalars(in_uuid_order(statement, key, limit=limit, after=after)))
    return page_of(rows, limit, lambda row: uuid_cursor(getattr(row, key.key)))
