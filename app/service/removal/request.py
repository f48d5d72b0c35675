"""Asking for a TPM removal or a VM's deletion: one job per VM however many requests arrive, in every replica."""

from uuid import UUID, uuid4

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.engine import Engine, driver_connection
from app.service.db.models import Job
from app.service.db.queries import driver_of
from app.service.errors import ConflictError, NotFoundError
from app.service.inventory.service import get_vm, job_under_way_detail
from app.service.jobs.reads import get_job, job_out
from app.service.jobs.types import JobType
from app.service.removal.run import STATEMENTS
from app.service.schemas import JobOut
from app.service.trace_context import current_trace_context

# A request's attempts: each further one follows a change of the VM's state between two statements.
_REQUEST_ATTEMPTS = 3

_QUEUE = {JobType.REMOVE_TPM: "queue_removal", JobType.DELETE_VM: "queue_vm_deletion"}


async def request_removal(engine: Engine, vm_uuid: UUID) -> tuple[JobOut, bool]:
    """Queue the removal of a VM's TPM, or return the removal already under way; the flag tells which."""
    return await _request(engine, JobType.REMOVE_TPM, vm_uuid)


async def request_vm_deletion(engine: Engine, vm_uuid: UUID) -> tuple[JobOut, bool]:
    """Queue the deletion of a VM, or return the deletion already under way; the flag tells which."""
    return await _request(engine, JobType.DELETE_VM, vm_uuid)


async def _request(engine: Engine, job_type: JobType, vm_uuid: UUID) -> tuple[JobOut, bool]:
    """Queue a job of `job_type` for the VM, or return the one of that type under way; the flag tells which.

    Each statement is atomic by itself, so they run without a transaction: the common case is the insert alone, one
    round trip. However many requests arrive at once, in every replica, the unique index lets exactly one job in;
    the others read it back, on a connection of their own once the first is back in the pool. A job of the other
    type under way is a ConflictError that names it.
    """
    async with driver_connection(engine) as connection:
        queued_or_active = await _queue(connection, job_type, vm_uuid)
    if not isinstance(queued_or_active, UUID):
        return job_out(Job(**queued_or_active), hosts=[]), True
    async with AsyncSession(engine) as session:
        return await get_job(session, queued_or_active), False


async def _queue(connection: asyncpg.Connection, job_type: JobType, vm_uuid: UUID) -> asyncpg.Record | UUID:
    """The row of the job inserted, or else the id of the job of that type under way; NotFoundError or
    ConflictError."""
    params = {
        "job_id": uuid4(),
        "job_type": job_type.value,
        "vm_uuid": vm_uuid,
        "trace_context": current_trace_context(),
    }
    for _ in range(_REQUEST_ATTEMPTS):
        if queued := await STATEMENTS.run(connection, _QUEUE[job_type], params):
            return queued[0]
        ((vm, active, active_type, tpm),) = await STATEMENTS.run(connection, "removal_state", params)
        if active is not None:
            if active_type == job_type:
                return active
            raise ConflictError(job_under_way_detail(vm_uuid, active, active_type))
        if vm is None:
            raise NotFoundError(f"VM {vm_uuid} does not exist")
        if job_type == JobType.REMOVE_TPM and tpm is None:
            raise NotFoundError(f"VM {vm_uuid} has no TPM")
        # What the insert needs and no job under way, yet no job inserted: a job ended, or a TPM was created,
        # between the two statements. Look again.
    raise ConflictError(f"VM {vm_uuid} is changing right now; try again shortly")


async def list_files_removed_with_tpm(session: AsyncSession, vm_uuid: UUID) -> list[asyncpg.Record]:
    """The VM's host files that removing its TPM would delete (state files, secrets and, without secure boot, NVRAM),
    by the rule the removal's plan selects with (queries.sql), in the session's transaction."""
    await get_vm(session, vm_uuid)
    params = {"vm_uuid": vm_uuid, "every_file": False}
    return await STATEMENTS.run(await driver_of(session), "files_removed_with_tpm", params)
