"""PostgreSQL LISTEN/NOTIFY for the process: wakes the worker for new jobs and long-polls for changed jobs.

The notifications come from triggers on the job tables (see the first migration), so they reach every
replica whichever one made the change. One dedicated connection serves the whole process; waiting
callers hold no database connection, only an asyncio.Event.
"""

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

JOB_QUEUED = "tpm_job_queued"
JOB_CHANGED = "tpm_job_changed"
_HEALTH_CHECK_SECONDS = 2.0


class Notifications:
    """Keeps one LISTEN connection open (reconnecting after outages) and fans its notifications out."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.job_queued = asyncio.Event()
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    @asynccontextmanager
    async def watch_job(self, job_id: object) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the job may have changed; subscribe *before* reading the job."""
        event = asyncio.Event()
        key = str(job_id)
        self._watchers[key].add(event)
        try:
            yield event
        finally:
            watchers = self._watchers[key]
            watchers.discard(event)
            if not watchers:
                del self._watchers[key]

    async def run(self) -> None:
        """Listen until cancelled; after a lost connection, wake everyone (they re-read) and reconnect."""
        delay = 0.5
        while True:
            try:
                connection = await asyncpg.connect(self._dsn, timeout=3)
            except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                log.debug("listen connection failed", extra={"reason": repr(error)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            try:
                await connection.add_listener(JOB_QUEUED, self._on_job_queued)
                await connection.add_listener(JOB_CHANGED, self._on_job_changed)
                # Anything that happened while we were not listening is picked up by a re-read.
                self._wake_everyone()
                while True:
                    await asyncio.sleep(_HEALTH_CHECK_SECONDS)
                    await connection.fetchval("SELECT 1", timeout=_HEALTH_CHECK_SECONDS)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                log.warning("listen connection lost", extra={"reason": repr(error)})
            finally:
                connection.terminate()
                self._wake_everyone()

    def _on_job_queued(self, _connection: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.job_queued.set()

    def _on_job_changed(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        for event in self._watchers.get(payload, ()):
            event.set()

    def _wake_everyone(self) -> None:
        self.job_queued.set()
        for watchers in self._watchers.values():
            for event in watchers:
                event.set()


async def wait_for_any(events: list[asyncio.Event], *, timeout: float) -> None:
    """Wait until the first of `events` is set, or `timeout` seconds have passed."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
