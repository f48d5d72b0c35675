"""The job table as a queue: claim with SKIP LOCKED, leases, fencing tokens, release, failure and retention.

Every write a worker makes for a job it claimed is fenced: one statement whose first part updates the job
row only while the worker's token is still the job's, renewing the lease and locking the row, and whose every
other change is made only if that part matched. A worker whose lease was taken over (it stalled, it was cut off)
matches no row and changes nothing, so it can never finish a job a second time or overwrite the outcome another
worker recorded. Being one statement, a fenced write needs no transaction of its own around it. The statements are
in queries.sql beside this module; each runs alone on a connection of `app.service.db.engine.driver_connection`.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from uuid import UUID

import asyncpg
from opentelemetry.context import Context

from app.service.backoff import Backoff
from app.service.db.queries import NamedStatements
from app.service.trace_context import stored_trace_context, trace_id_of

STATEMENTS = NamedStatements(__file__)


@dataclass(frozen=True)
class JobClaim:
    """A job a worker holds, with the fencing token of its claim."""

    job_id: UUID
    job_type: str
    """Which handler runs it (app.service.jobs.types.JobType, unless a newer replica queued it)."""
    payload: Mapping[str, Any]
    """The job's row as JSON: what its handler reads its arguments from."""
    token: UUID
    attempt: int
    failures: int
    trace_context: str | None = None
    """The W3C trace context of the request that created the job (app/service/trace_context.py), which its runs
    continue."""

    def fence_params(self, lease_seconds: float) -> dict[str, object]:
        """The parameters of a fenced write for this claim: the job, its token, and the lease to renew."""
        return {"job_id": self.job_id, "token": self.token, "lease": lease_seconds}

    @cached_property
    def trace_parent(self) -> Context:
        """The context every run of the job continues: the span of the request that created it, if it had one."""
        return stored_trace_context(self.trace_context)

    @cached_property
    def _trace_id(self) -> str | None:
        return trace_id_of(self.trace_parent)

    def log_fields(self) -> dict[str, str]:
        """The fields every log line about this job carries: the job, what it is about (its `*_uuid` columns), and
        its trace's id where it has one."""
        about = {k: str(v) for k, v in self.payload.items() if k.endswith("_uuid") and v is not None}
        fields = {"job_id": str(self.job_id), "job_type": self.job_type, **about}
        if self._trace_id is not None:
            fields["trace_id"] = self._trace_id
        return fields


async def claim_jobs(connection: asyncpg.Connection, *, limit: int, lease_seconds: float) -> list[JobClaim]:
    """Claim up to `limit` jobs that are queued, or running under a lease that ran out."""
    rows = await STATEMENTS.run(connection, "claim_jobs", {"limit": limit, "lease": lease_seconds})
    return [
        JobClaim(r["id"], r["type"], r["payload"], r["lease_token"], r["attempts"], r["failures"], r["trace_context"])
        for r in rows
    ]


async def renew_leases(connection: asyncpg.Connection, claims: list[JobClaim], *, lease_seconds: float) -> set[UUID]:
    """Renew the leases of all `claims` in one statement; the ids whose lease is still ours."""
    if not claims:
        return set()
    params = {"ids": [c.job_id for c in claims], "tokens": [c.token for c in claims], "lease": lease_seconds}
    return {r["id"] for r in await STATEMENTS.run(connection, "renew_leases", params)}


async def release_job(connection: asyncpg.Connection, claim: JobClaim) -> None:
    """Hand a job back to the queue at once (at shutdown), so another process need not wait for the lease."""
    await STATEMENTS.run(connection, "release_job", {"job_id": claim.job_id, "token": claim.token})


async def record_job_failure(
    connection: asyncpg.Connection, claim: JobClaim, error: str, *, max_failures: int, backoff: Backoff
) -> str | None:
    """Count a failed step: requeue the job after its back-off, or fail it. Its new state, None if not ours."""
    params = {
        "job_id": claim.job_id,
        "token": claim.token,
        "error": error,
        "max_failures": max_failures,
        "delay": backoff.delay(claim.failures + 1),
    }
    rows = await STATEMENTS.run(connection, "record_job_failure", params)
    return str(rows[0]["state"]) if rows else None


async def prune_jobs(connection: asyncpg.Connection, *, retention_seconds: float, limit: int) -> int:
    """Delete up to `limit` jobs finished more than `retention_seconds` ago, with their outcomes and confirmations
    (one statement, which commits alone); how many went."""
    (row,) = await STATEMENTS.run(connection, "prune_jobs", {"retention": retention_seconds, "limit": limit})
    return int(row["jobs"])
