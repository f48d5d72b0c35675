"""The inventory: hosts, VMs, TPMs with their key binding, and the files VMs keep on hosts."""

from typing import Any, Literal, TypeVar
from uuid import UUID, uuid4

from sqlalchemy import Boolean, exists, func, literal_column, select, type_coerce
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.models import (
    ACTIVE_JOB_STATES,
    FileLedger,
    Host,
    HostFile,
    HostHealth,
    Job,
    OrphanFile,
    Tpm,
    TpmKeyBinding,
    Vm,
)
from app.service.errors import ConflictError, NotFoundError
from app.service.jobs.types import JobType
from app.service.pagination import Page, in_uuid_order, page_by_uuid, page_of, uuid_cursor
from app.service.schemas import HEALTHY, HealthState, HostFileIn, HostHealthOut, HostIn, HostOut, TpmIn, VmIn

# PostgreSQL's xmax is 0 only on a row the statement inserted (not on one ON CONFLICT updated).
_INSERTED = type_coerce(literal_column("xmax = 0"), Boolean).label("created")

_Row = TypeVar("_Row", Host, Vm)


async def _put(session: AsyncSession, model: type[_Row], key: UUID, values: dict[str, Any]) -> tuple[_Row, bool]:
    """Create or replace the row of `model` whose uuid is `key`, in one statement; whether it was created."""
    statement = (
        insert(model)
        .values(uuid=key, **values)
        .on_conflict_do_update(index_elements=[model.uuid], set_=values)
        .returning(model, _INSERTED)
    )
    row, created = (await session.execute(statement)).one()
    return row, created


async def put_host(session: AsyncSession, host_uuid: UUID, body: HostIn) -> tuple[Host, bool]:
    """Create or replace a host; the flag tells whether it was created."""
    return await _put(session, Host, host_uuid, body.model_dump())


async def get_host(session: AsyncSession, host_uuid: UUID, *, key_share: bool = False) -> Host:
    """The host, or NotFoundError; with key_share, the host cannot be deleted until the transaction ends.

    A record that points at the host takes that lock anyway (its foreign key), but only when it is written: taken
    first, a decommission in flight is waited for and the host answers as gone, not as a failed insert.
    """
    statement = select(Host).where(Host.uuid == host_uuid)
    if key_share:
        statement = statement.with_for_update(read=True, key_share=True)
    host = (await session.execute(statement)).scalar_one_or_none()
    if host is None:
        raise NotFoundError(f"host {host_uuid} does not exist")
    return host


async def list_agent_urls(session: AsyncSession) -> list[str]:
    """The agent URL of every known host, each once."""
    return list(await session.scalars(select(Host.agent_url).distinct()))


async def host_out(session: AsyncSession, host: Host) -> HostOut:
    """The host as the API shows it, with its health (app/service/orphans/health.py)."""
    return _host_out(host, await session.get(HostHealth, host.uuid, populate_existing=True))


async def list_hosts(
    session: AsyncSession, *, health: HealthState | None, limit: int, after: str | None
) -> Page[HostOut]:
    """A page of the hosts with their health, in UUID order, of one health state when `health` is given.

    Each host's health comes in the same statement (a host without a health row has never failed a call: ok)."""
    statement = select(Host, HostHealth).outerjoin(HostHealth, HostHealth.host_uuid == Host.uuid)
    if health is not None:
        statement = statement.where(func.coalesce(HostHealth.state, HEALTHY.state) == health)
    rows = (await session.execute(in_uuid_order(statement, Host.uuid, limit=limit, after=after))).all()
    return page_of([_host_out(host, row_health) for host, row_health in rows], limit, lambda out: uuid_cursor(out.uuid))


def _host_out(host: Host, health: HostHealth | None) -> HostOut:
    return HostOut(
        uuid=host.uuid,
        name=host.name,
        agent_url=host.agent_url,
        health=HEALTHY if health is None else HostHealthOut.model_validate(health, from_attributes=True),
    )


async def list_vms(session: AsyncSession, *, limit: int, after: str | None) -> Page[Vm]:
    """A page of the VMs, in UUID order."""
    return await page_by_uuid(session, select(Vm), Vm.uuid, limit=limit, after=after)


async def put_vm(session: AsyncSession, vm_uuid: UUID, body: VmIn) -> tuple[Vm, bool]:
    """Create or replace a VM; the flag tells whether it was created. ConflictError while it is being deleted."""
    if await session.scalar(select(Vm.uuid).where(Vm.uuid == vm_uuid).with_for_update()) is not None:
        await _refuse_while_deleted(session, vm_uuid)
    return await _put(session, Vm, vm_uuid, body.model_dump())


