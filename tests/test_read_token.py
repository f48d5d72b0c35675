"""API_READ_TOKEN: a second bearer token that may read (GET) and nothing else."""

import uuid
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from app.service.settings import Settings
from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm
from tests.problem_helpers import assert_problem
from tests.test_errors_and_auth import bearer, concrete, operations

API_TOKEN = f"full-{uuid.uuid4().hex}"
READ_TOKEN = f"read-{uuid.uuid4().hex}"


@pytest.fixture
async def api(make_client: AppFactory) -> httpx.AsyncClient:
    """A client of an app with both tokens set, that sends API_TOKEN unless a call says otherwise."""
    client = await make_client(api_token=SecretStr(API_TOKEN), api_read_token=SecretStr(READ_TOKEN))
    client.headers.update(bearer(API_TOKEN))
    return client


async def test_the_read_token_reads_everything_a_caller_can_read(api: httpx.AsyncClient, tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent_url:
        host = await put_host(api, agent_url)
        vm = await put_vm(api)
        [state] = make_files(tmp_path, vm, "tpm2-00.permall")
        await add_file(api, vm, host, state)
        job = await remove_tpm(api, vm)

    reads = [
        f"/hosts/{host}",
        f"/vms/{vm}",
        f"/vms/{vm}/host-files",
        f"/jobs/{job['id']}",
        f"/jobs?vm_uuid={vm}",
        f"/orphan-files?host_uuid={host}",
    ]
    for path in reads:
        as_reader = await api.get(path, headers=bearer(READ_TOKEN))
        assert as_reader.status_code == 200, (path, as_reader.text)
        assert as_reader.json() == (await api.get(path)).json()


async def test_the_read_token_cannot_write_and_changes_nothing(api: httpx.AsyncClient, tmp_path: Path) -> None:
    reader = bearer(READ_TOKEN)
    host = await put_host(api, "http://127.0.0.1:9")
    vm = await put_vm(api)
    [state] = make_files(tmp_path, vm, "tpm2-00.permall")
    await add_file(api, vm, host, state)
    new_host = str(uuid.uuid4())
    before = (await api.get(f"/vms/{vm}/tpm")).json()

    writes = [
        ("PUT", f"/hosts/{new_host}", {"name": "kvm", "agent_url": "http://127.0.0.1:9"}),
        ("PUT", f"/vms/{vm}", {"name": "renamed", "secure_boot": True}),
        ("POST", f"/vms/{vm}/host-files", {"host_uuid": host, "path": "/var/lib/x", "type": "NvRam", "backup": False}),
        ("DELETE", f"/vms/{vm}/tpm", None),
        ("POST", f"/vms/{vm}/tpm", {"key_provider_uuid": None}),
    ]
    for method, path, body in writes:
        body_problem = assert_problem(await api.request(method, path, json=body, headers=reader), 403)
        assert "API_READ_TOKEN" in body_problem["detail"] and method in body_problem["detail"]

    assert (await api.get(f"/hosts/{new_host}")).status_code == 404
    assert (await api.get(f"/vms/{vm}")).json()["name"] == "vm"
    assert (await api.get(f"/vms/{vm}/tpm")).json() == before
    assert (await api.get("/jobs", params={"vm_uuid": vm})).json() == []
    assert (await api.get(f"/hosts/{host}")).status_code == 200
    # The full token still writes.
    assert (await api.delete(f"/vms/{vm}/tpm")).status_code == 202


async def test_every_operation_that_is_not_a_get_answers_403_to_the_read_token(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    writes = [(method, path) for method, path, _ in operations(schema) if method != "GET"]
    assert writes, "the schema lists no write operation"
    for method, path in writes:
        assert_problem(await api.request(method, concrete(path), headers=bearer(READ_TOKEN)), 403)


async def test_other_tokens_and_none_are_still_401(make_client: AppFactory) -> None:
    client = await make_client(api_token=SecretStr(API_TOKEN), api_read_token=SecretStr(READ_TOKEN))
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": f"Basic {READ_TOKEN}"}, {}):
        assert_problem(await client.get("/jobs", headers=headers), 401)
        assert_problem(await client.delete(f"/vms/{uuid.uuid4()}/tpm", headers=headers), 401)


async def test_without_api_token_the_read_token_still_only_reads(make_client: AppFactory) -> None:
    open_api = await make_client(api_read_token=SecretStr(READ_TOKEN))
    vm = str(uuid.uuid4())
    body = {"name": "vm", "secure_boot": False}

    assert_problem(await open_api.put(f"/vms/{vm}", json=body, headers=bearer(READ_TOKEN)), 403)
    assert (await open_api.get(f"/vms/{vm}", headers=bearer(READ_TOKEN))).status_code == 404
    assert (await open_api.put(f"/vms/{vm}", json=body)).status_code == 201


async def test_the_docs_authorize_takes_either_token(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    [scheme] = schema["components"]["securitySchemes"].values()
    assert scheme["scheme"].lower() == "bearer"
    assert "API_TOKEN" in scheme["description"] and "API_READ_TOKEN" in scheme["description"]
    delete_tpm = schema["paths"]["/vms/{vm_uuid}/tpm"]["delete"]
    assert "403" in delete_tpm["responses"]


def test_the_read_token_must_differ_from_the_api_token() -> None:
    with pytest.raises(ValidationError, match="API_READ_TOKEN must differ from API_TOKEN") as refused:
        Settings(api_token=SecretStr(API_TOKEN), api_read_token=SecretStr(API_TOKEN))
    assert API_TOKEN not in str(refused.value)
