"""Tests of every validation rule of the inventory: bad input is a 422 problem (or 413) and writes nothing."""

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.inventory_helpers import put_host, put_vm
from tests.problem_helpers import assert_problem

AGENT_URL = "http://127.0.0.1:8100"
JSON = {"content-type": "application/json"}
MALFORMED_UUIDS = ["not-a-uuid", "123", "0b1c2d3e-0000-4000-8000-00000000000g", "0b1c2d3e00004000800000000000000100"]


@pytest.mark.parametrize("bad", MALFORMED_UUIDS)
@pytest.mark.parametrize(
    ("method", "template", "body"),
    [
        ("GET", "/hosts/{}", None),
        ("PUT", "/hosts/{}", {"name": "kvm", "agent_url": AGENT_URL}),
        ("GET", "/vms/{}", None),
        ("PUT", "/vms/{}", {"name": "vm", "secure_boot": False}),
        ("GET", "/vms/{}/tpm", None),
        ("POST", "/vms/{}/tpm", {"key_provider_uuid": None}),
        ("GET", "/vms/{}/host-files", None),
        ("POST", "/vms/{}/host-files", {"host_uuid": str(uuid.uuid4()), "path": "/a", "type": "NvRam"}),
    ],
)
async def test_malformed_uuid_in_path_is_422(
    client: httpx.AsyncClient, method: str, template: str, body: dict[str, Any] | None, bad: str
) -> None:
    assert_problem(await client.request(method, template.format(bad), json=body), 422)


