"""The audit: clean after removals, and it catches a forgotten file, a file both confirmed and orphaned,
a succeeded job whose TPM survived, and (as a warning only) a job stuck under an old lease."""

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.service.audit import AuditReport, audit
from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm

REPO_ROOT = Path(__file__).resolve().parent.parent


def sessions_of(client: httpx.AsyncClient) -> async_sessionmaker[AsyncSession]:
    """The session factory of the app behind `client`."""
    factory: async_sessionmaker[AsyncSession] = client.app.state.sessions  # type: ignore[attr-defined]
    return factory


async def audit_vm(client: httpx.AsyncClient, vm: str) -> AuditReport:
    """The audit of one VM's files and jobs."""
    async with sessions_of(client)() as session:
        return await audit(session, vm_uuids=[uuid.UUID(vm)])


async def execute(client: httpx.AsyncClient, sql: str, **params: Any) -> None:
    """Run one statement in a transaction of its own."""
    async with sessions_of(client)() as session, session.begin():
        await session.execute(text(sql), params)


async def run_cli(database_url: str, *args: str) -> tuple[int, str]:
    """Run `python -m app audit ARGS` against the database; its exit code and standard output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "audit",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    assert b"Traceback" not in stderr, stderr.decode()
    return process.returncode, stdout.decode()


@asynccontextmanager
async def removed_vm_with_orphan(client: httpx.AsyncClient, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A VM removed with one file deleted on a live host and one orphaned on a dead one; (vm, orphan file uuid)."""
    vm = await put_vm(client)
    async with running_agent(tmp_path) as url:
        live = await put_host(client, url)
        dead = await put_host(client, "http://127.0.0.1:9")
        (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
        await add_file(client, vm, live, state)
        orphan = await add_file(client, vm, dead, "/var/lib/libvirt/swtpm/x/tpm2-00.permall")
        job = await remove_tpm(client, vm)
    assert job["state"] == "succeeded" and job["orphan_files"] == 1, job
    yield vm, orphan["uuid"]


async def test_audit_is_clean_after_a_removal_that_left_an_orphan(client: httpx.AsyncClient, tmp_path: Path) -> None:
    async with removed_vm_with_orphan(client, tmp_path) as (vm, _):
        report = await audit_vm(client, vm)

    assert report.ok, report.render()
    assert report.ledger_files == 2
    assert [c.name for c in report.checks if c.count] == []


async def test_audit_catches_a_host_file_record_deleted_by_hand(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    vm = await put_vm(client)
    host = await put_host(client, "http://127.0.0.1:9")
    kept = await add_file(client, vm, host, "/var/lib/libvirt/swtpm/a/tpm2-00.permall")
    lost = await add_file(client, vm, host, "/var/lib/libvirt/qemu/nvram/a.fd", type="NvRam")
    assert (await audit_vm(client, vm)).ok

    await execute(client, "DELETE FROM host_files WHERE uuid = :uuid", uuid=lost["uuid"])
    try:
        report = await audit_vm(client, vm)
        code, output = await run_cli(database_url, "--json", "--vm", vm)
    finally:
        # Put the record back as it was, so that an audit of the whole test database stays clean.
        await execute(
            client,
            "INSERT INTO host_files (uuid, vm_uuid, host_uuid, path, type, backup) "
            "VALUES (:uuid, :vm, :host, :path, 'NvRam', false)",
            uuid=lost["uuid"],
            vm=vm,
            host=host,
            path=lost["path"],
        )

    assert not report.ok
    (forgotten,) = report.violations
    assert forgotten.name == "forgotten_files" and forgotten.count == 1
    assert forgotten.examples[0]["file_uuid"] == uuid.UUID(lost["uuid"])
    assert forgotten.examples[0]["path"] == lost["path"]
    assert "VIOLATION forgotten_files (1)" in report.render()
    assert code == 1
    answer = json.loads(output)
    assert answer["ok"] is False
    (cli_check,) = [c for c in answer["checks"] if c["count"]]
    assert cli_check["name"] == "forgotten_files" and cli_check["examples"][0]["file_uuid"] == lost["uuid"]
    assert kept["uuid"] not in output
    code, output = await run_cli(database_url, "--vm", vm)
    assert code == 0 and output.startswith("audit: 2 files in the ledger; 0 violation(s)"), output


async def test_audit_catches_a_confirmed_file_that_is_still_an_orphan(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with removed_vm_with_orphan(client, tmp_path) as (vm, orphan):
        await execute(
            client,
            "INSERT INTO confirmed_deletions (file_uuid, host_uuid, path) "
            "SELECT uuid, host_uuid, path FROM orphan_files WHERE uuid = :uuid",
            uuid=orphan,
        )
        try:
            report = await audit_vm(client, vm)
        finally:
            await execute(client, "DELETE FROM confirmed_deletions WHERE file_uuid = :uuid", uuid=orphan)

    assert [(c.name, c.count) for c in report.violations] == [("confirmed_and_orphan", 1)], report.render()


async def test_audit_catches_a_succeeded_job_whose_tpm_survived(client: httpx.AsyncClient, tmp_path: Path) -> None:
    async with removed_vm_with_orphan(client, tmp_path) as (vm, _):
        tpm = (await client.post(f"/vms/{vm}/tpm", json={"key_provider_uuid": None})).json()
        await execute(client, "UPDATE jobs SET tpm_uuid = :tpm WHERE vm_uuid = :vm", tpm=tpm["uuid"], vm=vm)
        try:
            report = await audit_vm(client, vm)
        finally:
            await execute(client, "DELETE FROM tpms WHERE uuid = :tpm", tpm=tpm["uuid"])

    assert [(c.name, c.count) for c in report.violations] == [("succeeded_job_tpm_remains", 1)], report.render()


async def test_a_job_running_under_an_old_lease_is_a_warning_not_a_violation(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False)  # no worker here to take the job up
    vm = await put_vm(client)
    tpm = (await client.get(f"/vms/{vm}/tpm")).json()
    job_id = uuid.uuid4()
    # Left running by a process that died, with no live process to take it up (its lease ran out an hour ago).
    await execute(
        client,
        "INSERT INTO jobs (id, vm_uuid, tpm_uuid, state, lease_token, lease_expires_at, run_after) "
        "VALUES (:id, :vm, :tpm, 'running', gen_random_uuid(), now() - interval '1 hour', now() + interval '1 day')",
        id=job_id,
        vm=vm,
        tpm=tpm["uuid"],
    )
    try:
        async with sessions_of(client)() as session:
            report = await audit(session, vm_uuids=[uuid.UUID(vm)], stale_lease_seconds=600)
    finally:
        await execute(client, "DELETE FROM jobs WHERE id = :id", id=job_id)

    assert report.ok, report.render()
    (warning,) = report.warnings
    assert warning.name == "stale_leases" and warning.examples[0]["job_id"] == job_id
