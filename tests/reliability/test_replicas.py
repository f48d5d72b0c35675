"""Two `serve` replicas on one database: 200 removals spread across both run once each, every file is sent
exactly once, and orphans that both replicas retry are never retried by both at the same time."""

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.reliability.process_helpers import Host, SeededVm, fault_harness, wait_until

pytestmark = pytest.mark.reliability

REMOVALS = 200
GOOD_HOSTS = 4
# Every this-many-th VM also keeps a file on the flaky host.
FLAKY_EVERY = 4
# No process dies here: a long lease keeps a busy machine from ever passing a job to the other replica, and
# the default pool keeps a job from waiting so long for a connection (3 s) that it counts as a database outage
# (then its lease runs out and it is taken up again, as it should be, but that is another test).
SETTINGS = {"JOB_LEASE_SECONDS": "30", "DB_POOL_SIZE": "20"}

T = TypeVar("T")


async def bounded(calls: list[Callable[[], Awaitable[T]]], *, at_once: int = 16) -> list[T]:
    """Run the calls with at most `at_once` in flight; their results in order."""
    slots = asyncio.Semaphore(at_once)

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    return await asyncio.gather(*(run(call) for call in calls))


async def test_two_replicas_run_200_removals_once_each_and_never_retry_an_orphan_together(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        replicas = await asyncio.gather(harness.start_service(**SETTINGS), harness.start_service(**SETTINGS))
        clients = [await harness.client(replica) for replica in replicas]
        good = [await harness.add_host(clients[0]) for _ in range(GOOD_HOSTS)]
        flaky = await harness.add_host(clients[0])
        flaky.agent.mode = "http500"

        def hosts_of(i: int) -> list[Host]:
            hosts = [good[i % GOOD_HOSTS], good[(i + 1) % GOOD_HOSTS]]
            return [*hosts, flaky] if i % FLAKY_EVERY == 0 else hosts

        vms: list[SeededVm] = await bounded(
            [lambda i=i: harness.add_vm(clients[i % 2], hosts_of(i), files_per_host=1) for i in range(REMOVALS)]
        )
        answers = await bounded([lambda i=i: clients[i % 2].delete(f"/vms/{vms[i].uuid}/tpm") for i in range(REMOVALS)])
        assert [a.status_code for a in answers] == [202] * REMOVALS
        job_ids = [a.json()["id"] for a in answers]

        async def all_succeeded() -> bool:
            rows = await harness.rows("SELECT count(*) AS n FROM jobs WHERE state = 'succeeded'")
            return bool(rows[0].n == REMOVALS)

        await wait_until(all_succeeded, timeout=240, what=f"{REMOVALS} jobs succeeded")
        jobs = await harness.rows("SELECT id, vm_uuid, attempts, orphan_files FROM jobs")
        assert sorted(str(j.id) for j in jobs) == sorted(job_ids)
        assert len({j.vm_uuid for j in jobs}) == REMOVALS
        assert {j.attempts for j in jobs} == {1}
        assert sum(j.orphan_files for j in jobs) == REMOVALS // FLAKY_EVERY

        # Each job succeeded once, in one replica; both replicas ran jobs. (A replica logs the success just
        # after its commit: wait for the last lines.)
        def logged_successes() -> list[list[str]]:
            return [[r["job_id"] for r in replica.logged("job succeeded")] for replica in replicas]

        await wait_until(lambda: sum(map(len, logged_successes())) >= REMOVALS, timeout=30, what="successes logged")
        successes = logged_successes()
        assert Counter(successes[0] + successes[1]) == Counter(job_ids)
        assert successes[0] and successes[1]

        # Every file on a good host was sent exactly once, in all of the replicas' calls together.
        for host in good:
            expected = [str(p) for vm in vms for p in vm.files.get(host.uuid, [])]
            assert host.agent.times_sent() == Counter(expected)
            assert host.agent.times_confirmed() == Counter(expected)

        # Both replicas retry the orphans while the flaky host still fails, then it recovers (slowly, so
        # that two retries of one file in flight at once would overlap visibly).
        await wait_until(
            lambda: all(replica.logged("orphan retry failed") for replica in replicas),
            timeout=60,
            what="both replicas retry orphans",
        )
        flaky.agent.slow_seconds = 0.3
        flaky.agent.mode = "slow"

        async def no_orphans() -> bool:
            return not await harness.rows("SELECT 1 FROM orphan_files")

        await wait_until(no_orphans, timeout=180, what="every orphan confirmed")
        flaky_paths = [str(p) for vm in vms for p in vm.files.get(flaky.uuid, [])]
        assert flaky.agent.overlapping_requests() == []
        assert flaky.agent.times_confirmed() == Counter(flaky_paths)
        assert flaky.agent.sent_after_confirmation() == []

        assert not [p for vm in vms for p in vm.paths() if p.exists()]
        for table in ("tpms", "tpm_key_bindings", "host_files", "orphan_files"):
            assert await harness.rows(f"SELECT 1 FROM {table}") == [], table
        confirmed = await harness.rows("SELECT count(*) AS n FROM confirmed_deletions")
        assert confirmed[0].n == sum(len(vm.paths()) for vm in vms)
        report = await harness.audit()
        assert report.ok, report.render()
        assert report.ledger_files == confirmed[0].n
