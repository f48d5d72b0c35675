"""The operator commands (`remove`, `delete-vm`, `jobs`, `orphans`, `hosts`, `decommission`) against a real server."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from typer.testing import CliRunner, Result

from app.operator.cli import EXIT_FAILED, EXIT_ORPHANS, EXIT_STRAYS, EXIT_SUCCEEDED, MAX_PAGE_SIZE, fetch_all
from app.service.commands import cli
from app.service.db.engine import asyncpg_dsn
from devtools.local_stack import LocalProcess, free_port, service_process
from tests.agent_helpers import running_agent
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm
from tests.pg_helpers import create_migrated_database

API_TOKEN = f"cli-api-token-{uuid.uuid4().hex}"
API_READ_TOKEN = f"cli-read-token-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def service(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcess]:
    """The service as a separate process on a free port, with short retry intervals."""
    process = service_process(
        database_url,
        tmp_path_factory.mktemp("cli-service"),
        API_TOKEN=API_TOKEN,
        API_READ_TOKEN=API_READ_TOKEN,
        AGENT_TIMEOUT_SECONDS="2",
        ORPHAN_RETRY_SECONDS="0.5",
        ORPHAN_RETRY_MAX_SECONDS="1",
        WORKER_POLL_SECONDS="0.2",
        STRAY_MIN_AGE_SECONDS="0",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def api(service: LocalProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the service process, with the token."""
    async with httpx.AsyncClient(base_url=service.url, headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
        yield client


async def run_cli(*args: str, url: str, token: str | None = API_TOKEN, answer: str | None = None) -> Result:
    """Run a command of `python -m app` in a thread, so that agents on this test's loop keep answering; `answer` is
    what the operator types at its prompts."""
    env = {"VTPM_URL": url, "API_TOKEN": token or ""}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, input=answer)


async def seed_vm(api: httpx.AsyncClient, roots: dict[str, Path]) -> tuple[str, dict[str, str], list[Path]]:
    """A VM with a state file, a backup and an NVRAM file on each host (agent URL -> root); its hosts and files."""
    vm = await put_vm(api)
    hosts: dict[str, str] = {}
    files: list[Path] = []
    for agent_url, root in roots.items():
        host = hosts[agent_url] = await put_host(api, agent_url)
        state, backup, nvram = make_files(root, vm, "tpm2-00.permall", "tpm2-00.permall.bak", "nvram.fd")
        await add_file(api, vm, host, state)
        await add_file(api, vm, host, backup, backup=True)
        await add_file(api, vm, host, nvram, type="NvRam")
        files += [state, backup, nvram]
    return vm, hosts, files


# The two commands that start a job and follow it, with the job type each starts and what its summary says it did.
JOB_COMMANDS = {"remove": ("remove-tpm", "TPM removed"), "delete-vm": ("delete-vm", "VM deleted")}


