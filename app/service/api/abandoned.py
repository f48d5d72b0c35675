"""Routes of /abandoned-files: orphan files of decommissioned hosts, left for an operator to clean by hand."""

from fastapi import APIRouter, Request, Response

from app.service.api.deps import HostFilesPageQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.links import set_next_link
from app.service.inventory.decommission import list_abandoned
from app.service.schemas import AbandonedFileOut

router = APIRouter(prefix="/abandoned-files", tags=["orphan files"])


@router.get(
    "",
    response_model=list[AbandonedFileOut],
    summary="List abandoned files",
    description=(
        "Orphan files of hosts decommissioned with `abandon_orphans=true`: they may still be on those disks. The "
        "service never retries nor deletes them, and they stay in this list. "
        'Paged with `limit` and the `Link: <...>; rel="next"` header.'
    ),
    responses=problem_responses(400, 422),
)
async def get_abandoned_files(
    session: SessionDep, request: Request, response: Response, query: HostFilesPageQuery
) -> list[AbandonedFileOut]:
    async with session.begin():
        page = await list_abandoned(session, host_uuid=query.host_uuid, limit=query.limit, after=query.after)
    set_next_link(request, response, page.next_cursor)
    return [AbandonedFileOut.model_validate(a, from_attributes=True) for a in page.items]
