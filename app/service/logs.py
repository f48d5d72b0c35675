"""Structured logs: JSON lines when not on a terminal, key=value on one; `extra` fields become keys."""

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

from app.service.request_id import RequestIdFilter

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class KeyValueFormatter(logging.Formatter):
    """`time level logger message key=value ...`, for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        pairs = " ".join(
            f"{k}={json.dumps(v, default=str) if ' ' in str(v) else v}" for k, v in _fields(record).items()
        )
        line = f"{time} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line} {pairs}" if pairs else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class TraceIdFilter(logging.Filter):
    """Adds `trace_id` (32 hex digits) to log records written inside a span (app/service/tracing.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = trace.format_trace_id(span_context.trace_id)
        return True


def log_handler(stream: TextIO) -> logging.Handler:
    """A handler writing to `stream`: key=value on a terminal, JSON lines elsewhere, request and trace ids added."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter() if stream.isatty() else JsonFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(TraceIdFilter())
    return handler


def configure_logging(level: str = "INFO") -> None:
    """Send the root logger to stderr in the format that suits where stderr goes."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(sys.stderr)]
    root.setLevel(level.upper())
    # uvicorn's own handlers would print its lines a second time, unstructured.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
