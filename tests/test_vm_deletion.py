"""DELETE /vms/{uuid}: a delete-vm job takes every host file of the VM, then the VM with its TPM and key binding."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx

from app.service.audit import audit
from tests.agent_helpers import running_agent, running_recording_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, wait_for_job
from tests.reliability.process_helpers import wait_until
from tests.test_removal import db_rows


async def delete_vm(client: httpx.AsyncClient, vm_uuid: str) -> dict[str, Any]:
    """DELETE the VM and wait for its job to end; the final job."""
    answer = await client.delete(f"/vms/{vm_uuid}")
    assert answer.status_code == 202, answer.text
    return await wait_for_job(client, answer.json()["id"])


async def vm_records(client: httpx.AsyncClient, vm_uuid: str) -> list[Any]:
    """What the database still holds of the VM itself: its row, TPM and host-file records."""
    return await db_rows(
        client,
        "SELECT 'vm' FROM vms WHERE uuid = :v UNION ALL SELECT 'tpm' FROM tpms WHERE vm_uuid = :v "
        "UNION ALL SELECT 'host file' FROM host_files WHERE vm_uuid = :v",
        v=vm_uuid,
    )


async def test_deleting_a_secure_boot_vm_removes_every_file_on_every_host_then_the_vm(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm = await put_vm(client, secure_boot=True)
    tpm = (await client.get(f"/vms/{vm}/tpm")).json()
    files: list[Path] = []
    async with running_agent(tmp_path / "a") as a, running_agent(tmp_path / "b") as b:
        for root, url in ((tmp_path / "a", a), (tmp_path / "b", b)):
            host = await put_host(client, url)
            state, state_backup, nvram, nvram_backup = make_files(
                root, vm, "tpm2-00.permall", "tpm2-00.permall.bak", "VARS.fd", "VARS.fd.bak"
            )
            await add_file(client, vm, host, state)
            await add_file(client, vm, host, state_backup, backup=True)
            await add_file(client, vm, host, nvram, type="NvRam")
            await add_file(client, vm, host, nvram_backup, type="NvRam", backup=True)
            files += [state, state_backup, nvram, nvram_backup]

        answer = await client.delete(f"/vms/{vm}")
        assert answer.status_code == 202, answer.text
        queued = answer.json()
        assert queued["type"] == "delete-vm" and queued["vm_uuid"] == vm and queued["tpm_uuid"] == tpm["uuid"]
        assert answer.headers["Location"] == f"/jobs/{queued['id']}"
        assert answer.headers["Retry-After"] == "1"
        job = await wait_for_job(client, queued["id"])

    assert job["state"] == "succeeded" and job["error"] is None and job["orphan_files"] == 0, job
    assert job["type"] == "delete-vm" and job["tpm_uuid"] == tpm["uuid"]
    assert sorted((h["state"], h["files"]) for h in job["hosts"]) == [("deleted", 4), ("deleted", 4)]
    assert not [f for f in files if f.exists()]
    assert await vm_records(client, vm) == []
    assert await db_rows(client, "SELECT 1 FROM tpm_key_bindings WHERE tpm_uuid = :t", t=tpm["uuid"]) == []
    for gone in (f"/vms/{vm}", f"/vms/{vm}/tpm", f"/vms/{vm}/host-files"):
        assert (await client.get(gone)).status_code == 404, gone
    confirmed = await db_rows(client, "SELECT path FROM confirmed_deletions WHERE job_id = :j", j=job["id"])
    assert sorted(p for (p,) in confirmed) == sorted(str(f) for f in files)
    # The job outlives its VM, and an ended job has no Retry-After.
    read = await client.get(f"/jobs/{job['id']}")
    assert read.status_code == 200 and read.json() == job and "Retry-After" not in read.headers
    assert [j["id"] for j in (await client.get("/jobs", params={"vm_uuid": vm})).json()] == [job["id"]]
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok and report.ledger_files == len(files), report.render()


async def test_a_vm_without_tpm_is_deleted_by_a_job_that_names_no_tpm(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm = await put_vm(client, tpm=False)
    async with running_agent(tmp_path) as url:
        host = await put_host(client, url)
        (nvram,) = make_files(tmp_path, vm, "VARS.fd")
        await add_file(client, vm, host, nvram, type="NvRam")
        job = await delete_vm(client, vm)

    assert job["state"] == "succeeded" and job["tpm_uuid"] is None, job
    assert [(h["state"], h["files"]) for h in job["hosts"]] == [("deleted", 1)]
    assert not nvram.exists()
    assert await vm_records(client, vm) == []


async def test_a_failing_host_leaves_orphans_and_the_vm_is_deleted_all_the_same(
    make_client: AppFactory, tmp_path: Path
) -> None:
    # Retries far off, so that the orphans are still there when the test reads them.
    client = await make_client(orphan_retry_seconds=600)
    vm = await put_vm(client)
    async with (
        running_recording_agent(tmp_path / "ok") as (ok_url, _),
        running_recording_agent(tmp_path / "bad", mode="http500") as (bad_url, _),
    ):
        ok_host, bad_host = await put_host(client, ok_url), await put_host(client, bad_url)
        (kept,) = make_files(tmp_path / "ok", vm, "tpm2-00.permall")
        lost = make_files(tmp_path / "bad", vm, "tpm2-00.permall", "VARS.fd")
        await add_file(client, vm, ok_host, kept)
        await add_file(client, vm, bad_host, lost[0])
        await add_file(client, vm, bad_host, lost[1], type="NvRam")
        job = await delete_vm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 2, job
    assert {h["host_uuid"]: h["state"] for h in job["hosts"]} == {ok_host: "deleted", bad_host: "failed"}
    assert await vm_records(client, vm) == []
    orphans = (await client.get("/orphan-files", params={"host_uuid": bad_host})).json()
    assert sorted(o["path"] for o in orphans) == sorted(str(p) for p in lost)
    assert {o["vm_uuid"] for o in orphans} == {vm}


async def test_delete_of_an_unknown_vm_is_404_and_a_malformed_uuid_422(client: httpx.AsyncClient) -> None:
    unknown = await client.delete(f"/vms/{uuid.uuid4()}")
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    assert "does not exist" in unknown.json()["detail"]
    assert (await client.delete("/vms/not-a-uuid")).status_code == 422


async def test_a_deleted_vm_is_404_and_its_uuid_may_be_put_again(client: httpx.AsyncClient) -> None:
    vm = await put_vm(client)
    await delete_vm(client, vm)
    assert (await client.delete(f"/vms/{vm}")).status_code == 404
    again = await client.put(f"/vms/{vm}", json={"name": "reborn", "secure_boot": False})
    assert again.status_code == 201 and again.json()["name"] == "reborn"


async def test_writes_to_a_vm_being_deleted_are_409_naming_the_job_and_change_nothing(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    host = await put_host(client, "http://127.0.0.1:9")
    await add_file(client, vm, host, f"/var/lib/libvirt/swtpm/{vm}")
    before = (await client.get(f"/vms/{vm}")).json(), (await client.get(f"/vms/{vm}/tpm")).json()
    deletion = await client.delete(f"/vms/{vm}")
    assert deletion.status_code == 202 and deletion.json()["state"] == "queued"
    job_id = deletion.json()["id"]

    writes = [
        client.put(f"/vms/{vm}", json={"name": "renamed", "secure_boot": True}),
        client.post(f"/vms/{vm}/tpm", json={}),
        client.post(
            f"/vms/{vm}/host-files",
            json={"host_uuid": host, "path": f"/var/lib/libvirt/qemu/nvram/{vm}.fd", "type": "NvRam"},
        ),
        client.delete(f"/vms/{vm}/tpm"),
    ]
    for answer in await asyncio.gather(*writes):
        assert answer.status_code == 409, (answer.request.method, answer.request.url, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"
        assert f"VM {vm} is being deleted (job {job_id})" == answer.json()["detail"]
    assert ((await client.get(f"/vms/{vm}")).json(), (await client.get(f"/vms/{vm}/tpm")).json()) == before
    assert len((await client.get(f"/vms/{vm}/host-files")).json()) == 1
    # A second DELETE gets the same job, and reads of the job under way say when to look again.
    again = await client.delete(f"/vms/{vm}")
    assert again.status_code == 202 and again.json()["id"] == job_id and again.headers["Retry-After"] == "1"
    assert [j["id"] for j in (await client.get("/jobs", params={"vm_uuid": vm})).json()] == [job_id]


async def test_delete_of_a_vm_whose_tpm_removal_is_under_way_is_409_naming_that_job(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    removal = (await client.delete(f"/vms/{vm}/tpm")).json()

    answer = await client.delete(f"/vms/{vm}")
    assert answer.status_code == 409 and answer.headers["content-type"] == "application/problem+json"
    assert removal["id"] in answer.json()["detail"] and "TPM" in answer.json()["detail"]
    assert (await client.get(f"/vms/{vm}")).status_code == 200
    assert [j["id"] for j in (await client.get("/jobs", params={"vm_uuid": vm})).json()] == [removal["id"]]


async def test_concurrent_deletes_in_two_replicas_share_one_job_and_call_each_host_once(
    make_client: AppFactory, tmp_path: Path
) -> None:
    # The held call must not time out (and end the job) before every DELETE is answered, however slow the machine.
    replicas = [await make_client(agent_timeout_seconds=60), await make_client(agent_timeout_seconds=60)]
    vm = await put_vm(replicas[0])
    async with running_recording_agent(tmp_path) as (url, agent):
        host = await put_host(replicas[0], url)
        for path in make_files(tmp_path, vm, "tpm2-00.permall", "VARS.fd"):
            await add_file(replicas[0], vm, host, path, type="NvRam" if path.suffix == ".fd" else "TpmState")
        # The job stays running until every DELETE is answered: one that came after its end would get a 404.
        agent.hold.clear()
        answers = await asyncio.gather(*(replicas[i % 2].delete(f"/vms/{vm}") for i in range(40)))
        agent.hold.set()
        assert {a.status_code for a in answers} == {202}, {a.text for a in answers}
        (job_id,) = {a.json()["id"] for a in answers}
        job = await wait_for_job(replicas[1], job_id)

    assert job["state"] == "succeeded" and job["type"] == "delete-vm"
    assert len(agent.calls) == 1
    assert await vm_records(replicas[0], vm) == []


async def test_files_recorded_while_the_deletion_starts_are_either_refused_or_deleted_with_the_vm(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm = await put_vm(client)
    async with running_recording_agent(tmp_path) as (url, agent):
        host = await put_host(client, url)
        first, *racing = make_files(tmp_path, vm, *(f"VARS-{i}.fd" for i in range(21)))
        late = make_files(tmp_path, vm, *(f"late-{i}.fd" for i in range(5)))

        async def record(path: Path) -> httpx.Response:
            return await client.post(
                f"/vms/{vm}/host-files", json={"host_uuid": host, "path": str(path), "type": "NvRam"}
            )

        assert (await record(first)).status_code == 201  # so that the job calls the host, however the race goes
        agent.hold.clear()
        answers = await asyncio.gather(
            *(record(p) for p in racing[:10]), client.delete(f"/vms/{vm}"), *(record(p) for p in racing[10:])
        )
        deletion, raced = answers[10], answers[:10] + answers[11:]
        assert deletion.status_code == 202, deletion.text
        await wait_until(lambda: bool(agent.calls), timeout=20, what="the job has planned its files and calls the host")
        refused = await asyncio.gather(*(record(p) for p in late))
        agent.hold.set()
        job = await wait_for_job(client, deletion.json()["id"])

    assert {r.status_code for r in raced} <= {201, 409}
    assert {r.status_code for r in refused} == {409}
    accepted = [first] + [p for p, r in zip(racing, raced, strict=True) if r.status_code == 201]
    assert job["state"] == "succeeded" and sum(h["files"] for h in job["hosts"]) == len(accepted), job
    # Every file whose record was accepted went with the VM; the refused ones were never recorded nor touched.
    assert not [p for p in accepted if p.exists()]
    assert all(p.exists() for p in late)
    assert await vm_records(client, vm) == []
