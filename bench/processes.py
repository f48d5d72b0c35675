"""The HTTP servers the benchmark measures, each run as a real process: started, awaited, weighed, stopped."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT_SECONDS = 60.0
_STOP_TIMEOUT_SECONDS = 40.0


class ServerProcess:
    """A server started as `python <args>`, with its output in a log file."""

    def __init__(self, process: asyncio.subprocess.Process, base_url: str, log_path: Path) -> None:
        self.process = process
        self.base_url = base_url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """The process id of the server."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the server and every process under it used so far, from /proc."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.process.pid))

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process under it, from /proc."""
        return sum(_rss_bytes(pid) for pid in _process_tree(self.process.pid))


@asynccontextmanager
async def running_server(
    args: Sequence[str], *, env: dict[str, str], port: int, ready_path: str, log_path: Path
) -> AsyncIterator[ServerProcess]:
    """Run `python <args>` from the repository root until the block ends; yields once `ready_path` answers 200."""
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=REPO_ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        await _wait_ready(server, ready_path)
        yield server
    finally:
        await _stop(process)


async def _wait_ready(server: ServerProcess, path: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.returncode is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}; see {server.log_path}")
            try:
                async with session.get(server.base_url + path) as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"server not ready after {_START_TIMEOUT_SECONDS:g}s; see {server.log_path}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()


def _process_tree(pid: int) -> list[int]:
    tree = [pid]
    for parent in tree:
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                tree += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass  # the task ended while we looked
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        # The fields after the command name (which may hold spaces) start at the state, field 3.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child_env(**values: str) -> dict[str, str]:
    """This process's environment without the service's secrets, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "AGENT_TOKEN", "DATABASE_URL")}
    env.update(values)
    return env
