"""Libvirt secrets go with the TPM: the inventory's rule, the agent undefining vTPM secrets on a real libvirtd
(and refusing any other), and the service tracking a secret like a file: plan, orphan, retry, audit."""

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.agent.libvirt import VIRSH_TIMEOUT_SECONDS, Libvirt
from app.agent.server import create_agent_app
from app.protocol import DELETE_PATH
from app.service.audit import audit
from app.service.db.migrate import downgrade, upgrade
from devtools.host_layout import make_nvram
from devtools.local_stack import agent_process
from tests.agent_helpers import running_app
from tests.conftest import AppFactory, create_database
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm
from tests.problem_helpers import assert_problem
from tests.real_libvirt import LibvirtDaemon, secret_path
from tests.real_swtpm import real_vm_state
from tests.reliability.process_helpers import wait_until


async def post_delete(url: str, vm: str, files: list[tuple[str, str]]) -> dict[str, Any]:
    """Call an agent's delete operation directly; its answer's body."""
    body = {"vm_uuid": vm, "files": [{"path": path, "type": type} for path, type in files]}
    async with httpx.AsyncClient() as http:
        answer = await http.post(url + DELETE_PATH, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def agent_on(root: Path, libvirtd: LibvirtDaemon, *more_roots: Path) -> Any:
    """The shipped agent, confined to its roots, undefining secrets on the test's libvirtd; run it with running_app."""
    return running_app(create_agent_app(root, *more_roots, libvirt=Libvirt(uri=libvirtd.uri)))


async def confirmed_paths(client: httpx.AsyncClient, host: str) -> list[str]:
    """The paths whose deletion the host confirmed, as the service recorded them."""
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        rows = await session.execute(text("SELECT path FROM confirmed_deletions WHERE host_uuid = :h"), {"h": host})
        return sorted(path for (path,) in rows)


async def orphans_on(client: httpx.AsyncClient, host: str) -> list[dict[str, Any]]:
    """The orphan files waiting on a host."""
    answer = await client.get("/orphan-files", params={"host_uuid": host})
    assert answer.status_code == 200, answer.text
    orphans: list[dict[str, Any]] = answer.json()
    return orphans


# The inventory's rule: a Secret is named `<lowercase uuid>.xml` and is never a backup.


@pytest.mark.parametrize(
    ("path", "backup", "reason"),
    [
        ("/etc/libvirt/secrets/not-a-uuid.xml", False, "lowercase UUID"),
        (f"/etc/libvirt/secrets/{str(uuid.uuid4()).upper()}.xml", False, "lowercase UUID"),
        (f"/etc/libvirt/secrets/{uuid.uuid4()}", False, "lowercase UUID"),
        (f"/etc/libvirt/secrets/{uuid.uuid4()}.xml.bak", False, "lowercase UUID"),
        (f"/etc/libvirt/secrets/{uuid.uuid4()}.xml/", False, "lowercase UUID"),
        (f"/etc/libvirt/secrets/{uuid.uuid4()}.xml", True, "backup"),
    ],
)
async def test_inventory_refuses_a_secret_that_is_no_uuid_file_or_a_backup(
    client: httpx.AsyncClient, path: str, backup: bool, reason: str
) -> None:
    vm = await put_vm(client)
    host = await put_host(client, "http://127.0.0.1:9")
    answer = await client.post(
        f"/vms/{vm}/host-files", json={"host_uuid": host, "path": path, "type": "Secret", "backup": backup}
    )
    assert_problem(answer, 422)
    assert reason in answer.json()["detail"]
    assert (await client.get(f"/vms/{vm}/host-files")).json() == []


async def test_inventory_records_a_secret_by_its_definition_file(client: httpx.AsyncClient) -> None:
    vm = await put_vm(client)
    host = await put_host(client, "http://127.0.0.1:9")
    path = secret_path(str(uuid.uuid4()))
    recorded = await add_file(client, vm, host, path, type="Secret")
    assert recorded["type"] == "Secret" and recorded["backup"] is False
    assert [f["path"] for f in (await client.get(f"/vms/{vm}/host-files")).json()] == [path]


async def test_migration_0002_lets_the_type_columns_take_secret_and_takes_it_back(server_url: str) -> None:
    database_url = await create_database(server_url)
    engine = create_async_engine(database_url)

    async def type_checks() -> list[str]:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conname IN ('ck_host_files_type', 'ck_orphan_files_type') ORDER BY conname"
                )
            )
            return [definition for (definition,) in rows]

    try:
        await asyncio.to_thread(upgrade, database_url)
        assert all("'Secret'" in check for check in await type_checks())
        await asyncio.to_thread(downgrade, database_url, "0001")
        checks = await type_checks()
        assert len(checks) == 2 and not any("'Secret'" in check for check in checks)
        await asyncio.to_thread(upgrade, database_url)
        assert all("'Secret'" in check for check in await type_checks())
    finally:
        await engine.dispose()


