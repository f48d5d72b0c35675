"""The stray list as the API shows it: pages of each host's strays, with whether their VM is known."""

from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.db.models import StrayFile, Vm
from app.service.pagination import Page, page_by_uuid
from app.service.schemas import StrayFileOut


async def list_strays(
    session: AsyncSession, *, host_uuid: UUID | None, limit: int, after: str | None
) -> Page[StrayFileOut]:
    """A page of stray files, optionally of one host, in UUID order."""
    statement = select(StrayFile)
    if host_uuid is not None:
        statement = statement.where(StrayFile.host_uuid == host_uuid)
    page = await page_by_uuid(session, statement, StrayFile.uuid, limit=limit, after=after)
    named = {stray.vm_uuid for stray in page.items if stray.vm_uuid is not None}
    known = set(await session.scalars(select(Vm.uuid).where(Vm.uuid.in_(named)))) if named else set()
    return Page(
        [
            StrayFileOut(
                uuid=stray.uuid,
                host_uuid=stray.host_uuid,
                path=stray.path,
                type=stray.type,
                vm_uuid=stray.vm_uuid,
                vm_known=stray.vm_uuid in known,
                bytes=stray.bytes,
                modified_at=stray.modified_at,
                first_seen_at=stray.first_seen_at,
                last_seen_at=stray.last_seen_at,
            )
            for stray in page.items
        ],
        page.next_cursor,
    )
