"""Periodic scans: every host is scanned once per HOST_SCAN_INTERVAL_SECONDS, by one replica, spread over the
interval (a periodic task of the worker, registered in app/service/main.py)."""

import logging

from app.service.db.engine import Engine, driver_connection
from app.service.jobs.types import JobType
from app.service.scan.run import STATEMENTS

log = logging.getLogger(__name__)

# Most scans one round queues: a round that queued this many looks again at once.
SCANS_PER_ROUND = 100


class PeriodicScans:
    """Queues the scan of each host whose turn it is."""

    def __init__(self, engine: Engine, *, interval_seconds: float, poll_seconds: float) -> None:
        self._engine = engine
        self._interval_seconds = interval_seconds
        self._poll_seconds = poll_seconds

    async def run_once(self) -> float:
        """Queue the scans that are due; the seconds to rest before the next round."""
        params = {"interval": self._interval_seconds, "limit": SCANS_PER_ROUND, "job_type": JobType.SCAN_HOST.value}
        async with driver_connection(self._engine) as connection:
            await STATEMENTS.run(connection, "spread_new_hosts", params)
            queued = await STATEMENTS.run(connection, "queue_due_scans", params)
        if queued:
            log.info("periodic scans queued", extra={"jobs": len(queued)})
        return 0.0 if len(queued) == SCANS_PER_ROUND else self._poll_seconds
