"""`python -m bench.agent_calls`: the fan-out's host calls alone, from a process of their own.

The calls a removal job makes to its hosts, through the service's `AgentClient` on a session set up as the
service sets up its own, all at once with `asyncio.gather`, but with no service, database or plan around them:
the floor that this machine and a fleet of simulated hosts in one process put under the fan-out ratio. Reads the
agents' URLs on stdin, one per line; prints JSON: each run's wall time in seconds, and this process's CPU time per
call in milliseconds.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from app.agent_client import AgentClient, FileToDelete, agent_session
from app.cli import tune_garbage_collector
from bench import loop


async def call_all(urls: list[str], root: Path, runs: int) -> dict[str, object]:
    """Ask every agent to delete one file (missing, under `root`) of a new VM, `runs` times; each run's seconds
    and the CPU time per call."""
    async with agent_session(len(urls)) as http:
        agent = AgentClient(http, timeout_seconds=10, concurrency=len(urls))
        seconds = []
        cpu_started = time.process_time()
        for _ in range(runs):
            vm_uuid = uuid.uuid4()
            files = [FileToDelete(path=str(root / str(vm_uuid) / "state.permall"), type="TpmState")]
            started = time.perf_counter()
            results = await asyncio.gather(*(agent.delete_files(url, vm_uuid, files) for url in urls))
            seconds.append(time.perf_counter() - started)
            if failed := [r.error for r in results if not r.ok]:
                raise RuntimeError(f"{len(failed)} agent calls failed, e.g. {failed[0]}")
        cpu_ms_per_call = (time.process_time() - cpu_started) * 1000 / (runs * len(urls))
        return {"seconds": seconds, "cpu_ms_per_call": cpu_ms_per_call}


def main() -> None:
    """Parse the command line, make the calls, print the timings."""
    parser = argparse.ArgumentParser(prog="python -m bench.agent_calls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the agents' root folder")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    urls = [line.strip() for line in sys.stdin if line.strip()]
    # The collector as `serve` sets it, so that the calls cost what they cost in the service.
    tune_garbage_collector()
    print(json.dumps(loop.run(call_all(urls, args.root, args.runs))))


if __name__ == "__main__":
    main()
