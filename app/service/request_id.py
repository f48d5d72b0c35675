"""Request ids: taken from the caller's `X-Request-ID` (or made up), echoed in the answer, put on every log line.

The id travels in a context variable that asgi-correlation-id's middleware sets for the span of one
request, so every log line written while serving it (by any module, also in tasks it starts) carries it.
"""

import logging
import re

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
from fastapi import FastAPI

REQUEST_ID_HEADER = "X-Request-ID"

# Proxies and callers use UUIDs, nginx's 32 hex digits, or their own short tokens; anything else (long,
# with spaces or control characters) is replaced by a fresh id rather than copied into logs and answers.
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_acceptable_request_id(value: str) -> bool:
    """Whether a caller's request id is short and plain enough to pass through."""
    return _ACCEPTABLE.fullmatch(value) is not None


def add_request_ids(app: FastAPI) -> None:
    """Give every request an id: the caller's `X-Request-ID` when acceptable, else a new one; echo it."""
    app.add_middleware(
        CorrelationIdMiddleware,
        header_name=REQUEST_ID_HEADER,
        validator=is_acceptable_request_id,
    )


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to log records written while a request is being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = correlation_id.get()
        if request_id is not None:
            record.request_id = request_id
        return True
