"""What a TPM removal does: plan the files, delete them on every host at once, clean up in one transaction.

Host calls come before the database transaction, never after it: a record is deleted only once its
file's fate is known (confirmed gone, or kept as an orphan to retry), so nothing on a host is ever left
without a record pointing at it. The key-provider binding goes in that same transaction as the records,
so a TPM state file is never left on disk without the binding of the key that can read it while
its deletion is unconfirmed. Every write is fenced by the job's lease token (see app/service/jobs/queue.py).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import asyncpg
from sqlalchemy import ColumnElement, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.service.agent_client import AgentClient, FileToDelete, HostDeleteResult
from app.service.db.engine import DriverStatement, driver_connection
from app.service.db.models import ACTIVE_JOB, Job
from app.service.errors import ConflictError, LeaseLostError, NotFoundError
from app.service.inventory.service import removed_with_tpm
from app.service.jobs.queue import FENCED, RENEWED_LEASE, JobClaim, get_job, job_out
from app.service.schemas import JobOut

log = logging.getLogger(__name__)


# A removal's request attempts: each further one follows a change of the VM's state between two statements.
_REQUEST_ATTEMPTS = 3


# The job of a removal, inserted only while the VM has a TPM and no removal under way. The TPM row is locked, so
# that a TPM being deleted by a finishing removal yields no job rather than one for a TPM that is gone; the
# partial unique index of active jobs (named by its predicate, ACTIVE_JOB) turns a removal already queued into no
# row too. It is the whole of the common DELETE: one constant statement, run on asyncpg and its row read without
# the ORM.
_QUEUE_REMOVAL = DriverStatement.of(
    text(f"""
INSERT INTO jobs (id, vm_uuid, tpm_uuid)
SELECT :job_id, tpms.vm_uuid, tpms.uuid FROM tpms WHERE tpms.vm_uuid = :vm_uuid FOR UPDATE
ON CONFLICT (vm_uuid) WHERE {ACTIVE_JOB.text} DO NOTHING
RETURNING *
""")
)

# Why no job was inserted.
_REMOVAL_STATE = DriverStatement.of(
    text(f"""
SELECT (SELECT uuid FROM vms WHERE uuid = :vm_uuid) AS vm,
       (SELECT id FROM jobs WHERE vm_uuid = :vm_uuid AND {ACTIVE_JOB.text}) AS active_job,
       (SELECT uuid FROM tpms WHERE vm_uuid = :vm_uuid) AS tpm
""")
)


async def request_removal(engine: AsyncEngine, vm_uuid: UUID) -> tuple[JobOut, bool]:
    """Queue the removal of a VM's TPM, or return the removal already under way; the flag tells which.

    Each statement is atomic by itself, so they run without a transaction: the common case is the insert alone, one
    round trip. However many requests arrive at once, in every replica, the unique index lets exactly one job in;
    the others read it back, on a connection of their own once the first is back in the pool.
    """
    async with driver_connection(engine) as connection:
        queued_or_active = await _queue_removal(connection, vm_uuid)
    if not isinstance(queued_or_active, UUID):
        return job_out(Job(**queued_or_active), hosts=[]), True
    async with AsyncSession(engine) as session:
        return await get_job(session, queued_or_active), False


async def _queue_removal(connection: asyncpg.Connection, vm_uuid: UUID) -> asyncpg.Record | UUID:
    """The row of the job inserted, or else the id of the removal under way; NotFoundError or ConflictError."""
    for _ in range(_REQUEST_ATTEMPTS):
        if queued := await _QUEUE_REMOVAL.fetch(connection, {"job_id": uuid4(), "vm_uuid": vm_uuid}):
            return queued[0]
        ((vm, active, tpm),) = await _REMOVAL_STATE.fetch(connection, {"vm_uuid": vm_uuid})
        if active is not None:
            return active
        if vm is None:
            raise NotFoundError(f"VM {vm_uuid} does not exist")
        if tpm is None:
            raise NotFoundError(f"VM {vm_uuid} has no TPM")
        # A TPM and no removal under way, yet no job inserted: a removal ended or a TPM was created
        # between the two statements. Look again.
    raise ConflictError(f"VM {vm_uuid}'s TPM is changing right now; try again shortly")


@dataclass(frozen=True)
class HostPlan:
    """The files of one host that a job still has to delete there."""

    host_uuid: UUID
    agent_url: str
    files: list[FileToDelete]


class LeaseClock:
    """The worker's local view of its lease: no host is called once the lease may have run out.

    The local deadline is kept a tenth of the lease short of the database's, since the clock started
    after the statement that set the lease was sent.
    """

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._safe_seconds = lease_seconds * 0.9
        self._valid_until = time.monotonic() + self._safe_seconds
        self._lost = False

    def renewed(self, at: float) -> None:
        """The lease was renewed by a statement sent at monotonic time `at`."""
        self._valid_until = max(self._valid_until, at + self._safe_seconds)

    def lose(self) -> None:
        """The lease is known to be someone else's."""
        self._lost = True

    def valid(self) -> bool:
        """Whether the lease is surely still ours."""
        return not self._lost and time.monotonic() < self._valid_until


