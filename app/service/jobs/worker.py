"""The worker inside every `serve` process: claims jobs, keeps their leases, runs the orphan reaper, prunes jobs.

Nothing here knows what a job does: it hands each claimed job to the handler registered for the job's `type`
(app/service/main.py registers them). Adding a job type means adding a handler, not a branch here.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from app.service.db.engine import create_session_factory, driver_connection, is_database_unavailable
from app.service.db.notify import Notifications, wait_for_any
from app.service.errors import LeaseLostError
from app.service.jobs.lease import LeaseClock
from app.service.jobs.queue import JobClaim, claim_jobs, prune_jobs, record_job_failure, release_job, renew_leases
from app.service.jobs.retention import PRUNE_BATCH_JOBS, rest_after_batch
from app.service.metrics import JOBS_TOTAL, refresh_gauges
from app.service.orphans.reaper import OrphanReaper

log = logging.getLogger(__name__)

_GAUGE_REFRESH_SECONDS = 5.0
# Finished jobs are counted every twelfth refresh (a minute): counting them is a scan of the retained jobs.
_FINISHED_JOBS_EVERY_REFRESHES = 12

JobHandler = Callable[[JobClaim, LeaseClock], Awaitable[int]]
"""Carries a claimed job to its end, its writes fenced by the claim; the number of orphan files it left.
Raises LeaseLostError once the job is another process's."""


class Worker:
    """Runs up to `max_jobs` jobs at once, each by the handler of its type, and the orphan reaper, until stopped."""

    def __init__(
        self,
        engine: AsyncEngine,
        handlers: Mapping[str, JobHandler],
        reaper: OrphanReaper,
        notifications: Notifications,
        *,
        lease_seconds: float,
        retention_seconds: float,
        poll_seconds: float,
        max_jobs: int,
        max_failures: int,
    ) -> None:
        self._engine = engine
        self._sessions = create_session_factory(engine)
        self._handlers = dict(handlers)
        self._reaper = reaper
        self._notifications = notifications
        self._lease_seconds = lease_seconds
        self._retention_seconds = retention_seconds
        self._poll_seconds = poll_seconds
        self._max_jobs = max_jobs
        self._max_failures = max_failures
        self._running: dict[UUID, tuple[JobClaim, LeaseClock, asyncio.Task[None]]] = {}
        self._jobs_ended = 0
        """Jobs this process has run to an end, however they ended: the pace the pruner keeps up with."""
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start claiming, renewing, reaping, pruning and gauge refreshing in the background."""
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim jobs"),
            asyncio.create_task(self._renew_loop(), name="renew leases"),
            asyncio.create_task(self._reap_loop(), name="retry orphans"),
            asyncio.create_task(self._prune_loop(), name="prune jobs"),
            asyncio.create_task(self._gauge_loop(), name="refresh gauges"),
        ]

    def stop_claiming(self) -> None:
        """Take no new job and no new orphan from now on (the process was asked to stop); running work goes on."""
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
                async with self._sessions() as session, session.begin():
                    await release_job(session, claim)
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
            orphans = await handler(claim, lease)
            JOBS_TOTAL.labels(state="succeeded").inc()
            log.info("job succeeded", extra={**claim.log_fields(), "orphan_files": orphans})
        except LeaseLostError:
            log.warning("job lease lost; another process owns it now, stopping", extra=claim.log_fields())
        except Exception as error:
            await self._job_failed(claim, error)
        finally:
            self._jobs_ended += 1
            self._running.pop(claim.job_id, None)
            self._slot_freed.set()

    async def _job_failed(self, claim: JobClaim, error: Exception) -> None:
        if is_database_unavailable(error):
            # An outage is no reason to fail a job: its lease runs out and it is taken up again.
            log.warning("job interrupted: database unavailable", extra={**claim.log_fields(), "reason": repr(error)})
            return
        log.exception("job step failed", extra=claim.log_fields())
        try:
            async with self._sessions() as session, session.begin():
                state = await record_job_failure(
                    session, claim, f"{type(error).__name__}: {error}"[:2000], max_failures=self._max_failures
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
                async with self._sessions() as session, session.begin():
                    still_ours = await renew_leases(
                        session, [claim for claim, _, _ in held], lease_seconds=self._lease_seconds
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

    async def _reap_loop(self) -> None:
        # A stopping process claims no more orphans: ones cut off at the end would wait out their claim hold.
        while not self._stopping:
            try:
                tried = await self._reaper.retry_due()
            except Exception as error:
                _log_loop_error("retry orphans", error)
                tried = 0
            if not tried:
                await asyncio.sleep(self._poll_seconds)

    async def _prune_loop(self) -> None:
        ended, since = self._jobs_ended, time.monotonic()
        while True:
            started = time.monotonic()
            try:
                pruned = await self.prune_once()
            except Exception as error:
                _log_loop_error("prune jobs", error)
                pruned = 0
            now = time.monotonic()
            finished_per_second = (self._jobs_ended - ended) / (now - since)
            ended, since = self._jobs_ended, now
            if pruned < PRUNE_BATCH_JOBS:
                await asyncio.sleep(self._poll_seconds)
            else:
                # More are due: a rest between batches keeps the requests and jobs meanwhile from queueing behind a
                # backlog's pruning, as long as the pruning keeps up with the jobs that finish (jobs/retention.py).
                await asyncio.sleep(
                    rest_after_batch(
                        pruned=pruned, batch_seconds=now - started, finished_per_second=finished_per_second
                    )
                )

    async def prune_once(self) -> int:
        """Delete one batch of jobs past their retention; how many went."""
        async with driver_connection(self._engine) as connection:
            pruned = await prune_jobs(connection, retention_seconds=self._retention_seconds, limit=PRUNE_BATCH_JOBS)
        if pruned:
            log.info("finished jobs pruned", extra={"jobs": pruned})
        return pruned

    async def _gauge_loop(self) -> None:
        for refresh in itertools.count():
            try:
                async with self._sessions() as session:
                    await refresh_gauges(session, finished_jobs=refresh % _FINISHED_JOBS_EVERY_REFRESHES == 0)
            except Exception as error:
                _log_loop_error("refresh gauges", error)
            await asyncio.sleep(_GAUGE_REFRESH_SECONDS)


def _log_loop_error(what: str, error: Exception) -> None:
    if is_database_unavailable(error):
        log.warning("%s: database unavailable, will retry", what, extra={"reason": repr(error)})
    else:
        log.error("%s failed", what, exc_info=error)
