"""The job table as a queue: claim with SKIP LOCKED, leases, fencing tokens, and reading jobs back.

Every write a worker makes for a job it claimed is fenced: one statement whose first part updates the job
row only while the worker's token is still the job's (`FENCED` below), renewing the lease and locking the row,
and whose every other change is made only if that part matched. A worker whose lease was taken over (it
stalled, it was cut off) matches no row and changes nothing, so it can never finish a job a second time or
overwrite the outcome another worker recorded. Being one statement, a fenced write needs no transaction of
its own around it: the job's writes run one round trip each (see app/service/removal/run.py and docs/BENCHMARK.md).
"""

from dataclasses import dataclass
from uuid import UUID

import asyncpg
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.engine import DriverStatement
from app.service.db.models import Job, JobHost
from app.service.errors import NotFoundError
from app.service.pagination import Page, after_time_uuid, page_of, time_uuid_cursor
from app.service.schemas import JobHostOut, JobOut

# The condition of every fenced write on the jobs table: the job is running under this claim's token.
FENCED = "jobs.id = :job_id AND jobs.lease_token = :token AND jobs.state = 'running'"
# What a fenced write that goes on with the job sets: the lease, renewed from now.
RENEWED_LEASE = "lease_expires_at = now() + :lease * interval '1 second'"

_CLAIM = DriverStatement.of(
    text(f"""
UPDATE jobs SET
    state = 'running',
    lease_token = gen_random_uuid(),
    {RENEWED_LEASE},
    started_at = coalesce(started_at, now()),
    attempts = attempts + 1
WHERE id IN (
    SELECT id FROM jobs
    WHERE (state = 'queued' AND run_after <= now())
       OR (state = 'running' AND lease_expires_at < now())
    ORDER BY run_after
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
RETURNING id, vm_uuid, tpm_uuid, lease_token, attempts
""")
)

_RENEW = text(f"""
UPDATE jobs SET {RENEWED_LEASE}
FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[])) AS held(id, token)
WHERE jobs.id = held.id AND jobs.lease_token = held.token AND jobs.state = 'running'
RETURNING jobs.id
""")

_RELEASE = text(f"""
UPDATE jobs SET state = 'queued', lease_token = NULL, lease_expires_at = NULL
WHERE {FENCED}
""")

# A failed cleanup is retried after a backoff; after max_failures failures the job is failed for good.
_RECORD_FAILURE = text(f"""
UPDATE jobs SET
    failures = failures + 1,
    error = :error,
    state = CASE WHEN failures + 1 >= :max_failures THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN failures + 1 >= :max_failures THEN now() END,
    run_after = now() + least(60, power(2, failures)) * interval '1 second',
    lease_token = NULL,
    lease_expires_at = NULL
WHERE {FENCED}
RETURNING state
""")


@dataclass(frozen=True)
class JobClaim:
    """A job a worker holds, with the fencing token of its claim."""

    job_id: UUID
    vm_uuid: UUID
    tpm_uuid: UUID
    token: UUID
    attempt: int

    def fence_params(self, lease_seconds: float) -> dict[str, object]:
        """The parameters of a fenced write (`FENCED`, `RENEWED_LEASE`) for this claim."""
        return {"job_id": self.job_id, "token": self.token, "lease": lease_seconds}

    def log_fields(self) -> dict[str, str]:
        """The fields every log line about this job carries."""
        return {"job_id": str(self.job_id), "vm_uuid": str(self.vm_uuid)}


async def claim_jobs(connection: asyncpg.Connection, *, limit: int, lease_seconds: float) -> list[JobClaim]:
    """Claim up to `limit` jobs that are queued, or running under a lease that ran out (one statement, which
    commits alone on a connection of `app.service.db.engine.driver_connection`)."""
    rows = await _CLAIM.fetch(connection, {"limit": limit, "lease": lease_seconds})
    return [JobClaim(r["id"], r["vm_uuid"], r["tpm_uuid"], r["lease_token"], r["attempts"]) for r in rows]


async def renew_leases(session: AsyncSession, claims: list[JobClaim], *, lease_seconds: float) -> set[UUID]:
    """Renew the leases of all `claims` in one statement; the ids whose lease is still ours."""
    if not claims:
        return set()
    rows = await session.execute(
        _RENEW,
        {
            "ids": [c.job_id for c in claims],
            "tokens": [c.token for c in claims],
            "lease": lease_seconds,
        },
    )
    return {r.id for r in rows}


async def release_job(session: AsyncSession, claim: JobClaim) -> None:
    """Hand a job back to the queue at once (at shutdown), so another process need not wait for the lease."""
    await session.execute(_RELEASE, {"job_id": claim.job_id, "token": claim.token})


async def record_job_failure(session: AsyncSession, claim: JobClaim, error: str, *, max_failures: int) -> str | None:
    """Count a failed cleanup: requeue the job with a backoff, or fail it. Its new state, None if not ours."""
    row = await session.execute(
        _RECORD_FAILURE,
        {"job_id": claim.job_id, "token": claim.token, "error": error, "max_failures": max_failures},
    )
    state = row.scalar_one_or_none()
    return str(state) if state is not None else None


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
        statement = statement.where(
            text("(jobs.created_at, jobs.id) < (CAST(:after_created AS timestamptz), :after_id)").bindparams(
                after_created=created_at, after_id=last_id
            )
        )
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
    return JobOut(
        id=job.id,
        type="remove-tpm",
        vm_uuid=job.vm_uuid,
        tpm_uuid=job.tpm_uuid,
        state=job.state,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        hosts=hosts,
        orphan_files=job.orphan_files,
        error=job.error,
    )
