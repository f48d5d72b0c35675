"""Dependencies of the routes: the database session, the settings, and the bearer-token checks."""

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.engine import Engine
from app.service.pagination import DEFAULT_LIMIT, MAX_LIMIT, TIME_UUID_CURSOR_PATTERN, UUID_CURSOR_PATTERN
from app.service.settings import Settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session for one request; the route opens its transaction where the unit of work is decided."""
    async with request.app.state.sessions() as session:
        yield session


async def get_engine(request: Request) -> Engine:
    """The API's engine, for a service function that checks its connections out itself."""
    engine: Engine = request.app.state.engine
    return engine


async def get_settings(request: Request) -> Settings:
    """The app's settings (async only so that FastAPI calls it in the loop, not in its thread pool)."""
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[AsyncSession, Depends(get_session)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(
    auto_error=False,
    description=(
        "Either token, when they are set (click Authorize and paste one): API_TOKEN for every call, or "
        "API_READ_TOKEN for GET calls only (any other call with it answers 403)."
    ),
)

# What API_READ_TOKEN may do: read. HEAD is a GET without its body.
READ_METHODS = frozenset({"GET", "HEAD"})


async def require_token(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let a request through with `Authorization: Bearer <API_TOKEN>`, or with API_READ_TOKEN if it only reads.

    Anything else gets 401 while API_TOKEN is set; a call with API_READ_TOKEN that would change something gets 403
    before any of it runs, whether or not API_TOKEN is set.
    """
    given = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
    if _is_token(given, settings.api_read_token):
        if request.method not in READ_METHODS:
            raise HTTPException(
                status_code=403,
                detail=f"this token is API_READ_TOKEN, which may make GET calls only; {request.method} needs API_TOKEN",
            )
        return
    if settings.api_token is None or _is_token(given, settings.api_token):
        return
    raise HTTPException(
        status_code=401,
        detail="a valid 'Authorization: Bearer <token>' header is required",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _is_token(given: str | None, token: SecretStr | None) -> bool:
    """Whether the bearer token given is `token` (a setting that may be unset)."""
    if given is None or token is None:
        return False
    # Constant time, so the token cannot be guessed byte by byte from response times.
    return hmac.compare_digest(given.encode(), token.get_secret_value().encode())


LimitQuery = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"Page size (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})")
]


def _after_query(pattern: str) -> Any:
    # The pattern is stated, not enforced by FastAPI: the list's own decoding refuses any other string with 400.
    return Query(
        description="Opaque cursor of the next page, as given in the Link header",
        json_schema_extra={"pattern": pattern},
    )


AfterQuery = Annotated[str | None, _after_query(UUID_CURSOR_PATTERN)]
"""The `after` cursor of a list in UUID order."""
AfterTimeQuery = Annotated[str | None, _after_query(TIME_UUID_CURSOR_PATTERN)]
"""The `after` cursor of a list in time order (jobs, newest first)."""


@dataclass
class HostFilesPage:
    """The query of a page of files of one host, or of every host: `?host_uuid=&limit=&after=`."""

    host_uuid: UUID | None = None
    limit: LimitQuery = DEFAULT_LIMIT
    after: AfterQuery = None


HostFilesPageQuery = Annotated[HostFilesPage, Depends()]
