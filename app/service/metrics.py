"""Prometheus metrics of the service, named by Prometheus conventions."""

import time

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.db.models import (
    ACTIVE_JOB_STATES,
    HEALTH_STATES,
    JOB_STATES,
    AbandonedFile,
    Host,
    HostHealth,
    Job,
    OrphanFile,
    StrayFile,
)

JOBS_TOTAL = Counter("tpm_removal_jobs_total", "Removal jobs that reached a state, by state", ["state"])
AGENT_CALLS_TOTAL = Counter("tpm_agent_calls_total", "Host agent delete calls, by outcome", ["outcome"])
AGENT_CALL_DURATION = Histogram(
    "tpm_agent_call_duration_seconds",
    "Duration of one host agent delete call",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ORPHAN_FILES = Gauge("tpm_orphan_files", "Orphan files waiting for their host to confirm deletion")
ABANDONED_FILES = Gauge(
    "tpm_abandoned_files", "Orphan files of decommissioned hosts, never retried: they may still be on those disks"
)
JOBS_BY_STATE = Gauge(
    "tpm_removal_jobs_current",
    "Removal jobs in the database now, by state (succeeded and failed refreshed every minute, the others every 5 s)",
    ["state"],
)
STRAY_FILES = Gauge(
    "tpm_stray_files", "Stray files: what hosts hold that no record names, as their last scans found it"
)
HOSTS_BY_HEALTH = Gauge("tpm_hosts", "Hosts in the database now, by health state", ["state"])


async def refresh_gauges(session: AsyncSession, *, finished_jobs: bool = True) -> None:
    """Set the database-backed gauges (jobs by state, orphan files pending, abandoned files, stray files, hosts by
    health) from cheap queries.

    Finished jobs are counted only when `finished_jobs`: they are nearly all of the table, which only a scan
    counts, while the active ones are few and counted through the claim index, which holds only them.
    """
    counted_states = JOB_STATES if finished_jobs else ACTIVE_JOB_STATES
    by_state = select(Job.state, func.count()).where(Job.state.in_(counted_states)).group_by(Job.state)
    counts: dict[str, int] = dict((await session.execute(by_state)).all())
    for state in counted_states:
        JOBS_BY_STATE.labels(state=state).set(counts.get(state, 0))
    ORPHAN_FILES.set(await session.scalar(select(func.count()).select_from(OrphanFile)) or 0)
    ABANDONED_FILES.set(await session.scalar(select(func.count()).select_from(AbandonedFile)) or 0)
    STRAY_FILES.set(await session.scalar(select(func.count()).select_from(StrayFile)) or 0)
    # A host without a health row has never failed a call: it is ok.
    health = func.coalesce(HostHealth.state, "ok")
    by_health = select(health, func.count()).select_from(Host).outerjoin(HostHealth).group_by(health)
    hosts: dict[str, int] = dict((await session.execute(by_health)).all())
    for state in HEALTH_STATES:
        HOSTS_BY_HEALTH.labels(state=state).set(hosts.get(state, 0))


GAUGE_REFRESH_SECONDS = 5.0
# Finished jobs are counted every twelfth refresh (a minute): counting them is a scan of the retained jobs.
FINISHED_JOBS_EVERY_REFRESHES = 12


class GaugeRefresher:
    """Refreshes the database-backed gauges every GAUGE_REFRESH_SECONDS (a periodic task of the worker)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._refreshes = 0

    async def run_once(self) -> float:
        """Refresh the gauges; the seconds to rest before the next refresh."""
        finished_jobs = self._refreshes % FINISHED_JOBS_EVERY_REFRESHES == 0
        self._refreshes += 1
        async with self._sessions() as session:
            await refresh_gauges(session, finished_jobs=finished_jobs)
        return GAUGE_REFRESH_SECONDS


HTTP_REQUESTS_TOTAL = Counter(
    "tpm_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "tpm_http_request_duration_seconds",
    "Time to answer an HTTP request (long-polls included), by method and route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Label values come from a fixed set, never from what a caller sends, so that the series stay few.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"


class HttpMetrics:
    """ASGI middleware: counts and times every HTTP request by the template of the route that served it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # An exception that escapes the app becomes a 500 further out.
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = route_template(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            HTTP_REQUESTS_TOTAL.labels(method=method, route=route, status=str(status)).inc()
            HTTP_REQUEST_DURATION.labels(method=method, route=route).observe(time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The template of the route that served a request (`/vms/{vm_uuid}`, not the raw path), or "unmatched"."""
    route = scope.get("route")
    if route is None and "endpoint" in scope and "router" in scope:
        # FastAPI names only its API routes in the scope; Starlette routes and mounts (the OpenAPI schema,
        # the docs' assets) are found by the endpoint they handed the request to.
        endpoint = scope["endpoint"]
        route = next(
            (
                r
                for r in scope["router"].routes
                if getattr(r, "endpoint", None) is endpoint or getattr(r, "app", None) is endpoint
            ),
            None,
        )
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE
