"""The measured scenarios against a running service: fan-out to slow hosts, and removals at full speed."""

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import asyncpg

from bench.load import LoadResult, send_all
from bench.seed import FileSpec

_POLL_SECONDS = 0.1
_FAN_OUT_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class FanOutRun:
    """One removal spread over many slow hosts: the job's own run time and what the caller waited."""

    hosts: int
    run_seconds: float
    caller_seconds: float


async def fan_out_run(
    session: aiohttp.ClientSession, database: asyncpg.Connection, base_url: str, vm_uuid: uuid.UUID
) -> FanOutRun:
    """Remove one VM's TPM, wait until its job has ended, and read the job back; its timings.

    The wait watches the job's row in the database rather than long-polling the service, so that following
    the job takes no CPU from the service while it fans out.
    """
    sent = time.perf_counter()
    async with session.delete(f"{base_url}/vms/{vm_uuid}/tpm") as answer:
        if answer.status != 202:
            raise RuntimeError(f"DELETE answered {answer.status}: {await answer.text()}")
        job_id = (await answer.json())["id"]
    while await database.fetchval("SELECT state IN ('queued', 'running') FROM jobs WHERE id = $1", uuid.UUID(job_id)):
        await asyncio.sleep(_FAN_OUT_POLL_SECONDS)
    waited = time.perf_counter() - sent
    async with session.get(f"{base_url}/jobs/{job_id}") as answer:
        job = await answer.json()
    if job["state"] != "succeeded" or any(host["state"] != "deleted" for host in job["hosts"]):
        raise RuntimeError(f"fan-out job did not succeed on every host: {job}")
    run = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    return FanOutRun(hosts=len(job["hosts"]), run_seconds=run.total_seconds(), caller_seconds=waited)


def two_host_layouts(host_uuids: list[uuid.UUID], count: int) -> list[list[FileSpec]]:
    """`count` VMs' files: TPM state and NVRAM on one host, a backup of the state on another, hosts rotating."""
    layouts = []
    for index in range(count):
        first = host_uuids[index % len(host_uuids)]
        second = host_uuids[(index + 1 + (index // len(host_uuids)) % (len(host_uuids) - 1)) % len(host_uuids)]
        layouts.append(
            [FileSpec(first, "TpmState"), FileSpec(first, "NvRam"), FileSpec(second, "TpmState", backup=True)]
        )
    return layouts


@dataclass(frozen=True)
class RemovalRun:
    """A batch of removals: how fast DELETEs were accepted, and how fast jobs were done end to end."""

    accepted: LoadResult
    succeeded: int
    finished_at: float

    @property
    def end_to_end_seconds(self) -> float:
        """From the first DELETE sent until the last job finished."""
        return self.finished_at - self.accepted.started

    @property
    def removals_per_second(self) -> float:
        """Removals done per second, end to end."""
        return self.succeeded / self.end_to_end_seconds


async def removal_run(
    session: aiohttp.ClientSession,
    database: asyncpg.Connection,
    base_url: str,
    vm_uuids: list[uuid.UUID],
    *,
    concurrency: int,
) -> RemovalRun:
    """DELETE every VM's TPM, `concurrency` at a time, and wait until every job has ended."""
    accepted = await send_all(
        session, "DELETE", [f"{base_url}/vms/{vm}/tpm" for vm in vm_uuids], concurrency=concurrency
    )
    if accepted.statuses[202] != len(vm_uuids):
        raise RuntimeError(f"DELETEs answered {dict(accepted.statuses)}, expected 202 for all {len(vm_uuids)}")
    await no_job_active(database)
    succeeded, finished_at = await database.fetchrow(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), max(finished_at) FROM jobs WHERE vm_uuid = ANY($1)",
        vm_uuids,
    )
    if succeeded != len(vm_uuids):
        raise RuntimeError(f"only {succeeded} of {len(vm_uuids)} jobs succeeded")
    return RemovalRun(accepted, succeeded, finished_at.timestamp())


async def no_job_active(database: asyncpg.Connection) -> None:
    """Return once no job is queued or running."""
    # Watching the database (one cheap count on the partial index of active jobs) costs the service nothing.
    while await database.fetchval("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"):
        await asyncio.sleep(_POLL_SECONDS)


async def baseline_run(session: aiohttp.ClientSession, base_url: str, requests: int, *, concurrency: int) -> LoadResult:
    """POST to the baseline's insert endpoint `requests` times, `concurrency` at a time."""
    result = await send_all(session, "POST", [f"{base_url}/items"] * requests, concurrency=concurrency)
    if result.statuses[201] != requests:
        raise RuntimeError(f"baseline answered {dict(result.statuses)}")
    return result