@pytest.mark.parametrize("bad", [*MALFORMED_UUIDS, 42, ["x"], {"uuid": "x"}])
async def test_malformed_key_provider_uuid_is_422(client: httpx.AsyncClient, bad: object) -> None:
    vm_uuid = await put_vm(client, tpm=False)
    assert_problem(await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": bad}), 422)
    assert_problem(await client.get(f"/vms/{vm_uuid}/tpm"), 404)


@pytest.mark.parametrize("bad", [*MALFORMED_UUIDS, None, 42])
async def test_malformed_host_uuid_of_a_file_is_422(client: httpx.AsyncClient, bad: object) -> None:
    vm_uuid = await put_vm(client)
    answer = await client.post(f"/vms/{vm_uuid}/host-files", json={"host_uuid": bad, "path": "/a", "type": "TpmState"})
    assert_problem(answer, 422)
    assert (await client.get(f"/vms/{vm_uuid}/host-files")).json() == []


@pytest.mark.parametrize(
    "agent_url",
    [
        "ftp://kvm-1:21",
        "http://",
        "https://",
        "not a url",
        "kvm-1:8100",
        "//kvm-1:8100",
        "http://user:secret@kvm-1:8100",
        "http://user@kvm-1:8100",
        "http://kvm-1:99999",
        "http://kvm-1:port",
        "file:///etc/passwd",
        "",
        "http://" + "h" * 2048,
        "http://kvm\x00-1:8100",
        "http://kvm-1:8100/\x00",
        "https://[0]",
        "http://[1::2::3]:8100",
    ],
    ids=repr,
)
async def test_agent_url_must_be_http_with_a_host(client: httpx.AsyncClient, agent_url: str) -> None:
    host_uuid = uuid.uuid4()
    assert_problem(await client.put(f"/hosts/{host_uuid}", json={"name": "kvm", "agent_url": agent_url}), 422)
    assert_problem(await client.get(f"/hosts/{host_uuid}"), 404)


@pytest.mark.parametrize(
    "agent_url", ["http://kvm-1:8100", "https://10.0.0.5", "http://[::1]:8100/agent", "https://[::ffff:10.0.0.5]"]
)
async def test_agent_url_accepts_http_and_https(client: httpx.AsyncClient, agent_url: str) -> None:
    answer = await client.put(f"/hosts/{uuid.uuid4()}", json={"name": "kvm", "agent_url": agent_url})
    assert answer.status_code == 201, answer.text
    assert answer.json()["agent_url"] == agent_url


async def test_replacing_a_host_with_a_bad_agent_url_keeps_it(client: httpx.AsyncClient) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    assert_problem(await client.put(f"/hosts/{host_uuid}", json={"name": "other", "agent_url": "ftp://x"}), 422)
    assert (await client.get(f"/hosts/{host_uuid}")).json()["agent_url"] == AGENT_URL


@pytest.mark.parametrize(
    "path",
    [
        "relative/state",
        "./state",
        "",
        "/var/lib/../etc/shadow",
        "/..",
        "/var/lib/swtpm/..",
        "../state",
        "/var/lib/swtpm/\x00/state",
        "/state\x00",
        "/" + "a" * 4096,  # 4097 bytes
        "/" + "é" * 2049,  # 2049 characters of two bytes each: 4099 bytes
        "/" + "€" * 1366,  # 1367 characters, 4099 bytes
        "/\ud800",  # a lone surrogate is no UTF-8 at all
    ],
    ids=repr,
)
async def test_bad_host_path_is_422_and_writes_nothing(client: httpx.AsyncClient, path: str) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    # Sent as escaped JSON (`\\ud800`), as a client would send a string that is no valid Unicode.
    body = json.dumps({"host_uuid": host_uuid, "path": path, "type": "TpmState"})
    answer = await client.post(f"/vms/{vm_uuid}/host-files", content=body, headers=JSON)
    assert_problem(answer, 422)
    assert (await client.get(f"/vms/{vm_uuid}/host-files")).json() == []
    assert (await client.get(f"/vms/{vm_uuid}/tpm")).json()["host_files"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/" + "a" * 4095,  # exactly 4096 bytes
        "/" + "é" * 2047 + "a",  # 4096 bytes in 2049 characters
        "/var/lib/swtpm/..state/tpm2-00.permall",  # '..' inside a name is no '..' segment
        "/var/lib/swtpm/./tpm2//state",
        "/var/lib/libvirt/qemu/nvram/vm name with spaces_VARS.fd",
    ],
    ids=lambda p: repr(p[:40]),
)
async def test_good_host_path_is_kept_as_given(client: httpx.AsyncClient, path: str) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    answer = await client.post(
        f"/vms/{vm_uuid}/host-files", json={"host_uuid": host_uuid, "path": path, "type": "NvRam"}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["path"] == path
    assert [f["path"] for f in (await client.get(f"/vms/{vm_uuid}/host-files")).json()] == [path]


@pytest.mark.parametrize(
    "change",
    [
        {"type": "tpmstate"},
        {"type": "Nvram"},
        {"type": "Backup"},
        {"type": None},
        {"type": 1},
        {"backup": "true"},
        {"backup": 1},
        {"backup": None},
        {"path": None},
        {"path": ["/a"]},
        {"extra": "field"},
        {"uuid": str(uuid.uuid4())},
    ],
    ids=repr,
)
async def test_bad_host_file_field_is_422(client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    body = {"host_uuid": host_uuid, "path": "/state", "type": "TpmState", "backup": False, **change}
    assert_problem(await client.post(f"/vms/{vm_uuid}/host-files", json=body), 422)
    assert (await client.get(f"/vms/{vm_uuid}/host-files")).json() == []


@pytest.mark.parametrize("missing", ["host_uuid", "path", "type"])
async def test_host_file_without_a_required_field_is_422(client: httpx.AsyncClient, missing: str) -> None:
    host_uuid = await put_host(client, AGENT_URL)
    vm_uuid = await put_vm(client)
    body = {"host_uuid": host_uuid, "path": "/state", "type": "TpmState"}
    del body[missing]
    assert_problem(await client.post(f"/vms/{vm_uuid}/host-files", json=body), 422)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "vm", "secure_boot": "true"},
        {"name": "vm", "secure_boot": 1},
        {"name": "vm", "secure_boot": None},
        {"name": "vm"},
        {"secure_boot": False},
        {"name": "", "secure_boot": False},
        {"name": "v" * 256, "secure_boot": False},
        {"name": 7, "secure_boot": False},
        {"name": "vm", "secure_boot": False, "tpm": True},
        [],
        "vm",
    ],
    ids=repr,
)
async def test_bad_vm_body_is_422_and_writes_nothing(client: httpx.AsyncClient, body: object) -> None:
    vm_uuid = uuid.uuid4()
    assert_problem(await client.put(f"/vms/{vm_uuid}", json=body), 422)
    assert_problem(await client.get(f"/vms/{vm_uuid}"), 404)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "kvm"},
        {"agent_url": AGENT_URL},
        {"name": "", "agent_url": AGENT_URL},
        {"name": "kvm", "agent_url": AGENT_URL, "rack": 4},
    ],
    ids=repr,
)
async def test_bad_host_body_is_422_and_writes_nothing(client: httpx.AsyncClient, body: object) -> None:
    host_uuid = uuid.uuid4()
    assert_problem(await client.put(f"/hosts/{host_uuid}", json=body), 422)
    assert_problem(await client.get(f"/hosts/{host_uuid}"), 404)


