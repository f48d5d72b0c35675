"""Routes of /orphan-files: files whose host has not confirmed their deletion yet."""

from fastapi import APIRouter, Request, Response

from app.service.api.deps import HostFilesPageQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.links import set_next_link
from app.service.orphans.reaper import list_orphans
from app.service.schemas import OrphanFileOut

router = APIRouter(prefix="/orphan-files", tags=["orphan files"])


@router.get(
    "",
    response_model=list[OrphanFileOut],
    summary="List orphan files",
    description=(
        "Files whose host delete failed. The service retries each with exponential backoff from "
        "ORPHAN_RETRY_SECONDS until its host confirms; then it leaves this list. "
        'Paged with `limit` and the `Link: <...>; rel="next"` header.'
    ),
    responses=problem_responses(400, 422),
)
async def get_orphan_files(
    session: SessionDep, request: Request, response: Response, query: HostFilesPageQuery
) -> list[OrphanFileOut]:
    async with session.begin():
        page = await list_orphans(session, host_uuid=query.host_uuid, limit=query.limit, after=query.after)
    set_next_link(request, response, page.next_cursor)
    return [OrphanFileOut.model_validate(o, from_attributes=True) for o in page.items]
