"""The trace id of each request, read from its W3C `traceparent` header and put on the agent's log lines.

The agent takes part in a caller's trace only so far: it loads no OpenTelemetry (it runs as root on every host and
loads nothing but aiohttp, pydantic and the standard library), records no span, and answers as before.
"""

import logging
import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from aiohttp import web

from app.protocol import HEALTH_PATH

logger = logging.getLogger(__name__)

# version "-" trace-id "-" parent-id "-" flags, lowercase hex; a later version may add fields after the flags.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_ZEROS_32, _ZEROS_16 = "0" * 32, "0" * 16

_request_trace_id: ContextVar[str | None] = ContextVar("request_trace_id", default=None)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a `traceparent` header, or None for a missing or malformed one (W3C Trace Context)."""
    match = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
    if match is None:
        return None
    version, trace_id, parent_id, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZEROS_32 or parent_id == _ZEROS_16:
        return None
    return trace_id


@web.middleware
async def log_trace_ids(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Log each request (but health checks), and let every line logged while it is served carry its trace id
    (`TraceIdFilter`)."""
    token = _request_trace_id.set(trace_id_of(request.headers.get("traceparent")))
    try:
        if request.path != HEALTH_PATH:
            logger.info("request method=%s path=%s remote=%s", request.method, request.path, request.remote)
        return await handler(request)
    finally:
        _request_trace_id.reset(token)


class TraceIdFilter(logging.Filter):
    """Sets `trace_id_field` of every record: " trace_id=<id>" while a request with a trace id is served, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id = _request_trace_id.get()
        record.trace_id_field = f" trace_id={trace_id}" if trace_id else ""
        return True
