"""Job retention: a finished job goes JOB_RETENTION_SECONDS after finished_at, with its host outcomes and its files'
confirmations; fresh jobs, orphans and abandoned files stay, and the audit is as exact after pruning as before."""

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.service.audit import AuditReport, audit
from app.service.db.engine import driver_connection
from app.service.jobs.queue import prune_jobs
from app.service.jobs.retention import PRUNE_BATCH_JOBS, Pruner, rest_after_batch
from app.service.metrics import refresh_gauges
from app.service.settings import Settings
from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm
from tests.reliability.process_helpers import wait_until

RETENTION_SECONDS = 3600
DEAD_AGENT = "http://127.0.0.1:9"


def sessions_of(client: httpx.AsyncClient) -> async_sessionmaker[AsyncSession]:
    """The session factory of the app behind `client`."""
    factory: async_sessionmaker[AsyncSession] = client.app.state.sessions  # type: ignore[attr-defined]
    return factory


def pruner_of(client: httpx.AsyncClient) -> Pruner:
    """The pruner of the app behind `client` (its worker started or not)."""
    pruner: Pruner = client.app.state.pruner  # type: ignore[attr-defined]
    return pruner


async def scalar(client: httpx.AsyncClient, sql: str, **params: Any) -> Any:
    """The one value one statement answers."""
    async with sessions_of(client)() as session, session.begin():
        return await session.scalar(text(sql), params)


async def finished_long_ago(client: httpx.AsyncClient, *job_ids: str, seconds: float = 2 * RETENTION_SECONDS) -> None:
    """Move the jobs' finished_at back by `seconds`, as if they had ended that long ago."""
    async with sessions_of(client)() as session, session.begin():
        await session.execute(
            text("UPDATE jobs SET finished_at = finished_at - :age * interval '1 second' WHERE id = ANY(:ids)"),
            {"age": seconds, "ids": [uuid.UUID(j) for j in job_ids]},
        )


async def audit_of(client: httpx.AsyncClient, vm: str) -> AuditReport:
    """The audit of one VM's files and jobs, checked to be clean."""
    async with sessions_of(client)() as session:
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok, report.render()
    return report


async def rows_of_job(client: httpx.AsyncClient, job_id: str) -> dict[str, int]:
    """How many rows of each job table and of the confirmations belong to the job."""
    counts = {}
    for table, column in (
        ("jobs", "id"),
        ("job_hosts", "job_id"),
        ("job_files", "job_id"),
        ("confirmed_deletions", "job_id"),
    ):
        counts[table] = await scalar(
            client, f"SELECT count(*) FROM {table} WHERE {column} = :job", job=uuid.UUID(job_id)
        )
    return counts


async def test_a_job_past_retention_goes_with_its_outcomes_and_confirmations_and_nothing_else(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(job_retention_seconds=RETENTION_SECONDS)
    vm = await put_vm(client)
    async with running_agent(tmp_path) as url:
        live = await put_host(client, url)
        retried, gone = await put_host(client, DEAD_AGENT), await put_host(client, DEAD_AGENT)
        deleted = [await add_file(client, vm, live, path) for path in make_files(tmp_path, vm, "a", "b")]
        orphan = await add_file(client, vm, retried, f"/var/lib/libvirt/swtpm/{vm}/tpm2-00.permall")
        abandoned = await add_file(client, vm, gone, f"/var/lib/libvirt/qemu/nvram/{vm}.fd", type="NvRam")
        job = await remove_tpm(client, vm)
    assert job["orphan_files"] == 2, job
    assert (await client.delete(f"/hosts/{gone}", params={"abandon_orphans": "true"})).status_code == 204
    fresh_vm = await put_vm(client)
    fresh = await remove_tpm(client, fresh_vm)
    before = await audit_of(client, vm)
    assert before.states == {"live": 0, "confirmed": 2, "orphan": 1, "abandoned": 1}, before.render()
    assert await rows_of_job(client, job["id"]) == {"jobs": 1, "job_hosts": 3, "job_files": 4, "confirmed_deletions": 2}

    await finished_long_ago(client, job["id"])

    async def pruned() -> bool:
        return (await client.get(f"/jobs/{job['id']}")).status_code == 404

    await wait_until(pruned, timeout=20, what="the worker pruned the job past its retention")
    assert await rows_of_job(client, job["id"]) == {"jobs": 0, "job_hosts": 0, "job_files": 0, "confirmed_deletions": 0}
    assert (await client.get("/jobs", params={"vm_uuid": vm})).json() == []
    assert (await client.get(f"/jobs/{fresh['id']}")).status_code == 200
    assert [o["uuid"] for o in (await client.get("/orphan-files", params={"host_uuid": retried})).json()] == [
        orphan["uuid"]
    ]
    assert [a["uuid"] for a in (await client.get("/abandoned-files", params={"host_uuid": gone})).json()] == [
        abandoned["uuid"]
    ]
    after = await audit_of(client, vm)
    assert after.states == {"live": 0, "confirmed": 0, "orphan": 1, "abandoned": 1}, after.render()
    assert after.ledger_files == 2
    for file in deleted:
        assert (
            await scalar(client, "SELECT count(*) FROM file_ledger WHERE file_uuid = :f", f=uuid.UUID(file["uuid"]))
            == 0
        )


async def test_an_orphan_confirmed_after_its_job_was_pruned_leaves_no_row_behind(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(job_retention_seconds=RETENTION_SECONDS)
    vm = await put_vm(client)
    host = await put_host(client, DEAD_AGENT)
    (path,) = make_files(tmp_path, vm, "tpm2-00.permall")
    orphan = await add_file(client, vm, host, path)
    job = await remove_tpm(client, vm)
    assert job["orphan_files"] == 1, job
    await finished_long_ago(client, job["id"])

    async def pruned() -> bool:
        return (await client.get(f"/jobs/{job['id']}")).status_code == 404

    await wait_until(pruned, timeout=20, what="the worker pruned the job past its retention")
    async with running_agent(tmp_path) as url:
        assert (await client.put(f"/hosts/{host}", json={"name": "kvm", "agent_url": url})).status_code == 200

        async def confirmed() -> bool:
            return (await client.get("/orphan-files", params={"host_uuid": host})).json() == []

        await wait_until(confirmed, timeout=30, what="the orphan confirmed by its host, back with a live agent")
    assert not path.exists()
    for table in ("confirmed_deletions", "file_ledger"):
        count = await scalar(client, f"SELECT count(*) FROM {table} WHERE file_uuid = :f", f=uuid.UUID(orphan["uuid"]))
        assert count == 0, table
    await audit_of(client, vm)


async def test_a_job_within_retention_is_kept(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False, job_retention_seconds=RETENTION_SECONDS)
    vm = await put_vm(client)
    job_id = await insert_finished_job(client, vm)
    await finished_long_ago(client, job_id, seconds=RETENTION_SECONDS / 2)

    await pruner_of(client).prune_once()

    assert (await client.get(f"/jobs/{job_id}")).status_code == 200


async def insert_finished_job(client: httpx.AsyncClient, vm: str) -> str:
    """A succeeded job of the VM, finished now, written straight into the queue; its id."""
    job_id = uuid.uuid4()
    async with sessions_of(client)() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO jobs (id, vm_uuid, tpm_uuid, state, started_at, finished_at) "
                "VALUES (:id, :vm, :tpm, 'succeeded', now(), now())"
            ),
            {"id": job_id, "vm": uuid.UUID(vm), "tpm": uuid.uuid4()},
        )
    return str(job_id)


