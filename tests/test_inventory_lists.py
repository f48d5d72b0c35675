"""GET /hosts and GET /vms: every host and VM in UUID order, page by page; hosts with their health, and by it."""

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.service.db.engine import recorded_statements
from devtools.local_stack import free_port, wait_until
from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, put_host, put_vm, remove_tpm
from tests.pg_helpers import create_migrated_database
from tests.problem_helpers import assert_problem

NEXT_LINK = re.compile(r'^<([^>]+)>; rel="next"$')
HEALTHY = {"state": "ok", "consecutive_failures": 0, "last_error": None, "next_probe_at": None}


@pytest.fixture
async def database_url(server_url: str) -> str:
    """A database of this test's own (overrides conftest's for `client`), so that a list holds exactly what the test
    put into it."""
    return await create_migrated_database(server_url)


async def read_all_pages(client: httpx.AsyncClient, url: str) -> list[list[dict[str, Any]]]:
    """Each page of the list at `url`, following its `Link: rel="next"` header to the end."""
    pages: list[list[dict[str, Any]]] = []
    next_url: str | None = url
    while next_url is not None:
        answer = await client.get(next_url)
        assert answer.status_code == 200, answer.text
        pages.append(answer.json())
        link = answer.headers.get("link")
        match = NEXT_LINK.match(link) if link is not None else None
        assert link is None or match, link
        next_url = match.group(1) if match else None
    return pages


async def failing_host(client: httpx.AsyncClient) -> str:
    """A host whose agent does not answer, seen failing: a removal of a VM's TPM with a file on it called it."""
    host_uuid = await put_host(client, f"http://127.0.0.1:{free_port()}")
    vm_uuid = await put_vm(client)
    await add_file(client, vm_uuid, host_uuid, f"/var/lib/libvirt/swtpm/{vm_uuid}")
    job = await remove_tpm(client, vm_uuid)
    assert job["hosts"][0]["state"] == "failed", job
    return host_uuid


async def test_vms_are_listed_in_uuid_order_page_by_page(client: httpx.AsyncClient) -> None:
    vms = {}
    for secure_boot in (True, False, True, False, False):
        vm_uuid = await put_vm(client, secure_boot=secure_boot, tpm=False)
        vms[vm_uuid] = {"uuid": vm_uuid, "name": "vm", "secure_boot": secure_boot}

    pages = await read_all_pages(client, "/vms?limit=2")
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [vm for page in pages for vm in page] == [vms[key] for key in sorted(vms)]


async def test_hosts_are_listed_in_uuid_order_page_by_page_each_with_its_health(client: httpx.AsyncClient) -> None:
    failing = await failing_host(client)
    healthy = [await put_host(client, "http://127.0.0.1:8100") for _ in range(4)]

    pages = await read_all_pages(client, "/hosts?limit=2")
    assert [len(page) for page in pages] == [2, 2, 1]
    listed = [host for page in pages for host in page]
    assert [host["uuid"] for host in listed] == sorted([failing, *healthy])
    for host in listed:
        # Each as GET /hosts/{uuid} answers it, its health included.
        assert host == (await client.get(f"/hosts/{host['uuid']}")).json()
    health = {host["uuid"]: host["health"] for host in listed}
    assert all(health[host] == HEALTHY for host in healthy)
    assert health[failing]["state"] == "failing" and health[failing]["consecutive_failures"] >= 1
    assert "connection refused" in health[failing]["last_error"]


async def test_a_page_of_hosts_reads_their_health_in_one_statement(
    client: httpx.AsyncClient, make_client: AppFactory
) -> None:
    await failing_host(client)
    for _ in range(5):
        await put_host(client, "http://127.0.0.1:8100")
    # An app without a worker: nothing but the request uses its engine while the statements are recorded.
    reader = await make_client(run_worker=False)
    async with recorded_statements(reader.app.state.engine) as statements:  # type: ignore[attr-defined]
        answer = await reader.get("/hosts")
    assert len(answer.json()) == 6
    assert len([statement for statement, _ in statements if "host_health" in statement]) == 1, statements


async def test_the_health_filter_keeps_the_hosts_of_one_state_and_pages_within_them(client: httpx.AsyncClient) -> None:
    failing = sorted([await failing_host(client) for _ in range(3)])
    healthy = sorted([await put_host(client, "http://127.0.0.1:8100") for _ in range(2)])

    failing_pages = await read_all_pages(client, "/hosts?health=failing&limit=2")
    assert [[host["uuid"] for host in page] for page in failing_pages] == [failing[:2], failing[2:]]
    assert all(host["health"]["state"] == "failing" for page in failing_pages for host in page)
    ok_pages = await read_all_pages(client, "/hosts?health=ok&limit=2")
    assert [[host["uuid"] for host in page] for page in ok_pages] == [healthy]


async def test_a_host_that_answers_again_is_listed_ok_and_no_longer_failing(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    host_uuid = await failing_host(client)
    async with running_agent(tmp_path) as agent_url:
        # The same host's agent back at another address: the reaper's next probe of its orphan file reaches it.
        answer = await client.put(f"/hosts/{host_uuid}", json={"name": "kvm", "agent_url": agent_url})
        assert answer.status_code == 200, answer.text

        async def answered_again() -> bool:
            return bool((await client.get(f"/hosts/{host_uuid}")).json()["health"]["state"] == "ok")

        await wait_until(answered_again, timeout=30, what="the host ok again")

    (ok,) = (await client.get("/hosts?health=ok")).json()
    assert ok["uuid"] == host_uuid and ok["health"]["consecutive_failures"] == 0
    assert (await client.get("/hosts?health=failing")).json() == []


async def test_an_empty_inventory_lists_nothing_and_links_no_next_page(client: httpx.AsyncClient) -> None:
    for url in ("/hosts", "/vms", "/hosts?health=ok", "/hosts?health=failing"):
        answer = await client.get(url)
        assert answer.status_code == 200, answer.text
        assert answer.json() == [] and "link" not in answer.headers


async def test_a_page_that_ends_the_list_exactly_links_no_next_page(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await put_host(client, "http://127.0.0.1:8100")
        await put_vm(client, tpm=False)
    for url in ("/hosts?limit=2", "/vms?limit=2"):
        answer = await client.get(url)
        assert len(answer.json()) == 2 and "link" not in answer.headers


@pytest.mark.parametrize("path", ["/hosts", "/vms"])
@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("limit=0", 422),
        ("limit=1001", 422),
        ("limit=many", 422),
        ("after=garbage!", 400),
        ("after=FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF", 400),
        (f"after={uuid.UUID(int=1)}", 400),  # a UUID, but not a cursor: cursors are 32 hex digits
        ("after=%00", 400),
    ],
)
async def test_bad_paging_is_a_problem_and_changes_nothing(
    client: httpx.AsyncClient, path: str, query: str, status: int
) -> None:
    await put_host(client, "http://127.0.0.1:8100")
    await put_vm(client, tpm=False)
    before = (await client.get(path)).json()
    assert_problem(await client.get(f"{path}?{query}"), status)
    assert (await client.get(path)).json() == before


@pytest.mark.parametrize("health", ["maybe", "OK", "", "failing,ok"])
async def test_an_unknown_health_is_422_and_changes_nothing(client: httpx.AsyncClient, health: str) -> None:
    await failing_host(client)
    before = (await client.get("/hosts")).json()
    problem = assert_problem(await client.get("/hosts", params={"health": health}), 422)
    assert "health" in problem["detail"], problem
    assert (await client.get("/hosts")).json() == before