async def test_unknown_field_of_a_tpm_is_422(client: httpx.AsyncClient) -> None:
    vm_uuid = await put_vm(client, tpm=False)
    answer = await client.post(f"/vms/{vm_uuid}/tpm", json={"key_provider_uuid": None, "uuid": str(uuid.uuid4())})
    assert_problem(answer, 422)
    assert_problem(await client.get(f"/vms/{vm_uuid}/tpm"), 404)


@pytest.mark.parametrize("name", ["nul\x00inside", "\ud800 lone surrogate"], ids=repr)
async def test_name_that_postgresql_cannot_store_is_422(client: httpx.AsyncClient, name: str) -> None:
    vm_uuid = uuid.uuid4()
    vm = json.dumps({"name": name, "secure_boot": False})
    assert_problem(await client.put(f"/vms/{vm_uuid}", content=vm, headers=JSON), 422)
    host_uuid = uuid.uuid4()
    host = json.dumps({"name": name, "agent_url": AGENT_URL})
    assert_problem(await client.put(f"/hosts/{host_uuid}", content=host, headers=JSON), 422)
    assert_problem(await client.get(f"/vms/{vm_uuid}"), 404)
    assert_problem(await client.get(f"/hosts/{host_uuid}"), 404)


@pytest.mark.parametrize(
    "content",
    [b"{", b"not json", b'{"name": "vm", "secure_boot": false', b"\xff\xfe", b""],
    ids=repr,
)
async def test_invalid_json_body_is_422(client: httpx.AsyncClient, content: bytes) -> None:
    vm_uuid = uuid.uuid4()
    assert_problem(await client.put(f"/vms/{vm_uuid}", content=content, headers=JSON), 422)
    assert_problem(await client.get(f"/vms/{vm_uuid}"), 404)


async def test_body_over_one_mebibyte_is_413(client: httpx.AsyncClient) -> None:
    vm_uuid = uuid.uuid4()
    content = b'{"name": "' + b"v" * (1024 * 1024) + b'", "secure_boot": false}'
    assert_problem(await client.put(f"/vms/{vm_uuid}", content=content, headers=JSON), 413)
    assert_problem(await client.get(f"/vms/{vm_uuid}"), 404)


async def test_streamed_body_over_one_mebibyte_is_413(client: httpx.AsyncClient) -> None:
    """A body sent without Content-Length is counted as it arrives."""

    async def chunks() -> Any:
        yield b'{"name": "'
        for _ in range(17):
            yield b"v" * 65536
        yield b'", "secure_boot": false}'

    vm_uuid = uuid.uuid4()
    answer = await client.put(f"/vms/{vm_uuid}", content=chunks(), headers=JSON)
    assert "content-length" not in answer.request.headers
    assert_problem(answer, 413)
    assert_problem(await client.get(f"/vms/{vm_uuid}"), 404)
