"""Routes of /hosts: the KVM hosts and their agents."""

import logging
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response

from app.service.api.deps import AfterQuery, EngineDep, LimitQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.jobs import JOB_ACCEPTED, job_response
from app.service.api.links import set_next_link
from app.service.inventory import service as inventory
from app.service.inventory.decommission import delete_host
from app.service.pagination import DEFAULT_LIMIT
from app.service.scan.request import request_scan
from app.service.schemas import HealthState, HostIn, HostOut, JobOut

log = logging.getLogger(__name__)

router = APIRouter(prefix="/hosts", tags=["inventory"])


@router.put(
    "/{host_uuid}",
    response_model=HostOut,
    status_code=200,
    summary="Create or replace a host",
    description="201 when the host was created, 200 when it was replaced.",
    responses={201: {"model": HostOut, "description": "Created"}, **problem_responses(400, 413, 422)},
)
async def put_host(host_uuid: UUID, body: HostIn, session: SessionDep, response: Response) -> HostOut:
    async with session.begin():
        host, created = await inventory.put_host(session, host_uuid, body)
        answer = await inventory.host_out(session, host)
    response.status_code = 201 if created else 200
    return answer


@router.get(
    "",
    response_model=list[HostOut],
    summary="List hosts and their health",
    description=(
        "In UUID order, each with its health as `GET /hosts/{host_uuid}` gives it; `health` keeps the hosts of one "
        'state. Paged with `limit` and the `Link: <...>; rel="next"` header.'
    ),
    responses=problem_responses(400, 422),
)
async def list_hosts(
    session: SessionDep,
    request: Request,
    response: Response,
    health: Annotated[HealthState | None, Query(description="Only the hosts whose health is this")] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> list[HostOut]:
    async with session.begin():
        page = await inventory.list_hosts(session, health=health, limit=limit, after=after)
    set_next_link(request, response, page.next_cursor)
    return page.items


@router.get("/{host_uuid}", response_model=HostOut, summary="Read a host", responses=problem_responses(404, 422))
async def get_host(host_uuid: UUID, session: SessionDep) -> HostOut:
    async with session.begin():
        return await inventory.host_out(session, await inventory.get_host(session, host_uuid))


@router.delete(
    "/{host_uuid}",
    status_code=204,
    summary="Decommission a host",
    description=(
        "204 once nothing is left on the host; 409 while any VM has a host-file record on it, or any orphan file "
        "waits on it. With `abandon_orphans=true` a host that is gone for good is removed with its orphan files: "
        "they move to `GET /abandoned-files`, where they are never retried nor deleted, for an operator to clean "
        "that disk by hand. Host-file records block it still."
    ),
    responses=problem_responses(404, 409, 422),
)
async def decommission_host(
    host_uuid: UUID,
    session: SessionDep,
    abandon_orphans: Annotated[
        bool, Query(description="Remove the host even with orphan files on it, abandoning them")
    ] = False,
) -> Response:
    async with session.begin():
        abandoned = await delete_host(session, host_uuid, abandon_orphans=abandon_orphans)
    log.info("host decommissioned", extra={"host_uuid": str(host_uuid), "abandoned_files": abandoned})
    return Response(status_code=204)


@router.post(
    "/{host_uuid}/scan",
    response_model=JobOut,
    status_code=202,
    summary="Scan a host for stray files",
    description=(
        "Answers 202 at once with a `scan-host` job (`Location: /jobs/{id}`); the job asks the host's agent what it "
        "holds and, in one transaction, makes the host's stray list (`GET /stray-files`) what the host holds now that "
        "no record names. A scan deletes nothing. While a scan of the host is queued or running, answers 202 with "
        "that same job. 404 when the host is unknown."
    ),
    responses={202: JOB_ACCEPTED, **problem_responses(404, 422)},
)
async def scan_host(host_uuid: UUID, engine: EngineDep) -> Response:
    job, _created = await request_scan(engine, host_uuid)
    return job_response(job, status_code=202, headers={"Location": f"/jobs/{job.id}"})
