"""Orphan files: files whose host did not confirm their deletion, retried with backoff until it does.

A failing host's orphans are not retried by their own back-off: the host gets one probe per back-off step of its
own (app/service/orphans/health.py), and once it answers, all its orphans are due at once.
"""

import asyncio
import logging
from dataclasses import dataclass
from uuid import UUID, uuid4

from opentelemetry.context import Context
from opentelemetry.trace import Tracer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.service.agent_client import AgentClient, FileToDelete, HostDeleteResult
from app.service.backoff import Backoff
from app.service.db.engine import Engine, driver_connection
from app.service.db.models import OrphanFile
from app.service.orphans.health import STATEMENTS, record_contact
from app.service.pagination import Page, page_by_uuid
from app.service.trace_context import linked_trace

log = logging.getLogger(__name__)


async def list_orphans(
    session: AsyncSession, *, host_uuid: UUID | None, limit: int, after: str | None
) -> Page[OrphanFile]:
    """A page of orphan files, optionally of one host, in a stable order."""
    statement = select(OrphanFile)
    if host_uuid is not None:
        statement = statement.where(OrphanFile.host_uuid == host_uuid)
    return await page_by_uuid(session, statement, OrphanFile.uuid, limit=limit, after=after)


@dataclass
class _OrphanGroup:
    """Due orphans one removal job left of one VM on one host: the protocol's one delete call."""

    host_uuid: UUID
    vm_uuid: UUID
    job_id: UUID | None
    agent_url: str
    uuids: list[UUID]
    files: list[FileToDelete]
    attempts: int
    """The most tries of any of them so far: the back-off step of the group."""
    probe: bool
    """Whether this call is the probe of a failing host."""
    trace_context: str | None
    """The trace context of the job that left the orphans, which the retry's span links to."""

    def log_fields(self) -> dict[str, str]:
        """The fields every log line about this retry carries: the job, VM and host, as the job's own lines."""
        return {"job_id": str(self.job_id), "vm_uuid": str(self.vm_uuid), "host_uuid": str(self.host_uuid)}


class OrphanReaper:
    """Retries due orphan files, one call per host, VM and job, all hosts at once; probes failing hosts."""

    def __init__(
        self,
        engine: Engine,
        agent: AgentClient,
        *,
        backoff: Backoff,
        call_timeout_seconds: float,
        poll_seconds: float,
        tracer: Tracer,
    ) -> None:
        self._engine = engine
        self._agent = agent
        self._backoff = backoff
        self._tracer = tracer
        self._hold_seconds = 2 * call_timeout_seconds + 5
        self._poll_seconds = poll_seconds

    async def run_once(self) -> float:
        """Retry what is due (a periodic task); the seconds to rest: none while there was work."""
        return 0.0 if await self.retry_due() else self._poll_seconds

    async def retry_due(self, limit: int = 1000) -> int:
        """Retry up to `limit` due orphans; how many were tried."""
        token = uuid4()
        groups = await self._claim(token, limit)
        await asyncio.gather(*(self._retry_group(token, group) for group in groups))
        return sum(len(g.uuids) for g in groups)

    async def _claim(self, token: UUID, limit: int) -> list[_OrphanGroup]:
        async with driver_connection(self._engine) as connection:
            params = {"token": token, "hold": self._hold_seconds, "limit": limit}
            rows = await STATEMENTS.run(connection, "claim_due", params)
        grouped: dict[tuple[UUID, UUID, UUID | None], _OrphanGroup] = {}
        for row in rows:
            key = (row["host_uuid"], row["vm_uuid"], row["job_id"])
            group = grouped.get(key)
            if group is None:
                group = grouped[key] = _OrphanGroup(
                    *key, row["agent_url"], [], [], 0, probe=row["probe"], trace_context=row["trace_context"]
                )
            group.uuids.append(row["uuid"])
            group.files.append(FileToDelete(path=row["path"], type=row["type"]))
            group.attempts = max(group.attempts, row["attempts"])
        return list(grouped.values())

    async def _retry_group(self, token: UUID, group: _OrphanGroup) -> None:
        # A trace of its own, linked to the job's: a retry may come days after the job, in another process.
        with self._tracer.start_as_current_span(
            "host probe" if group.probe else "orphan retry",
            context=Context(),
            links=linked_trace(group.trace_context),
            attributes={**group.log_fields(), "files": len(group.files)},
        ):
            result = await self._agent.delete_files(
                group.agent_url, group.vm_uuid, group.files, host_uuid=group.host_uuid
            )
            try:
                await self._record(token, group, result)
            except Exception as error:
                # The claim's hold runs out and the orphans come due again: nothing is lost.
                log.warning("could not record orphan retry", extra={**group.log_fields(), "reason": repr(error)})

    async def _record(self, token: UUID, group: _OrphanGroup, result: HostDeleteResult) -> None:
        claimed = {"uuids": group.uuids, "token": token}
        async with driver_connection(self._engine) as connection, connection.transaction():
            if result.contact == "not_called":
                await STATEMENTS.run(connection, "release", claimed)
                log.info("orphan retry not sent", extra={**group.log_fields(), "reason": result.error})
                return
            # Before the group's own orphans are confirmed or backed off: a host that answers again makes its other
            # orphans due, not those whose call just failed.
            await record_contact(connection, group.host_uuid, result, backoff=self._backoff, fields=group.log_fields())
            if result.ok:
                await STATEMENTS.run(connection, "confirm", claimed)
                log.info("orphan files deleted", extra={**group.log_fields(), "files": len(group.uuids)})
                return
            delay = self._backoff.delay(group.attempts + 1)
            await STATEMENTS.run(connection, "back_off", {**claimed, "error": result.error, "delay": delay})
        log.warning(
            "orphan retry failed",
            extra={**group.log_fields(), "files": len(group.uuids), "probe": group.probe, "reason": result.error},
        )
