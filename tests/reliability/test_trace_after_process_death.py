"""A job taken over after its `serve` process was killed with SIGKILL continues the trace of the request that made it.

The service processes export nothing (no OpenTelemetry variable is set): the trace travels as ids, which the job's
row keeps and every agent call carries.
"""

from pathlib import Path

import pytest
from aiohttp import web

from tests.agent_helpers import Handler
from tests.reliability.process_helpers import HOLDS_CALLS, SURVIVOR, LoggingAgent, fault_harness, wait_until

pytestmark = pytest.mark.reliability

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"


class TraceparentAgent(LoggingAgent):
    """The logging agent, keeping the `traceparent` of every delete call."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.traceparents: list[str] = []

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.traceparents.append(request.headers.get("traceparent", ""))
        return await super()._record(request, handler)


async def test_a_job_resumed_after_kill_9_continues_the_trace_of_its_request(server_url: str, tmp_path: Path) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        first = await harness.start_service(**HOLDS_CALLS)
        http = await harness.client(first)
        quick, held = await harness.add_host(http, TraceparentAgent), await harness.add_host(http, TraceparentAgent)
        vm = await harness.add_vm(http, [quick, held])
        gate = held.agent.hold_next()

        answer = await http.delete(f"/vms/{vm.uuid}/tpm", headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        await wait_until(lambda: held.agent.open_requests(), timeout=60, what="the held host is called")
        await harness.wait_for_host_state(job_id, quick.uuid, "deleted")
        await first.kill()
        gate.set()
        second = await harness.start_service(**SURVIVOR)
        job = await harness.wait_for_job_state(job_id, "succeeded")
        assert job.attempts == 2

        assert TRACE_ID in job.trace_context
        assert isinstance(quick.agent, TraceparentAgent) and isinstance(held.agent, TraceparentAgent)
        (quick_call,) = quick.agent.traceparents
        first_call, second_call = held.agent.traceparents
        # Every call is in the caller's trace, each from a span of the job's run that made it: the dead process's
        # run for the first two, the survivor's for the last.
        assert {call.split("-")[1] for call in (quick_call, first_call, second_call)} == {TRACE_ID}
        parents = [call.split("-")[2] for call in (quick_call, first_call, second_call)]
        assert parents[0] == parents[1] and parents[2] != parents[0] and CALLER_SPAN_ID not in parents
        # Both processes' log lines of the job carry the trace's id.
        assert [line["trace_id"] for line in first.logged("job claimed", job_id=job_id)] == [TRACE_ID]
        assert [line["trace_id"] for line in second.logged("job claimed", job_id=job_id)] == [TRACE_ID]
        (succeeded,) = await second.wait_logged("job succeeded", job_id=job_id)
        assert succeeded["trace_id"] == TRACE_ID
