"""Routes of /vms and /vms/{uuid}/host-files: the VMs, their deletion, and the files they keep on hosts."""

from uuid import UUID

from fastapi import APIRouter, Request, Response

from app.service.api.deps import AfterQuery, EngineDep, LimitQuery, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.jobs import JOB_ACCEPTED, job_response
from app.service.api.links import set_next_link
from app.service.api.openapi import operation_link
from app.service.inventory import service as inventory
from app.service.pagination import DEFAULT_LIMIT
from app.service.removal import request as removal
from app.service.schemas import HostFileIn, HostFileOut, JobOut, VmIn, VmOut

router = APIRouter(prefix="/vms", tags=["inventory"])

# What a client does next with a VM it has put: its TPM and the files it keeps on hosts.
_VM_LINKS = {
    "links": {
        operation: operation_link(operation, vm_uuid="$response.body#/uuid")
        for operation in ("tpm-create", "tpm-get", "tpm-remove", "host-files-create", "host-files-list")
    }
}


@router.put(
    "/{vm_uuid}",
    response_model=VmOut,
    summary="Create or replace a VM",
    description="201 when the VM was created, 200 when it was replaced. 409 while the VM is being deleted.",
    responses={
        200: _VM_LINKS,
        201: {"model": VmOut, "description": "Created", **_VM_LINKS},
        **problem_responses(400, 409, 413, 422),
    },
)
async def put_vm(vm_uuid: UUID, body: VmIn, session: SessionDep, response: Response) -> VmOut:
    async with session.begin():
        vm, created = await inventory.put_vm(session, vm_uuid, body)
    response.status_code = 201 if created else 200
    return VmOut.model_validate(vm, from_attributes=True)


@router.get(
    "",
    response_model=list[VmOut],
    summary="List VMs",
    description='In UUID order. Paged with `limit` and the `Link: <...>; rel="next"` header.',
    responses=problem_responses(400, 422),
)
async def list_vms(
    session: SessionDep,
    request: Request,
    response: Response,
    limit: LimitQuery = DEFAULT_LIMIT,
    after: AfterQuery = None,
) -> list[VmOut]:
    async with session.begin():
        page = await inventory.list_vms(session, limit=limit, after=after)
    set_next_link(request, response, page.next_cursor)
    return [VmOut.model_validate(vm, from_attributes=True) for vm in page.items]


@router.get("/{vm_uuid}", response_model=VmOut, summary="Read a VM", responses=problem_responses(404, 422))
async def get_vm(vm_uuid: UUID, session: SessionDep) -> VmOut:
    async with session.begin():
        vm = await inventory.get_vm(session, vm_uuid)
    return VmOut.model_validate(vm, from_attributes=True)


@router.delete(
    "/{vm_uuid}",
    response_model=JobOut,
    status_code=202,
    summary="Delete the VM",
    description=(
        "Answers 202 at once with a `delete-vm` job (`Location: /jobs/{id}`); the job deletes every host file of "
        "the VM, whatever its type and whether or not the VM uses secure boot, one call per host, all at once; "
        "then, in one transaction, the file records, the VM's TPM and key binding if it has one, and the VM. Hosts "
        "that fail leave orphan files, retried until they confirm. While the deletion is queued or running, "
        "answers 202 with that same job, and every write to the VM answers 409. 404 when the VM is unknown; 409 "
        "while a removal of its TPM is queued or running (the detail names that job), or, seldom, when the VM "
        "changed under the request again and again: ask again."
    ),
    responses={202: JOB_ACCEPTED, **problem_responses(404, 409, 422)},
)
async def delete_vm(vm_uuid: UUID, engine: EngineDep) -> Response:
    job, _created = await removal.request_vm_deletion(engine, vm_uuid)
    return job_response(job, status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.post(
    "/{vm_uuid}/host-files",
    response_model=HostFileOut,
    status_code=201,
    summary="Record a file the VM keeps on a host",
    description=(
        "TPM state or NVRAM, original or backup (`backup: true`). 404 when the VM or host is unknown; "
        "409 when that host already has a file recorded at that path, or while an orphan file at that path "
        "is being retried on the host (try again shortly), or while the VM is being deleted."
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
