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
from agent_helpers import running_agent
from inventory_helpers import add_file, make_files, put_host, put_vm
from restart_helpers import eventually, own_postgres, serve_process, start_postgres, stop_postgres

pytestmark = pytest.mark.reliability

# No answer may take longer than this, outage or not (long-polls: this beyond their wait).
ANSWER_BOUND_SECONDS = 5.0
LONG_POLL_SECONDS = 1.0
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
                await self._send("GET /jobs/{id}", "GET", f"/jobs/{job}")
            elif kind == 2:
                await self._send("GET /jobs?vm_uuid=", "GET", "/jobs", params={"vm_uuid": vm})
            elif kind == 3:
                body = {"name": "kvm", "agent_url": "http://127.0.0.1:9"}
                await self._send("PUT /hosts/{uuid}", "PUT", f"/hosts/{uuid.uuid4()}", json=body)
            elif kind == 4:
                await self._send("GET /orphan-files", "GET", "/orphan-files")
            elif kind == 5:
                # Long-poll with an ETag that never matches: it reads the job, which needs the database.
                headers = {"If-None-Match": '"stale"'}
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
    roots = [tmp_path / "host-a", tmp_path / "host-b"]
    async with (
        own_postgres() as postgres,
        running_agent(roots[0], delay_seconds=1.0) as agent_a,
        running_agent(roots[1], delay_seconds=1.0) as agent_b,
    ):
        settings = {
            "agent_timeout_seconds": "10",
            "job_lease_seconds": "3",
            "worker_poll_seconds": "0.2",
            "orphan_retry_seconds": "60",
        }
        with serve_process(postgres.url, tmp_path, **settings) as served:
            timeout = httpx.Timeout(ANSWER_BOUND_SECONDS + LONG_POLL_SECONDS + 10)
            async with httpx.AsyncClient(base_url=served.base_url, timeout=timeout) as http:
                hosts = [await put_host(http, agent_a), await put_host(http, agent_b)]
                vms = [await put_vm(http) for _ in range(6)]
                spare_vms = [await put_vm(http) for _ in range(6)]
                files: list[Path] = []
                for vm in vms + spare_vms:
                    for host, root in zip(hosts, roots, strict=True):
                        state, nvram = make_files(root, vm, "tpm2-00.permall", "nvram.fd")
                        await add_file(http, vm, host, state)
                        await add_file(http, vm, host, nvram, type="NvRam")
                        files += [state, nvram]

                jobs = []
                for vm in vms:
                    answer = await http.delete(f"/vms/{vm}/tpm")
                    assert answer.status_code == 202, answer.text
                    jobs.append(answer.json()["id"])

                async def some_job_running() -> bool:
                    return any(j["state"] == "running" for j in (await job_states(http, jobs)).values())

                await eventually(some_job_running, timeout=30, what="a job running")

                stream = RequestStream(http, vms, jobs, spare_vms)
                callers = [asyncio.create_task(stream.caller(n)) for n in range(4)]
                try:
                    await eventually(lambda: _answers_after(stream, 0, 8), timeout=30, what="answers before the outage")

                    stream.outage = True
                    await asyncio.to_thread(stop_postgres, postgres.pgdata)
                    outage_began = len(stream.answers)
                    await eventually(lambda: readyz_is(http, 503), timeout=10, what="/readyz 503 during the outage")
                    assert (await http.get("/healthz")).status_code == 200
                    # Long enough for every lease to run out while the database is away.
                    outage_ends = time.monotonic() + 4
                    await eventually(
                        lambda: _answers_after(stream, outage_began, 30, until=outage_ends),
                        timeout=60,
                        what="answers during the outage",
                    )

                    await asyncio.to_thread(start_postgres, postgres.pgdata)
                    stream.outage = False
                    await eventually(lambda: readyz_is(http, 200), timeout=30, what="/readyz 200 after the restart")
                    recovered = len(stream.answers)
                    await eventually(
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

                await eventually(all_jobs_ended, timeout=90, interval=0.5, what="every accepted job ended")
                final = await job_states(http, accepted)

    log = served.log()
    errors = [a for a in stream.answers if a.status == 0 or (a.status >= 500 and a.status != 503)]
    assert not errors, f"errors other than 503: {errors[:10]}\n{log[-5000:]}"
    assert [a for a in stream.answers if a.during_outage and a.status == 503], "no request met the outage"
    unavailable = [a for a in stream.answers if a.status == 503]
    assert all(a.content_type == "application/problem+json" and a.retry_after for a in unavailable), unavailable[:10]
    slow = [a for a in stream.answers if a.seconds > ANSWER_BOUND_SECONDS + LONG_POLL_SECONDS * ("wait" in a.request)]
    assert not slow, slow[:10]

    assert len(stream.accepted_jobs) > 0
    not_succeeded = {job_id: job for job_id, job in final.items() if job["state"] != "succeeded"}
    assert not not_succeeded, not_succeeded
    assert all(h["state"] == "deleted" for job in final.values() for h in job["hosts"]), final
    removed_vms = {job["vm_uuid"] for job in final.values()}
    left = [f for f in files if f.parent.name in removed_vms and f.exists()]
    assert not left, left
    # An outage is no reason to count a job step as failed, nor to log an unexpected error.
    assert "unhandled error" not in log and "job step failed" not in log, log[-5000:]


async def _answers_after(stream: RequestStream, start: int, count: int, *, until: float = 0.0) -> bool:
    """Whether the stream got `count` answers since answer number `start` (and the clock passed `until`)."""
    return len(stream.answers) - start >= count and time.monotonic() >= until


async def _successes_after(stream: RequestStream, start: int, count: int) -> bool:
    """Whether the stream got `count` successful answers since answer number `start`."""
    return sum(1 for a in stream.answers[start:] if 200 <= a.status < 400) >= count
