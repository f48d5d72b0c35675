"""Test helpers that run aiohttp applications (the shipped agent or hand-made peers) on loopback."""

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from app.agent.server import answer, create_agent_app
from app.protocol import DeleteFailed, DeleteSucceeded
from devtools.slow_agent import answering_after

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def running_app(app: web.Application, *, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve `app` on a free 127.0.0.1 port for the duration of the block (HTTPS with `ssl_context`); its base URL.

    A handler whose client went away is cancelled, and shutdown waits at most a second for
    the rest, so that a test which left a slow request behind does not stall the suite.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_agent(*roots: Path, token: str | None = None, delay_seconds: float = 0.0) -> AsyncIterator[str]:
    """Run the shipped host agent, confined to `roots`, on a free loopback port; yields its base URL.

    It runs as on a host without libvirt (`--libvirt-uri none`): locks alone say what is in use.
    """
    async with running_app(answering_after(create_agent_app(*roots, libvirt=None, token=token), delay_seconds)) as url:
        yield url


class RecordingAgent:
    """The shipped agent behind a recorder: counts calls and calls in flight, and can fail or hold calls.

    `mode` is "ok" (the real agent answers and deletes the files), or a failure: "http500",
    "success_false", "bad_json", "partial" (confirms none of the paths), or "slow" (answers as the
    real agent after `slow_seconds`). `hold` is an event the test clears to hold calls open. Every answer, whatever
    the mode, waits `answer_after_seconds` first (a failing agent that takes its time).
    """

    def __init__(
        self, root: Path, *, mode: str = "ok", slow_seconds: float = 0.0, answer_after_seconds: float = 0.0
    ) -> None:
        self.root = root
        self.mode = mode
        self.slow_seconds = slow_seconds
        self.answer_after_seconds = answer_after_seconds
        self.hold = asyncio.Event()
        self.hold.set()
        self.calls: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> web.Application:
        """The shipped agent's app with the recorder in front of its handler."""
        app = create_agent_app(self.root, libvirt=None)
        app.middlewares.append(self._record)
        return app

    @property
    def paths_sent(self) -> list[str]:
        """Every path named in any call, in order, repeats included."""
        return [f["path"] for call in self.calls for f in call["files"]]

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.calls.append(await request.json())  # the body stays readable for the handler
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.hold.wait()
            await asyncio.sleep(self.answer_after_seconds)
            if self.mode == "slow":
                await asyncio.sleep(self.slow_seconds)
            if self.mode == "http500":
                return web.Response(status=500, text="boom")
            if self.mode == "success_false":
                return answer(DeleteFailed(error="disk on fire"))
            if self.mode == "bad_json":
                return web.Response(text="{not json", content_type="application/json")
            if self.mode == "partial":
                return answer(DeleteSucceeded(deleted=[], missing=[]))
            return await handler(request)
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def running_recording_agent(root: Path, **kwargs: Any) -> AsyncIterator[tuple[str, RecordingAgent]]:
    """Run a RecordingAgent on a free loopback port; yields its URL and the agent."""
    agent = RecordingAgent(root, **kwargs)
    async with running_app(agent.app()) as url:
        yield url, agent
