"""Cost per job: how many SQL statements each step of a removal executes, for a small VM and a large one.

Runs `app.removal.Removal` in this process, without HTTP, on an engine whose statements are counted by a
`before_cursor_execute` listener, against agents of the benchmark's fleet.
"""

import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
from sqlalchemy import event

from app.agent_client import AgentClient
from app.db import create_engine, create_session_factory
from app.jobs import claim_jobs
from app.removal import LeaseClock, Removal, request_removal
from bench.seed import FileSpec, Seeder

_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class JobCost:
    """Statements one job executed, by step."""

    files: int
    hosts: int
    request: int
    plan: int
    host_calls: int
    cleanup: int


async def measure_job_costs(
    database_url: str, seeder: Seeder, host_uuids: list[uuid.UUID], sizes: list[int]
) -> list[JobCost]:
    """Run one removal per size (a VM with that many files, spread over `host_uuids`) and count its statements.

    Must run while no service works on the database: the claim here takes whichever job is queued.
    """
    engine = create_engine(database_url)
    counter: Counter[str] = Counter()
    step = ""

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def count(*_args: Any) -> None:
        counter[step] += 1

    sessions = create_session_factory(engine)
    costs = []
    async with aiohttp.ClientSession() as http:
        agent = AgentClient(http, timeout_seconds=10, concurrency=64)
        removal = Removal(sessions, agent, orphan_retry_seconds=30)
        try:
            for size in sizes:
                counter.clear()
                layout = [FileSpec(host_uuids[i % len(host_uuids)], "TpmState") for i in range(size)]
                (vm_uuid,) = await seeder.vms([layout])
                step = "request"
                async with sessions() as session, session.begin():
                    await request_removal(session, vm_uuid)
                step = "claim"
                async with sessions() as session, session.begin():
                    (claim,) = await claim_jobs(session, limit=1, lease_seconds=_LEASE_SECONDS)
                lease = LeaseClock(_LEASE_SECONDS)
                step = "plan"
                plan = await removal.plan_removal(claim, lease)
                step = "host_calls"
                await removal.delete_on_hosts(claim, lease, plan)
                step = "cleanup"
                orphans = await removal.commit_cleanup(claim, lease)
                if orphans:
                    raise RuntimeError(f"cost run left {orphans} orphan files: the agents did not confirm")
                costs.append(
                    JobCost(
                        files=size,
                        hosts=len(plan),
                        request=counter["request"],
                        plan=counter["plan"],
                        host_calls=counter["host_calls"],
                        cleanup=counter["cleanup"],
                    )
                )
        finally:
            await engine.dispose()
    return costs