async def test_pruning_goes_in_batches_oldest_first(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client, tpm=False)
    older, newer = await insert_finished_job(client, vm), await insert_finished_job(client, vm)
    # Older than anything other tests leave, so that these two are the oldest candidates.
    await finished_long_ago(client, older, seconds=20 * 365 * 86400)
    await finished_long_ago(client, newer, seconds=10 * 365 * 86400)
    engine = client.app.state.worker_engine  # type: ignore[attr-defined]

    async with driver_connection(engine) as connection:
        assert await prune_jobs(connection, retention_seconds=RETENTION_SECONDS, limit=1) == 1
    assert [(await client.get(f"/jobs/{j}")).status_code for j in (older, newer)] == [404, 200]


async def test_pruning_skips_a_job_another_transaction_holds(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False, job_retention_seconds=RETENTION_SECONDS)
    vm = await put_vm(client, tpm=False)
    job_id = await insert_finished_job(client, vm)
    await finished_long_ago(client, job_id)

    async with sessions_of(client)() as session, session.begin():
        await session.execute(text("SELECT 1 FROM jobs WHERE id = :id FOR UPDATE"), {"id": uuid.UUID(job_id)})
        # Returns at once (SKIP LOCKED) rather than waiting for this transaction, and leaves the job.
        await pruner_of(client).prune_once()
        assert await session.scalar(text("SELECT count(*) FROM jobs WHERE id = :id"), {"id": uuid.UUID(job_id)}) == 1

    await pruner_of(client).prune_once()
    assert (await client.get(f"/jobs/{job_id}")).status_code == 404


def test_retention_is_seven_days_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOB_RETENTION_SECONDS", raising=False)
    assert Settings().job_retention_seconds == 604800
    monkeypatch.setenv("JOB_RETENTION_SECONDS", "60")
    assert Settings().job_retention_seconds == 60


async def test_the_jobs_gauge_counts_finished_jobs_only_when_asked(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client, tpm=False)

    async def succeeded_after_refresh(*, finished_jobs: bool) -> float | None:
        async with sessions_of(client)() as session:
            await refresh_gauges(session, finished_jobs=finished_jobs)
        return REGISTRY.get_sample_value("tpm_removal_jobs_current", {"state": "succeeded"})

    before = await succeeded_after_refresh(finished_jobs=True)
    assert before is not None
    await insert_finished_job(client, vm)

    # The refreshes between the counts of finished jobs (a scan of the retained ones) leave their gauge as it was.
    assert await succeeded_after_refresh(finished_jobs=False) == before
    assert await succeeded_after_refresh(finished_jobs=True) == before + 1


@pytest.mark.parametrize(
    ("finished_per_second", "batch_seconds", "rest"),
    [
        (0.0, 0.010, 0.190),  # nothing finishing: a backlog is pruned gently, 19x each batch's time
        (30.0, 0.010, 0.190),  # finishing slower than the gentle pace prunes: still gentle
        (300.0, 0.050, 100 / 450 - 0.050),  # faster: only as much rest as keeps 1.5x their pace
        (10_000.0, 0.050, 0.0),  # far faster than any rest allows: none
    ],
    ids=["idle", "slow", "fast", "flat-out"],
)
def test_the_pruner_rests_gently_unless_jobs_finish_faster(
    finished_per_second: float, batch_seconds: float, rest: float
) -> None:
    assert rest_after_batch(
        pruned=PRUNE_BATCH_JOBS, batch_seconds=batch_seconds, finished_per_second=finished_per_second
    ) == pytest.approx(rest)
