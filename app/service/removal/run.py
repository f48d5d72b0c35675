"""What a removal job does: plan the files, delete them on every host at once, clean up in one transaction.

Both job types that remove a VM's host files run here, each with its scope: a TPM removal (`remove-tpm`) takes the
files that go with the TPM, a VM's deletion (`delete-vm`) takes every file of the VM and the VM itself.

Host calls come before the database transaction, never after it: a record is deleted only once its
file's fate is known (confirmed gone, or kept as an orphan to retry), so nothing on a host is ever left
without a record pointing at it. The key-provider binding goes in that same transaction as the records,
so a TPM state file is never left on disk without the binding of the key that can read it while
its deletion is unconfirmed. A host that is failing (app/service/orphans/health.py) is not called: its files
become orphans at once, and its probes tell when it answers again. Every write is fenced by the job's lease token
(see app/service/jobs/queue.py); the statements are in queries.sql beside this module.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg

from app.service.agent_client import AgentClient, FileToDelete, HostDeleteResult, not_called
from app.service.backoff import Backoff
from app.service.db.engine import Engine
from app.service.db.queries import NamedStatements
from app.service.errors import LeaseLostError
from app.service.jobs.fenced import run_fenced
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim
from app.service.orphans.health import log_health_changes

log = logging.getLogger(__name__)

STATEMENTS = NamedStatements(__file__)


@dataclass(frozen=True)
class RemovalScope:
    """What a job type removes: which of the VM's host files, and whether the VM itself goes too."""

    every_file: bool
    """Every host file of the VM, whatever its type and secure boot; else those that go with its TPM."""
    vm: bool
    """The VM's record goes in the cleanup, with its TPM and key binding."""


TPM_REMOVAL = RemovalScope(every_file=False, vm=False)
"""`remove-tpm`: the TPM, its key binding, its state files and secrets, and NVRAM unless the VM uses secure boot."""
VM_DELETION = RemovalScope(every_file=True, vm=True)
"""`delete-vm`: every host file of the VM, its TPM and key binding if it has one, and the VM."""


@dataclass(frozen=True)
class HostPlan:
    """The files of one host that a job still has to delete there."""

    host_uuid: UUID
    agent_url: str
    files: list[FileToDelete]
    failing: HostDeleteResult | None
    """The outcome of a host that is failing: not called, saying since when and why; None while it is ok."""


def vm_of(claim: JobClaim) -> UUID:
    """The VM a removal job removes files of."""
    return UUID(claim.payload["vm_uuid"])


# How long the first outcome of a batch waits for the job's other hosts before it is written without them.
OUTCOME_LINGER_SECONDS = 0.02


def _outcome_params(outcomes: Sequence[tuple[UUID, HostDeleteResult]]) -> dict[str, list[Any]]:
    return {
        "hosts": [str(host) for host, _ in outcomes],
        "states": ["deleted" if result.ok else "failed" for _, result in outcomes],
        "errors": [result.error for _, result in outcomes],
        "contacts": [result.contact for _, result in outcomes],
    }


class Removal:
    """Runs the removal jobs of one scope, given a database engine and an agent client; knows nothing of HTTP or
    claiming."""

    def __init__(self, engine: Engine, agent: AgentClient, *, scope: RemovalScope, backoff: Backoff) -> None:
        self._engine = engine
        self._agent = agent
        self._scope = scope
        self._backoff = backoff
        """The back-off of orphans and of a failing host's probes."""

    async def run(self, claim: JobClaim, lease: LeaseClock) -> None:
        """Carry a claimed job to its end. Raises LeaseLostError."""
        hosts = await self.plan_removal(claim, lease)
        last_outcomes = await self.delete_on_hosts(claim, lease, hosts)
        await self.commit_cleanup(claim, lease, last_outcomes)

    async def _fenced(
        self, claim: JobClaim, lease: LeaseClock, name: str, params: dict[str, Any]
    ) -> list[asyncpg.Record]:
        """Run one of the removal's fenced statements (app/service/jobs/fenced.py)."""
        return await run_fenced(self._engine, STATEMENTS, claim, lease, name, params)

    async def plan_removal(self, claim: JobClaim, lease: LeaseClock) -> list[HostPlan]:
        """Record the job's files and hosts once (a resumed job keeps its plan); the hosts still pending."""
        params = {"vm_uuid": vm_of(claim), "every_file": self._scope.every_file}
        rows = await self._fenced(claim, lease, "plan", params)
        plans: dict[UUID, HostPlan] = {}
        for host_uuid, agent_url, path, file_type, failing_since, last_error in rows:
            if host_uuid is None:  # the job has no file (left) to delete
                continue
            plan = plans.get(host_uuid)
            if plan is None:
                failing = None if failing_since is None else not_called(failing_since, last_error)
                plan = plans[host_uuid] = HostPlan(host_uuid, agent_url, [], failing)
            plan.files.append(FileToDelete(path=path, type=file_type))
        return list(plans.values())

    async def delete_on_hosts(
        self, claim: JobClaim, lease: LeaseClock, hosts: list[HostPlan]
    ) -> list[tuple[UUID, HostDeleteResult]]:
        """Send every host its one delete call, all at once; record each outcome as it lands.

        The outcomes that came last, with no host left to wait for, are not written here but returned: the
        cleanup records them in its own statement.
        """

        async def record_outcomes(outcomes: list[tuple[UUID, HostDeleteResult]]) -> None:
            params = {**self._backoff.probe_params(), **_outcome_params(outcomes)}
            (row,) = await self._fenced(claim, lease, "record_outcomes", params)
            log_health_changes(row["health_changes"], claim.log_fields())

        recorder = _OutcomeRecorder(record_outcomes, hosts=len(hosts))

        async def delete_on_host(host: HostPlan) -> None:
            if not lease.valid():
                raise LeaseLostError(f"job {claim.job_id}: lease may have run out, host not called")
            if host.failing is None:
                result = await self._agent.delete_files(
                    host.agent_url, vm_of(claim), host.files, host_uuid=host.host_uuid
                )
            else:
                result = host.failing
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
        binding and TPM (and the VM, if the scope says so) deleted, the job succeeded. The number of orphan files
        the job left."""
        params = {
            "vm_uuid": vm_of(claim),
            "delete_vm": self._scope.vm,
            "orphan_delay": self._backoff.delay(1),
            **self._backoff.probe_params(),
            **_outcome_params(last_outcomes),
        }
        (row,) = await self._fenced(claim, lease, "cleanup", params)
        log_health_changes(row["health_changes"], claim.log_fields())
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
