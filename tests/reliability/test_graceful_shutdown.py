"""SIGTERM: the process takes no new job, lets agent calls in flight finish within the grace, hands back
what is still running at its end, closes cleanly and exits 0."""

import signal
import time
from pathlib import Path

import pytest

from devtools.local_stack import LocalProcess
from tests.reliability.process_helpers import HOLDS_CALLS, fault_harness, wait_until

pytestmark = pytest.mark.reliability


def assert_closed_cleanly(service: LocalProcess) -> None:
    """The process exited 0 after a complete lifespan shutdown, with no traceback and no error logged."""
    assert service.process.returncode == 0, service.log_text()
    log = service.log_text()
    assert "Traceback" not in log, log
    assert not [r for r in service.log_records() if r["level"] in ("error", "critical")], log
    # What aiohttp and SQLAlchemy say when a client session or a pooled connection was never closed.
    assert "Unclosed" not in log and "garbage collector" not in log, log
    assert service.logged("Application shutdown complete.")


async def test_sigterm_lets_a_call_in_flight_finish_its_job_and_exits_0(server_url: str, tmp_path: Path) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service(**HOLDS_CALLS, SHUTDOWN_GRACE_SECONDS="60")
        http = await harness.client(service)
        host = await harness.add_host(http)
        vm = await harness.add_vm(http, [host])
        gate = host.agent.hold_next()
        job_id = (await http.delete(f"/vms/{vm.uuid}/tpm")).json()["id"]
        await wait_until(lambda: host.agent.open_requests(), timeout=60, what="the host is called")

        service.send(signal.SIGTERM)
        await wait_until(lambda: service.logged("Waiting for application shutdown."), timeout=30, what="stopping")
        # Shorter than the grace: the call ends by itself and the job with it.
        assert service.process.poll() is None
        gate.set()
        await service.wait_exit()

        assert_closed_cleanly(service)
        assert service.logged("job succeeded", job_id=job_id)
        assert not service.logged("job handed back at shutdown")
        await harness.assert_removed(vm, job_id)
        assert host.agent.times_sent() == {str(p): 1 for p in vm.paths()}
        assert not [p for p in vm.paths() if p.exists()]


async def test_sigterm_hands_a_job_back_after_the_grace_and_another_process_takes_it_at_once(
    server_url: str, tmp_path: Path
) -> None:
    # A lease far longer than the test may take: only a job handed back can be taken up in time.
    slow_lease = {"JOB_LEASE_SECONDS": "600", "AGENT_TIMEOUT_SECONDS": "300", "SHUTDOWN_GRACE_SECONDS": "1"}
    async with fault_harness(server_url, tmp_path) as harness:
        first = await harness.start_service(**slow_lease)
        http = await harness.client(first)
        host = await harness.add_host(http)
        vm = await harness.add_vm(http, [host])
        host.agent.hold_next()  # held for good: only the grace can end it
        job_id = (await http.delete(f"/vms/{vm.uuid}/tpm")).json()["id"]
        await wait_until(lambda: host.agent.open_requests(), timeout=60, what="the host is called")

        first.send(signal.SIGTERM)
        stopped_at = time.monotonic()
        await first.wait_exit(timeout=60)

        # Bounded by the grace, not by the agent timeout (300 s) nor the lease (600 s).
        assert time.monotonic() - stopped_at < 60
        assert_closed_cleanly(first)
        assert first.logged("job handed back at shutdown", job_id=job_id)
        job = await harness.job(job_id)
        assert (job.state, job.lease_token, job.lease_expires_at) == ("queued", None, None)
        assert host.agent.open_requests() == []  # the call was cut, not left hanging

        second = await harness.start_service(**slow_lease)
        await harness.wait_for_job_state(job_id, "succeeded", timeout=120)
        await second.wait_logged("job succeeded", job_id=job_id)
        await harness.assert_removed(vm, job_id)
        assert host.agent.times_confirmed() == {str(p): 1 for p in vm.paths()}
        assert not [p for p in vm.paths() if p.exists()]
