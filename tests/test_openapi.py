"""The OpenAPI schema says what the service enforces: operation ids, problem answers, methods, cursor shapes."""

import re
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.inventory_helpers import add_file, put_host, put_vm, remove_tpm
from tests.problem_helpers import assert_problem

AGENT_URL = "http://127.0.0.1:8100"
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture
async def schema(client: httpx.AsyncClient) -> dict[str, Any]:
    """The app's /openapi.json."""
    answer = await client.get("/openapi.json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (path, method, operation) of the schema."""
    return [
        (path, method, op) for path, item in schema["paths"].items() for method, op in item.items() if method in METHODS
    ]


async def test_every_operation_has_a_short_unique_id_of_its_resource_and_verb(schema: dict[str, Any]) -> None:
    ids = {(method.upper(), path): op["operationId"] for path, method, op in operations(schema)}
    assert len(set(ids.values())) == len(ids), ids
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)+", operation_id) for operation_id in ids.values()), ids
    assert ids[("DELETE", "/vms/{vm_uuid}/tpm")] == "tpm-remove"
    assert ids[("PUT", "/hosts/{host_uuid}")] == "hosts-put"
    assert ids[("GET", "/jobs/{job_id}")] == "jobs-get"
    assert ids[("GET", "/jobs")] == "jobs-list"
    assert ids[("GET", "/vms/{vm_uuid}/host-files")] == "host-files-list"
    assert ids[("POST", "/vms/{vm_uuid}/host-files")] == "host-files-create"


