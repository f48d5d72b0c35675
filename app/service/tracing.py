"""Tracing: W3C Trace Context through requests, jobs and agent calls; OpenTelemetry spans where an exporter is set.

The service always takes part in W3C Trace Context: a request's `traceparent` is continued (or a trace started), a
job keeps the trace context of the request that created it and every run of it continues that trace, and every agent
call carries a `traceparent` of a span of the job. Log lines written inside a span carry its `trace_id`
(app/service/logs.py).

OpenTelemetry's standard variables say where spans go (`OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, ...). With an exporter, the maintained instrumentations of FastAPI,
aiohttp's client and asyncpg record each request, agent call and statement. With none, nothing is recorded and no
instrumentation is installed (the FastAPI one alone cost 70 µs of CPU per request, unrecorded): a small middleware
continues or starts each request's trace, and the ids travel as they would.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

import aiohttp
from fastapi import FastAPI
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, Tracer
from opentelemetry.util.types import Attributes
from starlette.types import ASGIApp, Receive, Scope, Send

from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim
from app.service.jobs.worker import JobHandler

DEFAULT_SERVICE_NAME = "vtpm-cleanup"
# OTLP over HTTP is the one OTLP exporter installed (the gRPC one would bring grpcio): "otlp" names it.
_OTLP_EXPORTER = "otlp_proto_http"
_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class TracingConfigError(ValueError):
    """OTEL_TRACES_EXPORTER names an exporter that is not installed."""


@dataclass(frozen=True)
class Tracing:
    """The tracer provider of one service, and whether its spans go anywhere."""

    provider: TracerProvider
    tracer: Tracer
    exporting: bool


def tracing_from_environment() -> Tracing:
    """Tracing as OpenTelemetry's variables configure it: spans to the exporters they name, or to none."""
    return tracing_to([_load_exporter(name) for name in _exporter_names(os.environ)])


def tracing_to(exporters: Sequence[SpanExporter]) -> Tracing:
    """Tracing whose spans go to `exporters`, sampled by OTEL_TRACES_SAMPLER; with none, spans only carry ids."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    if not exporters:
        provider = TracerProvider(sampler=ALWAYS_OFF, resource=resource)
    else:
        # The SDK reads OTEL_TRACES_SAMPLER and its argument.
        configured = TracerProvider(shutdown_on_exit=False).sampler
        provider = TracerProvider(sampler=StatementsInTraces(configured), resource=resource)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider, provider.get_tracer("app.service"), exporting=bool(exporters))


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    """OTEL_TRACES_EXPORTER's names; unset, "otlp" when an OTLP endpoint is given, else none."""
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names:
        return ["otlp"] if any(environ.get(variable) for variable in _OTLP_ENDPOINTS) else []
    return [name.strip() for name in names.split(",") if name.strip() not in ("", "none")]


def _load_exporter(name: str) -> SpanExporter:
    """The span exporter an installed package registers under `name` (as the SDK's own configuration finds them)."""
    registered = _OTLP_EXPORTER if name == "otlp" else name
    found = list(entry_points(group="opentelemetry_traces_exporter", name=registered))
    if not found:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed")
    exporter: SpanExporter = found[0].load()()
    return exporter


class StatementsInTraces(Sampler):
    """The configured sampler, for every span but a database statement or agent call outside any trace.

    The worker's polls (claims, lease renewals, gauges, pruning) would each make a trace of one statement, several a
    second per replica; the statements of a request or a job are in that request's or job's trace.
    """

    def __init__(self, configured: Sampler) -> None:
        self._configured = configured

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        """Drop a client span without a parent; otherwise what the configured sampler says."""
        if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self._configured.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        """The sampler's name, as the SDK shows it."""
        return f"StatementsInTraces{{{self._configured.get_description()}}}"


def trace_requests(app: FastAPI, tracing: Tracing) -> None:
    """Continue each request's trace from its `traceparent`, or start one: with spans when exporting."""
    if tracing.exporting:
        # The ASGI messages as spans of their own would double the spans of every request and tell nothing.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing.provider, exclude_spans=["receive", "send"])
    else:
        app.add_middleware(TraceContextMiddleware, tracer=tracing.tracer)


class TraceContextMiddleware:
    """Runs each HTTP request in an unrecorded span that continues the caller's trace (or starts one)."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self._app = app
        self._tracer = tracer
        # The headers the propagators read (traceparent, tracestate, baggage): only these are decoded.
        self._fields = {field.encode("latin-1") for field in propagate.get_global_textmap().fields}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in self._fields
        }
        with self._tracer.start_as_current_span("request", context=propagate.extract(carrier), kind=SpanKind.SERVER):
            await self._app(scope, receive, send)


def agent_trace_configs(tracing: Tracing) -> list[aiohttp.TraceConfig]:
    """The aiohttp trace configs of the agent session: a span per agent call when exporting, else none (each call
    still carries the trace context: `app.service.trace_context.inject_trace_context`)."""
    return [create_trace_config(tracer_provider=tracing.provider)] if tracing.exporting else []


def trace_statements(tracing: Tracing) -> None:
    """Record every database statement as a span from now on, when exporting (until `untrace_statements`).

    asyncpg's instrumentation patches the driver for the whole process: one exporting service per process.
    """
    if tracing.exporting:
        AsyncPGInstrumentor().instrument(tracer_provider=tracing.provider)  # type: ignore[no-untyped-call]


def untrace_statements(tracing: Tracing) -> None:
    """Stop recording statements (`trace_statements`) and send the spans not yet exported."""
    if tracing.exporting:
        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        tracing.provider.force_flush()


def traced_job(tracer: Tracer, handler: JobHandler) -> JobHandler:
    """`handler`, run in a span of the job that continues the trace of the request that created the job."""

    async def run_in_job_span(claim: JobClaim, lease: LeaseClock) -> None:
        attributes: dict[str, str | int] = {
            "job.id": str(claim.job_id),
            "job.type": claim.job_type,
            "job.attempt": claim.attempt,
        }
        if claim.payload.get("vm_uuid") is not None:
            attributes["vm.uuid"] = str(claim.payload["vm_uuid"])
        with tracer.start_as_current_span(
            f"job {claim.job_type}", context=claim.trace_parent, kind=SpanKind.CONSUMER, attributes=attributes
        ):
            await handler(claim, lease)

    return run_in_job_span
