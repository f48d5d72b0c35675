"""Routes of /stray-files: what hosts hold that no record names, as their last scans found it."""

from fastapi import APIRouter, Request, Response

from app.service.api.deps import HostFilesPageQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.links import set_next_link
from app.service.scan.strays import list_strays
from app.service.schemas import StrayFileOut

router = APIRouter(prefix="/stray-files", tags=["stray files"])


@router.get(
    "",
    response_model=list[StrayFileOut],
    summary="List stray files",
    description=(
        "What each host's last scan (`POST /hosts/{host_uuid}/scan`, and the periodic scans) found that no host "
        "file, orphan, abandoned file or job under way names, older than STRAY_MIN_AGE_SECONDS and not in use. "
        "Nothing is deleted because it is listed here. "
        'Paged with `limit` and the `Link: <...>; rel="next"` header.'
    ),
    responses=problem_responses(400, 422),
)
async def get_stray_files(
    session: SessionDep, request: Request, response: Response, query: HostFilesPageQuery
) -> list[StrayFileOut]:
    async with session.begin():
        page = await list_strays(session, host_uuid=query.host_uuid, limit=query.limit, after=query.after)
    set_next_link(request, response, page.next_cursor)
    return page.items
