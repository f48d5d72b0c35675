"""A fleet of host agents inside the benchmark process: the shipped agent app, listening on many ports."""

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from app.agent.server import create_agent_app
from devtools.slow_agent import answering_after


@asynccontextmanager
async def agent_fleet(
    root: Path, *, hosts: int, delay_seconds: float, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[list[str]]:
    """Serve the shipped agent, confined to `root`, on `hosts` free loopback ports; yields one URL per port.

    With `ssl_context` the agents serve HTTPS only, as `python -m app agent --tls-cert ...` does. The hosts have
    no libvirt (`--libvirt-uri none`): locks alone say what is in use.

    One application serves every port: each port is a separate host to the service (its own URL, its own
    connections), while the benchmark process keeps one event loop for the whole fleet.
    """
    runner = web.AppRunner(answering_after(create_agent_app(root, libvirt=None), delay_seconds), access_log=None)
    await runner.setup()
    urls = []
    try:
        for _ in range(hosts):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            site = web.SockSite(runner, sock, backlog=1024, ssl_context=ssl_context)
            await site.start()
            urls.append(f"{'https' if ssl_context else 'http'}://127.0.0.1:{sock.getsockname()[1]}")
        yield urls
    finally:
        await runner.cleanup()
