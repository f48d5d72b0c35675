"""Input at the edges of size: bodies over the 1 MiB limit, and one VM with 10,000 files on 500 hosts."""

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.agent.server import create_agent_app
from app.service.api.limits import MAX_BODY_BYTES
from app.service.audit import audit
from app.service.db.engine import asyncpg_dsn, recorded_statements
from tests.conftest import AppFactory
from tests.inventory_helpers import put_vm, wait_for_job
from tests.problem_helpers import assert_problem
from tests.reliability.process_helpers import fault_harness, wait_until

pytestmark = pytest.mark.reliability

HOSTS = 500
FILES_PER_HOST = 20


async def test_a_body_over_one_mebibyte_is_refused_with_413_with_or_without_content_length(
    server_url: str, tmp_path: Path
) -> None:
    async with fault_harness(server_url, tmp_path) as harness:
        service = await harness.start_service()
        http = await harness.client(service)
        oversized = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'", "secure_boot": false}'

        declared = await http.put(f"/vms/{uuid.uuid4()}", content=oversized)
        assert_problem(declared, 413)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(oversized), 64 * 1024):
                yield oversized[start : start + 64 * 1024]

        # An async iterable goes out chunked, without Content-Length: only counting the body finds it.
        chunked = await http.put(f"/vms/{uuid.uuid4()}", content=chunks())
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in chunked.request.headers
        assert_problem(chunked, 413)

        # Just under the limit is still read and validated as usual.
        fitting = b'{"name": "vm", "secure_boot": false, "x": "' + b"x" * (MAX_BODY_BYTES - 100) + b'"}'
        assert_problem(await http.put(f"/vms/{uuid.uuid4()}", content=fitting), 422)
        assert (await http.put(f"/vms/{uuid.uuid4()}", json={"name": "vm", "secure_boot": False})).status_code == 201
        assert "unhandled error" not in service.log_text()


