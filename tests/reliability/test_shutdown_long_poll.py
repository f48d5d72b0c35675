"""SIGTERM with long-polls open: they end at once (304), so they hold no stopping process up."""

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.process_helpers import fault_harness, wait_until

pytestmark = pytest.mark.reliability


async def test_sigterm_ends_open_long_polls_at_once_and_the_process_exits_0(server_url: str, tmp_path: Path) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service()
        http = await harness.client(service)
        vm = await harness.add_vm(http, [await harness.add_host(http)])
        job = await http.delete(f"/vms/{vm.uuid}/tpm")
        final = await harness.wait_for_job_state(job.json()["id"], "succeeded")
        etag = (await http.get(f"/jobs/{final.id}")).headers["ETag"]
        polls = [
            asyncio.create_task(http.get(f"/jobs/{final.id}", params={"wait": 60}, headers={"If-None-Match": etag}))
            for _ in range(3)
        ]
        await asyncio.sleep(0.5)  # the polls are waiting inside the service

        started = time.monotonic()
        service.send(signal.SIGTERM)
        answers = await asyncio.gather(*polls)
        assert [a.status_code for a in answers] == [304, 304, 304]
        assert await service.wait_exit() == 0
        # Far less than the 60 s the polls asked for, or uvicorn's 30 s drain.
        assert time.monotonic() - started < 20
        await wait_until(lambda: service.logged("Application shutdown complete."), timeout=5, what="clean stop")
