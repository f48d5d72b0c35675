"""The worker: claims jobs, renews their leases, hands each to the handler of its type, and runs periodic tasks.

It knows how to claim, lease, fence and retry a job, and nothing of what a job does: handlers and periodic tasks
are registered in app/service/main.py.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from app.service.backoff import Backoff
from app.service.db.engine import Engine, driver_connection, is_database_unavailable
from app.service.db.notify import Notifications, wait_for_any
from app.service.errors import LeaseLostError
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim, claim_jobs, record_job_failure, release_job, renew_leases
from app.service.metrics import JOBS_TOTAL

log = logging.getLogger(__name__)

JobHandler = Callable[[JobClaim, LeaseClock], Awaitable[None]]
"""Carries a claimed job to its end, its writes fenced by the claim. Raises LeaseLostError once the job is another
process's."""

PeriodicTask = Callable[[], Awaitable[float]]
"""One round of work the worker repeats while it takes work: answers the seconds to rest before the next round."""


class Worker:
    """Runs up to `max_jobs` jobs at once, each by the handler of its type, and the periodic tasks, until stopped."""

    def __init__(
        self,
        engine: Engine,
        notifications: Notifications,
        *,
        lease_seconds: float,
        poll_seconds: float,
        max_jobs: int,
        max_failures: int,
        backoff: Backoff,
    ) -> None:
        self._engine = engine
        self._notifications = notifications
        self._lease_seconds = lease_seconds
        self._poll_seconds = poll_seconds
        self._max_jobs = max_jobs
        self._max_failures = max_failures
        self._backoff = backoff
        self._handlers: dict[str, JobHandler] = {}
        self._periodic: dict[str, PeriodicTask] = {}
        self._running: dict[UUID, tuple[JobClaim, LeaseClock, asyncio.Task[None]]] = {}
        self.jobs_ended = 0
        """Jobs this process has run to an end, however they ended: the pace the pruner keeps up with."""
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []

    def handle(self, job_type: str, handler: JobHandler) -> None:
        """Run the jobs of `job_type` with `handler`."""
        self._handlers[job_type] = handler

    def repeat(self, name: str, task: PeriodicTask) -> None:
        """Run `task` round after round while the worker takes work; `name` says which in the logs."""
        self._periodic[name] = task

    def start(self) -> None:
        """Start claiming, renewing and the periodic tasks in the background."""
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim jobs"),
            asyncio.create_task(self._renew_loop(), name="renew leases"),
            *(asyncio.create_task(self._repeat(name, task), name=name) for name, task in self._periodic.items()),
        ]

    def stop_claiming(self) -> None:
        """Take no new job and start no new round of a periodic task from now on (the process was asked to stop);
        running work goes on."""
        self._stopping = True
        if self._loops:
            self._loops[0].cancel()

    async def stop(self, grace_seconds: float) -> None:
        """Take no new job; let running jobs finish within `grace_seconds`; hand the rest back at once."""
        self.stop_claiming()
        claim_loop, *other_loops = self._loops
        await asyncio.gather(claim_loop, return_exceptions=True)
        running = [task for _, _, task in self._running.values()]
        if running:
            await asyncio.wait(running, timeout=grace_seconds)
        unfinished = list(self._running.values())
        for _, _, task in unfinished:
            task.cancel()
        await asyncio.gather(*(task for _, _, task in unfinished), return_exceptions=True)
        for loop in other_loops:
            loop.cancel()
        await asyncio.gather(*other_loops, return_exceptions=True)
        for claim, _, _ in unfinished:
            try:
                async with driver_connection(self._engine) as connection:
                    await release_job(connection, claim)
                log.info("job handed back at shutdown", extra=claim.log_fields())
            except Exception as error:
                # Its lease runs out and another process takes it up: later, but nothing is lost.
                log.warning("could not hand job back", extra={**claim.log_fields(), "reason": repr(error)})

    async def _claim_loop(self) -> None:
        while True:
            self._notifications.job_queued.clear()
            self._slot_freed.clear()
            free = self._max_jobs - len(self._running)
            claims: list[JobClaim] = []
            if free > 0:
                try:
                    async with driver_connection(self._engine) as connection:
                        claims = await claim_jobs(connection, limit=free, lease_seconds=self._lease_seconds)
                except Exception as error:
                    _log_loop_error("claim", error)
                for claim in claims:
                    self._start_job(claim)
                if claims and len(claims) == free:
                    continue  # there may be more waiting; claim again once a slot frees
            waiters = [self._slot_freed] if free <= 0 or claims else []
            if free > 0:
                waiters.append(self._notifications.job_queued)
            await wait_for_any(waiters, timeout=self._poll_seconds)

    def _start_job(self, claim: JobClaim) -> None:
        lease = LeaseClock(self._lease_seconds)
        task = asyncio.create_task(self._run_job(claim, lease), name=f"job {claim.job_id}")
        self._running[claim.job_id] = (claim, lease, task)
        log.info("job claimed", extra={**claim.log_fields(), "attempt": claim.attempt})

    async def _run_job(self, claim: JobClaim, lease: LeaseClock) -> None:
        try:
            handler = self._handlers.get(claim.job_type)
            if handler is None:
                # A job type this process does not know (a newer replica's, during a rolling upgrade): it fails
                # the step like any other error, and is retried by a process that knows it.
                raise LookupError(f"no handler for job type {claim.job_type!r}")
            await handler(claim, lease)
            JOBS_TOTAL.labels(state="succeeded").inc()
            log.info("job succeeded", extra=claim.log_fields())
        except LeaseLostError:
            log.warning("job lease lost; another process owns it now, stopping", extra=claim.log_fields())
        except Exception as error:
            await self._job_failed(claim, error)
        finally:
            self.jobs_ended += 1
            self._running.pop(claim.job_id, None)
            self._slot_freed.set()

    async def _job_failed(self, claim: JobClaim, error: Exception) -> None:
        if is_database_unavailable(error):
            # An outage is no reason to fail a job: its lease runs out and it is taken up again.
            log.warning("job interrupted: database unavailable", extra={**claim.log_fields(), "reason": repr(error)})
            return
        log.exception("job step failed", extra=claim.log_fields())
        try:
            async with driver_connection(self._engine) as connection:
                state = await record_job_failure(
                    connection,
                    claim,
                    f"{type(error).__name__}: {error}"[:2000],
                    max_failures=self._max_failures,
                    backoff=self._backoff,
                )
            if state == "failed":
                JOBS_TOTAL.labels(state="failed").inc()
        except Exception as record_error:
            _log_loop_error("record job failure", record_error)

    async def _renew_loop(self) -> None:
        # A third of the lease: two renewals may be lost or late before the lease runs out.
        interval = self._lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._running.values())
            if not held:
                continue
            sent_at = time.monotonic()
            try:
                async with driver_connection(self._engine) as connection:
                    still_ours = await renew_leases(
                        connection, [claim for claim, _, _ in held], lease_seconds=self._lease_seconds
                    )
            except Exception as error:
                _log_loop_error("renew leases", error)
                continue
            for claim, lease, task in held:
                if claim.job_id in still_ours:
                    lease.renewed(sent_at)
                elif not task.done():
                    lease.lose()
                    task.cancel()
                    log.warning("job lease taken over; job stopped", extra=claim.log_fields())

    async def _repeat(self, name: str, task: PeriodicTask) -> None:
        # A stopping process starts no new round: work cut off at the end (claimed orphans, say) would wait out
        # its claim.
        while not self._stopping:
            try:
                rest = await task()
            except Exception as error:
                _log_loop_error(name, error)
                rest = self._poll_seconds
            await asyncio.sleep(rest)


def _log_loop_error(what: str, error: Exception) -> None:
    if is_database_unavailable(error):
        log.warning("%s: database unavailable, will retry", what, extra={"reason": repr(error)})
    else:
        log.error("%s failed", what, exc_info=error)
