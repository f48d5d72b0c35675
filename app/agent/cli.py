"""`python -m app agent` (or `vtpm-agent`): the host agent's command line.

It uses argparse, not the service's typer and rich: the agent runs as root on every KVM host and loads
nothing but aiohttp, pydantic and the standard library (tests/test_layout.py checks it).
"""

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from app.agent.libvirt import DEFAULT_LIBVIRT_URI, NO_LIBVIRT_URI, libvirt_at
from app.agent.server import serve_agent
from app.agent.tls import TlsFileError, add_tls_options, ssl_context_from_options
from app.agent.tracing import TraceIdFilter


def parser() -> argparse.ArgumentParser:
    """The agent's options, as CONTRACT.md names them."""
    options = argparse.ArgumentParser(
        prog="python -m app agent",
        description="Run the host agent that deletes a VM's TPM state and NVRAM under its roots, and its vTPM secrets.",
    )
    options.add_argument(
        "--root",
        dest="roots",
        metavar="ROOT",
        type=Path,
        action="append",
        required=True,
        help="only paths whose real path lies under one of these folders are deleted; give it once per folder",
    )
    options.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    options.add_argument("--port", type=int, default=8100, help="port to listen on (default: %(default)s)")
    options.add_argument(
        "--token",
        default=os.environ.get("AGENT_TOKEN"),
        help="bearer token callers must send (default: the AGENT_TOKEN environment variable)",
    )
    options.add_argument(
        "--libvirt-uri",
        default=DEFAULT_LIBVIRT_URI,
        help=(
            "libvirt connection that Secret files are undefined and active domains listed through"
            f" (default: %(default)s); {NO_LIBVIRT_URI!r} for a host without libvirt, where locks alone say what is"
            " in use"
        ),
    )
    add_tls_options(options)
    options.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"), help="default: %(default)s")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options and serve until interrupted."""
    options = parser().parse_args(argv)
    for root in options.roots:
        if not root.is_dir():
            parser().error(f"--root: {root} is not a directory")
    try:
        ssl_context = ssl_context_from_options(options)
    except TlsFileError as error:
        parser().error(str(error))
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s%(trace_id_field)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceIdFilter())
    with suppress(KeyboardInterrupt):
        asyncio.run(
            serve_agent(
                options.roots,
                host=options.host,
                port=options.port,
                token=options.token,
                libvirt=libvirt_at(options.libvirt_uri),
                ssl_context=ssl_context,
            )
        )
