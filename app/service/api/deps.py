"""Dependencies of the routes: the database session, the settings, and the bearer-token check."""

import hmac
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.service.pagination import DEFAULT_LIMIT, MAX_LIMIT, TIME_UUID_CURSOR_PATTERN, UUID_CURSOR_PATTERN
from app.service.settings import Settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session for one request; the route opens its transaction where the unit of work is decided."""
    async with request.app.state.sessions() as session:
        yield session


async def get_engine(request: Request) -> AsyncEngine:
    """The API's engine, for a service function that checks its connections out itself."""
    engine: AsyncEngine = request.app.state.engine
    return engine


async def get_settings(request: Request) -> Settings:
    """The app's settings (async only so that FastAPI calls it in the loop, not in its thread pool)."""
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[AsyncSession, Depends(get_session)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(
    auto_error=False,
    description="The service's API_TOKEN, when it is set (click Authorize and paste the token).",
)


async def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request with 401 unless it carries `Authorization: Bearer <API_TOKEN>` (when set)."""
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    # Constant time, so the token cannot be guessed byte by byte from response times.
    if credentials is None or credentials.scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
        raise HTTPException(
            status_code=401,
            detail="a valid 'Authorization: Bearer <token>' header is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


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