async def test_migration_0002_refuses_to_downgrade_while_a_secret_is_recorded(server_url: str) -> None:
    database_url = await create_database(server_url)
    await asyncio.to_thread(upgrade, database_url)
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            vm, host = uuid.uuid4(), uuid.uuid4()
            await connection.execute(
                text("INSERT INTO vms (uuid, name, secure_boot) VALUES (:v, 'vm', false)"), {"v": vm}
            )
            await connection.execute(
                text("INSERT INTO hosts (uuid, name, agent_url) VALUES (:h, 'kvm', 'http://127.0.0.1:9')"), {"h": host}
            )
            await connection.execute(
                text(
                    "INSERT INTO host_files (uuid, vm_uuid, host_uuid, path, type, backup)"
                    " VALUES (:f, :v, :h, :p, 'Secret', false)"
                ),
                {"f": uuid.uuid4(), "v": vm, "h": host, "p": secret_path(str(uuid.uuid4()))},
            )
            head = await connection.scalar(text("SELECT version_num FROM alembic_version"))
        with pytest.raises(Exception, match="secret host files or orphan files exist"):
            await asyncio.to_thread(downgrade, database_url, "0001")
        async with engine.connect() as connection:
            # The downgrade is one transaction: refused, it leaves the schema where it was.
            assert await connection.scalar(text("SELECT version_num FROM alembic_version")) == head
    finally:
        await engine.dispose()


# The agent's checks that need no libvirtd.


