"""Asking for a host's scan: one scan job per host however many requests arrive, in every replica."""

from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.engine import Engine, driver_connection
from app.service.db.models import Job
from app.service.errors import ConflictError, NotFoundError
from app.service.jobs.reads import get_job, job_out
from app.service.jobs.types import JobType
from app.service.scan.run import STATEMENTS
from app.service.schemas import JobOut
from app.service.trace_context import current_trace_context

# A request's attempts: each further one follows a scan ending between two statements.
_REQUEST_ATTEMPTS = 3


async def request_scan(engine: Engine, host_uuid: UUID) -> tuple[JobOut, bool]:
    """Queue the scan of a host, or return the scan under way; the flag tells which. NotFoundError for no host."""
    params = {
        "job_id": uuid4(),
        "job_type": JobType.SCAN_HOST.value,
        "host_uuid": host_uuid,
        "trace_context": current_trace_context(),
    }
    async with driver_connection(engine) as connection:
        for _ in range(_REQUEST_ATTEMPTS):
            if queued := await STATEMENTS.run(connection, "queue_scan", params):
                return job_out(Job(**queued[0]), hosts=[]), True
            ((host, active),) = await STATEMENTS.run(connection, "scan_state", params)
            if host is None:
                raise NotFoundError(f"host {host_uuid} does not exist")
            if active is not None:
                break
        else:
            raise ConflictError(f"host {host_uuid} is changing right now; try again shortly")
    async with AsyncSession(engine) as session:
        return await get_job(session, active), False