# How long the first outcome of a batch waits for the job's other hosts before it is written without them.
OUTCOME_LINGER_SECONDS = 0.02


def _as_sql(clause: ColumnElement[bool]) -> str:
    """A constant SQLAlchemy expression as PostgreSQL text, to share it with a hand-written statement."""
    return str(clause.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))  # type: ignore[no-untyped-call]


# Each step of a job that writes is one fenced statement (app/service/jobs/queue.py): its CTE `job` updates the job row
# the claim's token, and every other change is joined to it, so a lost lease changes nothing and the statement
# answers no row. Data-modifying CTEs all read the snapshot the statement started with; each step
# below therefore works from what it reads and from its parameters, never from another CTE's effects.

# The plan: fence, then once per job (a resumed job keeps its own) copy its files and count them per host, and
# answer the files of the hosts still pending. It selects with the same expression that `GET /vms/{uuid}/tpm`
# previews with. `before` is the job row as the statement found it: whether it was planned already.
_PLAN = DriverStatement.of(
    text(f"""
WITH job AS (
    UPDATE jobs SET {RENEWED_LEASE}, planned = true
    FROM jobs AS before
    WHERE {FENCED} AND before.id = jobs.id
    RETURNING before.planned AS was_planned
), planned_files AS (
    INSERT INTO job_files (job_id, file_uuid, host_uuid, path, type)
    SELECT :job_id, host_files.uuid, host_files.host_uuid, host_files.path, host_files.type
    FROM job, host_files JOIN vms ON vms.uuid = host_files.vm_uuid
    WHERE NOT job.was_planned AND host_files.vm_uuid = :vm_uuid AND ({_as_sql(removed_with_tpm())})
    RETURNING host_uuid, path, type
), planned_hosts AS (
    INSERT INTO job_hosts (job_id, host_uuid, files)
    SELECT :job_id, host_uuid, count(*) FROM planned_files GROUP BY host_uuid
), pending AS (
    SELECT host_uuid, path, type FROM planned_files
    UNION ALL
    SELECT job_files.host_uuid, job_files.path, job_files.type
    FROM job, job_files
    JOIN job_hosts ON job_hosts.job_id = job_files.job_id AND job_hosts.host_uuid = job_files.host_uuid
    WHERE job.was_planned AND job_files.job_id = :job_id AND job_hosts.state = 'pending'
)
SELECT pending.host_uuid, hosts.agent_url, pending.path, pending.type
FROM job LEFT JOIN (pending JOIN hosts ON hosts.uuid = pending.host_uuid) ON true
ORDER BY pending.host_uuid, pending.path
""")
)

# Host outcomes as parameters (three arrays of the same length), and their recording on the job's pending hosts
# once `job` matched. The host UUIDs come as text: asyncpg knows text[] from the start, but would look uuid[] up on
# each new connection, three more round trips inside the job's statement.
_OUTCOMES = """outcome AS (
    SELECT CAST(host AS uuid) AS host_uuid, state, error
    FROM unnest(CAST(:hosts AS text[]), CAST(:states AS text[]), CAST(:errors AS text[])) AS outcome(host, state, error)
)"""
_RECORDED = """recorded AS (
    UPDATE job_hosts SET state = outcome.state, error = outcome.error
    FROM job, outcome
    WHERE job_hosts.job_id = job.id AND job_hosts.host_uuid = outcome.host_uuid AND job_hosts.state = 'pending'
)"""

# Host outcomes that land while other hosts of the job are still being called.
_RECORD_OUTCOMES = DriverStatement.of(
    text(f"""
WITH job AS (
    UPDATE jobs SET {RENEWED_LEASE} WHERE {FENCED} RETURNING id
), {_OUTCOMES}, {_RECORDED}
SELECT id FROM job
""")
)

