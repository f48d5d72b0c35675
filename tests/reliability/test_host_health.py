"""Host health against real `serve` processes and real agents: a host that does not answer costs nobody else anything.

A host goes failing from its first unanswered call and later jobs do not call it; a 200 with success:false keeps it
ok; replicas share one probe per back-off step; an answer brings it back with all its orphans; a slow host gets no
more than AGENT_HOST_CONCURRENCY calls; a process killed mid-probe loses nothing; a flapping host never makes a job
wait for a timeout it already knew of.
"""

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from devtools.local_stack import free_port
from tests.agent_helpers import Handler
from tests.inventory_helpers import add_file, make_files, put_host, put_vm
from tests.reliability.process_helpers import FaultHarness, LoggingAgent, SeededVm, fault_harness, wait_until

pytestmark = pytest.mark.reliability

# No probe within a test that counts a failing host's calls from jobs only.
NO_PROBES = {"ORPHAN_RETRY_SECONDS": "60", "ORPHAN_RETRY_MAX_SECONDS": "60"}
QUICK_TIMEOUT = {"AGENT_TIMEOUT_SECONDS": "1"}
# Longer than any agent timeout of these tests: a call that hangs this long is left unanswered.
HANG_SECONDS = 30.0


async def health(http: httpx.AsyncClient, host_uuid: str) -> dict[str, Any]:
    """The host's health as GET /hosts/{uuid} shows it."""
    answer = await http.get(f"/hosts/{host_uuid}")
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["health"]
    return result


async def remove(harness: FaultHarness, http: httpx.AsyncClient, vm: SeededVm) -> dict[str, Any]:
    """Remove the VM's TPM and wait for the job to succeed; the job as the API shows it."""
    job_id = (await http.delete(f"/vms/{vm.uuid}/tpm")).json()["id"]
    await harness.wait_for_job_state(job_id, "succeeded")
    job: dict[str, Any] = (await http.get(f"/jobs/{job_id}")).json()
    return job


def outcome(job: dict[str, Any], host_uuid: str) -> dict[str, Any]:
    """The job's outcome on one host."""
    (host,) = [h for h in job["hosts"] if h["host_uuid"] == host_uuid]
    return host


async def orphans_of(harness: FaultHarness, host_uuid: str) -> int:
    """How many orphan files wait on the host."""
    rows = await harness.rows("SELECT count(*) AS n FROM orphan_files WHERE host_uuid = :h", h=host_uuid)
    return int(rows[0].n)


