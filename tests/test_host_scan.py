"""The scan-host job: POST /hosts/{uuid}/scan asks the host's shipped agent what it holds, and one fenced statement
makes the host's stray list what no record names; failing hosts are not called, an older agent's 404 leaves the host
ok, an answer that does not validate fails the host, and nothing is ever deleted. Real agents on loopback, a real
database.
"""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from sqlalchemy import text

from app.agent.libvirt import Libvirt
from app.agent.server import answer, create_agent_app
from app.protocol import DELETE_PATH, MAX_SCAN_ENTRIES, SCAN_PATH, DeleteFailed, ScanEntry
from app.service.metrics import refresh_gauges
from tests.agent_helpers import Handler, running_agent, running_app
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, put_host, put_vm, remove_tpm, wait_for_job
from tests.problem_helpers import assert_problem
from tests.real_libvirt import LibvirtDaemon, secret_path

DEAD_AGENT = "http://127.0.0.1:9"
MIN_AGE_SECONDS = 600
STRAY_KEYS = {
    "uuid", "host_uuid", "path", "type", "vm_uuid", "vm_known", "bytes", "modified_at", "first_seen_at", "last_seen_at"
}  # fmt: skip


def aged(path: Path, seconds: float = 2 * MIN_AGE_SECONDS) -> Path:
    """Make a file or directory look `seconds` old, as a stray left long ago does."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)
    return path


async def scan(client: httpx.AsyncClient, host: str) -> dict[str, Any]:
    """Scan the host and wait for the job; the finished job."""
    accepted = await client.post(f"/hosts/{host}/scan")
    assert accepted.status_code == 202, accepted.text
    return await wait_for_job(client, accepted.json()["id"])


async def strays_of(client: httpx.AsyncClient, host: str) -> dict[str, dict[str, Any]]:
    """The host's stray list as GET /stray-files shows it, by path."""
    answer = await client.get("/stray-files", params={"host_uuid": host, "limit": 1000})
    assert answer.status_code == 200, answer.text
    return {stray["path"]: stray for stray in answer.json()}


async def test_a_scan_lists_what_no_record_names_and_keeps_first_seen_across_scans(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(stray_min_age_seconds=MIN_AGE_SECONDS)
    vm = await put_vm(client)
    recorded = tmp_path / vm
    (recorded / "tpm2").mkdir(parents=True)
    left = str(uuid.uuid4())
    stray = tmp_path / f"{left}.snapshot-backup"
    stray.mkdir()
    (stray / "state").write_bytes(b"s" * 10)
    young = tmp_path / "just-made_VARS.fd"
    young.write_bytes(b"")
    for path in (recorded, stray / "state", stray):
        aged(path)
    async with running_agent(tmp_path) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, recorded)
        first = await scan(client, host)
        listed = await strays_of(client, host)
        again = await scan(client, host)
        relisted = await strays_of(client, host)
        (stray / "state").unlink()
        stray.rmdir()
        gone = await scan(client, host)

    assert first["type"] == "scan-host" and first["state"] == "succeeded"
    assert (first["vm_uuid"], first["tpm_uuid"], first["strays"]) == (None, None, 1)
    assert first["hosts"] == [{"host_uuid": host, "files": 3, "state": "scanned", "error": None}]
    assert set(listed) == {str(stray)}
    row = listed[str(stray)]
    assert row.keys() == STRAY_KEYS and row["host_uuid"] == host
    assert (row["type"], row["vm_uuid"], row["vm_known"], row["bytes"]) == ("TpmState", left, False, 10)
    assert again["strays"] == 1
    kept = relisted[str(stray)]
    assert kept["uuid"] == row["uuid"] and kept["first_seen_at"] == row["first_seen_at"]
    assert kept["last_seen_at"] > row["last_seen_at"]
    assert gone["strays"] == 0 and await strays_of(client, host) == {}
    # A scan deletes nothing.
    assert recorded.exists() and young.exists()


async def test_scan_requests_share_the_job_under_way(make_client: AppFactory) -> None:
    client = await make_client(run_worker=False)
    host = await put_host(client, DEAD_AGENT)
    first = await client.post(f"/hosts/{host}/scan")
    second = await client.post(f"/hosts/{host}/scan")
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert first.headers["Location"] == f"/jobs/{first.json()['id']}" and first.headers["Retry-After"] == "1"
    assert first.json()["hosts"] == [] and first.json()["vm_uuid"] is None


async def test_scan_of_an_unknown_host_is_404_and_of_a_malformed_uuid_422(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post(f"/hosts/{uuid.uuid4()}/scan"), 404)
    assert_problem(await client.post("/hosts/not-a-uuid/scan"), 422)