# The cleanup, the job's database work after its host calls, in one statement however many files and hosts it
# has: the last host outcomes recorded, orphans and confirmations recorded from every host's outcome, file
# records, key binding and TPM deleted, and the job succeeded, which is also its fence.
_CLEANUP = DriverStatement.of(
    text(f"""
WITH {_OUTCOMES}, host_outcome AS (
    SELECT job_hosts.host_uuid,
           CASE WHEN outcome.host_uuid IS NULL THEN job_hosts.state ELSE outcome.state END AS state,
           CASE WHEN outcome.host_uuid IS NULL THEN job_hosts.error ELSE outcome.error END AS error
    FROM job_hosts
    LEFT JOIN outcome ON outcome.host_uuid = job_hosts.host_uuid AND job_hosts.state = 'pending'
    WHERE job_hosts.job_id = :job_id
), files AS (
    SELECT job_files.file_uuid, job_files.host_uuid, job_files.path, job_files.type,
           host_outcome.state, host_outcome.error
    FROM job_files JOIN host_outcome ON host_outcome.host_uuid = job_files.host_uuid
    WHERE job_files.job_id = :job_id
), job AS (
    UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_token = NULL, lease_expires_at = NULL,
        error = NULL, orphan_files = (SELECT count(*) FROM files WHERE state <> 'deleted')
    WHERE {FENCED}
    RETURNING id, orphan_files
), {_RECORDED}, orphans AS (
    INSERT INTO orphan_files (uuid, host_uuid, vm_uuid, job_id, path, type, attempts, last_error, next_attempt_at)
    SELECT files.file_uuid, files.host_uuid, :vm_uuid, :job_id, files.path, files.type,
           1, files.error, now() + :retry * interval '1 second'
    FROM job, files
    WHERE files.state <> 'deleted'
), confirmed AS (
    INSERT INTO confirmed_deletions (file_uuid, host_uuid, path, job_id)
    SELECT files.file_uuid, files.host_uuid, files.path, :job_id
    FROM job, files
    WHERE files.state = 'deleted'
), file_records AS (
    DELETE FROM host_files USING job, files WHERE host_files.uuid = files.file_uuid
), key_binding AS (
    DELETE FROM tpm_key_bindings USING job WHERE tpm_key_bindings.tpm_uuid = :tpm_uuid
), tpm AS (
    DELETE FROM tpms USING job WHERE tpms.uuid = :tpm_uuid
)
SELECT orphan_files FROM job
""")
)


def _outcome_params(outcomes: Sequence[tuple[UUID, HostDeleteResult]]) -> dict[str, list[Any]]:
    return {
        "hosts": [str(host) for host, _ in outcomes],
        "states": ["deleted" if result.ok else "failed" for _, result in outcomes],
        "errors": [result.error for _, result in outcomes],
    }


