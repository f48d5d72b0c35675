"""Decommissioning a host: removed once nothing is left on it, or with its orphan files abandoned to an operator.

A host that is gone for good cannot confirm the deletion of its orphan files, which would be retried forever.
Abandoning them keeps every one of them where an operator sees it (`GET /abandoned-files`), rather than forgetting
them as ZStack's tracker does; the service never retries nor deletes an abandoned file.
"""

from uuid import UUID

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.service.db.models import AbandonedFile, Host, HostFile, OrphanFile
from app.service.db.queries import NamedStatements, driver_of
from app.service.errors import ConflictError, NotFoundError
from app.service.pagination import Page, page_by_uuid

STATEMENTS = NamedStatements(__file__)


async def delete_host(session: AsyncSession, host_uuid: UUID, *, abandon_orphans: bool) -> int:
    """Delete a host that has no host-file record and (unless `abandon_orphans`) no orphan file; how many orphan
    files were abandoned. NotFoundError or ConflictError otherwise, with nothing changed.

    The host row is locked first: a host file or an orphan file recorded on it takes a lock on that row too (its
    foreign key), so none can appear between the checks and the delete. An orphan retry in flight is waited for
    while its claim commits, and its outcome, landing later, finds no orphan to confirm or back off.
    """
    host = await session.scalar(select(Host.uuid).where(Host.uuid == host_uuid).with_for_update())
    if host is None:
        raise NotFoundError(f"host {host_uuid} does not exist")
    records = await _count_on_host(session, HostFile.host_uuid, host_uuid)
    if records:
        raise ConflictError(
            f"host {host_uuid} still has {records} host-file record(s) of VMs; remove their TPMs or VMs first"
        )
    abandoned = 0
    if abandon_orphans:
        moved = await STATEMENTS.run(await driver_of(session), "abandon_orphans", {"host_uuid": host_uuid})
        abandoned = len(moved)
    else:
        orphans = await _count_on_host(session, OrphanFile.host_uuid, host_uuid)
        if orphans:
            raise ConflictError(
                f"host {host_uuid} still has {orphans} orphan file(s) the service is retrying; wait for them, or "
                "pass abandon_orphans=true to give them up to GET /abandoned-files"
            )
    await session.execute(delete(Host).where(Host.uuid == host_uuid))
    return abandoned


async def _count_on_host(session: AsyncSession, column: InstrumentedAttribute[UUID], host_uuid: UUID) -> int:
    return int(await session.scalar(select(func.count()).where(column == host_uuid)) or 0)


async def list_abandoned(
    session: AsyncSession, *, host_uuid: UUID | None, limit: int, after: str | None
) -> Page[AbandonedFile]:
    """A page of abandoned files, optionally of one (former) host, in a stable order."""
    statement = select(AbandonedFile)
    if host_uuid is not None:
        statement = statement.where(AbandonedFile.host_uuid == host_uuid)
    return await page_by_uuid(session, statement, AbandonedFile.uuid, limit=limit, after=after)
