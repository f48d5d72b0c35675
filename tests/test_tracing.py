"""Tracing: a caller's trace goes on through the job to every host, as spans when exported and as ids in any case."""

import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from sqlalchemy import text

from app.service.logs import log_handler
from app.service.trace_context import stored_trace_context
from app.service.tracing import Tracing, TracingConfigError, tracing_from_environment, tracing_to
from devtools.local_stack import agent_process, service_process, wait_until
from tests.agent_helpers import Handler, RecordingAgent, running_app
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, wait_for_job

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"
CALLER_CONTEXT = json.dumps({"traceparent": CALLER_TRACEPARENT})
MALFORMED_TRACEPARENTS = [
    "garbage",
    f"00-{'0' * 32}-00f067aa0ba902b7-01",  # an all-zero trace id
    f"00-{CALLER_TRACE_ID}-{'0' * 16}-01",  # an all-zero parent id
    f"ff-{CALLER_TRACE_ID}-00f067aa0ba902b7-01",  # the forbidden version
    f"00-{CALLER_TRACE_ID.upper()}-00F067AA0BA902B7-01",  # upper case
    f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01-extra",  # version 00 has four fields
    "00-" + "a" * 5000,
]


class TracedAgent(RecordingAgent):
    """The recording agent, keeping the `traceparent` header of every delete call it gets."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.traceparents: list[str | None] = []

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.traceparents.append(request.headers.get("traceparent"))
        return await super()._record(request, handler)


@pytest.fixture
async def traced_agent(tmp_path: Path) -> AsyncIterator[tuple[str, TracedAgent]]:
    agent = TracedAgent(tmp_path)
    async with running_app(agent.app()) as url:
        yield url, agent


@pytest.fixture
def exported() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    """Tracing whose spans go to memory, as an OTLP collector would get them."""
    exporter = InMemorySpanExporter()
    tracing = tracing_to([exporter])
    yield tracing, exporter
    tracing.provider.shutdown()


def trace_id_of_stored(trace_context: str | None) -> str:
    """The trace id of a job's stored trace context."""
    assert trace_context is not None
    return str(json.loads(trace_context)["traceparent"].split("-")[1])


async def trace_context_column(client: httpx.AsyncClient, table: str, key: str, value: str) -> str | None:
    """The trace_context column of a row of the service's database."""
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        row = (await session.execute(text(f"SELECT trace_context FROM {table} WHERE {key} = :v"), {"v": value})).one()
    stored: str | None = row.trace_context
    return stored


async def vm_with_files_on(client: httpx.AsyncClient, roots_and_urls: list[tuple[Path, str]]) -> str:
    """A VM with a TPM and one state file on each host (the hosts made from their roots and agent URLs)."""
    vm = await put_vm(client)
    for root, url in roots_and_urls:
        host = await put_host(client, url)
        (path,) = make_files(root, vm, "tpm2-00.permall")
        await add_file(client, vm, host, path)
    return vm


