"""The inventory: hosts, VMs, TPMs with their key binding, and the files VMs keep on hosts."""

from typing import Any, TypeVar
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
from app.service.pagination import Page, cursor_uuid, decode_cursor, page_of
from app.service.schemas import HEALTHY, HostFileIn, HostHealthOut, HostIn, HostOut, TpmIn, VmIn

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


async def get_host(session: AsyncSession, host_uuid: UUID) -> Host:
    """The host, or NotFoundError."""
    host = await session.get(Host, host_uuid)
    if host is None:
        raise NotFoundError(f"host {host_uuid} does not exist")
    return host


async def host_out(session: AsyncSession, host: Host) -> HostOut:
    """The host as the API shows it, with its health (app/service/orphans/health.py)."""
    health = await session.get(HostHealth, host.uuid, populate_existing=True)
    return HostOut(
        uuid=host.uuid,
        name=host.name,
        agent_url=host.agent_url,
        health=HEALTHY if health is None else HostHealthOut.model_validate(health, from_attributes=True),
    )


async def put_vm(session: AsyncSession, vm_uuid: UUID, body: VmIn) -> tuple[Vm, bool]:
    """Create or replace a VM; the flag tells whether it was created."""
    return await _put(session, Vm, vm_uuid, body.model_dump())


async def get_vm(session: AsyncSession, vm_uuid: UUID, *, lock: bool = False) -> Vm:
    """The VM, or NotFoundError; with lock, its row stays locked until the transaction ends.

    Locking the VM row serialises everything that decides about its TPM (create, remove) across replicas.
    """
    statement = select(Vm).where(Vm.uuid == vm_uuid)
    if lock:
        statement = statement.with_for_update()
    vm = (await session.execute(statement)).scalar_one_or_none()
    if vm is None:
        raise NotFoundError(f"VM {vm_uuid} does not exist")
    return vm


async def create_tpm(session: AsyncSession, vm_uuid: UUID, body: TpmIn) -> tuple[Tpm, UUID | None]:
    """Give a VM its TPM, bound to a key provider when one is named."""
    await get_vm(session, vm_uuid, lock=True)
    removal_under_way = exists().where(Job.vm_uuid == vm_uuid, Job.state.in_(ACTIVE_JOB_STATES))
    if await session.scalar(select(removal_under_way)):
        raise ConflictError(f"a removal of VM {vm_uuid}'s TPM is under way")
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
    """Record a file a VM keeps on a host, and enter it in the ledger of every file ever recorded."""
    await get_vm(session, vm_uuid)
    await get_host(session, body.host_uuid)
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
    statement = select(HostFile).where(HostFile.vm_uuid == vm_uuid).order_by(HostFile.uuid).limit(limit + 1)
    if after is not None:
        (last_uuid,) = decode_cursor(after, 1)
        statement = statement.where(HostFile.uuid > cursor_uuid(last_uuid))
    rows = list(await session.scalars(statement))
    return page_of(rows, limit, lambda f: [str(f.uuid)])
