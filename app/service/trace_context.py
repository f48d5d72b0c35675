"""How a W3C trace context is kept in a row (a job's, an orphan's) and taken up again: JSON of its headers.

Apart from app/service/tracing.py, which sets tracing up, so that the queue and the domains can keep and continue
trace contexts without loading the instrumentations.
"""

import json

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()


def current_trace_context() -> str | None:
    """The current span's trace context, as JSON of its W3C headers, for a job to keep; None outside a trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(carrier, separators=(",", ":")) if carrier else None


def inject_trace_context(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to an agent call's headers; a span of the call's own,
    when one is recorded, replaces them with its own (app/service/tracing.py).

    W3C Trace Context alone, whatever OTEL_PROPAGATORS says: it is what the host-agent protocol reads.
    """
    _W3C.inject(headers)


def stored_trace_context(stored: str | None) -> Context:
    """The context a kept trace context (`current_trace_context`) continues; an empty one for None."""
    return propagate.extract(json.loads(stored) if stored else {}, context=Context())


def linked_trace(stored: str | None) -> list[Link]:
    """A link to the span of a kept trace context, or none."""
    span_context = trace.get_current_span(stored_trace_context(stored)).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []


def trace_id_of(context: Context) -> str | None:
    """The trace id (32 hex digits) of a context's span, for log lines; None outside a trace."""
    span_context = trace.get_current_span(context).get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None
