"""Prometheus metrics of the service, named by Prometheus conventions."""

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import JOB_STATES, Job, OrphanFile

JOBS_TOTAL = Counter("tpm_removal_jobs_total", "Removal jobs that reached a state, by state", ["state"])
AGENT_CALLS_TOTAL = Counter("tpm_agent_calls_total", "Host agent delete calls, by outcome", ["outcome"])
AGENT_CALL_DURATION = Histogram(
    "tpm_agent_call_duration_seconds",
    "Duration of one host agent delete call",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ORPHAN_FILES = Gauge("tpm_orphan_files", "Orphan files waiting for their host to confirm deletion")
JOBS_BY_STATE = Gauge("tpm_removal_jobs_current", "Removal jobs in the database now, by state", ["state"])


async def refresh_gauges(session: AsyncSession) -> None:
    """Set the database-backed gauges (jobs by state, orphan files pending) from two cheap queries."""
    counts: dict[str, int] = {
        state: count for state, count in await session.execute(select(Job.state, func.count()).group_by(Job.state))
    }
    for state in JOB_STATES:
        JOBS_BY_STATE.labels(state=state).set(counts.get(state, 0))
    ORPHAN_FILES.set(await session.scalar(select(func.count()).select_from(OrphanFile)) or 0)
