"""What a TPM removal does: plan the files, delete them on every host at once, clean up in one transaction.

Host calls come before the database transaction, never after it: a record is deleted only once its
file's fate is known (confirmed gone, or kept as an orphan to retry), so nothing on a host is ever left
without a record pointing at it. The key-provider binding goes in that same transaction as the records,
so a TPM state file is never left on disk without the binding of the key that can read it while
its deletion is unconfirmed. Every write is fenced by the job's lease token (see app/jobs.py).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from uuid import UUID, uuid4

from sqlalchemy import ColumnElement, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.agent_client import AgentClient, FileToDelete, HostDeleteResult
from app.errors import LeaseLostError, NotFoundError
from app.inventory import get_vm, removed_with_tpm
from app.jobs import JobClaim, fence, get_job, job_out
from app.models import ACTIVE_JOB_STATES, Job, Tpm
from app.schemas import JobOut

log = logging.getLogger(__name__)


async def request_removal(session: AsyncSession, vm_uuid: UUID) -> tuple[JobOut, bool]:
    """Queue the removal of a VM's TPM, or return the removal already under way; the flag tells which.

    The VM row lock serialises concurrent requests (in every replica), so however many arrive at once
    exactly one job is created; the partial unique index on active jobs backs this up.
    """
    await get_vm(session, vm_uuid, lock=True)
    # One round trip for both questions, and the new job read back from its INSERT: the request is three
    # statements, the lock included (the benchmark's DELETEs are bound by round trips, docs/BENCHMARK.md).
    active, tpm_uuid = (
        await session.execute(
            select(
                select(Job.id).where(Job.vm_uuid == vm_uuid, Job.state.in_(ACTIVE_JOB_STATES)).scalar_subquery(),
                select(Tpm.uuid).where(Tpm.vm_uuid == vm_uuid).scalar_subquery(),
            )
        )
    ).one()
    if active is not None:
        return await get_job(session, active), False
    if tpm_uuid is None:
        raise NotFoundError(f"VM {vm_uuid} has no TPM")
    job = (
        await session.scalars(insert(Job).values(id=uuid4(), vm_uuid=vm_uuid, tpm_uuid=tpm_uuid).returning(Job))
    ).one()
    return job_out(job, hosts=[]), True


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


# The plan, once per job (a resumed job keeps its own), in one statement: mark the job planned, copy its files,
# count them per host. It selects with the same expression that `GET /vms/{uuid}/tpm` previews with.
_PLAN = text(f"""
WITH marked AS (
    UPDATE jobs SET planned = true WHERE id = :job_id AND NOT planned RETURNING id
), planned_files AS (
    INSERT INTO job_files (job_id, file_uuid, host_uuid, path, type)
    SELECT :job_id, host_files.uuid, host_files.host_uuid, host_files.path, host_files.type
    FROM host_files JOIN vms ON vms.uuid = host_files.vm_uuid
    WHERE host_files.vm_uuid = :vm_uuid AND ({_as_sql(removed_with_tpm())}) AND EXISTS (SELECT FROM marked)
    RETURNING host_uuid
)
INSERT INTO job_hosts (job_id, host_uuid, files)
SELECT :job_id, host_uuid, count(*) FROM planned_files GROUP BY host_uuid
""")

_PENDING_FILES = text("""
SELECT job_files.host_uuid, hosts.agent_url, job_files.path, job_files.type
FROM job_files
JOIN job_hosts ON job_hosts.job_id = job_files.job_id AND job_hosts.host_uuid = job_files.host_uuid
JOIN hosts ON hosts.uuid = job_files.host_uuid
WHERE job_files.job_id = :job_id AND job_hosts.state = 'pending'
ORDER BY job_files.host_uuid, job_files.path
""")

_RECORD_OUTCOMES = text("""
UPDATE job_hosts SET state = outcome.state, error = outcome.error
FROM unnest(CAST(:hosts AS uuid[]), CAST(:states AS text[]), CAST(:errors AS text[]))
    AS outcome(host_uuid, state, error)
WHERE job_hosts.job_id = :job_id AND job_hosts.host_uuid = outcome.host_uuid AND job_hosts.state = 'pending'
""")

# The cleanup: a fixed list of bulk statements, however many files and hosts the job has.
_INSERT_ORPHANS = text("""
INSERT INTO orphan_files (uuid, host_uuid, vm_uuid, job_id, path, type, attempts, last_error, next_attempt_at)
SELECT job_files.file_uuid, job_files.host_uuid, :vm_uuid, :job_id, job_files.path, job_files.type,
       1, job_hosts.error, now() + :retry * interval '1 second'
FROM job_files
JOIN job_hosts ON job_hosts.job_id = job_files.job_id AND job_hosts.host_uuid = job_files.host_uuid
WHERE job_files.job_id = :job_id AND job_hosts.state <> 'deleted'
ON CONFLICT (uuid) DO NOTHING
""")

_INSERT_CONFIRMED = text("""
INSERT INTO confirmed_deletions (file_uuid, host_uuid, path, job_id)
SELECT job_files.file_uuid, job_files.host_uuid, job_files.path, :job_id
FROM job_files
JOIN job_hosts ON job_hosts.job_id = job_files.job_id AND job_hosts.host_uuid = job_files.host_uuid
WHERE job_files.job_id = :job_id AND job_hosts.state = 'deleted'
ON CONFLICT (file_uuid) DO NOTHING
""")

_DELETE_FILE_RECORDS = text(
    "DELETE FROM host_files WHERE uuid IN (SELECT file_uuid FROM job_files WHERE job_id = :job_id)"
)
_DELETE_KEY_BINDING = text("DELETE FROM tpm_key_bindings WHERE tpm_uuid = :tpm_uuid")
_DELETE_TPM = text("DELETE FROM tpms WHERE uuid = :tpm_uuid")

_FINISH_JOB = text("""
UPDATE jobs SET state = 'succeeded', finished_at = now(), lease_token = NULL, lease_expires_at = NULL,
    error = NULL, orphan_files = (SELECT count(*) FROM orphan_files WHERE job_id = :job_id)