async def finished_spans(tracing: Tracing, exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """Every span exported so far, once a span named `name` is among them (spans end after what they did)."""

    def ended() -> bool:
        tracing.provider.force_flush()
        return any(span.name == name for span in exporter.get_finished_spans())

    await wait_until(ended, timeout=30, what=f"a span {name!r} is exported")
    return list(exporter.get_finished_spans())


@pytest.mark.parametrize("caller_traceparent", [CALLER_TRACEPARENT, None], ids=["continued", "started"])
async def test_one_removal_is_one_trace_from_the_request_through_the_job_to_each_host_and_statement(
    make_client: AppFactory,
    exported: tuple[Tracing, InMemorySpanExporter],
    tmp_path: Path,
    caller_traceparent: str | None,
) -> None:
    tracing, exporter = exported
    client = await make_client(tracing=tracing)
    roots = [tmp_path / "host-1", tmp_path / "host-2"]
    agents = [agent_process([root], tmp_path) for root in roots]
    for root, agent in zip(roots, agents, strict=True):
        root.mkdir()
        await agent.started()
    try:
        vm = await vm_with_files_on(client, [(root, agent.url) for root, agent in zip(roots, agents, strict=True)])
        headers = {"traceparent": caller_traceparent} if caller_traceparent else {}
        answer = await client.delete(f"/vms/{vm}/tpm", headers=headers)
        assert answer.status_code == 202, answer.text
        job = await wait_for_job(client, answer.json()["id"])
        assert job["state"] == "succeeded" and {h["state"] for h in job["hosts"]} == {"deleted"}
        spans = await finished_spans(tracing, exporter, "job remove-tpm")
    finally:
        for agent in agents:
            await agent.shut_down()

    (request,) = [s for s in spans if s.kind is SpanKind.SERVER and s.name == "DELETE /vms/{vm_uuid}/tpm"]
    trace_id = request.context.trace_id
    if caller_traceparent:
        assert format_trace_id(trace_id) == CALLER_TRACE_ID
        assert request.parent is not None and format_span_id(request.parent.span_id) == "00f067aa0ba902b7"
    else:
        assert request.parent is None
    (job_span,) = [s for s in spans if s.name == "job remove-tpm"]
    assert job_span.kind is SpanKind.CONSUMER and job_span.context.trace_id == trace_id
    assert job_span.parent is not None and job_span.parent.span_id == request.context.span_id
    assert job_span.attributes is not None and job_span.attributes["job.id"] == job["id"]
    # The app's reaper may meanwhile retry other tests' orphans, each in a trace of its own: only this trace counts.
    host_calls = [s for s in spans if s.kind is SpanKind.CLIENT and s.name.startswith("POST")]
    host_calls = [s for s in host_calls if s.context.trace_id == trace_id]
    assert len(host_calls) == 2
    for call in host_calls:
        assert call.parent is not None and call.parent.span_id == job_span.context.span_id
    statements = [s for s in spans if s.attributes is not None and s.attributes.get("db.system") == "postgresql"]
    in_request = [s for s in statements if s.parent is not None and s.parent.span_id == request.context.span_id]
    in_job = [s for s in statements if s.parent is not None and s.parent.span_id == job_span.context.span_id]
    assert in_request and len(in_job) >= 2, [s.name for s in statements]
    assert all(s.context.trace_id == trace_id for s in in_request + in_job)
    # The job keeps the request's trace context, and each real agent process logs the trace's id with the request.
    assert trace_id_of_stored(await trace_context_column(client, "jobs", "id", job["id"])) == format_trace_id(trace_id)
    for agent in agents:
        lines = [line for line in agent.log_text().splitlines() if f"trace_id={format_trace_id(trace_id)}" in line]
        assert any("request method=POST" in line for line in lines), agent.log_text()
        assert any("files deleted" in line for line in lines), agent.log_text()


async def test_without_an_exporter_the_trace_ids_still_reach_the_job_every_host_and_the_logs(
    client: httpx.AsyncClient,
    traced_agent: tuple[str, TracedAgent],
    tmp_path: Path,
    captured_logs: io.StringIO,
) -> None:
    url, agent = traced_agent
    assert not client.app.state.tracing.exporting  # type: ignore[attr-defined]
    agent.mode = "http500"
    vm = await vm_with_files_on(client, [(tmp_path, url)])
    answer = await client.delete(f"/vms/{vm}/tpm", headers={"traceparent": CALLER_TRACEPARENT})
    assert answer.status_code == 202
    job = await wait_for_job(client, answer.json()["id"])
    assert job["orphan_files"] == 1

    assert trace_id_of_stored(await trace_context_column(client, "jobs", "id", job["id"])) == CALLER_TRACE_ID
    (job_call,) = agent.traceparents
    assert job_call is not None and job_call.split("-")[1] == CALLER_TRACE_ID
    # A span of the job, not the caller's own.
    assert job_call.split("-")[2] != "00f067aa0ba902b7"
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    (failed,) = [line for line in lines if line["message"] == "host delete failed; its files become orphans"]
    assert failed["trace_id"] == CALLER_TRACE_ID and failed["job_id"] == job["id"]
    # The orphan keeps the job's trace context; its retry is a trace of its own.
    assert await trace_context_column(client, "orphan_files", "job_id", job["id"]) == await trace_context_column(
        client, "jobs", "id", job["id"]
    )
    agent.mode = "ok"
    await wait_until(lambda: len(agent.traceparents) >= 2, timeout=30, what="the orphan is retried")
    retry_call = agent.traceparents[1]
    assert retry_call is not None and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", retry_call)
    assert retry_call.split("-")[1] != CALLER_TRACE_ID


async def test_an_orphan_retry_is_a_trace_of_its_own_linked_to_its_jobs(
    make_client: AppFactory, exported: tuple[Tracing, InMemorySpanExporter], traced_agent: tuple[str, TracedAgent]
) -> None:
    tracing, exporter = exported
    client = await make_client(tracing=tracing)
    url, agent = traced_agent
    agent.mode = "success_false"
    vm = await vm_with_files_on(client, [(agent.root, url)])
    answer = await client.delete(f"/vms/{vm}/tpm", headers={"traceparent": CALLER_TRACEPARENT})
    job = await wait_for_job(client, answer.json()["id"])
    assert job["orphan_files"] == 1
    agent.mode = "ok"
    spans = await finished_spans(tracing, exporter, "orphan retry")

    (request,) = [s for s in spans if s.kind is SpanKind.SERVER and s.name == "DELETE /vms/{vm_uuid}/tpm"]
    retry = next(s for s in spans if s.name == "orphan retry")
    assert retry.parent is None and retry.context.trace_id != request.context.trace_id
    assert [link.context.span_id for link in retry.links] == [request.context.span_id]
    assert [format_trace_id(link.context.trace_id) for link in retry.links] == [CALLER_TRACE_ID]
    (call,) = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT
        and s.parent
        and s.parent.span_id == retry.context.span_id
        and s.name.startswith("POST")
    ]
    assert agent.traceparents[-1] is not None
    assert agent.traceparents[-1].split("-")[1:3] == [
        format_trace_id(call.context.trace_id),
        format_span_id(call.context.span_id),
    ]


