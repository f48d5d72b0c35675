"""Tests of every inventory call of the contract: hosts, VMs, TPMs and host files, against real PostgreSQL."""

import re
import uuid
from typing import Any

import httpx
import pytest

from tests.inventory_helpers import add_file, put_host, put_vm
from tests.problem_helpers import assert_problem

AGENT_URL = "http://127.0.0.1:8100"
NEXT_LINK = re.compile(r'^<([^>]+)>; rel="next"$')


async def test_put_host_creates_then_replaces(client: httpx.AsyncClient) -> None:
    host_uuid = str(uuid.uuid4())
    created = await client.put(f"/hosts/{host_uuid}", json={"name": "kvm-1", "agent_url": AGENT_URL})
    assert created.status_code == 201, created.text
    # A host that never left a call unanswered is ok.
    healthy = {"state": "ok", "consecutive_failures": 0, "last_error": None, "next_probe_at": None}
    assert created.json() == {"uuid": host_uuid, "name": "kvm-1", "agent_url": AGENT_URL, "health": healthy}

    replaced = await client.put(f"/hosts/{host_uuid}", json={"name": "kvm-2", "agent_url": "https://kvm-2:9000"})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json() == {"uuid": host_uuid, "name": "kvm-2", "agent_url": "https://kvm-2:9000", "health": healthy}

    read = await client.get(f"/hosts/{host_uuid}")
    assert read.status_code == 200
    assert read.json() == replaced.json()


async def test_get_unknown_host_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/hosts/{uuid.uuid4()}"), 404)


async def test_put_vm_creates_then_replaces(client: httpx.AsyncClient) -> None:
    vm_uuid = str(uuid.uuid4())
    created = await client.put(f"/vms/{vm_uuid}", json={"name": "web", "secure_boot": False})
    assert created.status_code == 201, created.text
    assert created.json() == {"uuid": vm_uuid, "name": "web", "secure_boot": False}

    replaced = await client.put(f"/vms/{vm_uuid}", json={"name": "web-2", "secure_boot": True})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json() == {"uuid": vm_uuid, "name": "web-2", "secure_boot": True}

    read = await client.get(f"/vms/{vm_uuid}")
    assert read.status_code == 200
    assert read.json() == replaced.json()


async def test_get_unknown_vm_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/vms/{uuid.uuid4()}"), 404)


@pytest.mark.parametrize("key_provider", [True, False], ids=["with-key-provider", "without-key-provider"])
async def test_post_tpm_creates_it_and_get_reads_it(client: httpx.AsyncClient, key_provider: bool) -> None:
    vm_uuid = await put_vm(client, tpm=False)
    key_provider_uuid = str(uuid.uuid4()) if key_provider else None
    created = await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": key_provider_uuid})
    assert created.status_code == 201, created.text
    tpm = created.json()
    assert tpm.keys() == {"uuid", "vm_uuid", "key_provider_uuid"}
    assert uuid.UUID(tpm["uuid"])
    assert tpm["vm_uuid"] == vm_uuid
    assert tpm["key_provider_uuid"] == key_provider_uuid

    read = await client.get(f"/vms/{vm_uuid}/tpm")
    assert read.status_code == 200, read.text
    assert read.json() == {**tpm, "host_files": []}


async def test_post_tpm_with_empty_body_has_no_key_provider(client: httpx.AsyncClient) -> None:
    vm_uuid = await put_vm(client, tpm=False)
    created = await client.post(f"/vms/{vm_uuid}/tpm", json={})
    assert created.status_code == 201, created.text
    assert created.json()["key_provider_uuid"] is None


