"""Routes of /hosts: the KVM hosts and their agents."""

from uuid import UUID

from fastapi import APIRouter, Response

from app.service.api.deps import SessionDep
from app.service.api.errors import problem_responses
from app.service.inventory import service as inventory
from app.service.schemas import HostIn, HostOut

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


@router.get("/{host_uuid}", response_model=HostOut, summary="Read a host", responses=problem_responses(404, 422))
async def get_host(host_uuid: UUID, session: SessionDep) -> HostOut:
    async with session.begin():
        return await inventory.host_out(session, await inventory.get_host(session, host_uuid))
