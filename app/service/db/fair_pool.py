"""A connection pool that hands connections out in the order they were asked for.

SQLAlchemy's asyncio pool keeps its idle connections in an `asyncio.Queue`. A connection put back wakes the first
waiting checkout, but a checkout that comes in before that waiter runs takes the connection first, and the waiter
goes to the back of the line. Under a steady stream of requests, with more requests in flight than connections,
some DELETEs waited over a second while most got a connection at once (docs/BENCHMARK.md).

Here a connection put back while checkouts wait goes straight to the first of them, and a checkout takes an idle
connection only when nobody waits (then there is none to wait for). The waiter awaits its own future, so the
connection reaches it in one turn of the event loop; with `asyncio.wait_for` around it took three, the connection
idle meanwhile, and a quarter of the accepted DELETEs per second was lost.
"""

import asyncio
from collections import deque
from typing import Any

from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util import queue as sqla_queue
from sqlalchemy.util.concurrency import await_only

# Set instead of a connection when a waiting checkout has waited out the pool timeout.
_EXPIRED = object()


class _FairQueue(sqla_queue.AsyncAdaptedQueue[Any]):
    """The pool's idle connections, and the checkouts waiting for one, first come first served."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self._waiters: deque[asyncio.Future[Any]] = deque()

    def put_nowait(self, item: Any) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # one that gave up (timed out, cancelled) is passed over
                waiter.set_result(item)
                return
        super().put_nowait(item)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        # The pool never holds more connections than its size: putting one back never has to wait.
        self.put_nowait(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        # While anyone waits there is no idle connection: put_nowait hands each one over.
        try:
            return self.get_nowait()
        except sqla_queue.Empty:
            if not block:
                raise
        return await_only(self._wait_in_line(timeout))

    async def _wait_in_line(self, timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            connection = await waiter
        except BaseException:
            # Cancelled: a connection handed over at the same moment goes to the next in line, not astray.
            if waiter.done() and not waiter.cancelled() and waiter.result() is not _EXPIRED:
                self.put_nowait(waiter.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if connection is _EXPIRED:
            raise sqla_queue.Empty()
        return connection


def _expire(waiter: "asyncio.Future[Any]") -> None:
    if not waiter.done():
        waiter.set_result(_EXPIRED)


class FairAsyncQueuePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio pool, handing connections out first come first served (see the module)."""

    _queue_class = _FairQueue
