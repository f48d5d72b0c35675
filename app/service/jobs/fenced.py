"""A job's fenced writes: each one a statement of its own that changes nothing once the job's lease is lost."""

import time
from typing import Any

import asyncpg

from app.service.db.engine import Engine, driver_connection
from app.service.db.queries import NamedStatements
from app.service.errors import LeaseLostError
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim


async def run_fenced(
    engine: Engine,
    statements: NamedStatements,
    claim: JobClaim,
    lease: LeaseClock,
    name: str,
    params: dict[str, Any],
) -> list[asyncpg.Record]:
    """Run one fenced statement on its own (no transaction around it); its rows, or LeaseLostError if none."""
    sent_at = time.monotonic()
    # Every statement of a job is fenced and atomic by itself: none needs a transaction around it.
    async with driver_connection(engine) as connection:
        rows = await statements.run(connection, name, {**claim.fence_params(lease.lease_seconds), **params})
    if not rows:
        lease.lose()
        raise LeaseLostError(f"job {claim.job_id}: lease was taken over")
    lease.renewed(sent_at)
    return rows