async def test_a_failing_host_is_not_called_and_its_list_stays(client: httpx.AsyncClient) -> None:
    host = await put_host(client, DEAD_AGENT)
    unanswered = await scan(client, host)
    not_called = await scan(client, host)
    health = (await client.get(f"/hosts/{host}")).json()["health"]
    assert unanswered["hosts"][0]["state"] == "failed" and health["state"] == "failing"
    assert "not called" in not_called["hosts"][0]["error"] and not_called["strays"] == 0


@asynccontextmanager
async def agent_answering_scans(tmp_path: Path, scan_answer: Handler) -> AsyncIterator[str]:
    """The shipped agent, whose scans `scan_answer` answers instead; its URL."""

    @web.middleware
    async def instead(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await (scan_answer if request.path == SCAN_PATH else handler)(request)

    app = create_agent_app(tmp_path, libvirt=None)
    app.middlewares.append(instead)
    async with running_app(app) as url:
        yield url


async def older_agent(request: web.Request) -> web.StreamResponse:
    """An agent older than the scan: it has no such operation."""
    raise web.HTTPNotFound


async def test_an_older_agent_stays_ok_after_a_periodic_scan_and_a_removal_still_reaches_it(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(stray_min_age_seconds=0, host_scan_interval_seconds=1)
    vm = await put_vm(client)
    state = tmp_path / vm
    state.mkdir()
    async with agent_answering_scans(tmp_path, older_agent) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        scanned = await wait_for_job(client, await periodic_scan_of(client, host))
        health = (await client.get(f"/hosts/{host}")).json()["health"]
        removal = await remove_tpm(client, vm)

    (outcome,) = scanned["hosts"]
    assert outcome["state"] == "failed" and "cannot scan" in outcome["error"] and "404" in outcome["error"]
    assert health["state"] == "ok"
    assert removal["hosts"][0]["state"] == "deleted" and not state.exists()


async def periodic_scan_of(client: httpx.AsyncClient, host: str) -> str:
    """The id of the first scan job of the host that periodic scans queued, once there is one."""
    for _ in range(200):
        async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
            job = await session.scalar(
                text("SELECT id FROM jobs WHERE host_uuid = :host ORDER BY created_at LIMIT 1"), {"host": host}
            )
        if job is not None:
            return str(job)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no periodic scan of host {host} was queued")


async def test_periodic_scans_find_the_strays_of_every_host(make_client: AppFactory, tmp_path: Path) -> None:
    client = await make_client(stray_min_age_seconds=0, host_scan_interval_seconds=1)
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
        (root / "left.fd").write_bytes(b"")
    async with running_agent(roots[0]) as first_url, running_agent(roots[1]) as second_url:
        hosts = [await put_host(client, first_url), await put_host(client, second_url)]
        jobs = [await wait_for_job(client, await periodic_scan_of(client, host)) for host in hosts]
    assert [job["strays"] for job in jobs] == [1, 1]
    for host, root in zip(hosts, roots, strict=True):
        assert set(await strays_of(client, host)) == {str(root / "left.fd")}


async def test_a_scan_answer_over_the_limit_fails_the_host_and_leaves_its_list(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(stray_min_age_seconds=0)
    entry = ScanEntry(
        path="/x", type="NvRam", vm_uuid=None, bytes=0, modified_at=datetime.now(UTC), in_use=False
    ).model_dump(mode="json")
    too_many = {"success": True, "truncated": False, "entries": [entry] * (MAX_SCAN_ENTRIES + 1)}

    async def oversized(request: web.Request) -> web.StreamResponse:
        return web.json_response(too_many)

    (tmp_path / "old.fd").write_bytes(b"")
    aged(tmp_path / "old.fd")
    async with running_agent(tmp_path) as url:
        host = await put_host(client, url)
        await scan(client, host)
    async with agent_answering_scans(tmp_path, oversized) as url:
        await client.put(f"/hosts/{host}", json={"name": "kvm", "agent_url": url})
        refused = await scan(client, host)
    assert refused["hosts"][0]["state"] == "failed" and "invalid answer" in refused["hosts"][0]["error"]
    assert set(await strays_of(client, host)) == {str(tmp_path / "old.fd")} and refused["strays"] == 1


async def test_an_agent_that_cannot_scan_fails_the_host_with_its_reason(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client()

    async def broken(request: web.Request) -> web.StreamResponse:
        return answer(DeleteFailed(error="cannot ask libvirt: down"))

    async with agent_answering_scans(tmp_path, broken) as url:
        host = await put_host(client, url)
        failed = await scan(client, host)
    assert failed["hosts"][0]["error"] == "agent error: cannot ask libvirt: down"


async def test_stray_list_pages_knows_its_vms_is_counted_and_goes_with_its_host(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(stray_min_age_seconds=0)
    known = await put_vm(client, tpm=False)
    for name in (known, f"{known}.snapshot-backup", "other_VARS.fd"):
        (tmp_path / name).write_bytes(b"")
    async with running_agent(tmp_path) as url:
        host = await put_host(client, url)
        await scan(client, host)
    first = await client.get("/stray-files", params={"host_uuid": host, "limit": 2})
    rest = await client.get(first.links["next"]["url"])
    strays = first.json() + rest.json()
    assert len(first.json()) == 2 and len(strays) == 3 and "next" not in rest.links
    assert [stray["uuid"] for stray in strays] == sorted(stray["uuid"] for stray in strays)
    assert {stray["path"]: stray["vm_known"] for stray in strays} == {
        str(tmp_path / known): True,
        str(tmp_path / f"{known}.snapshot-backup"): True,
        str(tmp_path / "other_VARS.fd"): False,
    }
    await refresh_gauges_of(client)
    every = (await client.get("/stray-files", params={"limit": 1000})).json()
    assert f"tpm_stray_files {float(len(every))}" in (await client.get("/metrics")).text.splitlines()
    assert (await client.delete(f"/hosts/{host}")).status_code == 204
    assert await strays_of(client, host) == {}
    assert_problem(await client.get("/stray-files", params={"host_uuid": "nope"}), 422)


async def refresh_gauges_of(client: httpx.AsyncClient) -> None:
    """Set the database-backed gauges now, as the worker's periodic refresh does."""
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        await refresh_gauges(session)


async def test_a_vtpm_secret_no_record_names_is_a_stray_and_a_recorded_one_is_not(
    make_client: AppFactory, libvirtd: LibvirtDaemon, tmp_path: Path
) -> None:
    client = await make_client(stray_min_age_seconds=0)
    vm = await put_vm(client)
    left, recorded = await libvirtd.define_secret(), await libvirtd.define_secret()
    volume = await libvirtd.define_secret(usage="volume")
    async with running_app(create_agent_app(tmp_path, libvirt=Libvirt(uri=libvirtd.uri))) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, secret_path(recorded), type="Secret")
        job = await scan(client, host)
    strays = await strays_of(client, host)
    assert job["hosts"][0]["state"] == "scanned"
    # The libvirtd may know secrets that other tests left on this machine: only these three are this test's.
    assert secret_path(left) in strays and secret_path(recorded) not in strays and secret_path(volume) not in strays
    assert (strays[secret_path(left)]["type"], strays[secret_path(left)]["vm_known"]) == ("Secret", False)
    # A scan undefines nothing.
    assert await libvirtd.is_defined(left) and await libvirtd.is_defined(recorded)


async def test_a_file_that_an_orphan_or_an_abandoned_file_names_is_no_stray(
    make_client: AppFactory, tmp_path: Path
) -> None:
    client = await make_client(stray_min_age_seconds=MIN_AGE_SECONDS)
    vm = await put_vm(client)
    state = tmp_path / vm
    state.mkdir()
    (tmp_path / "other.fd").write_bytes(b"")
    aged(tmp_path / "other.fd")
    async with agent_refusing_deletes(tmp_path) as url:
        host = await put_host(client, url)
        await add_file(client, vm, host, state)
        aged(state)
        assert (await remove_tpm(client, vm))["orphan_files"] == 1
        while_orphan = await strays_of_scan(client, host)
        gone = await client.delete(f"/hosts/{host}", params={"abandon_orphans": "true"})
        assert gone.status_code == 204, gone.text
        again = await client.put(f"/hosts/{host}", json={"name": "kvm", "agent_url": url})
        assert again.status_code == 201, again.text
        while_abandoned = await strays_of_scan(client, host)
    assert set(while_orphan) == set(while_abandoned) == {str(tmp_path / "other.fd")}
    assert state.exists()


async def strays_of_scan(client: httpx.AsyncClient, host: str) -> dict[str, dict[str, Any]]:
    """Scan the host, then its stray list by path."""
    assert (await scan(client, host))["hosts"][0]["state"] == "scanned"
    return await strays_of(client, host)


@asynccontextmanager
async def agent_refusing_deletes(tmp_path: Path) -> AsyncIterator[str]:
    """The shipped agent, refusing every delete (as one that finds the files in use does) but scanning; its URL."""

    @web.middleware
    async def refuse(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == DELETE_PATH:
            return answer(DeleteFailed(error="in use: held by a test"))
        return await handler(request)

    app = create_agent_app(tmp_path, libvirt=None)
    app.middlewares.append(refuse)
    async with running_app(app) as url:
        yield url
