"""The FastAPI application: routers, error handling, and the lifespan that owns every shared resource."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.service.agent_client import AgentClient, agent_session, agent_ssl_context
from app.service.api import abandoned, health, hosts, jobs, orphans, strays, tpm, vms
from app.service.api.deps import require_token
from app.service.api.docs import add_offline_docs
from app.service.api.errors import install_error_handlers, problem_responses
from app.service.api.limits import BodySizeLimit
from app.service.api.openapi import operation_id
from app.service.db.engine import (
    COMMAND_TIMEOUT_SECONDS,
    asyncpg_dsn,
    create_engine,
    create_session_factory,
    is_database_unavailable,
    resolve_database_url,
)
from app.service.db.notify import Notifications
from app.service.inventory.service import list_agent_urls
from app.service.jobs.retention import Pruner
from app.service.jobs.types import JobType
from app.service.jobs.worker import Worker
from app.service.metrics import GaugeRefresher, HttpMetrics
from app.service.orphans.reaper import OrphanReaper
from app.service.removal.run import TPM_REMOVAL, VM_DELETION, Removal
from app.service.request_id import add_request_ids
from app.service.scan.periodic import PeriodicScans
from app.service.scan.run import HostScan
from app.service.settings import Settings, get_settings
from app.service.tracing import (
    Tracing,
    agent_trace_configs,
    trace_requests,
    trace_statements,
    traced_job,
    tracing_from_environment,
    untrace_statements,
)

log = logging.getLogger(__name__)

# Unless SHUTDOWN_GRACE_SECONDS says otherwise, a stopping process lets its running jobs go on this much
# longer than an agent call may take before it hands them back.
SHUTDOWN_GRACE_MARGIN_SECONDS = 2.0
# The server ends a transaction left idle longer than a job lease (its process stalled), freeing the rows it locked;
# never sooner than this, so that a busy process between two statements is not taken for a stalled one.
STALLED_TRANSACTION_MIN_SECONDS = 10.0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the engine, the HTTP client, the LISTEN connection and the worker; close them in reverse."""
    settings: Settings = app.state.settings
    database_url = app.state.database_url or resolve_database_url(settings)
    if settings.api_token is None:
        log.warning("API_TOKEN is not set: the API accepts every caller")
    # Two pools of DB_POOL_SIZE each: the API's and the worker's, so that a flood of requests cannot leave
    # running jobs waiting for a connection (and, past the pool timeout, for their lease to run out).
    new_engine = partial(
        create_engine,
        database_url,
        pool_size=settings.db_pool_size,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        idle_transaction_timeout=max(settings.job_lease_seconds, STALLED_TRANSACTION_MIN_SECONDS),
    )
    engine = new_engine()
    # The worker's commits do not wait for the disk: every one is redone when a database crash loses it, and a
    # commit that NOTIFYs would hold the notification lock until durable (docs/design.md). The API's stay durable.
    worker_engine = new_engine(synchronous_commit=False)
    sessions = create_session_factory(engine)
    tracing: Tracing = app.state.tracing
    http = agent_session(settings.agent_concurrency, app.state.agent_ssl_context, agent_trace_configs(tracing))
    agent = AgentClient(
        http,
        timeout_seconds=settings.agent_timeout_seconds,
        concurrency=settings.agent_concurrency,
        host_concurrency=settings.agent_host_concurrency,
        token=settings.agent_token.get_secret_value() if settings.agent_token else None,
    )
    notifications = Notifications(asyncpg_dsn(database_url))
    listener = asyncio.create_task(notifications.run(), name="listen")
    worker = Worker(
        worker_engine,
        notifications,
        lease_seconds=settings.job_lease_seconds,
        poll_seconds=settings.worker_poll_seconds,
        max_jobs=settings.worker_max_jobs,
        max_failures=settings.job_max_failures,
        backoff=settings.job_backoff(),
    )
    orphan_backoff = settings.orphan_backoff()
    removal = partial(Removal, worker_engine, agent, backoff=orphan_backoff)
    worker.handle(JobType.REMOVE_TPM, traced_job(tracing.tracer, removal(scope=TPM_REMOVAL).run))
    worker.handle(JobType.DELETE_VM, traced_job(tracing.tracer, removal(scope=VM_DELETION).run))
    scan = HostScan(worker_engine, agent, backoff=orphan_backoff, min_age_seconds=settings.stray_min_age_seconds)
    worker.handle(JobType.SCAN_HOST, traced_job(tracing.tracer, scan.run))
    if settings.host_scan_interval_seconds > 0:
        scans = PeriodicScans(
            worker_engine,
            interval_seconds=settings.host_scan_interval_seconds,
            poll_seconds=settings.worker_poll_seconds,
        )
        worker.repeat("scan hosts", scans.run_once)
    reaper = OrphanReaper(
        worker_engine,
        agent,
        backoff=orphan_backoff,
        call_timeout_seconds=settings.agent_timeout_seconds,
        poll_seconds=settings.worker_poll_seconds,
        tracer=tracing.tracer,
    )
    worker.repeat("retry orphans", reaper.run_once)
    pruner = Pruner(
        worker_engine,
        retention_seconds=settings.job_retention_seconds,
        poll_seconds=settings.worker_poll_seconds,
        jobs_ended=lambda: worker.jobs_ended,
    )
    worker.repeat("prune jobs", pruner.run_once)
    worker.repeat("refresh gauges", GaugeRefresher(create_session_factory(worker_engine)).run_once)
    app.state.engine = engine
    app.state.worker_engine = worker_engine
    app.state.sessions = sessions
    app.state.agent = agent
    app.state.notifications = notifications
    app.state.worker = worker
    trace_statements(tracing)
    app.state.reaper = reaper
    app.state.pruner = pruner
    if app.state.run_worker:
        worker.start()
    try:
        await warn_about_plain_http_agents(sessions, agent)
        yield
    finally:
        if app.state.run_worker:
            grace = settings.shutdown_grace_seconds
            if grace is None:
                grace = settings.agent_timeout_seconds + SHUTDOWN_GRACE_MARGIN_SECONDS
            await worker.stop(grace_seconds=grace)
        listener.cancel()
        with suppress(asyncio.CancelledError):
            await listener
        await http.close()
        await engine.dispose()
        await worker_engine.dispose()
        untrace_statements(tracing)


