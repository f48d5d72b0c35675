"""A slow host for the tests and the benchmark: an agent app that holds every answer back a while."""

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web


def answering_after(app: web.Application, delay_seconds: float) -> web.Application:
    """`app` (the shipped agent's), holding every answer back `delay_seconds` before its handler runs."""
    if delay_seconds <= 0:
        return app

    @web.middleware
    async def delay(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        await asyncio.sleep(delay_seconds)
        return await handler(request)

    app.middlewares.append(delay)
    return app