async def test_second_tpm_is_409_and_keeps_the_first(client: httpx.AsyncClient) -> None:
    vm_uuid = await put_vm(client, tpm=False)
    first = await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": str(uuid.uuid4())})
    assert first.status_code == 201
    assert_problem(await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": None}), 409)
    read = await client.get(f"/vms/{vm_uuid}/tpm")
    assert read.json()["uuid"] == first.json()["uuid"]
    assert read.json()["key_provider_uuid"] == first.json()["key_provider_uuid"]


async def test_tpm_of_unknown_vm_is_404(client: httpx.AsyncClient) -> None:
    vm_uuid = uuid.uuid4()
    assert_problem(await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": None}), 404)
    assert_problem(await client.get(f"/vms/{vm_uuid}/tpm"), 404)


async def test_get_tpm_of_vm_without_one_is_404(client: httpx.AsyncClient) -> None:
    vm_uuid = await put_vm(client, tpm=False)
    assert_problem(await client.get(f"/vms/{vm_uuid}/tpm"), 404)


async def add_every_kind_of_file(client: httpx.AsyncClient, vm_uuid: str, host_uuid: str) -> list[dict[str, Any]]:
    """Record a state file, an NVRAM file, and a backup of each; the files as the API returned them."""
    return [
        await add_file(client, vm_uuid, host_uuid, f"/var/lib/swtpm/{vm_uuid}/{name}", type=type, backup=backup)
        for name, type, backup in (
            ("tpm2-00.permall", "TpmState", False),
            ("nvram.fd", "NvRam", False),
            ("tpm2-00.permall.bak", "TpmState", True),
            ("nvram.fd.bak", "NvRam", True),
        )
    ]


def by_uuid(files: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Files keyed by their UUID, to compare lists regardless of order."""
    return {f["uuid"]: f for f in files}


async def test_tpm_host_files_without_secure_boot_are_state_and_nvram_with_backups(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client, secure_boot=False)
    files = await add_every_kind_of_file(client, vm_uuid, host_uuid)

    read = await client.get(f"/vms/{vm_uuid}/tpm")
    assert read.status_code == 200
    assert by_uuid(read.json()["host_files"]) == by_uuid(files)


async def test_tpm_host_files_with_secure_boot_leave_out_nvram(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client, secure_boot=True)
    files = await add_every_kind_of_file(client, vm_uuid, host_uuid)

    read = await client.get(f"/vms/{vm_uuid}/tpm")
    assert read.status_code == 200
    assert by_uuid(read.json()["host_files"]) == by_uuid([f for f in files if f["type"] == "TpmState"])
    # The list of host files still has them all: secure boot only decides what a removal deletes.
    listed = await client.get(f"/vms/{vm_uuid}/host-files")
    assert by_uuid(listed.json()) == by_uuid(files)


async def test_post_host_file_answers_the_file(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    path = f"/var/lib/libvirt/swtpm/{vm_uuid}/tpm2/tpm2-00.permall"
    answer = await client.post(
        f"/vms/{vm_uuid}/host-files",
        json={"host_uuid": host_uuid, "path": path, "type": "TpmState", "backup": True},
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body.keys() == {"uuid", "vm_uuid", "host_uuid", "path", "type", "backup"}
    assert uuid.UUID(body["uuid"])
    assert body == {
        "uuid": body["uuid"],
        "vm_uuid": vm_uuid,
        "host_uuid": host_uuid,
        "path": path,
        "type": "TpmState",
        "backup": True,
    }


async def test_host_file_backup_defaults_to_false(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    answer = await client.post(
        f"/vms/{vm_uuid}/host-files", json={"host_uuid": host_uuid, "path": "/nvram.fd", "type": "NvRam"}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["backup"] is False


async def test_host_file_of_a_vm_without_tpm_is_recorded(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client, tpm=False)
    recorded = await add_file(client, vm_uuid, host_uuid, f"/nvram/{vm_uuid}.fd", type="NvRam")
    listed = await client.get(f"/vms/{vm_uuid}/host-files")
    assert listed.json() == [recorded]


async def test_host_file_of_unknown_vm_or_host_is_404(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    file = {"path": "/state", "type": "TpmState", "backup": False}

    unknown_vm = await client.post(f"/vms/{uuid.uuid4()}/host-files", json={**file, "host_uuid": host_uuid})
    assert_problem(unknown_vm, 404)
    unknown_host = await client.post(f"/vms/{vm_uuid}/host-files", json={**file, "host_uuid": str(uuid.uuid4())})
    assert_problem(unknown_host, 404)
    assert (await client.get(f"/vms/{vm_uuid}/host-files")).json() == []


async def test_same_path_on_the_same_host_twice_is_409(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    other_host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    other_vm_uuid = await put_vm(client)
    path = f"/var/lib/swtpm/{vm_uuid}/tpm2-00.permall"
    first = await add_file(client, vm_uuid, host_uuid, path)

    for owner in (vm_uuid, other_vm_uuid):
        again = await client.post(
            f"/vms/{owner}/host-files",
            json={"host_uuid": host_uuid, "path": path, "type": "NvRam", "backup": True},
        )
        assert_problem(again, 409)
    # The same path on another host is another file.
    await add_file(client, vm_uuid, other_host_uuid, path)

    listed = await client.get(f"/vms/{vm_uuid}/host-files")
    assert [f for f in listed.json() if f["host_uuid"] == host_uuid] == [first]
    assert (await client.get(f"/vms/{other_vm_uuid}/host-files")).json() == []


async def test_host_files_list_includes_backups(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client, secure_boot=True)
    files = await add_every_kind_of_file(client, vm_uuid, host_uuid)
    listed = await client.get(f"/vms/{vm_uuid}/host-files")
    assert listed.status_code == 200
    assert "link" not in listed.headers
    assert by_uuid(listed.json()) == by_uuid(files)
    assert sorted(f["backup"] for f in listed.json()) == [False, False, True, True]


async def test_host_files_of_unknown_vm_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/vms/{uuid.uuid4()}/host-files"), 404)


async def test_host_files_pages_follow_the_next_link_to_the_end(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    files = [await add_file(client, vm_uuid, host_uuid, f"/var/lib/swtpm/{vm_uuid}/file-{i}") for i in range(7)]

    pages: list[list[dict[str, Any]]] = []
    url: str | None = f"/vms/{vm_uuid}/host-files?limit=3"
    while url is not None:
        answer = await client.get(url)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        link = answer.headers.get("link")
        url = None
        if link is not None:
            match = NEXT_LINK.match(link)
            assert match, link
            url = match.group(1)
            assert "limit=3" in url
    assert [len(page) for page in pages] == [3, 3, 1]
    seen = [f for page in pages for f in page]
    assert len({f["uuid"] for f in seen}) == len(seen), "a file came twice"
    assert by_uuid(seen) == by_uuid(files)


async def test_host_files_page_that_ends_exactly_has_no_next_link(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    for i in range(2):
        await add_file(client, vm_uuid, host_uuid, f"/var/lib/swtpm/{vm_uuid}/file-{i}")
    answer = await client.get(f"/vms/{vm_uuid}/host-files?limit=2")
    assert len(answer.json()) == 2
    assert "link" not in answer.headers


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "many"])
async def test_host_files_limit_out_of_range_is_422(client: httpx.AsyncClient, limit: str) -> None:
    vm_uuid = await put_vm(client)
    assert_problem(await client.get(f"/vms/{vm_uuid}/host-files", params={"limit": limit}), 422)


async def test_host_files_limit_bounds_are_accepted(client: httpx.AsyncClient) -> None:
    vm_uuid = await put_vm(client)
    for limit in ("1", "1000"):
        answer = await client.get(f"/vms/{vm_uuid}/host-files", params={"limit": limit})
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "bm90IGpzb24",  # base64 of "not json"
        "WyJub3QtYS11dWlkIl0",  # base64 of ["not-a-uuid"]
        "eyJhIjogMX0",  # base64 of {"a": 1}
        "WzEsIDJd",  # base64 of [1, 2]
        "%00",
    ],
)
async def test_host_files_foreign_cursor_is_400(client: httpx.AsyncClient, cursor: str) -> None:
    vm_uuid = await put_vm(client)
    assert_problem(await client.get(f"/vms/{vm_uuid}/host-files?after={cursor}"), 400)
