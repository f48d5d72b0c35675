"""The load generator: sends a list of requests with a fixed number in flight and times them."""

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp


@dataclass
class LoadResult:
    """What a batch of requests came to: wall-clock start and end, answers by status, per-request latencies."""

    started: float
    ended: float
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    retried: int = 0
    """Answers 503 (the service shedding load) that were sent again at once; not in `statuses`."""

    @property
    def count(self) -> int:
        """How many requests were answered."""
        return sum(self.statuses.values())

    @property
    def per_second(self) -> float:
        """Answers per second over the whole batch."""
        return self.count / (self.ended - self.started)

    def latency_ms(self, quantile: float) -> float:
        """A latency quantile (0 < quantile < 1) in milliseconds."""
        cuts = statistics.quantiles(self.latencies, n=100)
        return cuts[round(quantile * 100) - 1] * 1000


def client_session(concurrency: int) -> aiohttp.ClientSession:
    """An HTTP client that keeps one connection per request in flight."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0))


async def send_all(session: aiohttp.ClientSession, method: str, urls: Sequence[str], *, concurrency: int) -> LoadResult:
    """Send `method` to every URL, `concurrency` at a time; `started` is when the first request went out
    (wall clock, comparable with the database's timestamps), `ended` when the last answer came in."""
    pending = iter(urls)
    result = LoadResult(started=time.time(), ended=0.0)

    async def sender() -> None:
        for url in pending:
            sent = time.perf_counter()
            while True:
                async with session.request(method, url) as answer:
                    await answer.read()
                if answer.status != 503:
                    break
                result.retried += 1
            result.latencies.append(time.perf_counter() - sent)
            result.statuses[answer.status] += 1

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    result.ended = time.time()
    return result


async def send_at_rate(
    session: aiohttp.ClientSession, method: str, urls: Sequence[str], *, per_second: float, until: asyncio.Event
) -> LoadResult:
    """Send `method` to the URLs at a fixed rate, whatever the answers take (an open loop), until `until` is set or
    the URLs run out; wait for the answers. Each latency runs from when its request was due, so that a slow answer
    that holds up the ones after it counts against them too (no coordinated omission)."""
    result = LoadResult(started=time.time(), ended=0.0)
    in_flight: set[asyncio.Task[None]] = set()

    async def send(url: str, due: float) -> None:
        async with session.request(method, url) as answer:
            await answer.read()
        result.latencies.append(time.perf_counter() - due)
        result.statuses[answer.status] += 1

    first = time.perf_counter()
    for index, url in enumerate(urls):
        due = first + index / per_second
        if until.is_set():
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(send(url, due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    result.ended = time.time()
    return result
