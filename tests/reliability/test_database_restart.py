"""A PostgreSQL restart under load: 503s while it is down, recovery by itself, and every accepted job finished."""

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.pg_helpers import separate_postgres, start_postgres, stop_postgres
from tests.reliability.process_helpers import fault_harness, wait_until

pytestmark = pytest.mark.reliability

# No answer may take longer than this, outage or not (long-polls: this beyond their wait).
ANSWER_BOUND_SECONDS = 5.0
LONG_POLL_SECONDS = 1.0
AGENT_DELAY_SECONDS = 1.0
# Longer than JOB_LEASE_SECONDS of the fault harness: every lease runs out while the database is away.
OUTAGE_SECONDS = 4.0
# A pause between one caller's requests: a steady stream rather than a flood that starves a loaded machine.
PACE_SECONDS = 0.01


@dataclass(frozen=True)
class Answer:
    """One answer the request stream got, and when."""

    request: str
    status: int
    content_type: str
    retry_after: str | None
    seconds: float
    during_outage: bool


@dataclass
class RequestStream:
    """Callers that keep using the API (reads, writes, removals, long-polls) and record every answer."""

    http: httpx.AsyncClient
    vms: list[str]
    jobs: list[str]
    spare_vms: list[str]
    answers: list[Answer] = field(default_factory=list)
    accepted_jobs: list[str] = field(default_factory=list)
    etags: dict[str, str] = field(default_factory=dict)
    outage: bool = False
    stopped: bool = False

    async def caller(self, number: int) -> None:
        """Cycle through the API until stopped; `number` staggers the callers over the requests."""
        for step in itertools.count(number):
            if self.stopped:
                return
            await asyncio.sleep(PACE_SECONDS)
            vm = self.vms[step % len(self.vms)]
            job = self.jobs[step % len(self.jobs)]
            kind = step % 7
            if kind == 0:
                await self._send("GET /vms/{vm}", "GET", f"/vms/{vm}")
            elif kind == 1:
                answer = await self._send("GET /jobs/{id}", "GET", f"/jobs/{job}")
                if answer is not None and answer.status_code == 200:
                    self.etags[job] = answer.headers["ETag"]
            elif kind == 2:
                await self._send("GET /jobs?vm_uuid=", "GET", "/jobs", params={"vm_uuid": vm})
            elif kind == 3:
                body = {"name": "kvm", "agent_url": "http://127.0.0.1:9"}
                await self._send("PUT /hosts/{uuid}", "PUT", f"/hosts/{uuid.uuid4()}", json=body)
            elif kind == 4:
                await self._send("GET /orphan-files", "GET", "/orphan-files")
            elif kind == 5:
                # A long-poll on the job as last seen: it waits, and a change or the outage ends the wait.
                headers = {"If-None-Match": self.etags.get(job, '"not seen yet"')}
                params = {"wait": LONG_POLL_SECONDS}
                await self._send("GET /jobs/{id}?wait", "GET", f"/jobs/{job}", params=params, headers=headers)
            elif self.spare_vms:
                spare = self.spare_vms.pop()
                answer = await self._send("DELETE /vms/{vm}/tpm", "DELETE", f"/vms/{spare}/tpm")
                if answer is not None and answer.status_code == 202:
                    self.accepted_jobs.append(answer.json()["id"])
                elif answer is None or answer.status_code == 503:
                    self.spare_vms.insert(0, spare)  # not accepted: try it again later

    async def _send(self, name: str, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        during_outage = self.outage
        started = time.monotonic()
        try:
            answer = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            self.answers.append(Answer(name, 0, "", None, time.monotonic() - started, during_outage))
            return None
        self.answers.append(
            Answer(
                name,
                answer.status_code,
                answer.headers.get("content-type", "").split(";")[0],
                answer.headers.get("retry-after"),
                time.monotonic() - started,
                during_outage or self.outage,
            )
        )
        return answer


async def job_states(http: httpx.AsyncClient, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The jobs as the API shows them now (jobs it cannot read right now are left out)."""
    jobs = {}
    for job_id in job_ids:
        answer = await http.get(f"/jobs/{job_id}")
        if answer.status_code == 200:
            jobs[job_id] = answer.json()
    return jobs


async def readyz_is(http: httpx.AsyncClient, status: int) -> bool:
    """Whether /readyz answers `status` now."""
    return (await http.get("/readyz")).status_code == status


async def test_database_restart_under_load_answers_503_then_recovers_and_finishes_every_job(tmp_path: Path) -> None:
    with separate_postgres() as (server_url, pgdata):
        async with fault_harness(server_url, tmp_path) as harness:
            service = await harness.start_service()
            http = await harness.client(service)
            hosts = [await harness.add_host(http), await harness.add_host(http)]
            for host in hosts:
                # Slow hosts keep jobs in flight, so that the outage lands in the middle of them.
                host.agent.mode, host.agent.slow_seconds = "slow", AGENT_DELAY_SECONDS
            vms = {vm.uuid: vm for vm in [await harness.add_vm(http, hosts) for _ in range(12)]}
            first, spare = list(vms)[:6], list(vms)[6:]
            jobs = []
            for vm_uuid in first:
                answer = await http.delete(f"/vms/{vm_uuid}/tpm")
                assert answer.status_code == 202, answer.text
                jobs.append(answer.json()["id"])

            async def some_job_running() -> bool:
                return any(j["state"] == "running" for j in (await job_states(http, jobs)).values())

            await wait_until(some_job_running, timeout=30, what="a job running")

            stream = RequestStream(http, first, jobs, spare)
            callers = [asyncio.create_task(stream.caller(n)) for n in range(4)]
            try:
                await wait_until(lambda: _answers_after(stream, 0, 8), timeout=30, what="answers before the outage")

                stream.outage = True
                await asyncio.to_thread(stop_postgres, pgdata)
                outage_began = len(stream.answers)
                await wait_until(lambda: readyz_is(http, 503), timeout=10, what="/readyz 503 during the outage")
                assert (await http.get("/healthz")).status_code == 200
                outage_ends = time.monotonic() + OUTAGE_SECONDS
                await wait_until(
                    lambda: _answers_after(stream, outage_began, 30, until=outage_ends),
                    timeout=60,
                    what="answers during the outage",
                )

                await asyncio.to_thread(start_postgres, pgdata)
                stream.outage = False
                await wait_until(lambda: readyz_is(http, 200), timeout=30, what="/readyz 200 after the restart")
                recovered = len(stream.answers)
                await wait_until(
                    lambda: _successes_after(stream, recovered, 10), timeout=30, what="successes after the restart"
                )
            finally:
                stream.stopped = True
                await asyncio.gather(*callers)

            accepted = jobs + stream.accepted_jobs

            async def all_jobs_ended() -> bool:
                states = await job_states(http, accepted)
                return len(states) == len(accepted) and all(
                    j["state"] in ("succeeded", "failed") for j in states.values()
                )

            await wait_until(all_jobs_ended, timeout=90, interval=0.5, what="every accepted job ended")
            final = await job_states(http, accepted)
            log = service.log_text()

            errors = [a for a in stream.answers if a.status == 0 or (a.status >= 500 and a.status != 503)]
            assert not errors, f"errors other than 503: {errors[:10]}"
            assert [a for a in stream.answers if a.during_outage and a.status == 503], "no request met the outage"
            unavailable = [a for a in stream.answers if a.status == 503]
            assert all(a.content_type == "application/problem+json" and a.retry_after for a in unavailable), (
                unavailable[:10]
            )
            bound = ANSWER_BOUND_SECONDS
            slow = [a for a in stream.answers if a.seconds > bound + LONG_POLL_SECONDS * ("wait" in a.request)]
            assert not slow, slow[:10]

            assert stream.accepted_jobs, "no removal was accepted around the outage"
            assert {j["state"] for j in final.values()} == {"succeeded"}, final
            assert {h["state"] for j in final.values() for h in j["hosts"]} == {"deleted"}, final
            for job_id, job in final.items():
                vm = vms[job["vm_uuid"]]
                await harness.assert_removed(vm, job_id)
                assert not [p for p in vm.paths() if p.exists()]
            # An outage is no reason to count a job step as failed, nor to log an unexpected error.
            assert "unhandled error" not in log and "job step failed" not in log


async def _answers_after(stream: RequestStream, start: int, count: int, *, until: float = 0.0) -> bool:
    """Whether the stream got `count` answers since answer number `start` (and the clock passed `until`)."""
    return len(stream.answers) - start >= count and time.monotonic() >= until


async def _successes_after(stream: RequestStream, start: int, count: int) -> bool:
    """Whether the stream got `count` successful answers since answer number `start`."""
    return sum(1 for a in stream.answers[start:] if 200 <= a.status < 400) >= count
