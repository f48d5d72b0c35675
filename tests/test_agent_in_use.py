"""Nothing in use is deleted: the shipped agent refuses a request when another process holds a lock on any file of
it, names the file and the process, and deletes nothing; the service keeps those files as orphans until they are
free. Real locks of other processes, real agents on loopback, a real database (the real VM: tests/test_real_vm.py).
"""

import os
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from app.agent.domains import domain_of
from app.agent.libvirt import Libvirt
from app.agent.server import create_agent_app
from app.protocol import DELETE_PATH
from devtools.local_stack import agent_process, wait_until
from tests.agent_helpers import running_agent, running_app
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, put_host, put_vm, remove_tpm
from tests.lock_holders import command_of, is_locked, lock_held


def make_file(path: Path, size: int = 512) -> Path:
    """A file of `size` bytes (and its parent directories) for the agent to delete or to spare."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def swtpm_layout(root: Path, vm: str) -> tuple[Path, Path]:
    """A VM's swtpm state directory under `root` as swtpm keeps it, with its `.lock`; the directory and the lock."""
    state = root / vm
    make_file(state / "tpm2" / "tpm2-00.permall")
    return state, make_file(state / "tpm2" / ".lock", size=0)


async def post_delete(url: str, vm: str, files: list[tuple[Path | str, str]]) -> dict[str, Any]:
    """Call an agent's delete operation; its 200 answer's body."""
    body = {"vm_uuid": vm, "files": [{"path": str(path), "type": kind} for path, kind in files]}
    async with aiohttp.ClientSession() as http, http.post(url + DELETE_PATH, json=body) as answer:
        assert answer.status == 200, await answer.text()
        result: dict[str, Any] = await answer.json()
        return result


