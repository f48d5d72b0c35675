"""Routes of /vms/{uuid}/tpm: create, read, and remove a VM's TPM."""

from uuid import UUID

from fastapi import APIRouter, Response

from app.service.api.deps import EngineDep, SessionDep
from app.service.api.errors import problem_responses
from app.service.api.jobs import JOB_ACCEPTED, job_response
from app.service.inventory import service as inventory
from app.service.removal import request as removal
from app.service.schemas import HostFileOut, JobOut, TpmIn, TpmOut, TpmWithFilesOut

router = APIRouter(prefix="/vms/{vm_uuid}/tpm", tags=["tpm"])


@router.post(
    "",
    response_model=TpmOut,
    status_code=201,
    summary="Give the VM a TPM",
    description="409 when the VM already has a TPM, a removal of its TPM is under way, or it is being deleted.",
    responses=problem_responses(400, 404, 409, 413, 422),
)
async def create_tpm(vm_uuid: UUID, body: TpmIn, session: SessionDep) -> TpmOut:
    async with session.begin():
        tpm, key_provider_uuid = await inventory.create_tpm(session, vm_uuid, body)
    return TpmOut(uuid=tpm.uuid, vm_uuid=tpm.vm_uuid, key_provider_uuid=key_provider_uuid)


@router.get(
    "",
    response_model=TpmWithFilesOut,
    summary="Read the VM's TPM",
    description=(
        "`host_files` lists the files a removal of this TPM deletes: its state files and backups, "
        "and the NVRAM files and backups unless the VM uses secure boot."
    ),
    responses=problem_responses(404, 422),
)
async def get_tpm(vm_uuid: UUID, session: SessionDep) -> TpmWithFilesOut:
    async with session.begin():
        tpm, key_provider_uuid = await inventory.get_tpm(session, vm_uuid)
        files = await removal.list_files_removed_with_tpm(session, vm_uuid)
    return TpmWithFilesOut(
        uuid=tpm.uuid,
        vm_uuid=tpm.vm_uuid,
        key_provider_uuid=key_provider_uuid,
        host_files=[HostFileOut.model_validate(dict(f)) for f in files],
    )


@router.delete(
    "",
    response_model=JobOut,
    status_code=202,
    summary="Remove the VM's TPM",
    description=(
        "Answers 202 at once with the removal job (`Location: /jobs/{id}`); the job deletes the TPM's "
        "files on every host, then the database records and the key binding in one transaction. "
        "While a removal of this VM is queued or running, answers 202 with that same job. "
        "404 when the VM is unknown, or has no TPM and no removal under way. 409 while the VM is being deleted "
        "(the detail names that job); seldom, when the VM's TPM was created or removed under the request again and "
        "again: ask again."
    ),
    responses={202: JOB_ACCEPTED, **problem_responses(404, 409, 422)},
)
async def remove_tpm(vm_uuid: UUID, engine: EngineDep) -> Response:
    job, _created = await removal.request_removal(engine, vm_uuid)
    return job_response(job, status_code=202, headers={"Location": f"/jobs/{job.id}"})
