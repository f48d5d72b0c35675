"""Following a job without busy polling: `GET /jobs/{id}?wait=S` with `If-None-Match`, woken by LISTEN/NOTIFY."""

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm, wait_for_job

# Generous: the machine is shared, and these bound "promptly", not a latency figure.
PROMPT_SECONDS = 15.0


async def finished_job(client: httpx.AsyncClient) -> dict[str, Any]:
    """A job that has ended (a VM with a TPM and no host files)."""
    return await remove_tpm(client, await put_vm(client))


async def start_slow_removal(client: httpx.AsyncClient, agent_url: str, root: Path) -> httpx.Response:
    """DELETE the TPM of a new VM whose one host answers slowly; the 202 answer."""
    vm = await put_vm(client)
    host = await put_host(client, agent_url)
    (state,) = make_files(root, vm, "tpm2-00.permall")
    await add_file(client, vm, host, state)
    answer = await client.delete(f"/vms/{vm}/tpm")
    assert answer.status_code == 202, answer.text
    return answer


async def test_every_job_answer_carries_an_etag_that_if_none_match_honours(client: httpx.AsyncClient) -> None:
    job = await finished_job(client)
    answer = await client.get(f"/jobs/{job['id']}")
    assert answer.status_code == 200 and answer.json() == job
    etag = answer.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')

    same = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert same.status_code == 304 and same.headers["ETag"] == etag and same.content == b""
    other = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.headers["ETag"] == etag


async def test_unchanged_job_answers_304_once_the_wait_is_over(client: httpx.AsyncClient) -> None:
    job = await finished_job(client)
    etag = (await client.get(f"/jobs/{job['id']}")).headers["ETag"]

    started = time.monotonic()
    answer = await client.get(f"/jobs/{job['id']}", params={"wait": 1.5}, headers={"If-None-Match": etag})
    elapsed = time.monotonic() - started

    assert answer.status_code == 304 and answer.headers["ETag"] == etag
    assert 1.4 <= elapsed < PROMPT_SECONDS


async def test_waiting_poll_answers_as_soon_as_the_job_changes(client: httpx.AsyncClient, tmp_path: Path) -> None:
    async with running_agent(tmp_path, delay_seconds=1.0) as slow:
        accepted = await start_slow_removal(client, slow, tmp_path)
        job_id, etag = accepted.json()["id"], accepted.headers["ETag"]
        seen = [accepted.json()["state"]]
        while seen[-1] != "succeeded":
            started = time.monotonic()
            answer = await client.get(f"/jobs/{job_id}", params={"wait": 60}, headers={"If-None-Match": etag})
            assert answer.status_code == 200, answer.text
            assert time.monotonic() - started < PROMPT_SECONDS
            assert answer.headers["ETag"] != etag
            etag = answer.headers["ETag"]
            seen.append(answer.json()["state"])

    # The poll saw the job move on step by step (running, the host's outcome, the end), never the same body twice.
    assert seen[0] in ("queued", "running") and seen[-1] == "succeeded"
    assert answer.json()["hosts"][0]["state"] == "deleted"