async def get_vm(session: AsyncSession, vm_uuid: UUID, *, lock: Literal["share", "update"] | None = None) -> Vm:
    """The VM, or NotFoundError; with lock, its row stays locked (shared or exclusive) until the transaction ends.

    Locking the VM row serialises what decides about it across replicas: an exclusive lock whatever decides about
    its TPM (create, remove), a shared one the recording of its files; the request of its deletion locks it too
    (app/service/removal/queries.sql), so a write made under the lock is either seen by the deletion or sees it.
    """
    statement = select(Vm).where(Vm.uuid == vm_uuid)
    if lock is not None:
        statement = statement.with_for_update(read=lock == "share")
    vm = (await session.execute(statement)).scalar_one_or_none()
    if vm is None:
        raise NotFoundError(f"VM {vm_uuid} does not exist")
    return vm


def job_under_way_detail(vm_uuid: UUID, job_id: UUID, job_type: str) -> str:
    """The detail of a 409 that a job of the VM under way causes, naming the job."""
    if job_type == JobType.DELETE_VM:
        return f"VM {vm_uuid} is being deleted (job {job_id})"
    return f"a removal of VM {vm_uuid}'s TPM is under way (job {job_id})"


async def _refuse_while_deleted(session: AsyncSession, vm_uuid: UUID) -> None:
    """ConflictError while a deletion of the VM is queued or running; call it with the VM row locked."""
    deletion = await session.scalar(
        select(Job.id).where(Job.vm_uuid == vm_uuid, Job.type == JobType.DELETE_VM, Job.state.in_(ACTIVE_JOB_STATES))
    )
    if deletion is not None:
        raise ConflictError(job_under_way_detail(vm_uuid, deletion, JobType.DELETE_VM))


async def create_tpm(session: AsyncSession, vm_uuid: UUID, body: TpmIn) -> tuple[Tpm, UUID | None]:
    """Give a VM its TPM, bound to a key provider when one is named."""
    await get_vm(session, vm_uuid, lock="update")
    active = (
        await session.execute(select(Job.id, Job.type).where(Job.vm_uuid == vm_uuid, Job.state.in_(ACTIVE_JOB_STATES)))
    ).one_or_none()
    if active is not None:
        raise ConflictError(job_under_way_detail(vm_uuid, active.id, active.type))
    if await session.scalar(select(exists().where(Tpm.vm_uuid == vm_uuid))):
        raise ConflictError(f"VM {vm_uuid} already has a TPM")
    tpm = Tpm(uuid=uuid4(), vm_uuid=vm_uuid)
    session.add(tpm)
    if body.key_provider_uuid is not None:
        await session.flush()
        session.add(TpmKeyBinding(tpm_uuid=tpm.uuid, key_provider_uuid=body.key_provider_uuid))
    await session.flush()
    return tpm, body.key_provider_uuid


async def get_tpm(session: AsyncSession, vm_uuid: UUID) -> tuple[Tpm, UUID | None]:
    """A VM's TPM and its key provider, or NotFoundError."""
    await get_vm(session, vm_uuid)
    row = (
        await session.execute(
            select(Tpm, TpmKeyBinding.key_provider_uuid)
            .outerjoin(TpmKeyBinding, TpmKeyBinding.tpm_uuid == Tpm.uuid)
            .where(Tpm.vm_uuid == vm_uuid)
        )
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"VM {vm_uuid} has no TPM")
    return row[0], row[1]


async def add_host_file(session: AsyncSession, vm_uuid: UUID, body: HostFileIn) -> HostFile:
    """Record a file a VM keeps on a host, and enter it in the ledger of every file ever recorded.

    ConflictError while the VM is being deleted."""
    await get_vm(session, vm_uuid, lock="share")
    await _refuse_while_deleted(session, vm_uuid)
    await get_host(session, body.host_uuid, key_share=True)
    # The row lock keeps the orphan reaper (SKIP LOCKED) from claiming an orphan at this path until the new
    # record is committed, after which it leaves the path alone; a retry already in flight must end first.
    retry_in_flight = await session.scalar(
        select(OrphanFile.uuid)
        .where(
            OrphanFile.host_uuid == body.host_uuid,
            OrphanFile.path == body.path,
            OrphanFile.claim_token.is_not(None),
            OrphanFile.next_attempt_at > func.now(),
        )
        .with_for_update()
    )
    if retry_in_flight is not None:
        raise ConflictError(
            f"a deletion of {body.path} on host {body.host_uuid} is being retried right now; try again shortly"
        )
    host_file = HostFile(
        uuid=uuid4(),
        vm_uuid=vm_uuid,
        host_uuid=body.host_uuid,
        path=body.path,
        type=body.type,
        backup=body.backup,
    )
    session.add(host_file)
    session.add(FileLedger(file_uuid=host_file.uuid, vm_uuid=vm_uuid, host_uuid=body.host_uuid, path=body.path))
    try:
        await session.flush()
    except IntegrityError:
        raise ConflictError(f"host {body.host_uuid} already has a file recorded at {body.path}") from None
    return host_file


async def list_host_files(session: AsyncSession, vm_uuid: UUID, *, limit: int, after: str | None) -> Page[HostFile]:
    """A page of a VM's host files, backups included, in a stable order."""
    await get_vm(session, vm_uuid)
    statement = select(HostFile).where(HostFile.vm_uuid == vm_uuid)
    return await page_by_uuid(session, statement, HostFile.uuid, limit=limit, after=after)
