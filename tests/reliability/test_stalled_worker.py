"""A process stalled (SIGSTOP) past its lease while it holds a job: another process takes the job over and
finishes it; when the first resumes (SIGCONT) and its held agent call comes back, it changes nothing. Stalled
while its cleanup statement runs, it keeps the job: the statement holds the job row and goes through whole. Each test
runs once for each job type (a TPM removal, a VM's deletion)."""

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.process_helpers import (
    HOLDS_CALLS,
    JOB_TYPES,
    SURVIVOR,
    FaultHarness,
    SeededVm,
    fault_harness,
    wait_until,
)

pytestmark = pytest.mark.reliability


async def snapshot(harness: FaultHarness, vm: SeededVm, job_id: str) -> dict[str, list[Any]]:
    """What the job left: its row, its hosts and files, the orphans (which files, not their retry count),
    the confirmations, and the VM, its TPM and records."""
    queries = {
        "job": "SELECT * FROM jobs WHERE id = :j",
        "job_hosts": "SELECT * FROM job_hosts WHERE job_id = :j ORDER BY host_uuid",
        "job_files": "SELECT * FROM job_files WHERE job_id = :j ORDER BY file_uuid",
        "orphans": "SELECT uuid, host_uuid, vm_uuid, job_id, path, type FROM orphan_files WHERE job_id = :j "
        "ORDER BY uuid",
        "confirmed": "SELECT * FROM confirmed_deletions WHERE job_id = :j ORDER BY file_uuid",
        "records": "SELECT uuid FROM host_files WHERE vm_uuid = :v UNION ALL SELECT uuid FROM tpms WHERE vm_uuid = :v "
        "UNION ALL SELECT uuid FROM vms WHERE uuid = :v",
    }
    return {name: [tuple(row) for row in await harness.rows(sql, j=job_id, v=vm.uuid)] for name, sql in queries.items()}


@pytest.mark.parametrize("job_type", JOB_TYPES)
async def test_a_process_resumed_after_its_job_was_taken_over_changes_nothing(
    server_url: str, tmp_path: Path, job_type: str
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        first = await harness.start_service(**HOLDS_CALLS)
        http = await harness.client(first)
        held, failing = await harness.add_host(http), await harness.add_host(http)
        vm = await harness.add_vm(http, [held, failing])
        failing.agent.mode = "http500"  # its files become orphans, retried by whoever is alive
        gate = held.agent.hold_next()

        job_id = await harness.request_job(http, vm, job_type)
        await wait_until(lambda: held.agent.open_requests(), timeout=60, what="the held host is called")
        await harness.wait_for_host_state(job_id, failing.uuid, "failed")
        # Whenever it lands: a process stalled inside a transaction has it ended by the server.
        first.send(signal.SIGSTOP)
        second = await harness.start_service(**SURVIVOR)

        job = await harness.wait_for_job_state(job_id, "succeeded")
        assert job.attempts == 2 and job.orphan_files == len(vm.files[failing.uuid])
        assert await harness.job_host_states(job_id) == {held.uuid: "deleted", failing.uuid: "failed"}
        await second.wait_logged("job succeeded", job_id=job_id)
        before = await snapshot(harness, vm, job_id)
        retries_before = len(first.logged("orphan retry failed", job_id=job_id))

        first.send(signal.SIGCONT)
        gate.set()  # the stalled process's call comes back now (confirmed, or timed out while it slept)
        await wait_until(lambda: not held.agent.open_requests(), timeout=30, what="the stalled call was answered")
        await wait_until(
            lambda: (
                first.logged("job lease lost; another process owns it now, stopping", job_id=job_id)
                or first.logged("job lease taken over; job stopped", job_id=job_id)
            ),
            timeout=30,
            what="the resumed process notices it lost the job",
        )
        # Its loops have gone round again since (its reaper retried the orphans): it had every chance to write.
        await wait_until(
            lambda: len(first.logged("orphan retry failed", job_id=job_id)) > retries_before,
            timeout=60,
            what="the resumed process retries orphans",
        )
        after = await snapshot(harness, vm, job_id)

        assert after == before
        assert not first.logged("job succeeded", job_id=job_id)
        # Sent once by each process (the stalled one's request was already out); never after a confirmation.
        assert held.agent.times_sent() == {str(p): 2 for p in vm.files[held.uuid]}
        assert held.agent.sent_after_confirmation() == []
        assert not [p for p in vm.files[held.uuid] if p.exists()]
        report = await harness.audit()
        assert report.ok, report.render()


@pytest.mark.parametrize("job_type", JOB_TYPES)
async def test_a_process_stalled_inside_its_cleanup_keeps_the_job_and_nothing_is_done_twice(
    server_url: str, tmp_path: Path, job_type: str
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        first = await harness.start_service(JOB_LEASE_SECONDS="5")
        http = await harness.client(first)
        host = await harness.add_host(http)
        vm = await harness.add_vm(http, [host])

        async with harness.file_record_locked(vm):
            job_id = await harness.request_job(http, vm, job_type)
            await harness.wait_for_blocked_cleanup()
            first.send(signal.SIGSTOP)
            second = await harness.start_service(**SURVIVOR)

            async def lease_long_over() -> bool:
                # Past the sleeping process's lease by a few of the other process's claim polls (1 s).
                sql = "SELECT 1 FROM jobs WHERE id = :j AND lease_expires_at < now() - interval '3 seconds'"
                return bool(await harness.rows(sql, j=job_id))

            await wait_until(lease_long_over, timeout=60, what="the stalled process's lease is long over")
            # Its waiting statement still holds the job row, so the other process cannot take the job over.
            assert (await harness.job(job_id)).state == "running"
        # The statement goes through on the server while its process sleeps: it needs no COMMIT from it.
        job = await harness.wait_for_job_state(job_id, "succeeded")
        assert job.attempts == 1
        before = await snapshot(harness, vm, job_id)

        first.send(signal.SIGCONT)
        # On waking it logs the job succeeded, or, if its statement timeout fires before it reads the answer,
        # that it was interrupted: either way it writes nothing more.
        await wait_until(
            lambda: [r for r in first.log_records() if r.get("job_id") == job_id and r["message"] != "job claimed"],
            timeout=60,
            what="the resumed process ends the job",
        )
        assert await snapshot(harness, vm, job_id) == before
        assert not second.logged("job claimed", job_id=job_id)
        assert host.agent.times_sent() == {str(p): 1 for p in vm.paths()}
        await harness.assert_removed(vm, job_id)