@pytest.mark.parametrize(
    ("fault", "reason"), [("hang", "timeout after 1s"), ("refuse", "connection refused"), ("http500", "HTTP 500")]
)
async def test_a_host_that_does_not_answer_goes_failing_at_once_and_later_jobs_do_not_call_it(
    server_url: str, tmp_path: Path, fault: str, reason: str
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service(**NO_PROBES, **QUICK_TIMEOUT)
        http = await harness.client(service)
        good = await harness.add_host(http)
        bad = await harness.add_host(http)
        if fault == "refuse":
            await http.put(f"/hosts/{bad.uuid}", json={"name": "kvm", "agent_url": f"http://127.0.0.1:{free_port()}"})
        else:
            bad.agent.mode, bad.agent.slow_seconds = ("slow", HANG_SECONDS) if fault == "hang" else ("http500", 0)
        assert await health(http, bad.uuid) == {
            "state": "ok",
            "consecutive_failures": 0,
            "last_error": None,
            "next_probe_at": None,
        }

        first = await remove(harness, http, await harness.add_vm(http, [good, bad]))
        assert outcome(first, bad.uuid)["state"] == "failed" and reason in outcome(first, bad.uuid)["error"]
        tripped = await health(http, bad.uuid)
        assert tripped["state"] == "failing" and tripped["consecutive_failures"] == 1
        assert reason in tripped["last_error"] and tripped["next_probe_at"] is not None
        calls = len(bad.agent.requests)

        later = [await harness.add_vm(http, [good, bad]) for _ in range(3)]
        for vm in later:
            job = await remove(harness, http, vm)
            assert outcome(job, good.uuid)["state"] == "deleted"
            assert outcome(job, bad.uuid)["state"] == "failed" and job["orphan_files"] == 2
            assert outcome(job, bad.uuid)["error"].startswith("host failing since ")
            assert reason in outcome(job, bad.uuid)["error"]
        # Not called at all: no call of theirs reached the agent, and the health counts no more failures.
        assert len(bad.agent.requests) == calls
        assert (await health(http, bad.uuid))["consecutive_failures"] == 1
        assert await orphans_of(harness, bad.uuid) == 2 * 4
        assert len(service.logged("host failing: it left a call unanswered; it gets probes only until it answers")) == 1
        metrics = (await http.get("/metrics")).text
        assert 'tpm_hosts{state="failing"}' in metrics
        report = await harness.audit()
        assert report.ok, report.render()


async def test_a_host_answering_success_false_for_one_vm_stays_ok_and_serves_other_removals(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service(**NO_PROBES)
        http = await harness.client(service)
        host = await harness.add_host(http)
        host.agent.mode = "success_false"
        refused = await remove(harness, http, await harness.add_vm(http, [host]))
        assert outcome(refused, host.uuid)["state"] == "failed" and refused["orphan_files"] == 2
        assert "disk on fire" in outcome(refused, host.uuid)["error"]
        assert (await health(http, host.uuid))["state"] == "ok"

        host.agent.mode = "ok"
        others = [await harness.add_vm(http, [host]) for _ in range(2)]
        for vm in others:
            job = await remove(harness, http, vm)
            assert outcome(job, host.uuid)["state"] == "deleted" and job["orphan_files"] == 0
            assert not [p for p in vm.paths() if p.exists()]
        assert await health(http, host.uuid) == {
            "state": "ok",
            "consecutive_failures": 0,
            "last_error": None,
            "next_probe_at": None,
        }
        # Only the refused VM's files are orphans, backing off on their own.
        assert await orphans_of(harness, host.uuid) == 2


async def test_two_replicas_send_a_failing_host_one_probe_at_a_time_and_one_per_back_off_step(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        # Probes back off from 0.5 s to a cap of 1 s (FAST_SETTINGS).
        replicas = await asyncio.gather(harness.start_service(), harness.start_service())
        http = await harness.client(replicas[0])
        host = await harness.add_host(http)
        # A failing agent that takes its time: two probes sent together would overlap visibly.
        host.agent.mode, host.agent.answer_after_seconds = "http500", 0.3
        vms = [await harness.add_vm(http, [host], files_per_host=1) for _ in range(6)]
        for vm in vms:
            await remove(harness, http, vm)

        calls_before = len(host.agent.requests)
        await wait_until(
            lambda: len(host.agent.requests) >= calls_before + 5, timeout=60, what="five probes of the failing host"
        )
        await wait_until(lambda: not host.agent.open_requests(), timeout=30, what="the last probe answered")
        probes = host.agent.requests[calls_before:]
        # Six VMs' orphans, each its own call if retried one by one; both replicas reaping. Yet one call at a time:
        assert host.agent.max_in_flight == 1
        # and each probe came a whole back-off step (at least the first, 0.5 s) after the previous one was answered,
        # whichever replica sent it: a second probe within a step would come sooner. (A busy machine only widens it.)
        gaps = [later.started - (earlier.ended or later.started) for earlier, later in itertools.pairwise(probes)]
        assert min(gaps) >= 0.45, gaps
        failing = await health(http, host.uuid)
        assert failing["state"] == "failing" and failing["consecutive_failures"] >= len(probes)
        # Every probe was one VM's call: the host's orphans were never sent together with another call.
        assert all(len(r.paths) == 1 for r in host.agent.requests)


async def test_a_host_that_answers_again_is_ok_after_its_next_probe_and_all_its_orphans_are_confirmed(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service()
        http = await harness.client(service)
        host = await harness.add_host(http)
        host.agent.mode = "http500"
        vms = [await harness.add_vm(http, [host]) for _ in range(20)]
        for vm in vms:
            await remove(harness, http, vm)
        await wait_until(lambda: len(host.agent.requests) >= 3, timeout=60, what="a few failed probes")
        attempts_before = {
            r.path: r.attempts
            for r in await harness.rows("SELECT path, attempts FROM orphan_files WHERE host_uuid = :h", h=host.uuid)
        }

        calls_before = len(host.agent.requests)
        host.agent.mode = "ok"

        async def drained() -> bool:
            return await orphans_of(harness, host.uuid) == 0

        await wait_until(drained, timeout=60, what="every orphan of the host confirmed")
        # The last error stays readable after the host recovered.
        assert await health(http, host.uuid) == {
            "state": "ok",
            "consecutive_failures": 0,
            "last_error": "HTTP 500",
            "next_probe_at": None,
        }
        assert not [p for vm in vms for p in vm.paths() if p.exists()]
        # The answered probe brought all the others due at once: each VM's orphans took one call, none failed again
        # (at most one probe was in flight, and failed, when the agent came back).
        after = host.agent.requests[calls_before:]
        assert len(after) <= len(vms) + 1 and sum(r.confirmed for r in after) == len(vms)
        assert len(attempts_before) == 2 * len(vms)
        await service.wait_logged("host ok again: it answered; all its orphan files are due now", host_uuid=host.uuid)
        report = await harness.audit()
        assert report.ok, report.render()


async def test_a_slow_host_never_holds_more_than_its_share_of_calls_and_another_hosts_job_finishes_meanwhile(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        # Three calls in flight in all, two per host: without the per-host bound the slow host would take all three.
        service = await harness.start_service(
            AGENT_CONCURRENCY="3", AGENT_HOST_CONCURRENCY="2", AGENT_TIMEOUT_SECONDS="20", JOB_LEASE_SECONDS="30"
        )
        http = await harness.client(service)
        slow, quick = await harness.add_host(http), await harness.add_host(http)
        slow.agent.mode, slow.agent.slow_seconds = "slow", 5.0
        slow_vms = [await harness.add_vm(http, [slow], files_per_host=1) for _ in range(5)]
        slow_jobs = [(await http.delete(f"/vms/{vm.uuid}/tpm")).json()["id"] for vm in slow_vms]
        await wait_until(lambda: len(slow.agent.open_requests()) == 2, timeout=60, what="the slow host holds two calls")

        quick_vm = await harness.add_vm(http, [quick])
        quick_job = await remove(harness, http, quick_vm)
        assert outcome(quick_job, quick.uuid)["state"] == "deleted"
        # The quick job ended while the slow host still held calls: it did not wait for them.
        assert slow.agent.open_requests()
        for job_id in slow_jobs:
            await harness.wait_for_job_state(job_id, "succeeded")
        assert slow.agent.max_in_flight == 2 and len(slow.agent.requests) == 5
        assert (await health(http, slow.uuid))["state"] == "ok"


async def test_a_process_killed_mid_probe_leaves_the_host_probed_again_and_loses_nothing(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        # A probe is claimed for 2 x AGENT_TIMEOUT_SECONDS + 5 s: keep that short.
        first = await harness.start_service(AGENT_TIMEOUT_SECONDS="3")
        http = await harness.client(first)
        host = await harness.add_host(http)
        host.agent.mode = "http500"
        vms = [await harness.add_vm(http, [host]) for _ in range(3)]
        for vm in vms:
            await remove(harness, http, vm)
        assert (await health(http, host.uuid))["state"] == "failing"

        calls_before = len(host.agent.requests)
        gate = host.agent.hold_next()
        host.agent.mode = "ok"
        await wait_until(
            lambda: len(host.agent.requests) > calls_before and host.agent.open_requests(),
            timeout=60,
            what="a probe is in flight",
        )
        await first.kill()
        gate.set()
        second = await harness.start_service(AGENT_TIMEOUT_SECONDS="3")
        http = await harness.client(second)

        async def drained() -> bool:
            return await orphans_of(harness, host.uuid) == 0

        await wait_until(drained, timeout=90, what="the orphans are confirmed")
        assert (await health(http, host.uuid))["state"] == "ok"
        assert not [p for vm in vms for p in vm.paths() if p.exists()]
        assert host.agent.times_confirmed() == {str(p): 1 for vm in vms for p in vm.paths()}
        assert host.agent.sent_after_confirmation() == []
        report = await harness.audit()
        assert report.ok, report.render()


class FlappingAgent(LoggingAgent):
    """The shipped agent, but every other call hangs (the service times it out) instead of being answered."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.arrivals = 0

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.arrivals += 1
        hangs = self.arrivals % 2 == 1

        async def flapping(request: web.Request) -> web.StreamResponse:
            if hangs:
                await asyncio.sleep(HANG_SECONDS)
            return await handler(request)

        return await super()._record(request, flapping)


async def test_a_flapping_host_never_makes_a_job_wait_for_a_timeout_it_knew_of_and_loses_no_orphan(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service(**QUICK_TIMEOUT)
        http = await harness.client(service)
        good = await harness.add_host(http)
        flapping = await harness.add_host(http, FlappingAgent)
        vms = [await harness.add_vm(http, [good, flapping], files_per_host=1) for _ in range(8)]
        not_called = 0
        for vm in vms:
            calls_before = len(flapping.agent.requests)
            job = await remove(harness, http, vm)
            calls_during = flapping.agent.requests[calls_before:]
            assert outcome(job, good.uuid)["state"] == "deleted"
            result = outcome(job, flapping.uuid)
            (path,) = vm.files[flapping.uuid]
            if result["state"] == "failed" and result["error"].startswith("host failing since "):
                # The job knew the host was failing and did not call it (counted below).
                not_called += 1
            else:
                # The host was ok when the job planned: it called it once, answered or timed out.
                assert [r for r in calls_during if str(path) in r.paths]
                assert result["state"] == "deleted" or "timeout" in result["error"]
        assert not_called >= 1

        async def drained() -> bool:
            return await orphans_of(harness, flapping.uuid) == 0

        await wait_until(drained, timeout=90, what="every orphan of the flapping host confirmed")
        assert not [p for vm in vms for p in vm.paths() if p.exists()]

        # Every call the host received was a job's that did call it, or one of the reaper's (each logged): the jobs
        # that knew it was failing sent none.
        def all_calls_accounted() -> bool:
            reaper_calls = sum(
                len(service.logged(message, host_uuid=flapping.uuid))
                for message in ("orphan retry failed", "orphan files deleted")
            )
            return len(flapping.agent.requests) == len(vms) - not_called + reaper_calls

        await wait_until(all_calls_accounted, timeout=30, what="every call to the flapping host accounted for")
        report = await harness.audit()
        assert report.ok, report.render()


async def test_hosts_answer_shows_health_of_a_host_put_again(server_url: str, tmp_path: Path) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service(**NO_PROBES)
        http = await harness.client(service)
        vm = await put_vm(http)
        host = await put_host(http, f"http://127.0.0.1:{free_port()}")
        (state,) = make_files(tmp_path / "dead", vm, "tpm2-00.permall")
        await add_file(http, vm, host, state)
        job_id = (await http.delete(f"/vms/{vm}/tpm")).json()["id"]
        await harness.wait_for_job_state(job_id, "succeeded")
        # Replacing the host (a new agent URL, say) keeps what the service knows of its health.
        answer = await http.put(f"/hosts/{host}", json={"name": "kvm", "agent_url": f"http://127.0.0.1:{free_port()}"})
        assert answer.status_code == 200 and answer.json()["health"]["state"] == "failing"