@asynccontextmanager
async def agent_on_many_ports(root: Path, count: int) -> AsyncIterator[list[str]]:
    """The shipped agent, confined to `root`, listening on `count` loopback ports: one per simulated host."""
    runner = web.AppRunner(create_agent_app(root, libvirt=None), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        for _ in range(count):
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield [f"http://127.0.0.1:{port}" for _, port, *_ in runner.addresses]
    finally:
        await runner.cleanup()


async def seed_files(
    client: httpx.AsyncClient, vm_uuid: str, agent_urls: Sequence[str], root: Path
) -> tuple[list[str], list[Path]]:
    """Hosts at `agent_urls` and FILES_PER_HOST real files of the VM on each, recorded in bulk as the API would.

    Like `POST /vms/{uuid}/host-files`, every record also enters the file ledger. Returns the host UUIDs
    and the files on disk.
    """
    hosts = [str(uuid.uuid4()) for _ in agent_urls]
    files: list[tuple[str, str, str, str, bool]] = []  # uuid, host, path, type, backup
    paths: list[Path] = []
    for index, host in enumerate(hosts):
        folder = root / f"host-{index}" / vm_uuid
        folder.mkdir(parents=True)
        for number in range(FILES_PER_HOST):
            # Half state files and half NVRAM, every other one a backup: all of them go with the TPM.
            kind = "TpmState" if number % 2 == 0 else "NvRam"
            path = folder / f"{kind.lower()}-{number}"
            path.write_bytes(b"state")
            paths.append(path)
            files.append((str(uuid.uuid4()), host, str(path), kind, number % 4 >= 2))
    async with client.app.state.sessions() as session, session.begin():  # type: ignore[attr-defined]
        await session.execute(
            text(
                "INSERT INTO hosts (uuid, name, agent_url) "
                "SELECT h, 'kvm', u FROM unnest(CAST(:hosts AS uuid[]), CAST(:urls AS text[])) AS t(h, u)"
            ),
            {"hosts": hosts, "urls": list(agent_urls)},
        )
        columns = {
            "uuids": [f[0] for f in files],
            "hosts": [f[1] for f in files],
            "paths": [f[2] for f in files],
            "types": [f[3] for f in files],
            "backups": [f[4] for f in files],
            "vm": vm_uuid,
        }
        await session.execute(
            text(
                "INSERT INTO host_files (uuid, vm_uuid, host_uuid, path, type, backup) "
                "SELECT f, CAST(:vm AS uuid), h, p, t, b FROM unnest(CAST(:uuids AS uuid[]), CAST(:hosts AS uuid[]), "
                "CAST(:paths AS text[]), CAST(:types AS text[]), CAST(:backups AS boolean[])) AS f(f, h, p, t, b)"
            ),
            columns,
        )
        await session.execute(
            text(
                "INSERT INTO file_ledger (file_uuid, vm_uuid, host_uuid, path) "
                "SELECT uuid, vm_uuid, host_uuid, path FROM host_files WHERE vm_uuid = :vm"
            ),
            {"vm": vm_uuid},
        )
    return hosts, paths


def statements_of_job(statements: list[tuple[str, tuple[Any, ...]]], job_id: str) -> list[str]:
    """The statements that name `job_id` among their parameters: the job's own work."""
    job = uuid.UUID(job_id)
    return [statement for statement, values in statements if job in values or job_id in values]


async def test_a_vm_with_10000_files_on_500_hosts_is_removed_in_a_bounded_number_of_statements(
    make_client: AppFactory, database_url: str, tmp_path: Path
) -> None:
    # A generous agent timeout: 500 calls queue behind AGENT_CONCURRENCY on a small, shared machine.
    client = await make_client(agent_timeout_seconds=60, job_lease_seconds=30, orphan_retry_seconds=600)
    # The jobs' statements go through the worker's pool.
    engine: AsyncEngine = client.app.state.worker_engine  # type: ignore[attr-defined]
    vm = await put_vm(client)
    async with agent_on_many_ports(tmp_path, HOSTS) as agent_urls:
        assert len(set(agent_urls)) == HOSTS
        hosts, paths = await seed_files(client, vm, agent_urls, tmp_path)
        tpm = (await client.get(f"/vms/{vm}/tpm")).json()
        assert len(tpm["host_files"]) == HOSTS * FILES_PER_HOST

        # The app's worker claims the job at once: record from before the DELETE, and follow the job over a
        # connection of the test's own, so that no statement of the test is counted.
        started = time.monotonic()
        follower = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with recorded_statements(engine) as statements:
                answer = await client.delete(f"/vms/{vm}/tpm")
                assert answer.status_code == 202, answer.text
                job_id = answer.json()["id"]

                async def job_ended() -> bool:
                    state = await follower.fetchval("SELECT state FROM jobs WHERE id = $1", uuid.UUID(job_id))
                    return state in ("succeeded", "failed")

                await wait_until(job_ended, timeout=300, interval=0.2, what="the removal of 10,000 files ends")
        finally:
            await follower.close()
        elapsed = time.monotonic() - started
        job = await wait_for_job(client, job_id)

    assert job["state"] == "succeeded" and job["error"] is None and job["orphan_files"] == 0, job
    assert len(job["hosts"]) == HOSTS
    failed = [h for h in job["hosts"] if h["state"] != "deleted"]
    assert not failed, f"{len(failed)} hosts not deleted, e.g. {failed[:5]}"
    assert {h["files"] for h in job["hosts"]} == {FILES_PER_HOST}
    assert sorted(h["host_uuid"] for h in job["hosts"]) == sorted(hosts)
    assert not [p for p in paths if p.exists()]
    # Planning and the cleanup are a fixed number of set-based statements, and the outcomes of hosts that
    # answer together are written together: fewer statements than hosts, where writing per host would
    # take two per host and writing per file two per file.
    job_statements = statements_of_job(statements, job_id)
    assert 3 <= len(job_statements) < HOSTS, (len(job_statements), job_statements[:20])
    print(f"removed {len(paths)} files on {HOSTS} hosts in {elapsed:.1f} s with {len(job_statements)} job statements")

    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        left = await session.execute(
            text(
                "SELECT (SELECT count(*) FROM host_files WHERE vm_uuid = :vm), "
                "(SELECT count(*) FROM tpms WHERE uuid = :tpm), "
                "(SELECT count(*) FROM tpm_key_bindings WHERE tpm_uuid = :tpm), "
                "(SELECT count(*) FROM orphan_files WHERE vm_uuid = :vm), "
                "(SELECT count(*) FROM confirmed_deletions WHERE job_id = :job)"
            ),
            {"vm": vm, "tpm": tpm["uuid"], "job": job_id},
        )
        assert tuple(left.one()) == (0, 0, 0, 0, HOSTS * FILES_PER_HOST)
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok and report.ledger_files == HOSTS * FILES_PER_HOST, report.render()
