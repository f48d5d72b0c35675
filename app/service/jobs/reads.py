"""Jobs as the API shows them: one job with its host outcomes, and pages of jobs."""

import math
from datetime import UTC, datetime
from uuid import UUID

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.models import ACTIVE_JOB_STATES, Job, JobHost
from app.service.errors import NotFoundError
from app.service.pagination import Page, after_time_uuid, page_of, time_uuid_cursor
from app.service.schemas import JobHostOut, JobOut

# The shortest Retry-After of a job under way: Retry-After counts whole seconds.
MIN_RETRY_AFTER_SECONDS = 1


async def get_job(session: AsyncSession, job_id: UUID) -> JobOut:
    """The job as the API shows it, or NotFoundError."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFoundError(f"job {job_id} does not exist")
    return (await _with_hosts(session, [job]))[0]


async def list_jobs(session: AsyncSession, *, vm_uuid: UUID | None, limit: int, after: str | None) -> Page[JobOut]:
    """A page of jobs, newest first, optionally of one VM."""
    statement = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if vm_uuid is not None:
        statement = statement.where(Job.vm_uuid == vm_uuid)
    if after is not None:
        created_at, last_id = after_time_uuid(after)
        statement = statement.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, last_id))
    jobs = list(await session.scalars(statement))
    page = page_of(jobs, limit, lambda j: time_uuid_cursor(j.created_at, j.id))
    return Page(await _with_hosts(session, page.items), page.next_cursor)


async def _with_hosts(session: AsyncSession, jobs: list[Job]) -> list[JobOut]:
    """Attach each job's host outcomes, read in one query for all of them."""
    hosts: dict[UUID, list[JobHostOut]] = {job.id: [] for job in jobs}
    if jobs:
        rows = await session.scalars(
            select(JobHost).where(JobHost.job_id.in_(hosts)).order_by(JobHost.job_id, JobHost.host_uuid)
        )
        for row in rows:
            hosts[row.job_id].append(
                JobHostOut(host_uuid=row.host_uuid, files=row.files, state=row.state, error=row.error)
            )
    return [job_out(job, hosts[job.id]) for job in jobs]


def job_out(job: Job, hosts: list[JobHostOut]) -> JobOut:
    """The job as the API shows it, given its host outcomes (none before the job is planned)."""
    out = JobOut(
        id=job.id,
        type=job.type,
        vm_uuid=job.vm_uuid,
        tpm_uuid=job.tpm_uuid,
        state=job.state,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        hosts=hosts,
        orphan_files=job.orphan_files,
        error=job.error,
        strays=job.strays,
    )
    out.retry_after = retry_after_seconds(job.state, job.run_after)
    return out


def retry_after_seconds(state: str, run_after: datetime) -> int | None:
    """When a job may next change, in whole seconds from now; None once it has ended.

    A running job changes as its hosts answer, and a queued job that is due is claimed within moments: 1 s. A job
    queued again after a failed cleanup is not claimed before its backoff ends.
    """
    if state not in ACTIVE_JOB_STATES:
        return None
    if state == "queued":
        return max(MIN_RETRY_AFTER_SECONDS, math.ceil((run_after - datetime.now(UTC)).total_seconds()))
    return MIN_RETRY_AFTER_SECONDS
