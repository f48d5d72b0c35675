"""The removal job end to end: real agents deleting real files, the database cleaned in one transaction."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from devtools.local_stack import free_port
from tests.agent_helpers import running_agent, running_recording_agent
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm, wait_for_job


async def db_rows(client: httpx.AsyncClient, sql: str, **params: Any) -> list[Any]:
    """Rows of a query on the app's own database."""
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        return list(await session.execute(text(sql), params))


async def test_removal_deletes_state_backup_and_nvram_files_on_three_hosts(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    roots = [tmp_path / f"host{i}" for i in range(3)]
    vm = await put_vm(client)
    tpm = (await client.get(f"/vms/{vm}/tpm")).json()
    files: list[Path] = []
    async with running_agent(roots[0]) as a, running_agent(roots[1]) as b, running_agent(roots[2]) as c:
        for root, url in zip(roots, (a, b, c), strict=True):
            host = await put_host(client, url)
            state, backup, nvram = make_files(root, vm, "tpm2-00.permall", "tpm2-00.permall.bak", "nvram.fd")
            await add_file(client, vm, host, state)
            await add_file(client, vm, host, backup, backup=True)
            await add_file(client, vm, host, nvram, type="NvRam")
            files += [state, backup, nvram]

        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded", job
    assert job["error"] is None and job["orphan_files"] == 0
    assert sorted(h["state"] for h in job["hosts"]) == ["deleted"] * 3
    assert [h["files"] for h in job["hosts"]] == [3, 3, 3]
    assert job["started_at"] and job["finished_at"] and job["tpm_uuid"] == tpm["uuid"]
    assert not [f for f in files if f.exists()]
    assert (await client.get(f"/vms/{vm}/tpm")).status_code == 404
    assert (await client.get(f"/vms/{vm}/host-files")).json() == []
    assert await db_rows(client, "SELECT 1 FROM tpm_key_bindings WHERE tpm_uuid = :t", t=tpm["uuid"]) == []
    confirmed = await db_rows(client, "SELECT path FROM confirmed_deletions WHERE job_id = :j", j=job["id"])
    assert sorted(p for (p,) in confirmed) == sorted(str(f) for f in files)


async def test_secure_boot_keeps_nvram_files(client: httpx.AsyncClient, tmp_path: Path) -> None:
    vm = await put_vm(client, secure_boot=True)
    async with running_agent(tmp_path) as url:
        host = await put_host(client, url)
        state, nvram, nvram_backup = make_files(tmp_path, vm, "tpm2-00.permall", "nvram.fd", "nvram.fd.bak")
        await add_file(client, vm, host, state)
        await add_file(client, vm, host, nvram, type="NvRam")
        await add_file(client, vm, host, nvram_backup, type="NvRam", backup=True)
        preview = (await client.get(f"/vms/{vm}/tpm")).json()["host_files"]
        assert [f["path"] for f in preview] == [str(state)]

        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["hosts"][0]["files"] == 1
    assert not state.exists() and nvram.exists() and nvram_backup.exists()
    remaining = (await client.get(f"/vms/{vm}/host-files")).json()
    assert sorted(f["path"] for f in remaining) == sorted([str(nvram), str(nvram_backup)])


def closed_port_url() -> str:
    """The URL of a loopback port nobody listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("http500", "HTTP 500"),
        ("slow", "timeout"),
        ("success_false", "disk on fire"),
        ("bad_json", "JSON"),
        ("partial", "not confirmed"),
        ("closed_port", ""),
    ],
)
async def test_a_failing_host_leaves_orphans_and_the_job_still_succeeds(
    make_client: Any, tmp_path: Path, mode: str, reason: str
) -> None:
    # No probe of the failing host within the test: it would count another attempt.
    client = await make_client(agent_timeout_seconds=0.5, orphan_retry_seconds=60, orphan_retry_max_seconds=60)
    vm = await put_vm(client)
    good_root, bad_root = tmp_path / "good", tmp_path / "bad"
    async with (
        running_agent(good_root) as good_url,
        running_recording_agent(bad_root, mode=mode, slow_seconds=3) as (bad_url, _),
    ):
        good_host = await put_host(client, good_url)
        bad_host = await put_host(client, closed_port_url() if mode == "closed_port" else bad_url)
        (good_file,) = make_files(good_root, vm, "tpm2-00.permall")
        bad_files = make_files(bad_root, vm, "tpm2-00.permall", "nvram.fd")
        await add_file(client, vm, good_host, good_file)
        await add_file(client, vm, bad_host, bad_files[0])
        await add_file(client, vm, bad_host, bad_files[1], type="NvRam")

        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded", job
    outcomes = {h["host_uuid"]: h for h in job["hosts"]}
    assert outcomes[good_host]["state"] == "deleted" and outcomes[good_host]["error"] is None
    assert outcomes[bad_host]["state"] == "failed"
    assert reason in outcomes[bad_host]["error"]
    assert job["orphan_files"] == 2
    assert not good_file.exists() and all(f.exists() for f in bad_files)
    orphans = (await client.get("/orphan-files", params={"host_uuid": bad_host})).json()
    assert sorted(o["path"] for o in orphans) == sorted(str(f) for f in bad_files)
    assert all(o["vm_uuid"] == vm and o["attempts"] == 1 and reason in o["last_error"] for o in orphans)
    # The database is clean all the same: the orphans are what keeps track of the files.
    assert (await client.get(f"/vms/{vm}/tpm")).status_code == 404
    assert (await client.get(f"/vms/{vm}/host-files")).json() == []


async def test_orphans_are_retried_until_the_host_confirms(make_client: Any, tmp_path: Path) -> None:
    client = await make_client(orphan_retry_seconds=0.2, orphan_retry_max_seconds=0.5)
    vm = await put_vm(client)
    async with running_recording_agent(tmp_path, mode="http500") as (url, agent):
        host = await put_host(client, url)
        files = make_files(tmp_path, vm, "tpm2-00.permall", "tpm2-00.permall.bak")
        await add_file(client, vm, host, files[0])
        await add_file(client, vm, host, files[1], backup=True)
        job = await remove_tpm(client, vm)
        assert job["orphan_files"] == 2

        # Let the host fail a few retries, then come back.
        await _until(lambda: len(agent.calls) >= 3)
        orphans = (await client.get("/orphan-files", params={"host_uuid": host})).json()
        assert orphans and max(o["attempts"] for o in orphans) >= 2
        agent.mode = "ok"
        await _until_async(lambda: _no_orphans(client, host))

    assert not [f for f in files if f.exists()]
    # Every retry was one call for the host's two files together.
    assert all(len(call["files"]) == 2 for call in agent.calls)
    confirmed = await db_rows(client, "SELECT path FROM confirmed_deletions WHERE host_uuid = :h", h=host)
    assert sorted(p for (p,) in confirmed) == sorted(str(f) for f in files)


async def _no_orphans(client: httpx.AsyncClient, host: str) -> bool:
    return (await client.get("/orphan-files", params={"host_uuid": host})).json() == []


async def _until(condition: Any, timeout: float = 20.0) -> None:
    async def check() -> bool:
        return bool(condition())

    await _until_async(check, timeout)


async def _until_async(condition: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_concurrent_deletes_share_one_job_and_call_each_host_once(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm = await put_vm(client)
    async with (
        running_recording_agent(tmp_path / "a") as (url_a, agent_a),
        running_recording_agent(tmp_path / "b") as (url_b, agent_b),
    ):
        for root, url in ((tmp_path / "a", url_a), (tmp_path / "b", url_b)):
            host = await put_host(client, url)
            for f in make_files(root, vm, "tpm2-00.permall", "nvram.fd"):
                await add_file(client, vm, host, f, type="NvRam" if f.name == "nvram.fd" else "TpmState")
        # The job stays running until every DELETE is answered: one that ended meanwhile would rightly answer 404.
        agent_a.hold.clear()
        answers = await asyncio.gather(*(client.delete(f"/vms/{vm}/tpm") for _ in range(40)))
        agent_a.hold.set()
        assert {a.status_code for a in answers} == {202}
        job_ids = {a.json()["id"] for a in answers}
        assert len(job_ids) == 1
        assert {a.headers["Location"] for a in answers} == {f"/jobs/{job_ids.pop()}"}
        job = await wait_for_job(client, answers[0].json()["id"])

    assert job["state"] == "succeeded"
    assert len(agent_a.calls) == 1 and len(agent_b.calls) == 1
    assert len((await client.get("/jobs", params={"vm_uuid": vm})).json()) == 1


async def test_thirty_slow_hosts_are_called_at_once(make_client: Any, tmp_path: Path) -> None:
    client = await make_client(agent_timeout_seconds=10)
    vm = await put_vm(client)
    async with running_recording_agent(tmp_path, mode="slow", slow_seconds=0.5) as (url, agent):
        for i in range(30):
            # Thirty host records served by one recording agent, which sees every call in flight.
            host = await put_host(client, url)
            (f,) = make_files(tmp_path, vm, f"tpm-{i}.permall")
            await add_file(client, vm, host, f)
        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and len(job["hosts"]) == 30
    # All thirty calls were in flight together: the job waited for the slowest host, not for their sum.
    assert agent.max_in_flight == 30
    assert not list(tmp_path.rglob("*.permall"))


async def test_delete_answers_404_for_unknown_vm_and_vm_without_tpm(client: httpx.AsyncClient) -> None:
    assert (await client.delete(f"/vms/{uuid.uuid4()}/tpm")).status_code == 404
    vm = await put_vm(client, tpm=False)
    answer = await client.delete(f"/vms/{vm}/tpm")
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert (await client.delete("/vms/not-a-uuid/tpm")).status_code == 422


async def test_a_finished_removal_is_not_repeated(client: httpx.AsyncClient) -> None:
    vm = await put_vm(client)
    job = await remove_tpm(client, vm)
    assert job["state"] == "succeeded" and job["hosts"] == []
    assert (await client.delete(f"/vms/{vm}/tpm")).status_code == 404
    # The VM can get a new TPM once the removal is over.
    assert (await client.post(f"/vms/{vm}/tpm", json={"key_provider_uuid": None})).status_code == 201


async def test_tpm_cannot_be_created_while_a_removal_is_queued(make_client: Any) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    queued = await client.delete(f"/vms/{vm}/tpm")
    assert queued.json()["state"] == "queued"
    answer = await client.post(f"/vms/{vm}/tpm", json={})
    assert answer.status_code == 409
    assert "removal" in answer.json()["detail"]
    again = await client.delete(f"/vms/{vm}/tpm")
    assert again.status_code == 202 and again.json()["id"] == queued.json()["id"]


async def test_removals_are_queued_however_often_the_request_statement_has_run(make_client: Any) -> None:
    # PostgreSQL plans a prepared statement generically after its fifth run: the insert's ON CONFLICT must still
    # find the index of active jobs then (it once named it with parameters, and failed from the sixth request).
    client = await make_client(run_worker=False, db_pool_size=1)
    for _ in range(12):
        vm = await put_vm(client)
        first, again = await client.delete(f"/vms/{vm}/tpm"), await client.delete(f"/vms/{vm}/tpm")
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"] and first.json()["state"] == "queued"


async def test_job_api_reads_and_lists_jobs_newest_first(make_client: Any) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    first = (await client.delete(f"/vms/{vm}/tpm")).json()
    answer = await client.get(f"/jobs/{first['id']}")
    assert answer.status_code == 200 and answer.json() == first and answer.headers["ETag"]
    assert set(first) == {
        "id", "type", "vm_uuid", "tpm_uuid", "state", "created_at", "started_at", "finished_at",
        "hosts", "orphan_files", "error", "strays",
    }  # fmt: skip
    assert first["type"] == "remove-tpm" and first["created_at"].endswith("Z") and first["strays"] is None
    assert (await client.get(f"/jobs/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/jobs/nope")).status_code == 422
    listed = (await client.get("/jobs", params={"vm_uuid": vm})).json()
    assert [j["id"] for j in listed] == [first["id"]]
