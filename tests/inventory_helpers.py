"""Helpers that fill the inventory through the API, each with fresh UUIDs so tests never collide."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx


async def put_host(client: httpx.AsyncClient, agent_url: str, **headers: str) -> str:
    """A new host whose agent answers at `agent_url`; its UUID."""
    host_uuid = str(uuid.uuid4())
    answer = await client.put(f"/hosts/{host_uuid}", json={"name": "kvm", "agent_url": agent_url}, headers=headers)
    assert answer.status_code == 201, answer.text
    return host_uuid


async def put_vm(client: httpx.AsyncClient, *, secure_boot: bool = False, tpm: bool = True) -> str:
    """A new VM, with a TPM unless told otherwise; its UUID."""
    vm_uuid = str(uuid.uuid4())
    answer = await client.put(f"/vms/{vm_uuid}", json={"name": "vm", "secure_boot": secure_boot})
    assert answer.status_code == 201, answer.text
    if tpm:
        answer = await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": str(uuid.uuid4())})
        assert answer.status_code == 201, answer.text
    return vm_uuid


async def add_file(
    client: httpx.AsyncClient,
    vm_uuid: str,
    host_uuid: str,
    path: str | Path,
    type: str = "TpmState",
    backup: bool = False,
) -> dict[str, Any]:
    """Record a host file of the VM; the file as the API returns it."""
    answer = await client.post(
        f"/vms/{vm_uuid}/host-files",
        json={"host_uuid": host_uuid, "path": str(path), "type": type, "backup": backup},
    )
    assert answer.status_code == 201, answer.text
    result: dict[str, Any] = answer.json()
    return result


def make_files(root: Path, vm_uuid: str, *names: str) -> list[Path]:
    """Create real files under `root` (as swtpm and libvirt would); their paths."""
    paths = []
    for name in names:
        path = root / vm_uuid / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"state")
        paths.append(path)
    return paths


async def wait_for_job(client: httpx.AsyncClient, job_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Follow a job with the long-poll until it has ended; the final job."""
    deadline = asyncio.get_running_loop().time() + timeout
    answer = await client.get(f"/jobs/{job_id}")
    while True:
        assert answer.status_code in (200, 304), answer.text
        if answer.status_code == 200:
            job: dict[str, Any] = answer.json()
            if job["state"] in ("succeeded", "failed"):
                return job
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"job {job_id} did not end within {timeout} s: {job}"
        answer = await client.get(
            f"/jobs/{job_id}",
            params={"wait": min(remaining, 5)},
            headers={"If-None-Match": answer.headers["ETag"]},
        )


async def remove_tpm(client: httpx.AsyncClient, vm_uuid: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """DELETE the VM's TPM and wait for the job to end; the final job."""
    answer = await client.delete(f"/vms/{vm_uuid}/tpm")
    assert answer.status_code == 202, answer.text
    return await wait_for_job(client, answer.json()["id"], timeout=timeout)