@pytest.mark.parametrize("exporting", [True, False], ids=["exported", "not exported"])
@pytest.mark.parametrize("traceparent", MALFORMED_TRACEPARENTS)
async def test_a_malformed_traceparent_is_ignored_and_a_trace_starts(
    make_client: AppFactory, traceparent: str, exporting: bool
) -> None:
    client = await make_client(run_worker=False, tracing=tracing_to([InMemorySpanExporter()] if exporting else []))
    vm = await put_vm(client)
    headers = {"traceparent": traceparent, "tracestate": "a=\x01,,=,b"}
    answer = await client.delete(f"/vms/{vm}/tpm", headers=headers)
    assert answer.status_code == 202, answer.text
    stored = await trace_context_column(client, "jobs", "id", answer.json()["id"])
    trace_id = trace_id_of_stored(stored)
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id not in (CALLER_TRACE_ID, "0" * 32)
    assert (await client.get(f"/vms/{uuid.uuid4()}", headers=headers)).status_code == 404
    assert (await client.get("/healthz", headers=headers)).status_code == 200


def test_the_standard_variables_choose_the_exporters(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    assert not tracing_from_environment().exporting

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "vtpm-test")
    tracing = tracing_from_environment()
    assert tracing.exporting and tracing.provider.resource.attributes["service.name"] == "vtpm-test"
    tracing.provider.shutdown()

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing_from_environment().exporting

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    with pytest.raises(TracingConfigError, match="no-such-exporter"):
        tracing_from_environment()


def test_serve_with_an_unknown_exporter_stops_with_one_line(database_url: str, tmp_path: Path) -> None:
    service = service_process(database_url, tmp_path, OTEL_TRACES_EXPORTER="no-such-exporter")
    with pytest.raises(RuntimeError, match="no span exporter 'no-such-exporter' is installed"):
        service.start()


class OtlpCollector:
    """An OTLP/HTTP receiver on loopback, as Jaeger's or a collector's: keeps the spans it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        """(service.name of the resource, span) for every span received."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        return app

    async def _receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            self.spans += [(service, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )


async def test_serve_exports_a_removals_spans_over_otlp_where_the_standard_variable_points(
    database_url: str, tmp_path: Path, traced_agent: tuple[str, TracedAgent]
) -> None:
    collector = OtlpCollector()
    agent_url, agent = traced_agent
    async with running_app(collector.app()) as collector_url:
        service = service_process(
            database_url, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=collector_url, OTEL_BSP_SCHEDULE_DELAY="100"
        )
        async with service, httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            vm = await vm_with_files_on(client, [(agent.root, agent_url)])
            answer = await client.delete(f"/vms/{vm}/tpm", headers={"traceparent": CALLER_TRACEPARENT})
            assert answer.status_code == 202, answer.text
            await wait_for_job(client, answer.json()["id"])

            def job_exported() -> bool:
                return any(span.name == "job remove-tpm" for _, span in collector.spans)

            await wait_until(job_exported, timeout=30, what="the job's span reaches the collector")
    in_trace = [(service, span) for service, span in collector.spans if span.trace_id.hex() == CALLER_TRACE_ID]
    assert {service for service, _ in in_trace} == {"vtpm-cleanup"}
    names = {span.name for _, span in in_trace}
    assert {"DELETE /vms/{vm_uuid}/tpm", "job remove-tpm", "POST"} <= names, names
    (call,) = [span for _, span in in_trace if span.name == "POST"]
    assert agent.traceparents == [f"00-{CALLER_TRACE_ID}-{call.span_id.hex()}-01"]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a person's shell is."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_type", [io.StringIO, Terminal], ids=["json", "key=value"])
def test_lines_written_inside_a_span_carry_its_trace_id_in_either_format(stream_type: type[io.StringIO]) -> None:
    stream = stream_type()
    logger = logging.getLogger("app.test.tracing")
    handler = log_handler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    tracer = tracing_to([]).tracer
    try:
        with tracer.start_as_current_span("request", context=stored_trace_context(CALLER_CONTEXT)):
            logger.info("inside")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    if stream_type is Terminal:
        assert inside.endswith(f"inside trace_id={CALLER_TRACE_ID}") and outside.endswith("outside")
    else:
        assert json.loads(inside)["trace_id"] == CALLER_TRACE_ID and "trace_id" not in json.loads(outside)
