"""Decommissioning a host: 204 once nothing is left on it, 409 while records or orphans are, and with
`abandon_orphans=true` its orphans move to /abandoned-files, never retried; every answer, races included."""

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.service.audit import audit
from app.service.inventory import service as inventory
from app.service.inventory.decommission import delete_host
from app.service.metrics import refresh_gauges
from app.service.schemas import PathFileIn
from tests.agent_helpers import running_agent, running_recording_agent
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm
from tests.problem_helpers import assert_problem
from tests.reliability.process_helpers import wait_until

DEAD_AGENT = "http://127.0.0.1:9"
NEXT_LINK = re.compile(r'^<([^>]+)>; rel="next"$')
ABANDONED_KEYS = {"uuid", "host_uuid", "vm_uuid", "path", "type", "attempts", "last_error", "abandoned_at"}


def sessions_of(client: httpx.AsyncClient) -> async_sessionmaker[AsyncSession]:
    """The session factory of the app behind `client`."""
    factory: async_sessionmaker[AsyncSession] = client.app.state.sessions  # type: ignore[attr-defined]
    return factory


async def listed(client: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    """One page of a list answer, checked to be a 200."""
    answer = await client.get(path, params=params)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()
    return rows


async def orphan_files_on(client: httpx.AsyncClient, host: str, count: int) -> tuple[str, list[str]]:
    """A VM whose TPM removal left `count` state files orphans on `host` (its agent is down); VM and file UUIDs."""
    vm = await put_vm(client)
    files = [await add_file(client, vm, host, f"/var/lib/libvirt/swtpm/{vm}/{n}/tpm2-00.permall") for n in range(count)]
    job = await remove_tpm(client, vm)
    assert job["state"] == "succeeded" and job["orphan_files"] == count, job
    return vm, [f["uuid"] for f in files]


async def waiting_on_a_lock(client: httpx.AsyncClient) -> bool:
    """Whether some session of this database waits for a row lock."""
    async with sessions_of(client)() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


async def test_a_host_with_nothing_on_it_is_deleted(client: httpx.AsyncClient) -> None:
    host = await put_host(client, DEAD_AGENT)

    answer = await client.delete(f"/hosts/{host}")

    assert answer.status_code == 204, answer.text
    assert answer.content == b""
    assert_problem(await client.get(f"/hosts/{host}"), 404)
    assert_problem(await client.delete(f"/hosts/{host}"), 404)


async def test_an_unknown_host_is_404_with_or_without_abandon(client: httpx.AsyncClient) -> None:
    assert_problem(await client.delete(f"/hosts/{uuid.uuid4()}"), 404)
    assert_problem(await client.delete(f"/hosts/{uuid.uuid4()}", params={"abandon_orphans": "true"}), 404)


@pytest.mark.parametrize(
    ("path", "params"),
    [("/hosts/not-a-uuid", {}), ("/hosts/{host}", {"abandon_orphans": "perhaps"})],
    ids=["malformed-uuid", "bad-abandon-flag"],
)
async def test_bad_input_is_422_and_changes_nothing(
    client: httpx.AsyncClient, path: str, params: dict[str, str]
) -> None:
    host = await put_host(client, DEAD_AGENT)

    assert_problem(await client.delete(path.format(host=host), params=params), 422)

    assert (await client.get(f"/hosts/{host}")).status_code == 200


@pytest.mark.parametrize("abandon", [False, True], ids=["plain", "abandon-orphans"])
async def test_a_host_with_a_file_record_is_409_and_stays(client: httpx.AsyncClient, abandon: bool) -> None:
    host = await put_host(client, DEAD_AGENT)
    vm = await put_vm(client)
    recorded = await add_file(client, vm, host, f"/var/lib/libvirt/swtpm/{vm}")

    answer = await client.delete(f"/hosts/{host}", params={"abandon_orphans": str(abandon).lower()})

    body = assert_problem(answer, 409)
    assert "1 host-file record" in body["detail"]
    assert (await client.get(f"/hosts/{host}")).status_code == 200
    assert [f["uuid"] for f in await listed(client, f"/vms/{vm}/host-files")] == [recorded["uuid"]]


async def test_a_host_with_orphans_is_409_until_they_are_abandoned(client: httpx.AsyncClient, tmp_path: Path) -> None:
    vm = await put_vm(client)
    async with running_agent(tmp_path) as url:
        live = await put_host(client, url)
        dead = await put_host(client, DEAD_AGENT)
        (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
        await add_file(client, vm, live, state)
        orphan = await add_file(client, vm, dead, f"/var/lib/libvirt/swtpm/{vm}/tpm2-00.permall")
        assert (await remove_tpm(client, vm))["orphan_files"] == 1
    orphans_before = await listed(client, "/orphan-files", host_uuid=dead)

    refused = await client.delete(f"/hosts/{dead}")

    assert "1 orphan file" in assert_problem(refused, 409)["detail"]
    assert await listed(client, "/orphan-files", host_uuid=dead) == orphans_before
    assert await listed(client, "/abandoned-files", host_uuid=dead) == []

    answer = await client.delete(f"/hosts/{dead}", params={"abandon_orphans": "true"})

    assert answer.status_code == 204, answer.text
    assert_problem(await client.get(f"/hosts/{dead}"), 404)
    assert await listed(client, "/orphan-files", host_uuid=dead) == []
    (abandoned,) = await listed(client, "/abandoned-files", host_uuid=dead)
    assert abandoned.keys() == ABANDONED_KEYS
    (was,) = orphans_before
    assert abandoned["uuid"] == orphan["uuid"] == was["uuid"]
    assert {k: abandoned[k] for k in ("host_uuid", "vm_uuid", "path", "type", "attempts", "last_error")} == {
        k: was[k] for k in ("host_uuid", "vm_uuid", "path", "type", "attempts", "last_error")
    }
    async with sessions_of(client)() as session:
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok, report.render()
    assert report.states == {"live": 0, "confirmed": 1, "orphan": 0, "abandoned": 1}, report.render()
    assert "1 abandoned" in report.render()


async def test_abandoned_files_are_never_retried_nor_deleted(client: httpx.AsyncClient, tmp_path: Path) -> None:
    async with running_recording_agent(tmp_path, mode="http500") as (url, agent):
        host = await put_host(client, url)
        vm = await put_vm(client)
        (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
        await add_file(client, vm, host, state)
        assert (await remove_tpm(client, vm))["orphan_files"] == 1
        assert (await client.delete(f"/hosts/{host}", params={"abandon_orphans": "true"})).status_code == 204
        agent.mode = "ok"
        calls = len(agent.calls)
        # Several retry intervals (ORPHAN_RETRY_SECONDS is 0.3 s in tests, at most 1 s with backoff).
        await asyncio.sleep(3)

        assert len(agent.calls) == calls
        assert state.read_bytes() == b"state"
        assert len(await listed(client, "/abandoned-files", host_uuid=host)) == 1


async def test_abandoned_files_are_paged_and_filtered_by_host(client: httpx.AsyncClient) -> None:
    first, second = await put_host(client, DEAD_AGENT), await put_host(client, DEAD_AGENT)
    _, first_files = await orphan_files_on(client, first, 3)
    _, second_files = await orphan_files_on(client, second, 1)
    for host in (first, second):
        assert (await client.delete(f"/hosts/{host}", params={"abandon_orphans": "true"})).status_code == 204

    page = await client.get("/abandoned-files", params={"host_uuid": first, "limit": 2})
    assert page.status_code == 200, page.text
    link = NEXT_LINK.match(page.headers["Link"])
    assert link is not None, page.headers["Link"]
    rest = await client.get(link.group(1))
    assert rest.status_code == 200, rest.text
    assert "Link" not in rest.headers
    assert [f["uuid"] for f in page.json() + rest.json()] == sorted(first_files)
    assert [f["uuid"] for f in await listed(client, "/abandoned-files", host_uuid=second)] == second_files
    everyone = {f["uuid"] for f in await listed(client, "/abandoned-files", limit=1000)}
    assert everyone >= set(first_files + second_files)


@pytest.mark.parametrize(
    "params",
    [{"host_uuid": "not-a-uuid"}, {"limit": "0"}, {"limit": "1001"}, {"after": "not-a-cursor"}],
    ids=["malformed-host", "limit-0", "limit-over-max", "bad-cursor"],
)
async def test_bad_queries_of_abandoned_files_are_4xx(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    assert_problem(await client.get("/abandoned-files", params=params), 400 if "after" in params else 422)


async def test_metrics_show_abandoned_files(client: httpx.AsyncClient) -> None:
    host = await put_host(client, DEAD_AGENT)
    await orphan_files_on(client, host, 2)
    assert (await client.delete(f"/hosts/{host}", params={"abandon_orphans": "true"})).status_code == 204
    async with sessions_of(client)() as session:
        await refresh_gauges(session)
        abandoned = await session.scalar(text("SELECT count(*) FROM abandoned_files"))

    answer = await client.get("/metrics")

    assert f"tpm_abandoned_files {float(abandoned or 0)}" in answer.text.splitlines()


async def test_a_host_file_added_while_its_host_is_deleted_is_404(client: httpx.AsyncClient) -> None:
    host = await put_host(client, DEAD_AGENT)
    vm = await put_vm(client)
    body = {"host_uuid": host, "path": f"/var/lib/libvirt/swtpm/{vm}", "type": "TpmState", "backup": False}
    async with sessions_of(client)() as session, session.begin():
        await delete_host(session, uuid.UUID(host), abandon_orphans=False)
        adding = asyncio.create_task(client.post(f"/vms/{vm}/host-files", json=body))
        await wait_until(lambda: waiting_on_a_lock(client), timeout=10, what="the host file waits for the host")
        assert not adding.done()

    assert_problem(await adding, 404)
    assert await listed(client, f"/vms/{vm}/host-files") == []


async def test_a_host_deleted_while_a_host_file_is_added_is_409(client: httpx.AsyncClient) -> None:
    host = await put_host(client, DEAD_AGENT)
    vm = await put_vm(client)
    body = PathFileIn(host_uuid=uuid.UUID(host), path=f"/var/lib/libvirt/swtpm/{vm}", type="TpmState")
    async with sessions_of(client)() as session, session.begin():
        await inventory.add_host_file(session, uuid.UUID(vm), body)
        deleting = asyncio.create_task(client.delete(f"/hosts/{host}"))
        await wait_until(lambda: waiting_on_a_lock(client), timeout=10, what="the delete waits for the host file")
        assert not deleting.done()

    assert "1 host-file record" in assert_problem(await deleting, 409)["detail"]
    assert (await client.get(f"/hosts/{host}")).status_code == 200


async def test_orphans_abandoned_while_their_retry_is_in_flight_stay_abandoned(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_recording_agent(tmp_path, mode="http500") as (url, agent):
        host = await put_host(client, url)
        vm = await put_vm(client)
        (state,) = make_files(tmp_path, vm, "tpm2-00.permall")
        await add_file(client, vm, host, state)
        assert (await remove_tpm(client, vm))["orphan_files"] == 1
        # The next retry is held open on the host while the host is decommissioned.
        agent.mode = "ok"
        agent.hold.clear()
        calls = len(agent.calls)
        await wait_until(lambda: len(agent.calls) > calls, timeout=10, what="an orphan retry in flight")

        assert (await client.delete(f"/hosts/{host}", params={"abandon_orphans": "true"})).status_code == 204
        agent.hold.set()
        await wait_until(lambda: agent.in_flight == 0, timeout=10, what="the retry answered")

    # Its answer found no orphan to confirm: the file stays abandoned, in exactly one state.
    async with sessions_of(client)() as session:
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok, report.render()
    assert report.states == {"live": 0, "confirmed": 0, "orphan": 0, "abandoned": 1}, report.render()
    assert len(await listed(client, "/abandoned-files", host_uuid=host)) == 1