async def test_a_lock_taken_just_before_the_request_stops_it_and_nothing_is_deleted(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    state, lock = swtpm_layout(tmp_path, vm)
    nvram = make_file(tmp_path / f"{vm}.fd")
    request = [(state, "TpmState"), (nvram, "NvRam")]
    async with running_agent(tmp_path) as url:
        with lock_held(lock, "posix") as holder:
            name = command_of(holder)
            refused = await post_delete(url, vm, request)
            # The agent tested the lock without taking or dropping one: the holder's lock is still there.
            assert is_locked(lock)
            assert lock.exists() and nvram.exists()
        deleted = await post_delete(url, vm, request)

    assert refused == {"success": False, "error": f"in use: {lock} locked by pid {holder} ({name})"}
    assert deleted == {"success": True, "deleted": [str(state), str(nvram)], "missing": []}


async def test_an_open_file_lock_on_part_of_an_nvram_image_is_seen_and_its_holder_named(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    nvram = make_file(tmp_path / "qemu" / "nvram" / f"{vm}_VARS.fd", size=4096)
    async with running_agent(tmp_path) as url:
        with lock_held(nvram, "ofd") as holder:
            name = command_of(holder)
            refused = await post_delete(url, vm, [(nvram, "NvRam")])
            assert is_locked(nvram)

    # The kernel names no process for an open file description's lock; the agent finds the one holding it.
    assert refused == {"success": False, "error": f"in use: {nvram} locked by pid {holder} ({name})"}
    assert nvram.exists()


async def test_a_request_with_one_locked_file_deep_in_a_directory_deletes_none_of_its_files(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    state, lock = swtpm_layout(tmp_path, vm)
    backup = make_file(tmp_path / f"{vm}.snapshot-backup" / "tpm2" / "tpm2-00.permall")
    async with running_agent(tmp_path) as url:
        with lock_held(lock, "posix"):
            refused = await post_delete(url, vm, [(backup.parent.parent, "TpmState"), (state, "TpmState")])

    assert refused["success"] is False and refused["error"].startswith(f"in use: {lock} locked by pid ")
    assert backup.exists() and lock.exists() and (state / "tpm2" / "tpm2-00.permall").exists()


async def test_a_link_in_a_requested_directory_is_not_followed_to_a_locked_file(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    other_state, other_lock = swtpm_layout(tmp_path, str(uuid.uuid4()))
    state = make_file(tmp_path / vm / "tpm2" / "tpm2-00.permall").parent.parent
    (state / "tpm2" / ".lock").symlink_to(other_lock)
    async with running_agent(tmp_path) as url:
        with lock_held(other_lock, "posix"):
            answer = await post_delete(url, vm, [(state, "TpmState")])
            assert is_locked(other_lock)

    assert answer == {"success": True, "deleted": [str(state)], "missing": []}
    assert other_lock.exists() and other_state.exists()


async def test_an_agent_that_cannot_test_a_file_for_locks_fails_the_call_and_deletes_nothing(tmp_path: Path) -> None:
    # Without CAP_DAC_OVERRIDE root cannot open a file of another user's without permissions, though it may still
    # unlink it from its own directory: the delete would work, the lock test cannot.
    vm = str(uuid.uuid4())
    state, _ = swtpm_layout(tmp_path, vm)
    unreadable = make_file(state / "tpm2" / "tpm2-00.volatilestate")
    os.chown(unreadable, 65534, 65534)
    unreadable.chmod(0)
    agent = agent_process(
        [tmp_path], tmp_path, launcher=["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    )
    async with agent:
        answer = await post_delete(agent.url, vm, [(state, "TpmState")])

    assert answer == {"success": False, "error": f"cannot test {unreadable} for locks: Permission denied"}
    assert unreadable.exists() and (state / "tpm2" / "tpm2-00.permall").exists()


async def test_a_host_without_libvirt_refuses_a_secret_and_deletes_nothing(tmp_path: Path) -> None:
    vm = str(uuid.uuid4())
    state, _ = swtpm_layout(tmp_path, vm)
    secret = f"/etc/libvirt/secrets/{uuid.uuid4()}.xml"
    async with running_agent(tmp_path) as url:
        answer = await post_delete(url, vm, [(state, "TpmState"), (secret, "Secret")])

    assert answer == {
        "success": False,
        "error": f"this host has no libvirt (--libvirt-uri none): cannot undefine {secret}",
    }
    assert state.exists()


async def test_with_libvirt_unreachable_the_locks_alone_decide_for_files(tmp_path: Path) -> None:
    unreachable = Libvirt(uri=f"qemu:///system?socket={tmp_path}/no-libvirt-sock")
    locked_vm, free_vm = str(uuid.uuid4()), str(uuid.uuid4())
    locked_state, lock = swtpm_layout(tmp_path, locked_vm)
    free_state, _ = swtpm_layout(tmp_path, free_vm)
    async with running_app(create_agent_app(tmp_path, libvirt=unreachable)) as url:
        with lock_held(lock, "posix"):
            refused = await post_delete(url, locked_vm, [(locked_state, "TpmState")])
        deleted = await post_delete(url, free_vm, [(free_state, "TpmState")])

    assert refused["success"] is False and refused["error"].startswith(f"in use: {lock} locked by pid ")
    assert deleted == {"success": True, "deleted": [str(free_state)], "missing": []}
    assert locked_state.exists() and not free_state.exists()


@pytest.mark.parametrize(
    ("nvram", "tpm_source"),
    [
        ("<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web-7_VARS.fd</nvram>", ""),
        ("<nvram type='file'><source file='/var/lib/libvirt/qemu/nvram/web-7_VARS.fd'/></nvram>", ""),
        ("<nvram>/var/lib/libvirt/qemu/nvram/web-7_VARS.fd</nvram>", "<source type='dir' path='/srv/tpm/web-7'/>"),
    ],
    ids=["text", "source", "tpm-source"],
)
def test_a_domain_definition_names_its_nvram_tpm_state_and_secret(nvram: str, tpm_source: str) -> None:
    vm, secret = str(uuid.uuid4()), str(uuid.uuid4())
    domain = domain_of(
        f"""<domain type='qemu' id='3'><name>web-7</name><uuid>{vm}</uuid>
        <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>{nvram}</os>
        <devices><disk type='file' device='disk'><source file='/var/lib/libvirt/images/web-7.qcow2'/></disk>
        <tpm model='tpm-crb'><backend type='emulator' version='2.0' persistent_state='yes'>
        <encryption secret='{secret}'/>{tpm_source}</backend></tpm></devices></domain>"""
    )
    expected = ["/var/lib/libvirt/qemu/nvram/web-7_VARS.fd"] + (["/srv/tpm/web-7"] if tpm_source else [])
    assert (domain.uuid, domain.name, list(domain.paths), domain.secrets) == (vm, "web-7", expected, (secret,))


async def test_the_service_keeps_files_in_use_as_orphans_with_the_agents_words_until_they_are_free(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(orphan_retry_seconds=0.2, orphan_retry_max_seconds=0.5)
    vm = await put_vm(client)
    state, lock = swtpm_layout(tmp_path, vm)
    async with running_agent(tmp_path) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        with lock_held(lock, "posix") as holder:
            job = await remove_tpm(client, vm)
            in_use = f"in use: {lock} locked by pid {holder} ("
            (outcome,) = job["hosts"]
            assert job["state"] == "succeeded" and job["orphan_files"] == 1, job
            assert outcome["state"] == "failed" and outcome["error"].startswith(f"agent error: {in_use}"), outcome
            # Retried meanwhile, the orphan keeps being refused with the agent's words, and stays on the host.
            await wait_until(lambda: _orphan_attempts(client, host, at_least=2), timeout=30, what="a retry")
            (orphan,) = await _orphans(client, host)
            assert orphan["last_error"].startswith(f"agent error: {in_use}"), orphan
            assert state.exists() and (await client.get(f"/hosts/{host}")).json()["health"]["state"] == "ok"
        await wait_until(lambda: _no_orphans(client, host), timeout=30, what="the orphan deleted once free")

    assert not state.exists()


async def _orphans(client: httpx.AsyncClient, host: str) -> list[dict[str, Any]]:
    answer = await client.get("/orphan-files", params={"host_uuid": host})
    assert answer.status_code == 200, answer.text
    orphans: list[dict[str, Any]] = answer.json()
    return orphans


async def _orphan_attempts(client: httpx.AsyncClient, host: str, *, at_least: int) -> bool:
    return all(orphan["attempts"] >= at_least for orphan in await _orphans(client, host))


async def _no_orphans(client: httpx.AsyncClient, host: str) -> bool:
    return await _orphans(client, host) == []
