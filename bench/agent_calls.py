"""`python -m bench.agent_calls`: the fan-out's host calls alone, from a process of their own.

The calls a removal job makes to its hosts, through the service's `AgentClient` on a session set up as the
service sets up its own, all at once with `asyncio.gather`, but with no service, database or plan around them:
the floor that this machine and a fleet of simulated hosts in one process put under the fan-out ratio. With
`--bare`, the same requests through aiohttp alone, without AgentClient's checks, timer and metrics: the floor under
that. Reads the agents' URLs on stdin, one per line; prints JSON: each run's wall time in seconds, and this
process's CPU time per call in milliseconds.
"""

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from app.protocol import DELETE_PATH
from app.service.agent_client import AgentClient, FileToDelete, agent_session, agent_ssl_context
from app.service.commands import tune_garbage_collector
from bench import loop

# One delete call: agent URL, VM and files in; whether the agent confirmed, or why not, out.
Call = Callable[[str, uuid.UUID, list[FileToDelete]], Awaitable[str | None]]


def agent_client_call(http: aiohttp.ClientSession, concurrency: int) -> Call:
    """A call as the service makes it, through AgentClient."""
    agent = AgentClient(http, timeout_seconds=10, concurrency=concurrency)

    async def call(url: str, vm_uuid: uuid.UUID, files: list[FileToDelete]) -> str | None:
        return (await agent.delete_files(url, vm_uuid, files)).error

    return call


def bare_call(http: aiohttp.ClientSession) -> Call:
    """The same request through aiohttp alone: the body sent, the answer read, its status checked."""

    async def call(url: str, vm_uuid: uuid.UUID, files: list[FileToDelete]) -> str | None:
        body = {"vm_uuid": str(vm_uuid), "files": [{"path": f.path, "type": f.type} for f in files]}
        async with http.post(f"{url}{DELETE_PATH}", json=body) as response:
            await response.read()
        return None if response.status == 200 else f"HTTP {response.status}"

    return call


async def call_all(urls: list[str], root: Path, runs: int, *, bare: bool) -> dict[str, object]:
    """Ask every agent to delete one file (missing, under `root`) of a new VM, `runs` times; each run's seconds
    and the CPU time per call."""
    async with agent_session(len(urls), agent_ssl_context()) as http:
        call = bare_call(http) if bare else agent_client_call(http, len(urls))
        seconds = []
        cpu_started = time.process_time()
        for _ in range(runs):
            vm_uuid = uuid.uuid4()
            files = [FileToDelete(path=str(root / str(vm_uuid) / "state.permall"), type="TpmState")]
            started = time.perf_counter()
            errors = await asyncio.gather(*(call(url, vm_uuid, files) for url in urls))
            seconds.append(time.perf_counter() - started)
            if failed := [error for error in errors if error is not None]:
                raise RuntimeError(f"{len(failed)} agent calls failed, e.g. {failed[0]}")
        cpu_ms_per_call = (time.process_time() - cpu_started) * 1000 / (runs * len(urls))
        return {"seconds": seconds, "cpu_ms_per_call": cpu_ms_per_call}


def main() -> None:
    """Parse the command line, make the calls, print the timings."""
    parser = argparse.ArgumentParser(prog="python -m bench.agent_calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the agents' root folder")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--bare", action="store_true", help="aiohttp alone, without AgentClient")
    args = parser.parse_args()
    urls = [line.strip() for line in sys.stdin if line.strip()]
    # Only errors: AgentClient's warning about each plain-HTTP agent would come between the report's lines.
    logging.basicConfig(level=logging.ERROR)
    # The collector as `serve` sets it, so that the calls cost what they cost in the service.
    tune_garbage_collector()
    print(json.dumps(loop.run(call_all(urls, args.root, args.runs, bare=args.bare))))


if __name__ == "__main__":
    main()
