"""The job queue's guarantees, driven directly (no HTTP worker): fencing, retries, constant cleanup cost."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.service.backoff import Backoff
from app.service.db.engine import driver_connection, recorded_statements
from app.service.errors import LeaseLostError
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim, claim_jobs
from app.service.removal.run import TPM_REMOVAL, VM_DELETION, Removal, RemovalScope
from tests.agent_helpers import running_recording_agent
from tests.conftest import setting_of_each_pool
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm, wait_for_job

LEASE = 30.0


def sessions_of(client: httpx.AsyncClient) -> async_sessionmaker[AsyncSession]:
    return client.app.state.sessions  # type: ignore[attr-defined,no-any-return]


# How each job type is asked for, and the scope its handler runs with (app/service/main.py).
JOB_TYPES = {"remove-tpm": ("/vms/{vm}/tpm", TPM_REMOVAL), "delete-vm": ("/vms/{vm}", VM_DELETION)}


def removal_of(client: httpx.AsyncClient, scope: RemovalScope = TPM_REMOVAL) -> Removal:
    state = client.app.state  # type: ignore[attr-defined]
    return Removal(state.engine, state.agent, scope=scope, backoff=Backoff(60, 60))


async def claim(client: httpx.AsyncClient, job_id: str) -> JobClaim:
    """Claim exactly this job, as a worker would: it is put first in line, and one job is claimed."""
    async with driver_connection(client.app.state.engine) as connection:  # type: ignore[attr-defined]
        await connection.execute("UPDATE jobs SET run_after = '-infinity' WHERE id = $1", uuid.UUID(job_id))
        claims = await claim_jobs(connection, limit=1, lease_seconds=LEASE)
    assert [str(c.job_id) for c in claims] == [job_id]
    return claims[0]


async def snapshot(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async with sessions_of(client)() as session:
        rows = {}
        for table, sql in {
            "job": "SELECT state, orphan_files, error, finished_at FROM jobs WHERE id = :j",
            "hosts": "SELECT host_uuid, state, error FROM job_hosts WHERE job_id = :j ORDER BY host_uuid",
            "orphans": "SELECT uuid, attempts, last_error FROM orphan_files WHERE job_id = :j ORDER BY uuid",
            "confirmed": "SELECT file_uuid FROM confirmed_deletions WHERE job_id = :j ORDER BY file_uuid",
        }.items():
            rows[table] = [tuple(r) for r in await session.execute(text(sql), {"j": job_id})]
        return rows


async def test_a_worker_whose_lease_was_taken_over_writes_nothing(make_client: Any, tmp_path: Path) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    async with (
        running_recording_agent(tmp_path / "slow") as (slow_url, slow_agent),
        running_recording_agent(tmp_path / "fine", mode="http500") as (fine_url, _),
    ):
        slow_host, failing_host = await put_host(client, slow_url), await put_host(client, fine_url)
        await add_file(client, vm, slow_host, make_files(tmp_path / "slow", vm, "tpm.permall")[0])
        await add_file(client, vm, failing_host, make_files(tmp_path / "fine", vm, "tpm.permall")[0])
        job_id = (await client.delete(f"/vms/{vm}/tpm")).json()["id"]

        # Worker 1 claims the job and stalls inside the slow host's call.
        slow_agent.hold.clear()
        first = await claim(client, job_id)
        stalled = asyncio.create_task(removal_of(client).run(first, LeaseClock(LEASE)))
        while not slow_agent.calls:
            await asyncio.sleep(0.01)

        # Its lease runs out; worker 2 takes the job over and finishes it (the slow host now answers at once).
        async with sessions_of(client)() as session, session.begin():
            await session.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :j"),
                                  {"j": job_id})  # fmt: skip
        second = await claim(client, job_id)
        assert second.token != first.token
        slow_agent.hold.set()
        await removal_of(client).run(second, LeaseClock(LEASE))
        after_takeover = await snapshot(client, job_id)
        assert after_takeover["job"][0][0] == "succeeded"

        # Worker 1 wakes up: its held call answers, and every write it tries is fenced off.
        with pytest.raises(LeaseLostError):
            await stalled
    assert await snapshot(client, job_id) == after_takeover


async def test_cleanup_that_keeps_failing_marks_the_job_failed_and_keeps_the_tpm(make_client: Any) -> None:
    client = await make_client(job_max_failures=2, worker_poll_seconds=0.1)
    vm = await put_vm(client)
    tpm = (await client.get(f"/vms/{vm}/tpm")).json()["uuid"]
    trigger = f"fail_delete_{tpm.replace('-', '')}"
    async with sessions_of(client)() as session, session.begin():
        await session.execute(
            text(f"""
            CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF OLD.uuid = '{tpm}' THEN RAISE EXCEPTION 'refusing to delete this TPM'; END IF; RETURN OLD; END $$
        """)
        )
        await session.execute(
            text(f"CREATE TRIGGER {trigger} BEFORE DELETE ON tpms FOR EACH ROW EXECUTE FUNCTION {trigger}()")
        )
    try:
        job_id = (await client.delete(f"/vms/{vm}/tpm")).json()["id"]
        job = await wait_for_job(client, job_id, timeout=30)
    finally:
        async with sessions_of(client)() as session, session.begin():
            await session.execute(text(f"DROP TRIGGER {trigger} ON tpms"))
            await session.execute(text(f"DROP FUNCTION {trigger}()"))
    assert job["state"] == "failed"
    assert "refusing to delete this TPM" in job["error"]
    assert (await client.get(f"/vms/{vm}/tpm")).status_code == 200
    # A failed job is over: a new removal can be asked for, and now succeeds.
    assert (await remove_tpm(client, vm))["state"] == "succeeded"


@pytest.mark.parametrize("job_type", JOB_TYPES)
@pytest.mark.parametrize("files", [1, 200])
async def test_cleanup_runs_the_same_number_of_statements_for_any_number_of_files(
    make_client: Any, tmp_path: Path, files: int, job_type: str
) -> None:
    request_path, scope = JOB_TYPES[job_type]
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    async with running_recording_agent(tmp_path) as (url, _):
        hosts = [await put_host(client, url) for _ in range(min(files, 20))]
        for i, path in enumerate(make_files(tmp_path, vm, *(f"f{i}" for i in range(files)))):
            await add_file(client, vm, hosts[i % len(hosts)], path)
        job_id = (await client.delete(request_path.format(vm=vm))).json()["id"]
        job = await claim(client, job_id)
        removal, lease = removal_of(client, scope), LeaseClock(LEASE)
        last_outcomes = await removal.delete_on_hosts(job, lease, await removal.plan_removal(job, lease))

        async with recorded_statements(client.app.state.engine) as statements:  # type: ignore[attr-defined]
            await removal.commit_cleanup(job, lease, last_outcomes)
    # Outcomes, orphans, confirmations, file records, key binding, TPM (and VM) and job, fenced: one statement,
    # however many files.
    assert len(statements) == 1, statements
    assert ((await client.get(f"/vms/{vm}")).status_code == 200) == (job_type == "remove-tpm")


async def test_api_commits_wait_for_the_disk_and_the_workers_do_not(client: httpx.AsyncClient) -> None:
    # What a caller is told is durable; the worker's commits are redone if a database crash loses them (service.main).
    assert await setting_of_each_pool(client, "synchronous_commit") == {"engine": "on", "worker_engine": "off"}
