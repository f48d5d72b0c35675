"""Fault-test harness: `serve` as real processes on a database of the test's own, and agents that log every call.

The service runs as `python -m app serve` subprocesses (devtools.local_stack) so that a test can SIGKILL,
SIGSTOP, SIGCONT and SIGTERM it like an operator or a crash would. The agents run in the test's event loop:
the shipped agent (deleting real files) behind a recorder that logs when each request came and went, whether
it confirmed its paths, and that can hold the next requests open until the test releases them.
"""

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.service.audit import AuditReport, audit
from app.service.db.engine import create_engine, create_session_factory
from app.service.db.migrate import upgrade
from devtools.local_stack import LocalProcess, service_process, wait_until
from tests.agent_helpers import Handler, RecordingAgent, running_app
from tests.conftest import create_database
from tests.inventory_helpers import add_file, make_files, put_host, put_vm

# Short intervals, so that leases run out and orphans come due within a test.
FAST_SETTINGS = {
    "JOB_LEASE_SECONDS": "2",
    "WORKER_POLL_SECONDS": "0.2",
    "ORPHAN_RETRY_SECONDS": "0.5",
    "ORPHAN_RETRY_MAX_SECONDS": "1",
    "AGENT_TIMEOUT_SECONDS": "5",
    "DB_POOL_SIZE": "5",
    "LOG_LEVEL": "INFO",
}
# The process that takes a job over is not faulted: a longer lease keeps a starved machine from passing
# the job on a third time, which would blur what the test counts.
SURVIVOR = {"JOB_LEASE_SECONDS": "10"}
# For a process whose agent call the test holds open: the call must not time out (a failed host, orphans)
# before the test has injected its fault, however slow the machine.
HOLDS_CALLS = {"AGENT_TIMEOUT_SECONDS": "60"}
# The request that queues each job type for a VM: both remove its TPM's files, a delete-vm job the VM too. Tests of
# the job guarantees (fencing, leases, crashes) run once per type.
JOB_REQUESTS = {"remove-tpm": "/vms/{vm}/tpm", "delete-vm": "/vms/{vm}"}
JOB_TYPES = tuple(JOB_REQUESTS)


@dataclass
class AgentRequest:
    """One delete request an agent received: the paths it named, when it came and went, what it answered."""

    paths: list[str]
    started: float
    ended: float | None = None
    confirmed: bool = False
    """Answered 200 with success:true (the shipped agent confirms only when every path is gone)."""