WHERE id = :job_id
RETURNING orphan_files
""")


class Removal:
    """Runs removal jobs, given a session factory and an agent client; knows nothing of HTTP or claiming."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        agent: AgentClient,
        *,
        orphan_retry_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._agent = agent
        self._orphan_retry_seconds = orphan_retry_seconds

    async def run(self, claim: JobClaim, lease: LeaseClock) -> int:
        """Carry a claimed job to its end; the number of orphan files it left. Raises LeaseLostError."""
        hosts = await self.plan_removal(claim, lease)
        await self.delete_on_hosts(claim, lease, hosts)
        return await self.commit_cleanup(claim, lease)

    async def _fenced(self, claim: JobClaim, lease: LeaseClock, session: AsyncSession) -> None:
        sent_at = time.monotonic()
        try:
            await fence(session, claim, lease_seconds=lease.lease_seconds)
        except LeaseLostError:
            lease.lose()
            raise
        lease.renewed(sent_at)

    async def plan_removal(self, claim: JobClaim, lease: LeaseClock) -> list[HostPlan]:
        """Record the job's files and hosts once (a resumed job keeps its plan); the hosts still pending."""
        async with self._sessions() as session, session.begin():
            await self._fenced(claim, lease, session)
            params = {"job_id": claim.job_id, "vm_uuid": claim.vm_uuid}
            await session.execute(_PLAN, params)
            rows = await session.execute(_PENDING_FILES, params)
            plans: dict[UUID, HostPlan] = {}
            for row in rows:
                plan = plans.get(row.host_uuid)
                if plan is None:
                    plan = plans[row.host_uuid] = HostPlan(row.host_uuid, row.agent_url, [])
                plan.files.append(FileToDelete(path=row.path, type=row.type))
        return list(plans.values())

    async def delete_on_hosts(self, claim: JobClaim, lease: LeaseClock, hosts: list[HostPlan]) -> None:
        """Send every host its one delete call, all at once; record each outcome as it lands."""
        recorder = _OutcomeRecorder(lambda outcomes: self._record_outcomes(claim, lease, outcomes), hosts=len(hosts))

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

    async def _record_outcomes(
        self, claim: JobClaim, lease: LeaseClock, outcomes: list[tuple[UUID, HostDeleteResult]]
    ) -> None:
        async with self._sessions() as session, session.begin():
            await self._fenced(claim, lease, session)
            await session.execute(
                _RECORD_OUTCOMES,
                {
                    "job_id": claim.job_id,
                    "hosts": [host for host, _ in outcomes],
                    "states": ["deleted" if r.ok else "failed" for _, r in outcomes],
                    "errors": [r.error for _, r in outcomes],
                },
            )

    async def commit_cleanup(self, claim: JobClaim, lease: LeaseClock) -> int:
        """In one transaction: orphans and confirmations recorded, file records, key binding and TPM
        deleted, the job succeeded. The number of orphan files the job left."""
        params = {
            "job_id": claim.job_id,
            "vm_uuid": claim.vm_uuid,
            "tpm_uuid": claim.tpm_uuid,
            "retry": self._orphan_retry_seconds,
        }
        async with self._sessions() as session, session.begin():
            await self._fenced(claim, lease, session)
            await session.execute(_INSERT_ORPHANS, params)
            await session.execute(_INSERT_CONFIRMED, params)
            await session.execute(_DELETE_FILE_RECORDS, params)
            await session.execute(_DELETE_KEY_BINDING, params)
            await session.execute(_DELETE_TPM, params)
            orphans = (await session.execute(_FINISH_JOB, params)).scalar_one()
        return int(orphans)


class _OutcomeRecorder:
    """Group commit of host outcomes: whoever holds the lock writes every outcome that arrived meanwhile.

    With hundreds of hosts answering within milliseconds of each other, one fenced transaction per host
    would queue on the job row's lock; batching keeps the job's run time close to its slowest host.
    The first write lingers a moment for the job's other hosts, so that hosts answering at nearly the same time
    (most jobs: a few hosts, all healthy) share one transaction instead of one each; later writes go at once.
    """

    def __init__(self, write: Callable[[list[tuple[UUID, HostDeleteResult]]], Awaitable[None]], *, hosts: int) -> None:
        self._write = write
        self._pending: list[tuple[UUID, HostDeleteResult]] = []
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None
        self._unanswered = hosts
        self._all_answered = asyncio.Event()
        self._lingered = False

    async def record(self, host_uuid: UUID, result: HostDeleteResult) -> None:
        """Return once this outcome is durably written (by this call or by one before it)."""
        self._pending.append((host_uuid, result))
        self._unanswered -= 1
        if self._unanswered <= 0:
            self._all_answered.set()
        async with self._lock:
            if self._error is not None:
                raise self._error
            if not self._pending:
                return
            if not self._lingered:
                self._lingered = True
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._all_answered.wait(), OUTCOME_LINGER_SECONDS)
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except BaseException as error:
                self._error = error
                raise