async def test_wait_over_60_seconds_or_negative_is_refused(client: httpx.AsyncClient) -> None:
    job = await finished_job(client)
    for wait in ("61", "-1", "soon"):
        answer = await client.get(f"/jobs/{job['id']}", params={"wait": wait})
        assert answer.status_code == 422, (wait, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"


async def test_a_change_made_by_one_replica_wakes_a_poll_on_another(make_client: AppFactory, tmp_path: Path) -> None:
    worker_replica = await make_client()
    poll_replica = await make_client(run_worker=False)
    async with running_agent(tmp_path, delay_seconds=1.0) as slow:
        # Queued through the replica that runs no worker: only the other one can move the job on.
        accepted = await start_slow_removal(poll_replica, slow, tmp_path)
        job_id, etag = accepted.json()["id"], accepted.headers["ETag"]

        started = time.monotonic()
        answer = await poll_replica.get(f"/jobs/{job_id}", params={"wait": 60}, headers={"If-None-Match": etag})

        assert answer.status_code == 200 and answer.headers["ETag"] != etag
        assert time.monotonic() - started < PROMPT_SECONDS
        final = await wait_for_job(poll_replica, job_id)
    assert final["state"] == "succeeded"
    assert (await worker_replica.get(f"/jobs/{job_id}")).json() == final


async def test_waiting_polls_hold_no_database_connection(make_client: AppFactory) -> None:
    client = await make_client(db_pool_size=2)
    job = await finished_job(client)
    etag = (await client.get(f"/jobs/{job['id']}")).headers["ETag"]

    polls = [
        asyncio.create_task(client.get(f"/jobs/{job['id']}", params={"wait": 3}, headers={"If-None-Match": etag}))
        for _ in range(20)
    ]
    await asyncio.sleep(0.5)
    # Twenty waiting callers on a pool of two (plus two overflow): a read still gets a connection at once.
    assert not any(poll.done() for poll in polls)
    assert (await client.get(f"/jobs/{job['id']}")).status_code == 200
    assert [poll.status_code for poll in await asyncio.gather(*polls)] == [304] * 20


async def test_answers_of_a_job_under_way_say_when_to_look_again_and_an_ended_one_does_not(
    make_client: AppFactory,
) -> None:
    client = await make_client(run_worker=False)
    vm = await put_vm(client)
    accepted = await client.delete(f"/vms/{vm}/tpm")
    job_id, etag = accepted.json()["id"], accepted.headers["ETag"]
    assert accepted.status_code == 202 and accepted.headers["Retry-After"] == "1"

    read = await client.get(f"/jobs/{job_id}")
    unchanged = await client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag})
    polled = await client.get(f"/jobs/{job_id}", params={"wait": 0.2}, headers={"If-None-Match": etag})
    assert (read.status_code, unchanged.status_code, polled.status_code) == (200, 304, 304)
    assert read.headers["Retry-After"] == unchanged.headers["Retry-After"] == polled.headers["Retry-After"] == "1"

    # Queued again after a failed cleanup, the job is not taken up before its backoff ends.
    async with client.app.state.sessions() as session, session.begin():  # type: ignore[attr-defined]
        await session.execute(
            text("UPDATE jobs SET run_after = now() + interval '40 seconds' WHERE id = :j"), {"j": job_id}
        )
    assert 1 < int((await client.get(f"/jobs/{job_id}")).headers["Retry-After"]) <= 40

    async with client.app.state.sessions() as session, session.begin():  # type: ignore[attr-defined]
        await session.execute(
            text("UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = :j"), {"j": job_id}
        )
    ended = await client.get(f"/jobs/{job_id}")
    assert ended.json()["state"] == "succeeded" and "Retry-After" not in ended.headers
    ended_unchanged = await client.get(f"/jobs/{job_id}", headers={"If-None-Match": ended.headers["ETag"]})
    assert ended_unchanged.status_code == 304 and "Retry-After" not in ended_unchanged.headers


async def test_the_openapi_schema_documents_retry_after_on_the_202s_and_job_answers(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    answers = {
        "DELETE /vms/{vm_uuid}/tpm 202": paths["/vms/{vm_uuid}/tpm"]["delete"]["responses"]["202"],
        "DELETE /vms/{vm_uuid} 202": paths["/vms/{vm_uuid}"]["delete"]["responses"]["202"],
        "GET /jobs/{job_id} 200": paths["/jobs/{job_id}"]["get"]["responses"]["200"],
        "GET /jobs/{job_id} 304": paths["/jobs/{job_id}"]["get"]["responses"]["304"],
    }
    for name, answer in answers.items():
        assert answer["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}, name
    # The header is documented beside the job body, not instead of it.
    assert answers["DELETE /vms/{vm_uuid} 202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobOut"
    }