class Removal:
    """Runs removal jobs, given a database engine and an agent client; knows nothing of HTTP or claiming."""

    def __init__(self, engine: AsyncEngine, agent: AgentClient, *, orphan_retry_seconds: float) -> None:
        self._engine = engine
        self._agent = agent
        self._orphan_retry_seconds = orphan_retry_seconds

    async def run(self, claim: JobClaim, lease: LeaseClock) -> int:
        """Carry a claimed job to its end; the number of orphan files it left. Raises LeaseLostError."""
        hosts = await self.plan_removal(claim, lease)
        last_outcomes = await self.delete_on_hosts(claim, lease, hosts)
        return await self.commit_cleanup(claim, lease, last_outcomes)

    async def _fenced(
        self, claim: JobClaim, lease: LeaseClock, statement: DriverStatement, params: dict[str, Any]
    ) -> list[asyncpg.Record]:
        """Run one fenced statement on its own (no transaction around it); its rows, or LeaseLostError if none."""
        sent_at = time.monotonic()
        # Every statement of a job is fenced and atomic by itself: none needs a transaction around it.
        async with driver_connection(self._engine) as connection:
            rows = await statement.fetch(connection, {**claim.fence_params(lease.lease_seconds), **params})
        if not rows:
            lease.lose()
            raise LeaseLostError(f"job {claim.job_id}: lease was taken over")
        lease.renewed(sent_at)
        return rows

    async def plan_removal(self, claim: JobClaim, lease: LeaseClock) -> list[HostPlan]:
        """Record the job's files and hosts once (a resumed job keeps its plan); the hosts still pending."""
        rows = await self._fenced(claim, lease, _PLAN, {"vm_uuid": claim.vm_uuid})
        plans: dict[UUID, HostPlan] = {}
        for host_uuid, agent_url, path, file_type in rows:
            if host_uuid is None:  # the job has no file (left) to delete
                continue
            plan = plans.get(host_uuid)
            if plan is None:
                plan = plans[host_uuid] = HostPlan(host_uuid, agent_url, [])
            plan.files.append(FileToDelete(path=path, type=file_type))
        return list(plans.values())

    async def delete_on_hosts(
        self, claim: JobClaim, lease: LeaseClock, hosts: list[HostPlan]
    ) -> list[tuple[UUID, HostDeleteResult]]:
        """Send every host its one delete call, all at once; record each outcome as it lands.

        The outcomes that came last, with no host left to wait for, are not written here but returned: the
        cleanup records them in its own statement.
        """
        recorder = _OutcomeRecorder(
            lambda outcomes: self._fenced(claim, lease, _RECORD_OUTCOMES, _outcome_params(outcomes)),
            hosts=len(hosts),
        )

        async def delete_on_host(host: HostPlan) -> None:
            if not lease.valid():
                raise LeaseLostError(f"job {claim.job_id}: lease may have run out, host not called")
            result = await self._agent.delete_files(host.agent_url, claim.vm_uuid, host.files)
            if not result.ok:
                log.warning(
                    "host delete failed; its files become orphans",
                    extra={
                        **claim.log_fields(),
                        "host_uuid": str(host.host_uuid),
                        "reason": result.error,
                        "files": len(host.files),
                    },
                )
            await recorder.record(host.host_uuid, result)

        results = await asyncio.gather(*(delete_on_host(h) for h in hosts), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        # A lost lease wins over any other error: the job is someone else's now.
        for error in errors:
            if isinstance(error, LeaseLostError):
                raise error
        if errors:
            raise errors[0]
        return recorder.unwritten()

    async def commit_cleanup(
        self, claim: JobClaim, lease: LeaseClock, last_outcomes: Sequence[tuple[UUID, HostDeleteResult]]
    ) -> int:
        """In one statement: the last host outcomes, orphans and confirmations recorded, file records, key
        binding and TPM deleted, the job succeeded. The number of orphan files the job left."""
        params = {
            "vm_uuid": claim.vm_uuid,
            "tpm_uuid": claim.tpm_uuid,
            "retry": self._orphan_retry_seconds,
            **_outcome_params(last_outcomes),
        }
        (row,) = await self._fenced(claim, lease, _CLEANUP, params)
        return int(row["orphan_files"])


class _OutcomeRecorder:
    """Group commit of host outcomes: whoever holds the lock writes every outcome that arrived meanwhile.

    With hundreds of hosts answering within milliseconds of each other, one fenced write per host would queue
    on the job row's lock; batching keeps the job's run time close to its slowest host. The first write lingers
    a moment for the job's other hosts, so that hosts answering at nearly the same time (most jobs: a few hosts,
    all healthy) share one write; later writes go at once. Outcomes with no host left to wait for are not
    written at all: they go with the cleanup, which follows at once.
    """

    def __init__(
        self, write: Callable[[list[tuple[UUID, HostDeleteResult]]], Awaitable[object]], *, hosts: int
    ) -> None:
        self._write = write
        self._pending: list[tuple[UUID, HostDeleteResult]] = []
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None
        self._unanswered = hosts
        self._all_answered = asyncio.Event()
        self._lingered = False

    async def record(self, host_uuid: UUID, result: HostDeleteResult) -> None:
        """Return once this outcome is durably written, or left for the cleanup as one of the last."""
        self._pending.append((host_uuid, result))
        self._unanswered -= 1
        if self._unanswered <= 0:
            self._all_answered.set()
        async with self._lock:
            if self._error is not None:
                raise self._error
            if not self._lingered:
                self._lingered = True
                with suppress(TimeoutError):
                    async with asyncio.timeout(OUTCOME_LINGER_SECONDS):
                        await self._all_answered.wait()
            if not self._pending or self._all_answered.is_set():
                return
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except BaseException as error:
                self._error = error
                raise

    def unwritten(self) -> list[tuple[UUID, HostDeleteResult]]:
        """The outcomes no write took: the last ones, once every host has answered."""
        return list(self._pending)
