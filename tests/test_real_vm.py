"""Nothing a running VM uses is deleted, shown on a real VM with an encrypted, persistent vTPM and UEFI firmware.

The service, the shipped agent with a host's roots, and the tests' libvirtd running the VM (tests/real_vm.py):
a removal while the VM runs deletes nothing and the VM survives a reset with its TPM; a record of another VM
naming the running VM's files is refused the same way; once the VM is destroyed, the orphans are confirmed and
every file libvirt made for the TPM is gone.
"""

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest

from app.agent.libvirt import Libvirt
from app.agent.server import create_agent_app
from app.protocol import SCAN_PATH
from app.service.settings import Settings
from devtools.local_stack import wait_until
from tests.agent_helpers import running_app
from tests.inventory_helpers import add_file, put_host, put_vm, remove_tpm, wait_for_job
from tests.lock_holders import is_locked
from tests.real_libvirt import LibvirtDaemon, secret_path
from tests.real_parts import require
from tests.real_vm import NVRAM_ROOT, SWTPM_ROOT, RealVm, missing_vm_requirement

STRAY_MIN_AGE_SECONDS = Settings().stray_min_age_seconds
# A reset restarts swtpm's TPM; the VM lost it and crashed within two seconds of one.
AFTER_RESET_SECONDS = 4.0


@pytest.fixture
async def vm(libvirtd: LibvirtDaemon, client: httpx.AsyncClient) -> AsyncIterator[RealVm]:
    """A VM of the inventory, running under the tests' libvirtd with its vTPM's secret; removed after the test."""
    require(missing_vm_requirement())
    real = RealVm(libvirtd, await put_vm(client), await libvirtd.define_secret())
    try:
        await real.boot()
        yield real
    finally:
        await real.remove()


async def record_tpm_files(client: httpx.AsyncClient, vm_uuid: str, host: str, running: RealVm) -> None:
    """Record the running VM's TPM state, NVRAM and secret as files of the inventory's VM `vm_uuid`."""
    await add_file(client, vm_uuid, host, running.state_dir)
    await add_file(client, vm_uuid, host, running.nvram, type="NvRam")
    await add_file(client, vm_uuid, host, secret_path(running.secret), type="Secret")


def assert_refused_in_use(job: dict[str, Any], running: RealVm) -> None:
    """The job's one host refused its three files, naming the running domain and what of it they are."""
    assert job["state"] == "succeeded" and job["orphan_files"] == 3, job
    (outcome,) = job["hosts"]
    assert outcome["state"] == "failed", outcome
    domain, *locks = outcome["error"].split("; ")
    assert domain.startswith(f"agent error: in use: domain {running.name} ({running.uuid}) is running and uses ")
    assert sorted(domain.split(" and uses ")[1].split(", ")) == sorted(
        [str(running.state_dir), str(running.nvram), secret_path(running.secret)]
    ), outcome
    # swtpm's and QEMU's own locks, found by testing, name the processes that hold them.
    assert sorted(lock.split(" by pid ")[0] for lock in locks) == sorted(
        [f"{running.state_dir}/tpm2/.lock locked", f"{running.nvram} locked"]
    ), outcome
    assert sorted(lock.split(" (")[-1] for lock in locks) == ["qemu-system-x86)", "swtpm)"], outcome


def assert_tpm_files_there(running: RealVm) -> None:
    """Everything libvirt made for the VM's TPM is still on the host."""
    kept = [running.state_dir / "tpm2" / "tpm2-00.permall", running.nvram, *running.secret_files]
    assert [path for path in kept if not path.exists()] == []


async def orphans_on(client: httpx.AsyncClient, host: str) -> list[dict[str, Any]]:
    """The orphan files waiting on a host."""
    answer = await client.get("/orphan-files", params={"host_uuid": host})
    assert answer.status_code == 200, answer.text
    orphans: list[dict[str, Any]] = answer.json()
    return orphans


async def test_a_running_vms_tpm_is_kept_until_it_stops_then_every_file_of_it_goes(
    client: httpx.AsyncClient, libvirtd: LibvirtDaemon, vm: RealVm
) -> None:
    # The test settings retry orphans within a second, so that they are confirmed soon after the VM stops.
    other_vm = await put_vm(client)
    agent = create_agent_app(SWTPM_ROOT, NVRAM_ROOT, libvirt=Libvirt(uri=libvirtd.uri))
    async with running_app(agent) as url:
        host = await put_host(client, url)
        await record_tpm_files(client, vm.uuid, host, vm)
        # A wrong record: another VM of the inventory naming the running VM's files, on the same host recorded twice.
        same_host = await put_host(client, url)
        await record_tpm_files(client, other_vm, same_host, vm)

        assert_refused_in_use(await remove_tpm(client, vm.uuid), vm)
        assert_refused_in_use(await remove_tpm(client, other_vm), vm)
        assert_tpm_files_there(vm)
        await assert_listed_in_use(url, vm)
        assert await libvirtd.is_defined(vm.secret)
        assert is_locked(vm.state_dir / "tpm2" / ".lock") and is_locked(vm.nvram)

        # The guest reboots as it would with its TPM still there; the VM crashed at this point.
        await libvirtd.virsh("reset", vm.name)
        await asyncio.sleep(AFTER_RESET_SECONDS)
        assert await vm.state() == "running"
        assert is_locked(vm.state_dir / "tpm2" / ".lock")

        await libvirtd.virsh("destroy", vm.name)
        await wait_until(
            lambda: _no_orphans(client, host, same_host), timeout=30, what="the orphans confirmed once the VM stopped"
        )

    left = [vm.state_dir, vm.nvram, *vm.secret_files]
    assert [path for path in left if path.exists()] == []
    assert not await libvirtd.is_defined(vm.secret)

    # The VM started again without its TPM: libvirt makes its NVRAM afresh, which no record names; a later scan
    # (the file aged past STRAY_MIN_AGE_SECONDS by then) finds it a stray of the VM.
    await vm.boot(tpm=False)
    await libvirtd.virsh("destroy", vm.name)
    then = time.time() - 2 * STRAY_MIN_AGE_SECONDS
    os.utime(vm.nvram, (then, then))
    async with running_app(agent) as url:
        scan_host = await put_host(client, url)
        accepted = await client.post(f"/hosts/{scan_host}/scan")
        scanned = await wait_for_job(client, accepted.json()["id"])
    strays = (await client.get("/stray-files", params={"host_uuid": scan_host, "limit": 1000})).json()
    assert scanned["hosts"][0]["state"] == "scanned", scanned
    assert [(s["type"], s["vm_uuid"], s["vm_known"]) for s in strays if s["path"] == str(vm.nvram)] == [
        ("NvRam", vm.uuid, True)
    ]


async def assert_listed_in_use(url: str, running: RealVm) -> None:
    """The agent's scan lists the running VM's state, NVRAM and secret, each in use: none of them can be a stray."""
    async with aiohttp.ClientSession() as http, http.post(url + SCAN_PATH, json={}) as answer:
        listed = {entry["path"]: entry for entry in (await answer.json())["entries"]}
    paths = [str(running.state_dir), str(running.nvram), secret_path(running.secret)]
    assert [(listed[path]["in_use"], listed[path]["vm_uuid"]) for path in paths] == [(True, running.uuid)] * 2 + [
        (True, running.secret)
    ]


async def _no_orphans(client: httpx.AsyncClient, *hosts: str) -> bool:
    return [orphan for host in hosts for orphan in await orphans_on(client, host)] == []
