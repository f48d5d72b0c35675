"""A `serve` process killed with SIGKILL mid-removal: the next process finishes the job as if nothing had died.

The kills mid-job are made once for each job type (a TPM removal, a VM's deletion).

Kills land at three places: while a host's delete call is in flight, inside the cleanup transaction, and
while an orphan's retry is in flight. Each time the next process must end the work, every file must have
been sent for deletion, none sent again after its host confirmed it, and the audit must be clean.
"""

from pathlib import Path

import pytest

from tests.reliability.process_helpers import HOLDS_CALLS, JOB_TYPES, SURVIVOR, fault_harness, wait_until

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("job_type", JOB_TYPES)
async def test_killed_while_a_host_call_is_held_the_next_process_finishes_the_job(
    server_url: str, tmp_path: Path, job_type: str
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        first = await harness.start_service(**HOLDS_CALLS)
        http = await harness.client(first)
        quick, held = await harness.add_host(http), await harness.add_host(http)
        vm = await harness.add_vm(http, [quick, held])
        gate = held.agent.hold_next()

        job_id = await harness.request_job(http, vm, job_type)
        await wait_until(lambda: held.agent.open_requests(), timeout=60, what="the held host is called")
        await harness.wait_for_host_state(job_id, quick.uuid, "deleted")
        await first.kill()
        gate.set()
        second = await harness.start_service(**SURVIVOR)

        job = await harness.wait_for_job_state(job_id, "succeeded")
        assert job.attempts == 2 and job.orphan_files == 0
        assert await harness.job_host_states(job_id) == {quick.uuid: "deleted", held.uuid: "deleted"}
        await second.wait_logged("job succeeded", job_id=job_id)
        await harness.assert_removed(vm, job_id)
        assert not [p for p in vm.paths() if p.exists()]
        # The quick host confirmed before the kill and was not called again; the held one was called again.
        assert quick.agent.times_sent() == {str(p): 1 for p in vm.files[quick.uuid]}
        assert held.agent.times_sent() == {str(p): 2 for p in vm.files[held.uuid]}
        for host in (quick, held):
            assert host.agent.times_confirmed() == {str(p): 1 for p in vm.files[host.uuid]}
            assert host.agent.sent_after_confirmation() == []


@pytest.mark.parametrize("job_type", JOB_TYPES)
async def test_killed_inside_the_cleanup_its_statement_commits_whole_and_nothing_is_done_twice(
    server_url: str, tmp_path: Path, job_type: str
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        first = await harness.start_service()
        http = await harness.client(first)
        hosts = [await harness.add_host(http), await harness.add_host(http)]
        vm = await harness.add_vm(http, hosts)

        async with harness.file_record_locked(vm):
            job_id = await harness.request_job(http, vm, job_type)
            await harness.wait_for_blocked_cleanup()
            await first.kill()
            second = await harness.start_service(**SURVIVOR)
            # The cleanup is one statement that holds the job row while it waits: nobody may take the job.
            assert (await harness.job(job_id)).state == "running"
        # Once it may go on, the server carries the dead process's statement through, whole: it needs no
        # COMMIT from the client. The job is done once, by its first claim; the survivor has nothing to do.
        job = await harness.wait_for_job_state(job_id, "succeeded")
        assert job.attempts == 1 and job.orphan_files == 0
        await harness.assert_removed(vm, job_id)
        assert not [p for p in vm.paths() if p.exists()]
        confirmed = await harness.rows("SELECT path FROM confirmed_deletions WHERE job_id = :j", j=job_id)
        assert sorted(r.path for r in confirmed) == sorted(str(p) for p in vm.paths())
        for host in hosts:
            assert host.agent.times_sent() == {str(p): 1 for p in vm.files[host.uuid]}
        assert not second.logged("job claimed", job_id=job_id)


async def test_killed_during_an_orphan_retry_the_next_process_retries_it_until_confirmed(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        # The reaper holds claimed orphans for 2 x AGENT_TIMEOUT_SECONDS + 5 s: keep that short.
        first = await harness.start_service(AGENT_TIMEOUT_SECONDS="3")
        http = await harness.client(first)
        host = await harness.add_host(http)
        vm = await harness.add_vm(http, [host])
        host.agent.mode = "http500"

        job_id = (await http.delete(f"/vms/{vm.uuid}/tpm")).json()["id"]
        job = await harness.wait_for_job_state(job_id, "succeeded")
        assert job.orphan_files == 2
        await harness.assert_removed(vm, job_id)

        calls_before = len(host.agent.requests)
        gate = host.agent.hold_next()
        host.agent.mode = "ok"
        await wait_until(
            lambda: len(host.agent.requests) > calls_before and host.agent.open_requests(),
            timeout=60,
            what="an orphan retry is in flight",
        )
        await first.kill()
        gate.set()
        await harness.start_service(AGENT_TIMEOUT_SECONDS="3")

        async def orphans_gone() -> bool:
            return not await harness.rows("SELECT 1 FROM orphan_files WHERE vm_uuid = :v", v=vm.uuid)

        await wait_until(orphans_gone, timeout=90, what="the orphans are confirmed")
        assert not [p for p in vm.paths() if p.exists()]
        confirmed = await harness.rows("SELECT path FROM confirmed_deletions WHERE job_id = :j", j=job_id)
        assert sorted(r.path for r in confirmed) == sorted(str(p) for p in vm.paths())
        assert host.agent.times_confirmed() == {str(p): 1 for p in vm.paths()}
        assert host.agent.sent_after_confirmation() == []
        report = await harness.audit()
        assert report.ok, report.render()