def closed_port_url() -> str:
    """The URL of an agent that is not running: its calls fail as unreachable."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("command", JOB_COMMANDS)
async def test_wait_json_follows_the_job_to_success(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path, command: str
) -> None:
    async with running_agent(tmp_path / "a") as a, running_agent(tmp_path / "b") as b:
        vm, hosts, files = await seed_vm(api, {a: tmp_path / "a", b: tmp_path / "b"})
        result = await run_cli(command, vm, "--wait", "--json", url=service.url)

    assert result.exit_code == EXIT_SUCCEEDED, result.output
    job = json.loads(result.stdout)
    assert job["state"] == "succeeded" and job["vm_uuid"] == vm and job["orphan_files"] == 0
    assert job["type"] == JOB_COMMANDS[command][0]
    assert sorted((h["host_uuid"], h["state"], h["files"]) for h in job["hosts"]) == sorted(
        (host, "deleted", 3) for host in hosts.values()
    )
    assert not [f for f in files if f.exists()]
    assert (await api.get(f"/vms/{vm}/tpm")).status_code == 404
    assert (await api.get(f"/vms/{vm}")).status_code == (404 if command == "delete-vm" else 200)


@pytest.mark.parametrize("command", JOB_COMMANDS)
async def test_wait_shows_each_host_outcome_as_it_lands(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path, command: str
) -> None:
    async with running_agent(tmp_path, delay_seconds=1.0) as slow:
        vm, hosts, _ = await seed_vm(api, {slow: tmp_path, closed_port_url(): tmp_path / "gone"})
        result = await run_cli(command, vm, "--wait", url=service.url)

    assert result.exit_code == EXIT_ORPHANS, result.output
    slow_host, dead_host = hosts.values()
    assert f"✓ host {slow_host}: 3 files deleted" in result.stdout
    assert f"✗ host {dead_host}: connection refused (3 files kept as orphans, retried)" in result.stdout
    assert f"succeeded: {JOB_COMMANDS[command][1]}, 1/2 hosts confirmed" in result.stdout
    assert "3 orphan files left for the service to retry" in result.stdout


async def test_orphans_lists_the_files_of_a_failed_host(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm, hosts, files = await seed_vm(api, {closed_port_url(): tmp_path})
    (host,) = hosts.values()
    result = await run_cli("remove", vm, "--wait", "--json", url=service.url)
    assert result.exit_code == EXIT_ORPHANS, result.output
    assert json.loads(result.stdout)["orphan_files"] == 3

    listed = await run_cli("orphans", "--host", host, "--json", url=service.url)
    assert listed.exit_code == 0, listed.output
    orphans = json.loads(listed.stdout)
    assert sorted(o["path"] for o in orphans) == sorted(str(f) for f in files)
    assert {(o["vm_uuid"], o["host_uuid"]) for o in orphans} == {(vm, host)}
    assert all(o["attempts"] >= 1 and "connection refused" in o["last_error"] for o in orphans)

    table = await run_cli("orphans", "--host", host, url=service.url)
    assert table.exit_code == 0, table.output
    assert "Orphan files" in table.stdout and "NvRam" in table.stdout


async def test_hosts_shows_a_failed_host_failing_and_a_good_one_ok(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with running_agent(tmp_path / "good") as good_url:
        vm, hosts, _ = await seed_vm(api, {good_url: tmp_path / "good", closed_port_url(): tmp_path / "dead"})
        assert (await run_cli("remove", vm, "--wait", url=service.url)).exit_code == EXIT_ORPHANS
    good_host, dead_host = hosts.values()

    listed = await run_cli("hosts", good_host, dead_host, "--json", url=service.url)
    assert listed.exit_code == 0, listed.output
    health = {host["uuid"]: host["health"] for host in json.loads(listed.stdout)}
    assert health[good_host] == {"state": "ok", "consecutive_failures": 0, "last_error": None, "next_probe_at": None}
    assert health[dead_host]["state"] == "failing" and health[dead_host]["consecutive_failures"] >= 1
    assert "connection refused" in health[dead_host]["last_error"]

    # Without hosts named: every host, or every host of one health.
    cases = {(): {good_host, dead_host}, ("--health", "ok"): {good_host}, ("--health", "failing"): {dead_host}}
    for options, shown in cases.items():
        listed = await run_cli("hosts", *options, "--json", url=service.url)
        assert listed.exit_code == 0, listed.output
        assert {host["uuid"] for host in json.loads(listed.stdout)} & {good_host, dead_host} == shown, options
    table = await run_cli("hosts", dead_host, url=service.url)
    assert table.exit_code == 0, table.output
    assert "Hosts" in table.stdout and "failing" in table.stdout


async def test_hosts_without_names_lists_every_host_page_after_page(server_url: str, tmp_path: Path) -> None:
    # A database of the test's own, so that the list is exactly these hosts: more than one page of them, one in four
    # failing (put straight into the tables: only the listing is under test here).
    database_url = await create_migrated_database(server_url)
    hosts = sorted(uuid.uuid4() for _ in range(MAX_PAGE_SIZE + 200))
    failing = hosts[::4]
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await connection.executemany(
            "INSERT INTO hosts (uuid, name, agent_url) VALUES ($1, 'kvm', 'http://127.0.0.1:8100')",
            [(host,) for host in hosts],
        )
        await connection.executemany(
            "INSERT INTO host_health (host_uuid, state, consecutive_failures, last_error, failing_since, "
            "next_probe_at) VALUES ($1, 'failing', 1, 'connection refused', now(), now() + interval '1 hour')",
            [(host,) for host in failing],
        )
    finally:
        await connection.close()

    async with service_process(database_url, tmp_path) as service:
        every = await run_cli("hosts", "--json", url=service.url, token=None)
        only_failing = await run_cli("hosts", "--health", "failing", "--json", url=service.url, token=None)
        both = await run_cli("hosts", str(hosts[0]), "--health", "ok", url=service.url, token=None)

    assert every.exit_code == 0, every.output
    assert [host["uuid"] for host in json.loads(every.stdout)] == [str(host) for host in hosts]
    assert only_failing.exit_code == 0, only_failing.output
    listed_failing = json.loads(only_failing.stdout)
    assert [host["uuid"] for host in listed_failing] == [str(host) for host in failing]
    assert all(host["health"]["last_error"] == "connection refused" for host in listed_failing)
    # Hosts named and a health filter do not go together: a usage error, before any call.
    assert both.exit_code == 2 and "--health" in both.output


async def test_jobs_lists_a_vms_jobs_newest_first(service: LocalProcess, api: httpx.AsyncClient) -> None:
    vm = await put_vm(api)
    first = await remove_tpm(api, vm)
    assert (await api.post(f"/vms/{vm}/tpm", json={"key_provider_uuid": None})).status_code == 201
    second = await remove_tpm(api, vm)

    listed = await run_cli("jobs", "--vm", vm, "--json", url=service.url)
    assert listed.exit_code == 0, listed.output
    assert [job["id"] for job in json.loads(listed.stdout)] == [second["id"], first["id"]]

    table = await run_cli("jobs", "--vm", vm, url=service.url)
    assert table.exit_code == 0, table.output
    assert "Removal jobs" in table.stdout and "succeeded" in table.stdout


async def test_list_commands_follow_the_link_header_across_pages(service: LocalProcess, api: httpx.AsyncClient) -> None:
    vm = await put_vm(api)
    ids = []
    for _ in range(3):
        ids.append((await remove_tpm(api, vm))["id"])
        assert (await api.post(f"/vms/{vm}/tpm", json={"key_provider_uuid": None})).status_code == 201

    def fetch(limit: int) -> list[dict[str, Any]]:
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {API_TOKEN}"}) as client:
            return fetch_all(client, "/jobs", {"vm_uuid": vm}, limit, page_size=1)

    assert [job["id"] for job in await asyncio.to_thread(fetch, 10)] == ids[::-1]
    assert [job["id"] for job in await asyncio.to_thread(fetch, 2)] == ids[::-1][:2]


@pytest.mark.parametrize("command", JOB_COMMANDS)
async def test_without_wait_the_command_answers_once_the_job_is_accepted(
    service: LocalProcess, api: httpx.AsyncClient, command: str
) -> None:
    vm = await put_vm(api)
    result = await run_cli(command, vm, "--json", url=service.url)
    assert result.exit_code == EXIT_SUCCEEDED, result.output
    job = json.loads(result.stdout)
    assert job["vm_uuid"] == vm and job["type"] == JOB_COMMANDS[command][0]


async def test_refused_calls_exit_1_with_the_services_reason(service: LocalProcess) -> None:
    for command in JOB_COMMANDS:
        unknown = await run_cli(command, str(uuid.uuid4()), "--wait", url=service.url)
        assert unknown.exit_code == EXIT_FAILED, command
        assert "404" in unknown.stderr and "does not exist" in unknown.stderr

    unauthorized = await run_cli("jobs", url=service.url, token="wrong-token")
    assert unauthorized.exit_code == EXIT_FAILED
    assert "401" in unauthorized.stderr and "wrong-token" not in unauthorized.output

    unreachable = await run_cli("orphans", url=closed_port_url())
    assert unreachable.exit_code == EXIT_FAILED
    assert "cannot reach the service" in unreachable.stderr


async def test_the_read_commands_work_with_the_read_token(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm, hosts, files = await seed_vm(api, {closed_port_url(): tmp_path})
    (host,) = hosts.values()
    job = await remove_tpm(api, vm)

    jobs = await run_cli("jobs", "--vm", vm, "--json", url=service.url, token=API_READ_TOKEN)
    assert jobs.exit_code == 0, jobs.output
    assert [listed["id"] for listed in json.loads(jobs.stdout)] == [job["id"]]
    orphans = await run_cli("orphans", "--host", host, "--json", url=service.url, token=API_READ_TOKEN)
    assert orphans.exit_code == 0, orphans.output
    assert sorted(o["path"] for o in json.loads(orphans.stdout)) == sorted(str(f) for f in files)


async def test_remove_with_the_read_token_is_refused_with_a_clear_message(
    service: LocalProcess, api: httpx.AsyncClient
) -> None:
    vm = await put_vm(api)
    refused = await run_cli("remove", vm, "--wait", url=service.url, token=API_READ_TOKEN)

    assert refused.exit_code == EXIT_FAILED
    assert "403" in refused.stderr and "may only read" in refused.stderr and "API_TOKEN" in refused.stderr
    assert API_READ_TOKEN not in refused.output
    assert (await api.get(f"/vms/{vm}/tpm")).status_code == 200
    assert (await api.get("/jobs", params={"vm_uuid": vm})).json() == []


async def test_the_service_process_logs_json_lines_with_request_ids_and_never_the_token(
    service: LocalProcess, api: httpx.AsyncClient
) -> None:
    await api.get("/orphan-files", headers={"X-Request-ID": "cli-log-check-1"})
    await api.get("/orphan-files", headers={"Authorization": "Bearer wrong-token-in-log-check"})
    await asyncio.sleep(0.5)  # the access log line is written after the answer

    text = service.log_path.read_text()
    assert API_TOKEN not in text and "wrong-token-in-log-check" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line.get("request_id") == "cli-log-check-1" for line in lines), text[-2000:]


async def test_decommission_lists_what_it_would_abandon_and_asks_first(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    vm, hosts, files = await seed_vm(api, {closed_port_url(): tmp_path})
    (host,) = hosts.values()
    assert (await run_cli("remove", vm, "--wait", url=service.url)).exit_code == EXIT_ORPHANS

    declined = await run_cli("decommission", host, "--abandon-orphans", url=service.url, answer="n\n")

    assert declined.exit_code == EXIT_FAILED, declined.output
    assert "Orphan files that would be abandoned" in declined.stdout
    assert all(str(f) in declined.stdout for f in files)
    assert f"abandon its {len(files)} orphan files?" in declined.stdout
    assert "nothing changed" in declined.stderr
    assert (await api.get(f"/hosts/{host}")).status_code == 200
    assert len((await api.get("/orphan-files", params={"host_uuid": host})).json()) == len(files)

    accepted = await run_cli("decommission", host, "--abandon-orphans", url=service.url, answer="y\n")

    assert accepted.exit_code == EXIT_SUCCEEDED, accepted.output
    assert f"host {host} removed; {len(files)} files abandoned" in accepted.stdout
    assert (await api.get(f"/hosts/{host}")).status_code == 404
    abandoned = (await api.get("/abandoned-files", params={"host_uuid": host})).json()
    assert sorted(a["path"] for a in abandoned) == sorted(str(f) for f in files)


async def test_decommission_yes_json_removes_an_empty_host_without_asking(
    service: LocalProcess, api: httpx.AsyncClient
) -> None:
    host = await put_host(api, closed_port_url())

    result = await run_cli("decommission", host, "--yes", "--json", url=service.url)

    assert result.exit_code == EXIT_SUCCEEDED, result.output
    assert json.loads(result.stdout) == {"host_uuid": host, "removed": True, "abandoned_files": []}
    assert (await api.get(f"/hosts/{host}")).status_code == 404


async def test_decommission_refused_exits_1_with_the_services_reason(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    _, hosts, _ = await seed_vm(api, {closed_port_url(): tmp_path})
    (host,) = hosts.values()

    with_records = await run_cli("decommission", host, "--abandon-orphans", "--yes", url=service.url)
    unknown = await run_cli("decommission", str(uuid.uuid4()), url=service.url, answer="y\n")

    assert with_records.exit_code == EXIT_FAILED
    assert "409" in with_records.stderr and "3 host-file record(s)" in with_records.stderr
    assert (await api.get(f"/hosts/{host}")).status_code == 200
    assert unknown.exit_code == EXIT_FAILED
    assert "404" in unknown.stderr and "?" not in unknown.stdout


async def test_scan_follows_the_scan_and_strays_lists_them_exiting_3_while_there_are_any(
    service: LocalProcess, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    full, empty = tmp_path / "full", tmp_path / "empty"
    full.mkdir()
    empty.mkdir()
    (full / "left_VARS.fd").write_bytes(b"")
    async with running_agent(full) as full_url, running_agent(empty) as empty_url:
        host, clean = await put_host(api, full_url), await put_host(api, empty_url)
        scanned = await run_cli("scan", host, url=service.url)
        clean_scan = await run_cli("scan", clean, "--json", url=service.url)
    dead_scan = await run_cli("scan", await put_host(api, closed_port_url()), url=service.url)
    listed = await run_cli("strays", "--host", host, "--json", url=service.url)
    table = await run_cli("strays", "--host", host, url=service.url)
    none = await run_cli("strays", "--host", clean, url=service.url)

    assert scanned.exit_code == EXIT_STRAYS, scanned.output
    assert f"✓ host {host}: 1 entries listed" in scanned.stdout
    assert "succeeded: 1/1 hosts scanned, 1 stray files listed" in scanned.stdout
    assert clean_scan.exit_code == EXIT_SUCCEEDED and json.loads(clean_scan.stdout)["strays"] == 0
    assert dead_scan.exit_code == EXIT_FAILED and "connection refused" in dead_scan.stdout
    assert listed.exit_code == EXIT_STRAYS
    assert [stray["path"] for stray in json.loads(listed.stdout)] == [str(full / "left_VARS.fd")]
    assert table.exit_code == EXIT_STRAYS and "Stray files" in table.stdout and "NvRam" in table.stdout
    assert none.exit_code == EXIT_SUCCEEDED and "No stray files." in none.stdout
