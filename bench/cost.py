"""Cost per job: how many SQL statements (and transactions) each step of a removal executes, per VM layout.

Runs `app.service.removal.run.Removal` in this process, without HTTP, on an engine whose statements are counted by
`app.service.db.engine.recorded_statements` (a `before_cursor_execute` listener for SQLAlchemy statements, asyncpg query
logger for the named statements that run past it) and transactions by a `begin` listener, against agents of the
fleet.
"""

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from sqlalchemy import Connection, event

from app.service.agent_client import AgentClient
from app.service.db.engine import create_engine, driver_connection, recorded_statements
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import claim_jobs
from app.service.removal.request import request_removal
from app.service.removal.run import TPM_REMOVAL, Removal
from app.service.settings import Settings
from bench.seed import FileSpec, Seeder

_LEASE_SECONDS = 30.0
STEPS = ("request", "claim", "plan", "host_calls", "cleanup")


@dataclass(frozen=True)
class JobCost:
    """Statements and transactions of one job, by step (see STEPS)."""

    files: int
    hosts: int
    statements: Counter[str]
    transactions: Counter[str]

    @property
    def round_trips(self) -> int:
        """Statements plus a BEGIN and a COMMIT per transaction: what the job waits on the database for."""
        return sum(self.statements.values()) + 2 * sum(self.transactions.values())


async def measure_job_costs(database_url: str, seeder: Seeder, layouts: Sequence[Sequence[FileSpec]]) -> list[JobCost]:
    """Remove one VM per layout, step by step, and count what each step executed.

    Must run while no service works on the database: the claim here takes whichever job is queued.
    """
    engine = create_engine(database_url)
    costs = []
    step = ""
    statements: Counter[str] = Counter()
    transactions: Counter[str] = Counter()

    @asynccontextmanager
    async def counted(name: str) -> AsyncIterator[None]:
        nonlocal step
        step = name
        async with recorded_statements(engine) as sent:
            yield
        statements[name] += len(sent)

    @event.listens_for(engine.sync_engine, "begin")
    def count_transaction(_connection: Connection) -> None:
        transactions[step] += 1

    async with aiohttp.ClientSession() as http:
        agent = AgentClient(http, timeout_seconds=10, concurrency=64)
        removal = Removal(engine, agent, scope=TPM_REMOVAL, backoff=Settings().orphan_backoff())
        try:
            for layout in layouts:
                (vm_uuid,) = await seeder.vms([layout])
                statements, transactions = Counter(), Counter()
                # The request and the claim run as the route and the worker run them.
                async with counted("request"):
                    await request_removal(engine, vm_uuid)
                async with counted("claim"), driver_connection(engine) as connection:
                    (claim,) = await claim_jobs(connection, limit=1, lease_seconds=_LEASE_SECONDS)
                lease = LeaseClock(_LEASE_SECONDS)
                async with counted("plan"):
                    plan = await removal.plan_removal(claim, lease)
                async with counted("host_calls"):
                    last_outcomes = await removal.delete_on_hosts(claim, lease, plan)
                async with counted("cleanup"):
                    orphans = await removal.commit_cleanup(claim, lease, last_outcomes)
                if orphans:
                    raise RuntimeError(f"cost run left {orphans} orphan files: the agents did not confirm")
                costs.append(JobCost(len(layout), len(plan), statements, transactions))
        finally:
            await engine.dispose()
    return costs
