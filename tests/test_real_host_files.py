"""A TPM removal against a real host layout: swtpm state made by swtpm_setup, libvirt's folders as the roots.

The service runs in the test (make_client), the shipped agent on loopback with the two roots of a KVM host,
`<libvirt>/swtpm` and `<libvirt>/qemu/nvram`; everything on disk is real.
"""

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.host_layout import make_nvram
from tests.agent_helpers import running_agent
from tests.inventory_helpers import add_file, put_host, put_vm, remove_tpm
from tests.real_swtpm import real_vm_state


@dataclass
class Host:
    """A host's libvirt folders, the agent serving them, and the host's UUID in the service."""

    libvirt: Path
    swtpm: Path
    nvram: Path
    host_uuid: str


@pytest.fixture
async def host(client: httpx.AsyncClient, tmp_path: Path) -> AsyncIterator[Host]:
    """A host whose agent has the production roots, under a temporary /var/lib/libvirt."""
    libvirt = tmp_path / "var" / "lib" / "libvirt"
    swtpm, nvram = libvirt / "swtpm", libvirt / "qemu" / "nvram"
    swtpm.mkdir(parents=True)
    nvram.mkdir(parents=True)
    async with running_agent(swtpm, nvram) as url:
        yield Host(libvirt, swtpm, nvram, await put_host(client, url))


def tree(folder: Path) -> dict[str, Any]:
    """Everything under `folder`, links not followed: file contents, link targets, and directories as "dir"."""
    found: dict[str, Any] = {}
    for directory, subdirectories, files in os.walk(folder):
        for name in subdirectories + files:
            path = Path(directory, name)
            if path.is_symlink():
                found[str(path.relative_to(folder))] = f"link to {os.readlink(path)}"
            else:
                found[str(path.relative_to(folder))] = "dir" if path.is_dir() else path.read_bytes()
    return found


async def test_state_directory_its_backup_and_nvram_are_gone_and_the_roots_stay(
    client: httpx.AsyncClient, host: Host
) -> None:
    vm = await put_vm(client)
    state = real_vm_state(host.swtpm, vm)
    backup = shutil.copytree(state, host.swtpm / f"{vm}.snapshot-backup", symlinks=True)
    nvram = make_nvram(host.nvram, f"vm-{vm[:8]}")
    await add_file(client, vm, host.host_uuid, state)
    await add_file(client, vm, host.host_uuid, backup, backup=True)
    await add_file(client, vm, host.host_uuid, nvram, type="NvRam")

    job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded", job
    assert [(h["state"], h["files"]) for h in job["hosts"]] == [("deleted", 3)]
    assert job["orphan_files"] == 0
    assert host.swtpm.is_dir() and host.nvram.is_dir()
    assert tree(host.libvirt) == {"swtpm": "dir", "qemu": "dir", "qemu/nvram": "dir"}


async def test_a_link_inside_a_state_directory_is_removed_and_its_target_outside_kept(
    client: httpx.AsyncClient, host: Host
) -> None:
    outside = host.libvirt / "images"
    make_nvram(outside, "disk")
    vm = await put_vm(client)
    state = real_vm_state(host.swtpm, vm)
    (state / "tpm2" / "escape").symlink_to(outside / "disk_VARS.fd")
    (state / "outside").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    await add_file(client, vm, host.host_uuid, state)

    job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 0, job
    assert not os.path.lexists(state)
    assert tree(outside) == before


async def test_a_recorded_path_that_is_a_link_out_of_the_roots_is_refused_and_kept_as_an_orphan(
    make_client: Any, tmp_path: Path
) -> None:
    client = await make_client(orphan_retry_seconds=60)
    swtpm, nvram = tmp_path / "swtpm", tmp_path / "qemu" / "nvram"
    swtpm.mkdir()
    nvram.mkdir(parents=True)
    vm = await put_vm(client)
    elsewhere = real_vm_state(tmp_path / "elsewhere", vm)
    before = tree(elsewhere)
    state = swtpm / vm
    state.symlink_to(elsewhere, target_is_directory=True)
    async with running_agent(swtpm, nvram) as url:
        host_uuid = await put_host(client, url)
        await add_file(client, vm, host_uuid, state)

        job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded", job
    assert [h["state"] for h in job["hosts"]] == ["failed"]
    assert f"path resolves outside the agent's roots: {state}" in job["hosts"][0]["error"]
    orphans = (await client.get("/orphan-files", params={"host_uuid": host_uuid})).json()
    assert [(o["path"], o["vm_uuid"]) for o in orphans] == [(str(state), vm)]
    assert state.is_symlink()
    assert tree(elsewhere) == before


async def test_files_recorded_inside_a_state_directory_take_their_emptied_parents_with_them(
    client: httpx.AsyncClient, host: Host
) -> None:
    vm, neighbour = await put_vm(client), await put_vm(client)
    state, neighbour_state = real_vm_state(host.swtpm, vm), real_vm_state(host.swtpm, neighbour)
    neighbour_before = tree(neighbour_state)
    await add_file(client, vm, host.host_uuid, state / "tpm2" / "tpm2-00.permall")
    await add_file(client, vm, host.host_uuid, state / "tpm2" / ".lock")

    job = await remove_tpm(client, vm)

    assert job["state"] == "succeeded" and job["orphan_files"] == 0, job
    # tpm2/ and <vm>/ were left empty and went; swtpm/ still holds the neighbour, and is a root anyway.
    assert not state.exists()
    assert sorted(os.listdir(host.swtpm)) == [neighbour]
    assert tree(neighbour_state) == neighbour_before
