"""Retention: the pruner of finished jobs, gentle through a backlog, never slower than this process finishes jobs.

A backlog (a first start with retention, a long outage's jobs coming due together) is pruned with a rest after each
batch of GENTLE_REST_FACTOR times the batch's time, so that its disk writes do not queue the requests meanwhile
(docs/BENCHMARK.md). A gentle pace alone falls behind a service removing at full speed, and its tables would grow
without end; so the rest is cut as far as it takes to prune CATCH_UP times as many jobs as this process finished
meanwhile, down to none.
"""

import logging
import time
from collections.abc import Callable

from app.service.db.engine import Engine, driver_connection
from app.service.jobs.queue import prune_jobs

log = logging.getLogger(__name__)

# Jobs pruned per statement: small enough that each statement holds its row locks and writes its WAL for
# milliseconds, so that a backlog drains in small steps.
PRUNE_BATCH_JOBS = 100
GENTLE_REST_FACTOR = 19.0
# More than 1, so that a pruner that fell behind (a burst, a slow disk) catches up rather than staying behind.
CATCH_UP = 1.5


def rest_after_batch(*, pruned: int, batch_seconds: float, finished_per_second: float) -> float:
    """Seconds to rest after a full batch of `pruned` jobs that took `batch_seconds`, while this process finishes
    `finished_per_second` jobs."""
    gentle = GENTLE_REST_FACTOR * batch_seconds
    if finished_per_second <= 0:
        return gentle
    # Keeping up means a batch of `pruned` every pruned / (CATCH_UP * rate) seconds, the batch's own time included.
    keeping_up = pruned / (CATCH_UP * finished_per_second) - batch_seconds
    return max(0.0, min(gentle, keeping_up))


class Pruner:
    """Deletes finished jobs past their retention, one batch per round, at the pace above (a periodic task)."""

    def __init__(
        self, engine: Engine, *, retention_seconds: float, poll_seconds: float, jobs_ended: Callable[[], int]
    ) -> None:
        self._engine = engine
        self._retention_seconds = retention_seconds
        self._poll_seconds = poll_seconds
        self._jobs_ended = jobs_ended
        self._ended, self._since = jobs_ended(), time.monotonic()

    async def prune_once(self) -> int:
        """Delete one batch of jobs past their retention; how many went."""
        async with driver_connection(self._engine) as connection:
            pruned = await prune_jobs(connection, retention_seconds=self._retention_seconds, limit=PRUNE_BATCH_JOBS)
        if pruned:
            log.info("finished jobs pruned", extra={"jobs": pruned})
        return pruned

    async def run_once(self) -> float:
        """Prune one batch; the seconds to rest before the next."""
        started = time.monotonic()
        pruned = await self.prune_once()
        now = time.monotonic()
        ended = self._jobs_ended()
        finished_per_second = (ended - self._ended) / (now - self._since)
        self._ended, self._since = ended, now
        if pruned < PRUNE_BATCH_JOBS:
            return self._poll_seconds
        return rest_after_batch(pruned=pruned, batch_seconds=now - started, finished_per_second=finished_per_second)