async def test_every_error_answer_is_the_one_problem_component(schema: dict[str, Any]) -> None:
    assert set(schema["components"]["schemas"]["Problem"]["required"]) == {"title", "status", "detail"}
    errors = 0
    for path, method, op in operations(schema):
        for status, answer in op["responses"].items():
            if int(status) >= 400:
                errors += 1
                assert answer["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (method, path, status)
    assert errors > len(operations(schema))
    assert "HTTPValidationError" not in schema["components"]["schemas"]


async def test_a_405_allows_exactly_the_methods_the_schema_gives_its_path(
    client: httpx.AsyncClient, schema: dict[str, Any]
) -> None:
    for path, item in schema["paths"].items():
        documented = sorted(method.upper() for method in item if method in METHODS)
        concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
        answer = await client.request("OPTIONS", concrete)
        assert_problem(answer, 405)
        assert answer.headers["allow"].split(", ") == documented, path


def links_of(schema: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    """The links of each answer that has any, by (METHOD, path, status)."""
    return {
        (method.upper(), path, status): answer["links"]
        for path, method, op in operations(schema)
        for status, answer in op["responses"].items()
        if "links" in answer
    }


def body_schema(schema: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of an answer's body, its `$ref` resolved."""
    ref: str = answer["content"]["application/json"]["schema"]["$ref"]
    resolved: dict[str, Any] = schema["components"]["schemas"][ref.removeprefix("#/components/schemas/")]
    return resolved


VM_OPERATIONS = {"tpm-create", "tpm-get", "tpm-remove", "host-files-create", "host-files-list"}


async def test_a_vm_put_links_to_its_tpm_and_host_files_and_every_202_to_its_job(schema: dict[str, Any]) -> None:
    targets = {key: {link["operationId"] for link in links.values()} for key, links in links_of(schema).items()}
    accepted = {(method.upper(), path, "202") for path, method, op in operations(schema) if "202" in op["responses"]}
    assert accepted >= {("DELETE", "/vms/{vm_uuid}", "202"), ("DELETE", "/vms/{vm_uuid}/tpm", "202")}
    assert targets == {
        ("PUT", "/vms/{vm_uuid}", "200"): VM_OPERATIONS,
        ("PUT", "/vms/{vm_uuid}", "201"): VM_OPERATIONS,
        **{key: {"jobs-get"} for key in accepted},
    }


async def test_every_link_names_an_operation_and_gives_each_of_its_path_parameters_from_the_answer(
    schema: dict[str, Any],
) -> None:
    by_id = {op["operationId"]: op for _, _, op in operations(schema)}
    for (method, path, status), links in links_of(schema).items():
        answer = body_schema(schema, schema["paths"][path][method.lower()]["responses"][status])
        for name, link in links.items():
            target = by_id[link["operationId"]]
            path_parameters = {p["name"] for p in target["parameters"] if p["in"] == "path"}
            assert link["parameters"].keys() == path_parameters, (method, path, name)
            for expression in link["parameters"].values():
                field = expression.removeprefix("$response.body#/")
                assert answer["properties"][field]["format"] == "uuid", (method, path, name, expression)


async def test_following_the_links_of_a_vm_put_reaches_its_tpm_and_the_job_that_removes_it(
    client: httpx.AsyncClient, schema: dict[str, Any]
) -> None:
    put = await client.put(f"/vms/{uuid.uuid4()}", json={"name": "vm", "secure_boot": False})
    assert put.status_code == 201, put.text
    links = schema["paths"]["/vms/{vm_uuid}"]["put"]["responses"]["201"]["links"]
    host_file = {"host_uuid": await put_host(client, AGENT_URL), "path": "/var/lib/libvirt/swtpm/x", "type": "TpmState"}
    calls = [("tpm-create", {}, 201), ("tpm-get", None, 200), ("host-files-create", host_file, 201)]
    calls += [("host-files-list", None, 200), ("tpm-remove", None, 202)]
    for operation_id, body, status in calls:
        answer = await follow(client, schema, links[operation_id], put, body)
        assert answer.status_code == status, (operation_id, answer.text)
    job_link = schema["paths"]["/vms/{vm_uuid}/tpm"]["delete"]["responses"]["202"]["links"]["jobs-get"]
    job = await follow(client, schema, job_link, answer)
    assert job.status_code == 200 and job.json()["vm_uuid"] == put.json()["uuid"], job.text


async def follow(
    client: httpx.AsyncClient, schema: dict[str, Any], link: dict[str, Any], answer: httpx.Response, body: Any = None
) -> httpx.Response:
    """Call the operation `link` names, with the path parameters its expressions take from `answer`'s body."""
    ((path, method),) = [
        (path, method) for path, method, op in operations(schema) if op["operationId"] == link["operationId"]
    ]
    for name, expression in link["parameters"].items():
        path = path.replace(f"{{{name}}}", answer.json()[expression.removeprefix("$response.body#/")])
    return await client.request(method.upper(), path, json=body)


def after_pattern(schema: dict[str, Any], path: str) -> str:
    """The pattern the schema states for the `after` cursor of the list at `path`."""
    (after,) = [p for p in schema["paths"][path]["get"]["parameters"] if p["name"] == "after"]
    pattern: str = after["schema"]["pattern"]
    return pattern


async def test_the_cursors_handed_out_have_the_shape_the_schema_states(
    client: httpx.AsyncClient, schema: dict[str, Any]
) -> None:
    host_uuid, _ = [await put_host(client, AGENT_URL) for _ in range(2)]
    vm_uuid, _ = [await put_vm(client) for _ in range(2)]
    cursors = {path: await next_cursor(client, path) for path in ("/hosts", "/vms")}
    for name in ("a", "b"):
        await add_file(client, vm_uuid, host_uuid, f"/var/lib/libvirt/swtpm/{vm_uuid}/{name}")
    cursors["/vms/{vm_uuid}/host-files"] = await next_cursor(client, f"/vms/{vm_uuid}/host-files")
    for _ in range(2):
        await remove_tpm(client, vm_uuid)
        assert (await client.post(f"/vms/{vm_uuid}/tpm", json={})).status_code == 201
    cursors["/jobs"] = await next_cursor(client, f"/jobs?vm_uuid={vm_uuid}")
    cursors["/orphan-files"] = await next_cursor(client, f"/orphan-files?host_uuid={host_uuid}")
    for path, cursor in cursors.items():
        assert re.fullmatch(after_pattern(schema, path), cursor), (path, cursor)


async def next_cursor(client: httpx.AsyncClient, url: str) -> str:
    """The `after` cursor in the Link header of the first page, of one item, of the list at `url`."""
    answer = await client.get(url, params={"limit": 1})
    assert answer.status_code == 200, answer.text
    link = re.fullmatch(r"<(.+)>; rel=\"next\"", answer.headers["link"])
    assert link is not None, answer.headers["link"]
    (cursor,) = parse_qs(urlsplit(link.group(1)).query)["after"]
    return cursor


@pytest.mark.parametrize(
    ("path", "cursor"),
    [
        ("/jobs", "0.00000000000000000000000000000000"),
        ("/jobs", "99999999999999999.ffffffffffffffffffffffffffffffff"),
        ("/orphan-files", "ffffffffffffffffffffffffffffffff"),
        ("/hosts", "ffffffffffffffffffffffffffffffff"),
        ("/vms", "ffffffffffffffffffffffffffffffff"),
    ],
)
async def test_a_cursor_of_the_stated_shape_is_accepted_wherever_it_points(
    client: httpx.AsyncClient, schema: dict[str, Any], path: str, cursor: str
) -> None:
    assert re.fullmatch(after_pattern(schema, path), cursor)
    answer = await client.get(
        path, params={"after": cursor, "vm_uuid": str(uuid.uuid4())} if path == "/jobs" else {"after": cursor}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == []


@pytest.mark.parametrize(
    "cursor",
    ["ffffffffffffffffffffffffffffffff", "1.FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF", "1.ffff", "-1." + "f" * 32, "%00"],
)
async def test_a_jobs_cursor_of_another_shape_is_400(client: httpx.AsyncClient, cursor: str) -> None:
    assert_problem(await client.get(f"/jobs?after={cursor}"), 400)


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ({"name": "kvm", "agent_url": "ftp://kvm-1:21"}, "agent_url: must be an http:// or https:// URL"),
        ({"name": "kvm", "agent_url": "http://kvm-1:0"}, "optional port (1-65535)"),
    ],
)
async def test_a_value_off_its_pattern_is_refused_with_the_rule_in_words(
    client: httpx.AsyncClient, body: dict[str, str], rule: str
) -> None:
    problem = assert_problem(await client.put(f"/hosts/{uuid.uuid4()}", json=body), 422)
    assert rule in problem["detail"] and "^" not in problem["detail"], problem


async def test_a_relative_host_path_is_refused_with_the_rule_in_words(client: httpx.AsyncClient) -> None:
    vm_uuid = await put_vm(client)
    body = {"host_uuid": await put_host(client, AGENT_URL), "path": "var/lib/x", "type": "TpmState"}
    problem = assert_problem(await client.post(f"/vms/{vm_uuid}/host-files", json=body), 422)
    assert problem["detail"] == "path: must be an absolute path with no '..' segment and no NUL", problem
