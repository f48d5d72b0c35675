"""The retention scenarios: pruning a backlog of finished jobs while DELETEs go on, and table sizes over a long run."""

import asyncio
import math
import time
import uuid
from dataclasses import dataclass

import aiohttp
import asyncpg

from bench.database import settle_disk
from bench.load import LoadResult, send_all, send_at_rate
from bench.scenarios import no_job_active, two_host_layouts
from bench.seed import Seeder

# The tables retention keeps from growing, as the issue names them.
RETAINED_TABLES = ("jobs", "job_hosts", "job_files", "confirmed_deletions", "file_ledger")
_WATCH_SECONDS = 0.1
# The seeded backlog passes its retention this long after the seed starts and before the quiet DELETEs: time to seed,
# vacuum and checkpoint it (15 s for 100,000 jobs).
_SEED_ALLOWANCE_SECONDS = 40.0


@dataclass(frozen=True)
class PruneRun:
    """DELETE latencies with nothing to prune and while a backlog of finished jobs was pruned, and the pruning."""

    jobs: int
    seed_seconds: float
    prune_seconds: float
    quiet: LoadResult
    pruning: LoadResult
    ran_out: bool
    """Whether the DELETEs ran out of VMs before the pruning was done."""


async def _jobs_past(database: asyncpg.Connection, retention_seconds: float) -> bool:
    found: bool = await database.fetchval(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE state IN ('succeeded', 'failed') "
        "AND finished_at < now() - $1::float8 * interval '1 second')",
        retention_seconds,
    )
    return found


async def _deletes_at_rate(
    http: aiohttp.ClientSession, base_url: str, vm_uuids: list[uuid.UUID], per_second: float, until: asyncio.Event
) -> LoadResult:
    result = await send_at_rate(
        http, "DELETE", [f"{base_url}/vms/{vm}/tpm" for vm in vm_uuids], per_second=per_second, until=until
    )
    if set(result.statuses) != {202}:
        raise RuntimeError(f"DELETEs answered {dict(result.statuses)}, expected 202 for all")
    return result


async def prune_backlog_run(
    http: aiohttp.ClientSession,
    database: asyncpg.Connection,
    seeder: Seeder,
    base_url: str,
    *,
    hosts: list[uuid.UUID],
    jobs: int,
    retention_seconds: float,
    per_second: float,
    quiet_seconds: float,
    longest_prune_seconds: float,
) -> PruneRun:
    """`jobs` finished jobs, seeded in one statement so that they pass their retention a while later; DELETEs at
    `per_second` for the last `quiet_seconds` before that, with nothing to prune, then on at the same rate from then
    until the service pruned them all (or for `longest_prune_seconds`, when VMs to remove run out).

    The tables are vacuumed, analysed and checkpointed between the seed and the quiet DELETEs, as a week of jobs
    would find them: neither phase then carries the cost of a million rows that just appeared at once (their
    writeback included), and the pruning writes the full page images that a week-old backlog's pages cost.
    """
    quiet_vms = await seeder.vms(two_host_layouts(hosts, math.ceil(per_second * quiet_seconds)))
    pruning_vms = await seeder.vms(two_host_layouts(hosts, math.ceil(per_second * longest_prune_seconds)))
    (backlog_vm,) = await seeder.vms([[]])
    await no_job_active(database)

    started = time.monotonic()
    due_after = _SEED_ALLOWANCE_SECONDS + quiet_seconds
    await seeder.finished_jobs(backlog_vm, hosts, jobs, age_seconds=retention_seconds - due_after)
    seed_seconds = time.monotonic() - started
    due = started + due_after
    await database.execute(f"VACUUM (ANALYZE) {', '.join(RETAINED_TABLES)}")
    await settle_disk(database)
    quiet_starts = due - quiet_seconds - time.monotonic()
    if quiet_starts < 0:
        raise RuntimeError(
            f"seeding, vacuuming and checkpointing took too long: {-quiet_starts:.0f} s of quiet DELETEs are lost"
        )
    await asyncio.sleep(quiet_starts)

    quiet_over = asyncio.Event()
    asyncio.get_running_loop().call_later(due - time.monotonic(), quiet_over.set)
    quiet = await _deletes_at_rate(http, base_url, quiet_vms, per_second, quiet_over)
    pruned = asyncio.Event()

    async def watch() -> float:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        while await database.fetchval("SELECT EXISTS (SELECT 1 FROM jobs WHERE vm_uuid = $1)", backlog_vm):
            await asyncio.sleep(_WATCH_SECONDS)
        pruned.set()
        return time.monotonic() - due

    watcher = asyncio.create_task(watch())
    pruning = await _deletes_at_rate(http, base_url, pruning_vms, per_second, pruned)
    prune_seconds = await watcher
    await no_job_active(database)
    return PruneRun(jobs, seed_seconds, prune_seconds, quiet, pruning, pruning.count == len(pruning_vms))


async def _remove_all(
    http: aiohttp.ClientSession,
    database: asyncpg.Connection,
    base_url: str,
    vm_uuids: list[uuid.UUID],
    concurrency: int,
) -> None:
    """Remove every VM's TPM and wait until no job is under way; checked by the TPMs being gone, since the jobs
    themselves may be pruned by then."""
    accepted = await send_all(http, "DELETE", [f"{base_url}/vms/{vm}/tpm" for vm in vm_uuids], concurrency=concurrency)
    if accepted.statuses[202] != len(vm_uuids):
        raise RuntimeError(f"DELETEs answered {dict(accepted.statuses)}, expected 202 for all {len(vm_uuids)}")
    await no_job_active(database)
    left = await database.fetchval("SELECT count(*) FROM tpms WHERE vm_uuid = ANY($1::uuid[])", vm_uuids)
    if left:
        raise RuntimeError(f"{left} of {len(vm_uuids)} TPMs were not removed")


@dataclass(frozen=True)
class TableSizes:
    """Rows and bytes on disk (indexes and TOAST included) of the retained tables after a round of removals."""

    removals: int
    rows: dict[str, int]
    total_bytes: int


async def table_sizes(database: asyncpg.Connection, removals: int) -> TableSizes:
    """The retained tables' rows and their size on disk now."""
    rows = {table: await database.fetchval(f"SELECT count(*) FROM {table}") for table in RETAINED_TABLES}
    total = await database.fetchval(
        "SELECT sum(pg_total_relation_size(name::regclass)) FROM unnest($1::text[]) AS name", list(RETAINED_TABLES)
    )
    return TableSizes(removals, rows, int(total))


async def long_run_table_sizes(
    http: aiohttp.ClientSession,
    database: asyncpg.Connection,
    seeder: Seeder,
    base_url: str,
    *,
    hosts: list[uuid.UUID],
    retention_seconds: float,
    rounds: int,
    removals: int,
    concurrency: int,
) -> list[TableSizes]:
    """Rounds of `removals` removals back to back, against a service with a short retention; the retained
    tables' sizes after each (the first reading is before any round, once older jobs are pruned)."""
    while await _jobs_past(database, retention_seconds):
        await asyncio.sleep(_WATCH_SECONDS)
    sizes = [await table_sizes(database, 0)]
    for number in range(1, rounds + 1):
        vm_uuids = await seeder.vms(two_host_layouts(hosts, removals))
        await _remove_all(http, database, base_url, vm_uuids, concurrency)
        sizes.append(await table_sizes(database, number * removals))
    return sizes
