"""Routes of /vms and /vms/{uuid}/host-files: the VMs and the files they keep on hosts."""

from uuid import UUID

from fastapi import APIRouter, Request, Response

from app.service.api.deps import AfterQuery, LimitQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.links import set_next_link
from app.service.inventory import service as inventory
from app.service.pagination import DEFAULT_LIMIT
from app.service.schemas import HostFileIn, HostFileOut, VmIn, VmOut

router = APIRouter(prefix="/vms", tags=["inventory"])


@router.put(
    "/{vm_uuid}",
    response_model=VmOut,
    summary="Create or replace a VM",
    description="201 when the VM was created, 200 when it was replaced.",
    responses={201: {"model": VmOut, "description": "Created"}, **problem_responses(400, 413, 422)},
)
async def put_vm(vm_uuid: UUID, body: VmIn, session: SessionDep, response: Response) -> VmOut:
    async with session.begin():
        vm, created = await inventory.put_vm(session, vm_uuid, body)
    response.status_code = 201 if created else 200
    return VmOut.model_validate(vm, from_attributes=True)


@router.get("/{vm_uuid}", response_model=VmOut, summary="Read a VM", responses=problem_responses(404, 422))
async def get_vm(vm_uuid: UUID, session: SessionDep) -> VmOut:
    async with session.begin():
        vm = await inventory.get_vm(session, vm_uuid)
    return VmOut.model_validate(vm, from_attributes=True)


@router.post(
    "/{vm_uuid}/host-files",
    response_model=HostFileOut,
    status_code=201,
    summary="Record a file the VM keeps on a host",
    description=(
        "TPM state or NVRAM, original or backup (`backup: true`). 404 when the VM or host is unknown; "
        "409 when that host already has a file recorded at that path, or while an orphan file at that path "
        "is being retried on the host (try again shortly)."
    ),
    responses=problem_responses(400, 404, 409, 413, 422),
)
async def add_host_file(vm_uuid: UUID, body: HostFileIn, session: SessionDep) -> HostFileOut:
    async with session.begin():
        host_file = await inventory.add_host_file(session, vm_uuid, body)
    return HostFileOut.model_validate(host_file, from_attributes=True)


@router.get(
    "/{vm_uuid}/host-files",
    response_model=list[HostFileOut],
    summary="List the VM's host files, backups included",
    description='Paged with `limit` and the `Link: <...>; rel="next"` header.',
    responses=problem_responses(400, 404, 422),
)
async def list_host_files(
    vm_uuid: UUID,
    session: SessionDep,
    request: Request,
    response: Response,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> list[HostFileOut]:
    async with session.begin():
        page = await inventory.list_host_files(session, vm_uuid, limit=limit, after=after)
    set_next_link(request, response, page.next_cursor)
    return [HostFileOut.model_validate(f, from_attributes=True) for f in page.items]
