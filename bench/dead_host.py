"""The "dead host" scenario: one host whose agent accepts connections and never answers, next to a healthy one.

Measured in one run against a service of its own (AGENT_TIMEOUT_SECONDS 2, orphan back-off from 1 s capped at 4 s):
how long removals that each touch the dead host take, how slow a removal of the healthy host alone gets while the
dead host's backlog is retried, how many calls the dead host receives per minute, and how soon its orphans are all
confirmed once it answers again.
"""

import asyncio
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from app.agent.server import create_agent_app
from bench.database import settle_disk
from bench.scenarios import fan_out_run, removal_run
from bench.seed import FileSpec, Seeder

# The service's settings in this scenario: the shape of the measurement.
SETTINGS = {"AGENT_TIMEOUT_SECONDS": "2", "ORPHAN_RETRY_SECONDS": "1", "ORPHAN_RETRY_MAX_SECONDS": "4"}
HEALTHY_ONLY_REMOVALS = 15
_DRAIN_POLL_SECONDS = 0.01


class HungAgent:
    """The shipped agent behind a hung front: it takes every call and answers none, until it is revived.

    Calls held when it is revived are answered then, as a hypervisor that resumes would. It notes when each call
    arrived, which is what the figures count.
    """

    def __init__(self, root: Path) -> None:
        self.revived = asyncio.Event()
        self.arrivals: list[float] = []
        self._app = create_agent_app(root, libvirt=None)
        self._app.middlewares.append(self._hang)

    @web.middleware
    async def _hang(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        await self.revived.wait()
        return await handler(request)

    def calls_between(self, start: float, end: float) -> int:
        """How many calls arrived from `start` to `end` (time.monotonic)."""
        return sum(start <= at < end for at in self.arrivals)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Serve on a free loopback port for the block; yields its URL."""
        runner = web.AppRunner(self._app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        try:
            await web.SockSite(runner, sock, backlog=1024).start()
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            self.revived.set()
            await runner.cleanup()


@dataclass(frozen=True)
class DeadHostFigures:
    """What one run of the scenario measured."""

    removals: int
    removals_seconds: float
    """From the first DELETE of the removals that touch the dead host to the last of their jobs finished."""
    quiet_median_seconds: float
    """Median of the healthy-only removals before the dead host had any backlog (DELETE sent to job seen ended)."""
    backlog_slowest_seconds: float
    """Slowest of the healthy-only removals while the dead host's backlog was retried."""
    backlog_median_seconds: float
    backlog_orphans: int
    window_seconds: float
    window_calls: int
    """Calls the dead host received in the window after the removals, while it was dead."""
    recovery_seconds: float
    """From the dead host answering again until its last orphan was confirmed."""

    @property
    def slowdown(self) -> float:
        """The slowest healthy-only removal during the backlog over the median without one."""
        return self.backlog_slowest_seconds / self.quiet_median_seconds

    @property
    def calls_per_minute(self) -> float:
        """Calls to the dead host per minute while it was dead."""
        return self.window_calls / self.window_seconds * 60


async def dead_host_run(
    http: aiohttp.ClientSession,
    database: asyncpg.Connection,
    seeder: Seeder,
    base_url: str,
    *,
    dead: HungAgent,
    dead_host: uuid.UUID,
    healthy_host: uuid.UUID,
    removals: int,
    window_seconds: float,
    concurrency: int,
) -> DeadHostFigures:
    """Measure the scenario against a service at `base_url` whose inventory has both hosts; its figures."""
    healthy_only = [[FileSpec(healthy_host, "TpmState")]] * HEALTHY_ONLY_REMOVALS
    warmup, quiet = await seeder.vms(healthy_only), await seeder.vms(healthy_only)
    # The service's first removals open its connections and prepare its statements: not what is compared.
    for vm in warmup:
        await fan_out_run(http, database, base_url, vm)
    await settle_disk(database)
    quiet_runs = [(await fan_out_run(http, database, base_url, vm)).caller_seconds for vm in quiet]

    touching = await seeder.vms([[FileSpec(dead_host, "TpmState"), FileSpec(healthy_host, "TpmState")]] * removals)
    removed = await removal_run(http, database, base_url, touching, concurrency=concurrency)
    backlog_orphans = await _orphans_on(database, dead_host)

    # The window: the healthy-only removals, spread over it, while the reaper works on the dead host's backlog.
    during = await seeder.vms(healthy_only)
    # The window's removals carry the cost of the backlog's retries, not the kernel's writeback of what the removals
    # above wrote, which lands about 30 s after them, in this window (settle_disk).
    await settle_disk(database)
    window_start = time.monotonic()
    backlog_runs = []
    for index, vm in enumerate(during):
        backlog_runs.append((await fan_out_run(http, database, base_url, vm)).caller_seconds)
        next_at = window_start + window_seconds * (index + 1) / len(during)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    window_end = time.monotonic()

    dead.revived.set()
    revived_at = time.perf_counter()
    while await _orphans_on(database, dead_host):
        await asyncio.sleep(_DRAIN_POLL_SECONDS)
    recovery = time.perf_counter() - revived_at

    return DeadHostFigures(
        removals=removed.succeeded,
        removals_seconds=removed.end_to_end_seconds,
        quiet_median_seconds=statistics.median(quiet_runs),
        backlog_slowest_seconds=max(backlog_runs),
        backlog_median_seconds=statistics.median(backlog_runs),
        backlog_orphans=backlog_orphans,
        window_seconds=window_end - window_start,
        window_calls=dead.calls_between(window_start, window_end),
        recovery_seconds=recovery,
    )


async def _orphans_on(database: asyncpg.Connection, host_uuid: uuid.UUID) -> int:
    count: int = await database.fetchval("SELECT count(*) FROM orphan_files WHERE host_uuid = $1", host_uuid)
    return count