class LoggingAgent(RecordingAgent):
    """The recording agent with a timed log of every request, and gates that hold the next requests open."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.requests: list[AgentRequest] = []
        self._gates: list[asyncio.Event] = []

    def hold_next(self, count: int = 1) -> asyncio.Event:
        """Hold the next `count` requests open until the returned event is set."""
        gate = asyncio.Event()
        self._gates.extend([gate] * count)
        return gate

    def release_all(self) -> None:
        """Let every held and every announced request go on."""
        for gate in self._gates:
            gate.set()
        self._gates.clear()
        self.hold.set()

    def open_requests(self) -> list[AgentRequest]:
        """The requests that have not been answered yet."""
        return [r for r in self.requests if r.ended is None]

    def times_sent(self) -> Counter[str]:
        """How many requests named each path."""
        return Counter(p for r in self.requests for p in r.paths)

    def times_confirmed(self) -> Counter[str]:
        """How many confirming answers named each path."""
        return Counter(p for r in self.requests if r.confirmed for p in r.paths)

    def sent_after_confirmation(self) -> list[str]:
        """Paths named in a request that started after a confirming answer for them had been given."""
        confirmed_at: dict[str, float] = {}
        for r in self.requests:
            if r.confirmed and r.ended is not None:
                for p in r.paths:
                    confirmed_at[p] = min(confirmed_at.get(p, r.ended), r.ended)
        return [p for r in self.requests for p in r.paths if p in confirmed_at and r.started > confirmed_at[p]]

    def overlapping_requests(self) -> list[str]:
        """Paths named by two requests in flight at the same time."""
        overlapping = []
        by_path: dict[str, list[AgentRequest]] = {}
        for r in self.requests:
            for p in r.paths:
                by_path.setdefault(p, []).append(r)
        for p, requests in by_path.items():
            ordered = sorted(requests, key=lambda r: r.started)
            for before, after in itertools.pairwise(ordered):
                if before.ended is None or after.started < before.ended:
                    overlapping.append(p)
        return overlapping

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.json()  # aiohttp keeps the body, so the recorder and the agent both read it
        entry = AgentRequest([f["path"] for f in body["files"]], time.monotonic())
        self.requests.append(entry)
        try:
            if self._gates:
                await self._gates.pop(0).wait()
            response = await super()._record(request, handler)
            if isinstance(response, web.Response) and response.status == 200 and isinstance(response.body, bytes):
                entry.confirmed = json.loads(response.body).get("success") is True
            return response
        finally:
            entry.ended = time.monotonic()


@dataclass
class Host:
    """A host of the inventory: its UUID, its agent, and the folder the agent deletes under."""

    uuid: str
    agent: LoggingAgent
    root: Path


@dataclass
class SeededVm:
    """A VM with a TPM whose host files exist on disk, as the test created it."""

    uuid: str
    tpm_uuid: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    """Host UUID -> the files recorded on that host."""

    def paths(self) -> list[Path]:
        """Every file of the VM, on every host."""
        return [p for paths in self.files.values() for p in paths]


class FaultHarness:
    """A fresh database, `serve` processes and logging agents for one fault test; everything ends with it."""

    def __init__(self, database_url: str, engine: AsyncEngine, work_dir: Path, stack: AsyncExitStack) -> None:
        self.database_url = database_url
        self.engine = engine
        self.sessions = create_session_factory(engine)
        self._work_dir = work_dir
        self._stack = stack
        self.services: list[LocalProcess] = []
        self.agents: list[LoggingAgent] = []

    async def start_service(self, **settings: str) -> LocalProcess:
        """Start a `serve` process with FAST_SETTINGS and `settings`; return once it is ready."""
        name = f"serve-{len(self.services) + 1}"
        service = service_process(self.database_url, self._work_dir, name=name, **(FAST_SETTINGS | settings))
        self.services.append(service)
        return await service.started()

    async def client(self, service: LocalProcess) -> httpx.AsyncClient:
        """An HTTP client of `service`, closed with the harness."""
        return await self._stack.enter_async_context(httpx.AsyncClient(base_url=service.url, timeout=30))

    async def add_host(
        self, http: httpx.AsyncClient, agent_type: Callable[[Path], LoggingAgent] = LoggingAgent
    ) -> Host:
        """A host whose logging agent (of `agent_type`) runs in this loop, deleting under a folder of its own."""
        root = self._work_dir / f"host-{len(self.agents) + 1}"
        root.mkdir()
        agent = agent_type(root)
        self.agents.append(agent)
        url = await self._stack.enter_async_context(running_app(agent.app()))
        return Host(await put_host(http, url), agent, root)

    async def add_vm(self, http: httpx.AsyncClient, hosts: Sequence[Host], *, files_per_host: int = 2) -> SeededVm:
        """A VM with a TPM and `files_per_host` real files on each host: a state file, then NVRAM files."""
        vm_uuid = await put_vm(http)
        tpm = (await http.get(f"/vms/{vm_uuid}/tpm")).json()
        vm = SeededVm(vm_uuid, tpm["uuid"])
        for host in hosts:
            names = ["tpm2-00.permall"] + [f"nvram-{i}.fd" for i in range(1, files_per_host)]
            paths = make_files(host.root, vm_uuid, *names)
            for path in paths:
                await add_file(
                    http, vm_uuid, host.uuid, path, type="TpmState" if path.suffix == ".permall" else "NvRam"
                )
            vm.files[host.uuid] = paths
        return vm

    async def request_job(self, http: httpx.AsyncClient, vm: SeededVm, job_type: str) -> str:
        """Queue a job of `job_type` for the VM (see JOB_REQUESTS); its id."""
        answer = await http.delete(JOB_REQUESTS[job_type].format(vm=vm.uuid))
        assert answer.status_code == 202 and answer.json()["type"] == job_type, answer.text
        job_id: str = answer.json()["id"]
        return job_id

    async def rows(self, sql: str, **params: Any) -> list[Row[Any]]:
        """The rows of a query on the test's database."""
        async with self.engine.connect() as conn:
            return list(await conn.execute(text(sql), params))

    async def job(self, job_id: str) -> Row[Any]:
        """The job's row."""
        (row,) = await self.rows("SELECT * FROM jobs WHERE id = :id", id=job_id)
        return row

    async def job_host_states(self, job_id: str) -> dict[str, str]:
        """Host UUID -> the state of that host's delete call in the job."""
        rows = await self.rows("SELECT host_uuid, state FROM job_hosts WHERE job_id = :id", id=job_id)
        return {str(r.host_uuid): r.state for r in rows}

    async def wait_for_host_state(self, job_id: str, host_uuid: str, state: str) -> None:
        """Wait until the job has recorded its call to this host as `state` (deleted, failed)."""

        async def recorded() -> bool:
            return (await self.job_host_states(job_id)).get(host_uuid) == state

        await wait_until(recorded, timeout=30, what=f"host {host_uuid} is recorded {state}")

    async def wait_for_job_state(self, job_id: str, state: str, *, timeout: float = 60.0) -> Row[Any]:
        """Wait until the job is in `state`; its row."""

        async def reached() -> bool:
            return str((await self.job(job_id)).state) == state

        await wait_until(reached, timeout=timeout, what=f"job {job_id} {state}")
        return await self.job(job_id)

    @asynccontextmanager
    async def file_record_locked(self, vm: SeededVm) -> AsyncIterator[None]:
        """Keep the VM's host-file records locked for the block, in a transaction of the test's own.

        A removal's cleanup statement then waits in its deletion of those records, after its first part fenced
        (and so locked) the job row: a fault injected meanwhile lands inside the cleanup, with no hook in the
        service. Nothing before the cleanup locks these rows (the DELETE request locks the TPM, the plan only
        reads them).
        """
        async with self.engine.connect() as conn, conn.begin():
            await conn.execute(text("SELECT 1 FROM host_files WHERE vm_uuid = :v FOR UPDATE"), {"v": vm.uuid})
            yield

    async def wait_for_blocked_cleanup(self) -> None:
        """Wait until a cleanup statement waits for the file records' row locks (see `file_record_locked`)."""

        async def blocked() -> bool:
            # Nothing else of the service waits for a lock meanwhile. (The statement's text is no use: the
            # server keeps only its first kilobyte.)
            waiting = await self.rows(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND application_name = 'vtpm'"
            )
            return bool(waiting)

        await wait_until(blocked, timeout=60, what="the cleanup waits for the file records")

    async def audit(self, vms: Sequence[SeededVm] | None = None) -> AuditReport:
        """The audit of the whole test database (or of some VMs)."""
        async with self.sessions() as session:
            return await audit(session, vm_uuids=[uuid.UUID(vm.uuid) for vm in vms] if vms is not None else None)

    async def assert_removed(self, vm: SeededVm, job_id: str) -> None:
        """The job succeeded and left the database clean: no TPM, key binding, host-file record, and no VM after a
        delete-vm job (the VM stays after a TPM removal); audit clean."""
        job = await self.job(job_id)
        assert job.state == "succeeded", job
        assert bool(await self.rows("SELECT 1 FROM vms WHERE uuid = :v", v=vm.uuid)) == (job.type == "remove-tpm")
        assert str(job.tpm_uuid) == vm.tpm_uuid
        assert await self.rows("SELECT 1 FROM tpms WHERE uuid = :t", t=vm.tpm_uuid) == []
        assert await self.rows("SELECT 1 FROM tpm_key_bindings WHERE tpm_uuid = :t", t=vm.tpm_uuid) == []
        assert await self.rows("SELECT 1 FROM host_files WHERE vm_uuid = :v", v=vm.uuid) == []
        report = await self.audit()
        assert report.ok, report.render()
        assert report.ledger_files >= len(vm.paths())


@asynccontextmanager
async def fault_harness(server_url: str, work_dir: Path) -> AsyncIterator[FaultHarness]:
    """A harness on a new, migrated database of `server_url`'s server.

    On the way out every held agent call is released, then every service is shut down (so that none
    keeps calling agents that are gone), then the agents stop. The services' logs stay in `work_dir`
    and are printed (but for the access log), so that a failing test shows what the processes did.
    """
    database_url = await create_database(server_url)
    await asyncio.to_thread(upgrade, database_url)
    engine = create_engine(database_url, pool_size=2)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        harness = FaultHarness(database_url, engine, work_dir, stack)
        try:
            yield harness
        finally:
            for agent in harness.agents:
                agent.release_all()
            await asyncio.gather(*(service.shut_down() for service in harness.services))
            for service in harness.services:
                print(f"----- {service.name} (pid {service.pid}, exit {service.process.returncode}) -----")
                print("\n".join(line for line in service.log_text().splitlines() if "uvicorn.access" not in line))
