"""Test helpers that run aiohttp applications (the shipped agent or hand-made peers) on loopback."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from app.agent_server import create_agent_app


@asynccontextmanager
async def running_app(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free 127.0.0.1 port for the duration of the block; yields its base URL.

    A handler whose client went away is cancelled, and shutdown waits at most a second for
    the rest, so that a test which left a slow request behind does not stall the suite.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_agent(root: Path, *, token: str | None = None, delay_seconds: float = 0.0) -> AsyncIterator[str]:
    """Run the shipped host agent, confined to `root`, on a free loopback port; yields its base URL."""
    async with running_app(create_agent_app(root, token=token, delay_seconds=delay_seconds)) as url:
        yield url