async def warn_about_plain_http_agents(sessions: async_sessionmaker[AsyncSession], agent: AgentClient) -> None:
    """Log at start, once per known host, that its agent is called over plain HTTP (a host added later: at its
    first call)."""
    try:
        async with sessions() as session:
            agent_urls = await list_agent_urls(session)
    except Exception as error:
        if not is_database_unavailable(error):
            raise
        log.warning("the hosts could not be read at start: each plain-HTTP agent is warned about at its first call")
        return
    for agent_url in agent_urls:
        agent.warn_if_plain_http(agent_url)


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    run_worker: bool = True,
    tracing: Tracing | None = None,
) -> FastAPI:
    """The service's ASGI app; `database_url` overrides the settings (tests), `run_worker` runs jobs here, `tracing`
    overrides OpenTelemetry's variables (tests)."""
    app = FastAPI(
        title="vTPM cleanup service",
        version="0.1.0",
        description=(
            "Removes a VM's virtual TPM: deletes its state files (and NVRAM unless the VM uses secure "
            "boot) on every KVM host that holds them, then the database records and the TPM's key-provider "
            "binding in one transaction. Host deletes are best-effort: a host that fails is reported in "
            "the job and its files become orphan files, retried until the host confirms. Deleting a VM runs the "
            "same way over every file of the VM, and also deletes the VM.\n\n"
            "Every error is `application/problem+json` (RFC 9457). When `API_TOKEN` is set, every endpoint "
            "but health, metrics and the docs needs `Authorization: Bearer <token>` (use Authorize): "
            "`API_TOKEN`, or `API_READ_TOKEN` for GET calls only."
        ),
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # Served by add_offline_docs from installed assets instead of a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings = settings or get_settings()
    # Built here, before the server starts, so that a bad TLS file stops `serve` with its one-line AgentTlsError.
    app.state.agent_ssl_context = agent_ssl_context(
        settings.agent_ca_file, settings.agent_cert_file, settings.agent_key_file
    )
    app.state.database_url = database_url
    app.state.tracing = tracing = tracing or tracing_from_environment()
    app.state.run_worker = run_worker
    app.state.stopping = asyncio.Event()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit)
    app.add_middleware(HttpMetrics)
    add_request_ids(app)
    # Outermost: every middleware's log lines carry the request's trace id.
    trace_requests(app, tracing)
    app.include_router(health.router)
    add_offline_docs(app)
    protected = APIRouter(dependencies=[Depends(require_token)], responses=problem_responses(401, 403, 503))
    for module in (hosts, vms, tpm, jobs, orphans, abandoned, strays):
        protected.include_router(module.router)
    app.include_router(protected)
    return app


def begin_shutdown(app: FastAPI) -> None:
    """A stop was asked for: take no new job and end every long-poll now.

    uvicorn lets open requests drain before the lifespan's shutdown runs; without this, open long-polls
    would hold a stopping process for up to their wait, and its worker would go on claiming meanwhile.
    """
    app.state.stopping.set()
    if app.state.run_worker:
        app.state.worker.stop_claiming()