async def test_agent_refuses_a_secret_path_that_names_no_secret_and_deletes_nothing(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
    async with running_app(create_agent_app(tmp_path, libvirt=Libvirt(virsh="/nonexistent/virsh"))) as url:
        answer = await post_delete(url, vm, [(str(state), "TpmState"), ("/etc/libvirt/secrets/x.xml", "Secret")])
    assert answer["success"] is False
    assert "lowercase UUID" in answer["error"] and "/etc/libvirt/secrets/x.xml" in answer["error"]
    assert state.exists()


async def test_agent_without_virsh_fails_the_call_and_deletes_nothing(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
    secret = secret_path(str(uuid.uuid4()))
    async with running_app(create_agent_app(tmp_path, libvirt=Libvirt(virsh="/nonexistent/virsh"))) as url:
        answer = await post_delete(url, vm, [(str(state), "TpmState"), (secret, "Secret")])
    assert answer["success"] is False
    assert "cannot run /nonexistent/virsh" in answer["error"] and secret in answer["error"]
    assert state.exists()


async def test_agent_without_virsh_lets_the_locks_alone_decide_a_request_without_secrets(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
    async with running_app(create_agent_app(tmp_path, libvirt=Libvirt(virsh="/nonexistent/virsh"))) as url:
        answer = await post_delete(url, vm, [(str(state), "TpmState")])
    assert answer == {"success": True, "deleted": [str(state)], "missing": []}


# The agent on a real libvirtd.


async def test_agent_undefines_a_vtpm_secret_with_its_value_and_counts_an_unknown_one_missing(
    libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    vm = str(uuid.uuid4())
    secret = await libvirtd.define_secret()
    unknown = secret_path(str(uuid.uuid4()))
    definition = Path(secret_path(secret))
    assert definition.exists() and definition.with_suffix(".base64").exists()
    async with agent_on(tmp_path, libvirtd) as url:
        answer = await post_delete(url, vm, [(str(definition), "Secret"), (unknown, "Secret")])
        again = await post_delete(url, vm, [(str(definition), "Secret")])

    assert answer == {"success": True, "deleted": [str(definition)], "missing": [unknown]}
    assert again == {"success": True, "deleted": [], "missing": [str(definition)]}
    assert not await libvirtd.is_defined(secret)
    assert not definition.exists() and not definition.with_suffix(".base64").exists()


async def test_agent_process_undefines_secrets_on_its_libvirt_uri(libvirtd: LibvirtDaemon, tmp_path: Path) -> None:
    secret = await libvirtd.define_secret()
    agent = agent_process([tmp_path], tmp_path, libvirt_uri=libvirtd.uri)
    await asyncio.to_thread(agent.start)
    try:
        answer = await post_delete(agent.url, str(uuid.uuid4()), [(secret_path(secret), "Secret")])
    finally:
        await asyncio.to_thread(agent.stop)
    assert answer == {"success": True, "deleted": [secret_path(secret)], "missing": []}
    assert not await libvirtd.is_defined(secret)


# The service and the agent on a real libvirtd.


async def test_tpm_removal_undefines_the_vms_secret_with_its_state_and_nvram(
    client: httpx.AsyncClient, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    # A real host's layout: swtpm state made by swtpm_setup and its backup, NVRAM, under libvirt's two roots.
    vm = await put_vm(client)
    swtpm, nvram_root = tmp_path / "libvirt" / "swtpm", tmp_path / "libvirt" / "qemu" / "nvram"
    nvram_root.mkdir(parents=True)
    state = real_vm_state(swtpm, vm)
    backup = shutil.copytree(state, swtpm / f"{vm}.snapshot-backup", symlinks=True)
    nvram = make_nvram(nvram_root, f"vm-{vm[:8]}")
    secret = await libvirtd.define_secret()
    async with agent_on(swtpm, libvirtd, nvram_root) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        await add_file(client, vm, host, backup, backup=True)
        await add_file(client, vm, host, nvram, type="NvRam")
        await add_file(client, vm, host, secret_path(secret), type="Secret")
        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 0, job
    assert [(h["files"], h["state"]) for h in job["hosts"]] == [(4, "deleted")]
    assert not await libvirtd.is_defined(secret)
    assert not [f for f in (state, backup, nvram) if f.exists()]
    assert sorted(p.name for p in (tmp_path / "libvirt").rglob("*")) == ["nvram", "qemu", "swtpm"]
    assert await confirmed_paths(client, host) == sorted([str(state), str(backup), str(nvram), secret_path(secret)])
    assert (await client.get(f"/vms/{vm}/host-files")).json() == []


async def test_secure_boot_keeps_nvram_and_the_secret_goes(
    client: httpx.AsyncClient, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    vm = await put_vm(client, secure_boot=True)
    secret = await libvirtd.define_secret()
    state, nvram = make_files(tmp_path, vm, "tpm2-00.permall", "nvram.fd")
    async with agent_on(tmp_path, libvirtd) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        await add_file(client, vm, host, nvram, type="NvRam")
        await add_file(client, vm, host, secret_path(secret), type="Secret")
        preview = (await client.get(f"/vms/{vm}/tpm")).json()["host_files"]
        assert sorted(f["path"] for f in preview) == sorted([str(state), secret_path(secret)])
        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 0, job
    assert [(h["files"], h["state"]) for h in job["hosts"]] == [(2, "deleted")]
    assert not await libvirtd.is_defined(secret)
    assert not state.exists() and nvram.exists()
    assert [f["path"] for f in (await client.get(f"/vms/{vm}/host-files")).json()] == [str(nvram)]


async def test_an_unknown_secret_counts_as_removed(
    client: httpx.AsyncClient, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    vm = await put_vm(client)
    never_defined = secret_path(str(uuid.uuid4()))
    async with agent_on(tmp_path, libvirtd) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, never_defined, type="Secret")
        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 0, job
    assert [(h["files"], h["state"]) for h in job["hosts"]] == [(1, "deleted")]
    assert await confirmed_paths(client, host) == [never_defined]


async def test_a_secret_of_another_usage_is_refused_and_the_hosts_files_stay(
    make_client: AppFactory, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    client = await make_client(orphan_retry_seconds=60)
    vm = await put_vm(client)
    vtpm_secret = await libvirtd.define_secret()
    volume_secret = await libvirtd.define_secret(usage="volume")
    (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
    async with agent_on(tmp_path, libvirtd) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        await add_file(client, vm, host, secret_path(vtpm_secret), type="Secret")
        await add_file(client, vm, host, secret_path(volume_secret), type="Secret")
        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 3, job
    (outcome,) = job["hosts"]
    assert outcome["state"] == "failed"
    assert "not a vTPM's (usage 'volume')" in outcome["error"] and volume_secret in outcome["error"]
    assert await libvirtd.is_defined(volume_secret) and await libvirtd.is_defined(vtpm_secret)
    assert state.exists()
    orphans = await orphans_on(client, host)
    assert sorted((o["path"], o["type"]) for o in orphans) == sorted(
        [(str(state), "TpmState"), (secret_path(vtpm_secret), "Secret"), (secret_path(volume_secret), "Secret")]
    )


async def test_a_stopped_libvirtd_leaves_the_secret_an_orphan_until_it_is_back(
    make_client: AppFactory, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    client = await make_client(orphan_retry_seconds=0.2, orphan_retry_max_seconds=0.5)
    vm = await put_vm(client)
    secret = await libvirtd.define_secret()
    (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
    async with agent_on(tmp_path, libvirtd) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        await add_file(client, vm, host, secret_path(secret), type="Secret")
        await libvirtd.stop()
        job = await remove_tpm(client, vm)

        assert job["state"] == "succeeded" and job["orphan_files"] == 2, job
        (outcome,) = job["hosts"]
        assert outcome["state"] == "failed", outcome
        assert f"cannot check secret {secret_path(secret)}: failed to connect" in outcome["error"], outcome
        # Nothing of the request was deleted while libvirt could not vouch for the secret.
        assert state.exists()
        orphans = await orphans_on(client, host)
        assert {o["type"] for o in orphans} == {"TpmState", "Secret"}
        assert all("failed to connect" in o["last_error"] for o in orphans), orphans

        await libvirtd.start()
        await wait_until(
            lambda: _no_orphans(client, host),
            timeout=30,
            what="the secret's orphan is confirmed after libvirtd is back",
        )

    assert not await libvirtd.is_defined(secret)
    assert not state.exists()
    assert await confirmed_paths(client, host) == sorted([str(state), secret_path(secret)])
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok, report.render()
    assert report.ledger_files == 2


async def _no_orphans(client: httpx.AsyncClient, host: str) -> bool:
    return await orphans_on(client, host) == []


async def test_a_hung_libvirtd_fails_the_call_within_the_agent_timeout(
    make_client: AppFactory, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    # The service waits as long as it does by default; the agent must give up on libvirt well before.
    client = await make_client(agent_timeout_seconds=10.0, orphan_retry_seconds=60)
    vm = await put_vm(client)
    secret = await libvirtd.define_secret()
    (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
    async with agent_on(tmp_path, libvirtd) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        await add_file(client, vm, host, secret_path(secret), type="Secret")
        libvirtd.freeze()
        job = await remove_tpm(client, vm)
        libvirtd.thaw_if_frozen()

    (outcome,) = job["hosts"]
    assert outcome["state"] == "failed", outcome
    # The agent's reason, not the service's timeout: the call was answered.
    assert f"did not answer within {VIRSH_TIMEOUT_SECONDS:g} s" in outcome["error"], outcome
    assert state.exists() and await libvirtd.is_defined(secret)
    assert {o["type"] for o in await orphans_on(client, host)} == {"TpmState", "Secret"}
