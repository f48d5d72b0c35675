"""Tests of /healthz, /readyz and /metrics, and of how the service answers while its database is down."""

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.service.db.engine import asyncpg_dsn
from tests.conftest import AppFactory
from tests.inventory_helpers import put_host, put_vm
from tests.pg_helpers import (
    create_migrated_database,
    pause_postgres,
    postgres_stopped,
    resume_postgres,
    separate_postgres,
)
from tests.problem_helpers import assert_problem

# Generous bounds for a shared, busy machine: what matters is "answers", not "answers fast".
OUTAGE_ANSWER_SECONDS = 8.0
# A frozen server is only noticed when a statement times out (app.service.db.engine.COMMAND_TIMEOUT_SECONDS).
FROZEN_ANSWER_SECONDS = 15.0
RECOVERY_SECONDS = 30.0


async def test_healthz_is_200(client: httpx.AsyncClient) -> None:
    answer = await client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


async def test_readyz_is_200_while_the_database_answers(client: httpx.AsyncClient) -> None:
    answer = await client.get("/readyz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ready"}


async def test_metrics_is_prometheus_text_with_the_service_metrics(client: httpx.AsyncClient) -> None:
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    names = {line.split()[2] for line in answer.text.splitlines() if line.startswith("# TYPE ")}
    assert {
        "tpm_removal_jobs_total",
        "tpm_agent_calls_total",
        "tpm_agent_call_duration_seconds",
        "tpm_orphan_files",
    } <= names


@pytest.fixture(scope="module")
def own_server() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL server that only this module's outage tests use, and stop."""
    with separate_postgres() as server:
        yield server


async def timed_get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """GET `url`, checking that the answer came within the outage bound rather than hanging."""
    started = time.monotonic()
    answer = await client.get(url)
    assert time.monotonic() - started < OUTAGE_ANSWER_SECONDS, f"{url} took too long"
    return answer


async def wait_until_ready(client: httpx.AsyncClient) -> None:
    """Poll /readyz until it is 200; fail after RECOVERY_SECONDS."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready again"
        await asyncio.sleep(0.2)


class TestDatabaseOutage:
    """The app keeps running while its database is stopped, answers 503, and recovers by itself."""

    @pytest.fixture
    async def database_url(self, own_server: tuple[str, Path]) -> str:
        """A migrated database on the server these tests stop (overrides conftest's for `make_client`)."""
        return await create_migrated_database(own_server[0])

    async def test_readyz_is_503_while_the_database_is_stopped_and_200_after(
        self, make_client: AppFactory, own_server: tuple[str, Path]
    ) -> None:
        client = await make_client()
        _, pgdata = own_server
        assert (await client.get("/readyz")).status_code == 200
        async with postgres_stopped(pgdata):
            for _ in range(3):
                answer = await timed_get(client, "/readyz")
                assert_problem(answer, 503)
                assert answer.headers["retry-after"].isdigit()
                assert (await timed_get(client, "/healthz")).status_code == 200
        await wait_until_ready(client)

    async def test_calls_that_need_the_database_are_503_with_retry_after_then_work_again(
        self, make_client: AppFactory, own_server: tuple[str, Path]
    ) -> None:
        client = await make_client()
        _, pgdata = own_server
        host_uuid = await put_host(client, "http://127.0.0.1:8100")
        vm_uuid = await put_vm(client)
        async with postgres_stopped(pgdata):
            calls = [
                ("GET", f"/vms/{vm_uuid}", None),
                ("GET", f"/vms/{vm_uuid}/tpm", None),
                ("GET", f"/vms/{vm_uuid}/host-files", None),
                ("GET", f"/hosts/{host_uuid}", None),
                ("PUT", f"/vms/{uuid.uuid4()}", {"name": "vm", "secure_boot": False}),
                ("PUT", f"/hosts/{uuid.uuid4()}", {"name": "kvm", "agent_url": "http://kvm:8100"}),
                ("POST", f"/vms/{vm_uuid}/host-files", {"host_uuid": host_uuid, "path": "/s", "type": "TpmState"}),
            ]
            for method, url, body in calls:
                started = time.monotonic()
                answer = await client.request(method, url, json=body)
                assert time.monotonic() - started < OUTAGE_ANSWER_SECONDS, f"{method} {url} took too long"
                assert_problem(answer, 503)
                assert int(answer.headers["retry-after"]) > 0
        await wait_until_ready(client)

        assert (await client.get(f"/vms/{vm_uuid}")).status_code == 200
        assert (await client.get(f"/hosts/{host_uuid}")).status_code == 200
        assert (await client.get(f"/vms/{vm_uuid}/tpm")).status_code == 200
        await put_vm(client)

    async def test_a_frozen_database_gives_503_not_a_hang(
        self, make_client: AppFactory, own_server: tuple[str, Path]
    ) -> None:
        """A server that accepts connections but never answers (paused, cut off) is an outage too."""
        client = await make_client()
        _, pgdata = own_server
        vm_uuid = await put_vm(client)
        pause_postgres(pgdata)
        try:
            for url in ("/readyz", f"/vms/{vm_uuid}", f"/vms/{vm_uuid}/host-files", "/readyz"):
                started = time.monotonic()
                answer = await client.get(url)
                assert time.monotonic() - started < FROZEN_ANSWER_SECONDS, f"{url} took too long"
                assert_problem(answer, 503)
        finally:
            resume_postgres(pgdata)
        await wait_until_ready(client)
        assert (await client.get(f"/vms/{vm_uuid}")).status_code == 200


async def test_a_delete_whose_connection_the_server_ends_mid_statement_is_503_then_works(
    client: httpx.AsyncClient, database_url: str
) -> None:
    # The DELETE statement runs on asyncpg past SQLAlchemy (a named statement): its errors are asyncpg own.
    vm_uuid = await put_vm(client)
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with holder.transaction():
            # The DELETE's INSERT locks the VM's TPM row: while the test holds it, the statement waits on the server.
            await holder.execute("SELECT 1 FROM tpms WHERE vm_uuid = $1 FOR UPDATE", uuid.UUID(vm_uuid))
            delete = asyncio.create_task(client.delete(f"/vms/{vm_uuid}/tpm"))
            waiting = None
            deadline = time.monotonic() + OUTAGE_ANSWER_SECONDS
            while waiting is None:
                assert time.monotonic() < deadline, "the DELETE never waited on the TPM row"
                await asyncio.sleep(0.05)
                waiting = await holder.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'vtpm' AND wait_event_type = 'Lock'"
                )
            assert await holder.fetchval("SELECT pg_terminate_backend($1)", waiting)
            answer = await delete
    finally:
        await holder.close()
    assert_problem(answer, 503)
    assert int(answer.headers["retry-after"]) > 0
    # Nothing was queued, and the pool replaced the connection the server ended.
    assert (await client.get("/jobs", params={"vm_uuid": vm_uuid})).json() == []
    assert (await client.delete(f"/vms/{vm_uuid}/tpm")).status_code == 202
