"""Tests of the error format (RFC 9457 problem+json on every 4xx/5xx) and of API_TOKEN authentication."""

import base64
import re
import uuid
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.conftest import AppFactory
from tests.inventory_helpers import put_vm
from tests.problem_helpers import assert_problem

TOKEN = "s3cret"
OPEN_PATHS = ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"]


@pytest.fixture
async def authed(make_client: AppFactory) -> httpx.AsyncClient:
    """A client of an app whose API_TOKEN is set (and which sends no token by itself)."""
    return await make_client(api_token=SecretStr(TOKEN))


def bearer(token: str) -> dict[str, str]:
    """The Authorization header that carries `token`."""
    return {"Authorization": f"Bearer {token}"}


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (method, path, operation) of an OpenAPI schema."""
    return [
        (method.upper(), path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in {"get", "put", "post", "delete", "patch"}
    ]


def concrete(path: str) -> str:
    """The path with a fresh UUID in each of its parameters."""
    return re.sub(r"\{[^}]+\}", lambda _: str(uuid.uuid4()), path)


async def test_unknown_route_is_404_problem(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/no/such/route"), 404)
    assert body["title"] == HTTPStatus(404).phrase


@pytest.mark.parametrize(("method", "path"), [("PATCH", "/hosts/{}"), ("POST", "/vms/{}"), ("PUT", "/healthz")])
async def test_wrong_method_is_405_problem_with_allow(client: httpx.AsyncClient, method: str, path: str) -> None:
    answer = await client.request(method, path.format(uuid.uuid4()))
    body = assert_problem(answer, 405)
    assert body["title"] == HTTPStatus(405).phrase
    assert answer.headers["allow"]


async def test_problem_title_is_the_status_phrase_and_detail_says_why(client: httpx.AsyncClient) -> None:
    vm_uuid = uuid.uuid4()
    missing = assert_problem(await client.get(f"/vms/{vm_uuid}"), 404)
    assert str(vm_uuid) in missing["detail"]
    invalid = assert_problem(await client.put(f"/vms/{vm_uuid}", json={"name": "vm", "secure_boot": "yes"}), 422)
    assert invalid["title"] == HTTPStatus(422).phrase
    assert "secure_boot" in invalid["detail"]
    vm_with_tpm = await put_vm(client)
    conflict = assert_problem(await client.post(f"/vms/{vm_with_tpm}/tpm", json={}), 409)
    assert conflict["title"] == HTTPStatus(409).phrase


async def test_without_token_is_401_bearer_problem(authed: httpx.AsyncClient) -> None:
    answer = await authed.get(f"/vms/{uuid.uuid4()}")
    body = assert_problem(answer, 401)
    assert body["title"] == HTTPStatus(401).phrase
    assert answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
        "Bearer",
        TOKEN,
        f"Basic {base64.b64encode(f'user:{TOKEN}'.encode()).decode()}",
        f"Token {TOKEN}",
    ],
)
async def test_wrong_token_is_401(authed: httpx.AsyncClient, authorization: str) -> None:
    vm_uuid = uuid.uuid4()
    answer = await authed.put(
        f"/vms/{vm_uuid}", json={"name": "vm", "secure_boot": False}, headers={"Authorization": authorization}
    )
    assert_problem(answer, 401)
    assert answer.headers["www-authenticate"] == "Bearer"
    # Nothing was written on the refused call.
    assert_problem(await authed.get(f"/vms/{vm_uuid}", headers=bearer(TOKEN)), 404)


async def test_right_token_is_let_in(authed: httpx.AsyncClient) -> None:
    vm_uuid = uuid.uuid4()
    created = await authed.put(f"/vms/{vm_uuid}", json={"name": "vm", "secure_boot": False}, headers=bearer(TOKEN))
    assert created.status_code == 201, created.text
    read = await authed.get(f"/vms/{vm_uuid}", headers=bearer(TOKEN))
    assert read.status_code == 200
    # The auth scheme is case-insensitive (RFC 9110).
    assert (await authed.get(f"/vms/{vm_uuid}", headers={"Authorization": f"bearer {TOKEN}"})).status_code == 200


async def test_plain_string_token_setting_works_too(make_client: AppFactory) -> None:
    client = await make_client(api_token=TOKEN)
    assert_problem(await client.get(f"/hosts/{uuid.uuid4()}"), 401)
    assert_problem(await client.get(f"/hosts/{uuid.uuid4()}", headers=bearer(TOKEN)), 404)


async def test_every_api_operation_needs_the_token(authed: httpx.AsyncClient) -> None:
    schema = (await authed.get("/openapi.json")).json()
    checked = 0
    for method, path, _ in operations(schema):
        if path in OPEN_PATHS:
            continue
        answer = await authed.request(method, concrete(path), json={})
        assert_problem(answer, 401)
        checked += 1
    assert checked >= 8  # hosts, VMs, TPM, host files, jobs and orphan files at least


@pytest.mark.parametrize("path", OPEN_PATHS)
async def test_health_metrics_and_docs_are_open(authed: httpx.AsyncClient, path: str) -> None:
    answer = await authed.get(path)
    assert answer.status_code == 200, answer.text


async def test_openapi_declares_bearer_auth_on_the_api_and_not_on_health(authed: httpx.AsyncClient) -> None:
    schema = (await authed.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    bearer_names = {name for name, s in schemes.items() if s["type"] == "http" and s["scheme"].lower() == "bearer"}
    assert bearer_names, schemes
    for _, path, operation in operations(schema):
        declared = {name for requirement in operation.get("security", []) for name in requirement}
        if path in OPEN_PATHS:
            assert not declared, path
        else:
            assert declared & bearer_names, path


async def test_without_api_token_everything_is_open(client: httpx.AsyncClient) -> None:
    vm_uuid = uuid.uuid4()
    created = await client.put(f"/vms/{vm_uuid}", json={"name": "vm", "secure_boot": False})
    assert created.status_code == 201, created.text
    assert (await client.get(f"/vms/{vm_uuid}")).status_code == 200
    # A token nobody asked for is ignored, not refused.
    assert (await client.get(f"/vms/{vm_uuid}", headers=bearer("anything"))).status_code == 200
