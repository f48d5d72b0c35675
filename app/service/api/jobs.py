"""Routes of /jobs: read jobs, list them, and follow one by long-polling."""

import asyncio
import hashlib
import time
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response

from app.service.api.deps import AfterTimeQuery, LimitQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.links import set_next_link
from app.service.api.openapi import operation_link
from app.service.db.notify import Notifications, wait_for_any
from app.service.jobs import reads as jobs
from app.service.pagination import DEFAULT_LIMIT
from app.service.schemas import JobOut

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_WAIT_SECONDS = 60


RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": (
            "While the job is queued or running: whole seconds after which it may have changed (1, or the end of "
            "the backoff of a job queued again after a failed cleanup). Absent once the job has ended."
        ),
        "schema": {"type": "integer", "minimum": 1},
    }
}
"""The OpenAPI description of the Retry-After header of job answers."""

JOB_ACCEPTED = {
    "headers": RETRY_AFTER_HEADER,
    "links": {"jobs-get": operation_link("jobs-get", job_id="$response.body#/id")},
}
"""The OpenAPI description of a 202 that answers with a new job (or the one under way): follow it at GET /jobs/{id}."""


def job_response(job: JobOut, *, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """The job as JSON with its ETag, a strong one: a hash of the body, so any visible change gives a new one;
    while the job is under way, with its Retry-After."""
    body = job.model_dump_json()
    etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'
    headers = {**(headers or {}), "ETag": etag}
    if job.retry_after is not None:
        headers["Retry-After"] = str(job.retry_after)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def _not_modified(response: Response) -> Response:
    """The 304 of a job answer: its ETag and Retry-After, no body."""
    kept = {name: response.headers[name] for name in ("ETag", "Retry-After") if name in response.headers}
    return Response(status_code=304, headers=kept)


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags or "*" in tags


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Read a job, or wait for it to change",
    description=(
        "Every answer carries an `ETag`. With `If-None-Match: <etag>` and `wait=S` (seconds, at most 60) "
        "this is a long-poll: 200 with the job as soon as anything in it differs from that ETag (any "
        "replica's change wakes it), or 304 Not Modified after S seconds. With `If-None-Match` and no "
        "`wait`, an unchanged job answers 304 at once. While the job is queued or running, every answer "
        "(304 too) carries `Retry-After`."
    ),
    responses={
        200: {"headers": RETRY_AFTER_HEADER},
        304: {"description": "Not Modified: the job still matches If-None-Match", "headers": RETRY_AFTER_HEADER},
        **problem_responses(404, 422),
    },
)
async def get_job(
    job_id: UUID,
    request: Request,
    session: SessionDep,
    wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_SECONDS, description="Long-poll seconds")] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    notifications: Notifications = request.app.state.notifications
    stopping: asyncio.Event = request.app.state.stopping
    deadline = time.monotonic() + (wait or 0)
    # Subscribe before reading, so a change between the read and the wait is not missed.
    async with notifications.watch_job(job_id) as changed:
        while True:
            changed.clear()
            async with session.begin():
                job = await jobs.get_job(session, job_id)
            response = job_response(job)
            if not _matches(if_none_match, response.headers["ETag"]):
                return response
            remaining = deadline - time.monotonic()
            # A stopping process ends its long-polls at once; the caller polls again, on another replica.
            if remaining <= 0 or stopping.is_set():
                return _not_modified(response)
            # No database connection is held while waiting: only these events.
            await wait_for_any([changed, stopping], timeout=remaining)


@router.get(
    "",
    response_model=list[JobOut],
    summary="List jobs, newest first",
    description='Optionally of one VM. Paged with `limit` and the `Link: <...>; rel="next"` header.',
    responses=problem_responses(400, 422),
)
async def list_jobs(
    session: SessionDep,
    request: Request,
    response: Response,
    vm_uuid: UUID | None = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterTimeQuery = None,
) -> list[JobOut]:
    async with session.begin():
        page = await jobs.list_jobs(session, vm_uuid=vm_uuid, limit=limit, after=after)
    set_next_link(request, response, page.next_cursor)
    return page.items
