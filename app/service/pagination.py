"""Keyset pagination: a page of rows and the opaque cursor that names where the next page starts."""

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.service.errors import ServiceError

T = TypeVar("T")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class BadCursorError(ServiceError):
    """The `after` cursor was not one this service handed out."""

    status = 400
    title = "Bad Request"


@dataclass(frozen=True)
class Page(Generic[T]):
    """Up to `limit` items, and the cursor of the next page when there is one."""

    items: list[T]
    next_cursor: str | None


def encode_cursor(key: list[str]) -> str:
    """An opaque cursor for the sort key of the last row of a page."""
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, length: int) -> list[str]:
    """The sort key inside a cursor; a cursor that was not ours is a 400."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadCursorError("the 'after' cursor is not valid") from None
    if not isinstance(key, list) or len(key) != length or not all(isinstance(k, str) for k in key):
        raise BadCursorError("the 'after' cursor is not valid")
    return key


def cursor_uuid(value: str) -> UUID:
    """A UUID out of a decoded cursor; anything else is a 400."""
    try:
        return UUID(value)
    except ValueError:
        raise BadCursorError("the 'after' cursor is not valid") from None


def page_of(rows: list[T], limit: int, key: Callable[[T], list[str]]) -> Page[T]:
    """The first `limit` of `limit + 1` fetched rows; the extra row only says that a next page exists."""
    if len(rows) > limit:
        return Page(rows[:limit], encode_cursor(key(rows[limit - 1])))
    return Page(rows, None)


async def page_by_uuid(
    session: AsyncSession,
    statement: Select[T],
    key: InstrumentedAttribute[UUID],
    *,
    limit: int,
    after: str | None,
) -> Page[T]:
    """A page of the rows `statement` selects, in the order of their UUID column `key`, from the cursor `after` on."""
    statement = statement.order_by(key).limit(limit + 1)
    if after is not None:
        (last_uuid,) = decode_cursor(after, 1)
        statement = statement.where(key > cursor_uuid(last_uuid))
    return page_of(list(await session.scalars(statement)), limit, lambda row: [str(getattr(row, key.key))])
