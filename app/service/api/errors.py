"""Every error answer as RFC 9457 problem+json, and the exceptions that become one."""

import logging
from http import HTTPStatus
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from app.service.api.openapi import PROBLEM_REF, add_problem_component
from app.service.db.engine import is_database_unavailable
from app.service.errors import ServiceError
from app.service.schemas import PATTERN_RULES, UNION_TAGS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 5
# The keys of an OpenAPI path item that name operations (the others are parameters, servers, ...).
_HTTP_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})


def problem(status: int, detail: str, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem+json answer with the standard title of `status`."""
    title = HTTPStatus(status).phrase
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _describe_validation(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            parts.append(f"body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}")
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body" and p not in UNION_TAGS) or "body"
        rule = (
            PATTERN_RULES.get(error.get("ctx", {}).get("pattern"))
            if error.get("type") == "string_pattern_mismatch"
            else None
        )
        parts.append(f"{where}: {rule or error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _on_service_error(_request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, ServiceError):
        raise error
    return problem(error.status, error.detail)


async def _on_http_error(request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, StarletteHTTPException):
        raise error
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).description
    headers = dict(error.headers or {})
    allowed = _documented_methods(request) if error.status_code == 405 else None
    if allowed is not None:
        # Starlette names the methods of the first route of the path only; a path has one route per method.
        headers["Allow"] = ", ".join(allowed)
    return problem(error.status_code, detail, headers=headers)


def _documented_methods(request: Request) -> list[str] | None:
    """The methods the app's OpenAPI schema gives the request's path; None for a path it does not document."""
    root_path = request.scope.get("root_path", "")
    path = request.url.path.removeprefix(root_path) if root_path else request.url.path
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].fullmatch(path):
            return sorted(method.upper() for method in operations if method.upper() in _HTTP_METHODS)
    return None


async def _on_validation_error(_request: Request, error: Exception) -> JSONResponse:
    if not isinstance(error, RequestValidationError):
        raise error
    return problem(422, _describe_validation(list(error.errors())))


async def _on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    if is_database_unavailable(error):
        return problem(
            503,
            "the database is unavailable; try again shortly",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    log.error("unhandled error", exc_info=error, extra={"path": request.url.path})
    return problem(500, "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Make every 4xx/5xx of `app` a problem+json answer, each documented as the one `Problem` of its schema."""
    add_problem_component(app)
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    # Registered by class, so that ExceptionMiddleware answers them: the catch-all handler re-raises after answering
    # (a traceback per call during an outage). asyncpg's own come from the named statements (app.service.db.queries).
    for error_class in (
        sa_exc.DBAPIError,
        sa_exc.TimeoutError,
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
    ):
        app.add_exception_handler(error_class, _on_unexpected_error)
    app.add_exception_handler(Exception, _on_unexpected_error)


# What the answers that many routes share mean, for readers of the schema.
_PROBLEM_DESCRIPTIONS = {
    401: "API_TOKEN is set and the request carries neither `Authorization: Bearer <API_TOKEN>` nor, for a GET, "
    "API_READ_TOKEN",
    403: "The request carries API_READ_TOKEN, which may make GET calls only",
    413: "The request body is larger than 1 MiB",
    503: "The database cannot be reached; try again after `Retry-After` seconds",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}


# For the OpenAPI schema: the answers every route may give besides its own.
def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for problem+json answers with these statuses."""
    # The schema goes under problem+json itself (a `model` would file it under application/json,
    # a media type these answers never have).
    content = {PROBLEM_JSON: {"schema": PROBLEM_REF}}
    return {
        status: {
            "description": _PROBLEM_DESCRIPTIONS.get(status, HTTPStatus(status).phrase),
            "content": content,
            **({"headers": _RETRY_AFTER} if status == 503 else {}),
        }
        for status in statuses
    }
