"""Tests of the agent client against the shipped agent and against small misbehaving agents on loopback."""

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from app.protocol import DELETE_PATH
from app.service.agent_client import AgentClient, FileToDelete, HostDeleteResult
from tests.agent_helpers import running_agent, running_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TIMEOUT = 0.3


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """Give each test the one shared session its client is built on, as the app's lifespan would."""
    async with aiohttp.ClientSession() as client:
        yield client


def files_for(*paths: str | Path) -> list[FileToDelete]:
    """Describe state files to delete."""
    return [FileToDelete(path=str(p), type="TpmState") for p in paths]


def agent_with(handler: Handler) -> web.Application:
    """Build a stand-in agent whose delete endpoint is `handler`."""
    app = web.Application()
    app.router.add_post(DELETE_PATH, handler)
    return app


async def call_agent_with(
    session: aiohttp.ClientSession, handler: Handler, paths: tuple[str, ...] = ("/r/a",)
) -> HostDeleteResult:
    """Run a stand-in agent and make one delete call to it with a short timeout."""
    client = AgentClient(session, timeout_seconds=TIMEOUT, concurrency=4)
    async with running_app(agent_with(handler)) as url:
        return await client.delete_files(url, uuid.uuid4(), files_for(*paths))


def agent_calls(outcome: str) -> float:
    """Read how many agent calls have ended with `outcome` so far."""
    return REGISTRY.get_sample_value("tpm_agent_calls_total", {"outcome": outcome}) or 0.0


def closed_port() -> int:
    """Find a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_failed(result: HostDeleteResult, reason: str) -> None:
    """Check that a call failed and that its reason says why."""
    assert result.ok is False
    assert result.error is not None
    assert reason in result.error
    assert (result.deleted, result.missing) == ([], [])


async def test_deletes_files_through_the_shipped_agent(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    tpm = tmp_path / "tpm.bin"
    tpm.write_bytes(b"state")
    gone = tmp_path / "gone.bin"
    client = AgentClient(session, timeout_seconds=5, concurrency=4)
    before = agent_calls("ok")
    async with running_agent(tmp_path) as url:
        result = await client.delete_files(url + "/", uuid.uuid4(), files_for(tpm, gone))
    assert result == HostDeleteResult(ok=True, deleted=[str(tpm)], missing=[str(gone)], error=None, contact="answered")
    assert not tpm.exists()
    assert agent_calls("ok") == before + 1


async def test_sends_one_json_body_and_the_bearer_token(session: aiohttp.ClientSession) -> None:
    seen: list[tuple[str | None, str | None, Any]] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.headers.get("Authorization"), request.content_type, body))
        paths = [f["path"] for f in body["files"]]
        return web.json_response({"success": True, "deleted": paths, "missing": []})

    vm_uuid = uuid.uuid4()
    files = [FileToDelete(path="/r/tpm", type="TpmState"), FileToDelete(path="/r/nvram", type="NvRam")]
    async with running_app(agent_with(record)) as url:
        with_token = AgentClient(session, timeout_seconds=5, concurrency=1, token="s3cret")
        without_token = AgentClient(session, timeout_seconds=5, concurrency=1)
        assert (await with_token.delete_files(url, vm_uuid, files)).ok
        assert (await without_token.delete_files(url, vm_uuid, files)).ok
    expected_body = {
        "vm_uuid": str(vm_uuid),
        "files": [{"path": "/r/tpm", "type": "TpmState"}, {"path": "/r/nvram", "type": "NvRam"}],
    }
    assert seen == [
        ("Bearer s3cret", "application/json", expected_body),
        (None, "application/json", expected_body),
    ]


async def test_wrong_token_is_a_failure(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    client = AgentClient(session, timeout_seconds=5, concurrency=1, token="wrong")
    async with running_agent(tmp_path, token="s3cret") as url:
        result = await client.delete_files(url, uuid.uuid4(), files_for(tmp_path / "tpm.bin"))
    assert_failed(result, "HTTP 401")
    assert result.error is not None and "unauthorized" in result.error


async def test_refusal_by_the_agent_is_a_failure_with_its_reason(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    client = AgentClient(session, timeout_seconds=5, concurrency=1)
    async with running_agent(tmp_path) as url:
        result = await client.delete_files(url, uuid.uuid4(), files_for(f"{tmp_path}/a/../b"))
    assert_failed(result, "agent error: path contains a '..' segment")


async def test_server_error_is_a_failure(session: aiohttp.ClientSession) -> None:
    async def crash(request: web.Request) -> web.Response:
        return web.Response(status=500, text="Internal Server Error")

    before = agent_calls("failed")
    result = await call_agent_with(session, crash)
    assert result.error == "HTTP 500"
    assert_failed(result, "HTTP 500")
    assert agent_calls("failed") == before + 1


async def test_redirect_is_not_followed(session: aiohttp.ClientSession) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("http://127.0.0.1:1/elsewhere")

    assert_failed(await call_agent_with(session, redirect), "HTTP 307")


async def test_agent_slower_than_timeout_is_a_timeout(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    client = AgentClient(session, timeout_seconds=TIMEOUT, concurrency=1)
    before = agent_calls("timeout")
    async with running_agent(tmp_path, delay_seconds=5) as url:
        started = time.monotonic()
        result = await client.delete_files(url, uuid.uuid4(), files_for(tmp_path / "tpm.bin"))
        elapsed = time.monotonic() - started
    assert_failed(result, f"timeout after {TIMEOUT}s")
    assert elapsed < 4
    assert agent_calls("timeout") == before + 1


async def test_body_streamed_slower_than_timeout_is_a_timeout(session: aiohttp.ClientSession) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        # Leading whitespace keeps the would-be answer valid JSON, so only the clock can fail it.
        for _ in range(100):
            await response.write(b" ")
            await asyncio.sleep(0.05)
        await response.write(b'{"success": true, "deleted": ["/r/a"], "missing": []}')
        return response

    assert_failed(await call_agent_with(session, trickle), f"timeout after {TIMEOUT}s")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param(b"<html>oops</html>", "invalid JSON", id="html"),
        pytest.param(b'{"success": true, "deleted": [', "invalid JSON", id="truncated-json"),
        pytest.param(b"\xff\xfe\xfa", "invalid JSON", id="not-utf8"),
        pytest.param(b"[]", "invalid answer", id="array"),
        pytest.param(b'{"success": "yes"}', "invalid answer", id="success-not-bool"),
        pytest.param(b'{"success": true}', "invalid answer", id="no-lists"),
        pytest.param(b'{"success": true, "deleted": "/r/a", "missing": []}', "invalid answer", id="not-list"),
        pytest.param(b'{"success": true, "deleted": [1], "missing": []}', "invalid answer", id="not-strings"),
        pytest.param(b'{"success": false, "error": "disk on fire"}', "agent error: disk on fire", id="refused"),
    ],
)
async def test_unusable_answer_is_a_failure(session: aiohttp.ClientSession, answer: bytes, reason: str) -> None:
    async def reply(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    assert_failed(await call_agent_with(session, reply), reason)


async def test_partial_answer_names_the_unconfirmed_paths(session: aiohttp.ClientSession) -> None:
    async def confirm_first_only(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"success": True, "deleted": [body["files"][0]["path"]], "missing": []})

    paths = ("/r/0", "/r/1", "/r/2", "/r/3", "/r/4", "/r/5")
    result = await call_agent_with(session, confirm_first_only, paths)
    assert_failed(result, "paths not confirmed: /r/1, /r/2, /r/3 (and 2 more)")


async def test_closed_port_is_unreachable(session: aiohttp.ClientSession) -> None:
    client = AgentClient(session, timeout_seconds=5, concurrency=1)
    before = agent_calls("unreachable")
    result = await client.delete_files(f"http://127.0.0.1:{closed_port()}", uuid.uuid4(), files_for("/r/a"))
    assert_failed(result, "connection refused")
    assert agent_calls("unreachable") == before + 1


async def test_invalid_agent_url_is_unreachable(session: aiohttp.ClientSession) -> None:
    client = AgentClient(session, timeout_seconds=5, concurrency=1)
    result = await client.delete_files("ftp://host.example", uuid.uuid4(), files_for("/r/a"))
    assert_failed(result, "invalid agent URL")


async def test_connection_closed_before_answer_is_a_failure(session: aiohttp.ClientSession) -> None:
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    assert_failed(await call_agent_with(session, hang_up), "connection closed by agent before answering")


async def test_connection_closed_mid_body_is_a_failure(session: aiohttp.ClientSession) -> None:
    async def cut_short(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"success": true, "deleted": ["/r/a"], "missing": []}')
        assert request.transport is not None
        request.transport.close()
        return response

    assert_failed(await call_agent_with(session, cut_short), "cut short")


async def test_oversized_answer_is_a_failure(session: aiohttp.ClientSession) -> None:
    async def huge(request: web.Request) -> web.Response:
        padding = json.dumps(["x" * 1000] * 2000)
        body = f'{{"success": true, "deleted": ["/r/a"], "missing": [], "pad": {padding}}}'
        return web.Response(text=body, content_type="application/json")

    assert_failed(await call_agent_with(session, huge), "answer too large")


async def test_oversized_streamed_answer_is_a_failure(session: aiohttp.ClientSession) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        # Chunked, so no Content-Length warns the client: only counting what it reads can stop it.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10_000):
            await response.write(b" " * 65536)
        return response

    assert_failed(await call_agent_with(session, endless), "answer too large")


async def test_at_most_concurrency_calls_are_in_flight(session: aiohttp.ClientSession) -> None:
    in_flight = 0
    most_in_flight = 0

    async def slow_counting(request: web.Request) -> web.Response:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await asyncio.sleep(0.1)
        finally:
            in_flight -= 1
        body = await request.json()
        return web.json_response({"success": True, "deleted": [], "missing": [body["files"][0]["path"]]})

    client = AgentClient(session, timeout_seconds=5, concurrency=2)
    async with running_app(agent_with(slow_counting)) as url:
        results = await asyncio.gather(
            *(client.delete_files(url, uuid.uuid4(), files_for(f"/r/{n}")) for n in range(6))
        )
    assert all(result.ok for result in results)
    assert most_in_flight == 2


async def test_waiting_for_a_slot_does_not_count_into_the_timeout(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Four calls of 0.25 s in single file take about 1 s, well past the 0.8 s timeout of each.
    client = AgentClient(session, timeout_seconds=0.8, concurrency=1)
    async with running_agent(tmp_path, delay_seconds=0.25) as url:
        results = await asyncio.gather(
            *(client.delete_files(url, uuid.uuid4(), files_for(tmp_path / f"{n}.bin")) for n in range(4))
        )
    assert [result.error for result in results] == [None] * 4


async def test_cancellation_propagates(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    client = AgentClient(session, timeout_seconds=5, concurrency=1)
    async with running_agent(tmp_path, delay_seconds=5) as url:
        call = asyncio.create_task(client.delete_files(url, uuid.uuid4(), files_for(tmp_path / "a.bin")))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call


def counting_agent(answer: Handler) -> tuple[web.Application, dict[str, int]]:
    """A stand-in agent that counts the calls it received and the most it held at once, then answers with `answer`."""
    counts = {"calls": 0, "in_flight": 0, "most_in_flight": 0}

    async def handler(request: web.Request) -> web.StreamResponse:
        counts["calls"] += 1
        counts["in_flight"] += 1
        counts["most_in_flight"] = max(counts["most_in_flight"], counts["in_flight"])
        try:
            return await answer(request)
        finally:
            counts["in_flight"] -= 1

    return agent_with(handler), counts


async def test_one_host_gets_no_more_than_its_share_of_slots_and_another_host_is_served_meanwhile(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await release.wait()
        body = await request.json()
        return web.json_response({"success": True, "deleted": [], "missing": [body["files"][0]["path"]]})

    slow_app, slow = counting_agent(held)
    client = AgentClient(session, timeout_seconds=5, concurrency=3, host_concurrency=2)
    slow_host = uuid.uuid4()
    async with running_app(slow_app) as slow_url, running_agent(tmp_path) as quick_url:
        slow_calls = [
            asyncio.create_task(client.delete_files(slow_url, uuid.uuid4(), files_for(f"/r/{n}"), host_uuid=slow_host))
            for n in range(5)
        ]
        while slow["in_flight"] < 2:
            await asyncio.sleep(0.01)
        # Three slots in all, two taken by the slow host: the quick host's call goes through while those are held.
        quick = await client.delete_files(
            quick_url, uuid.uuid4(), files_for(tmp_path / "a.bin"), host_uuid=uuid.uuid4()
        )
        assert quick.ok and quick.contact == "answered"
        assert slow["in_flight"] == 2
        release.set()
        results = await asyncio.gather(*slow_calls)
    assert all(result.ok for result in results)
    assert slow["most_in_flight"] == 2 and slow["calls"] == 5


async def test_calls_queued_for_a_host_that_left_a_call_unanswered_are_not_sent(
    session: aiohttp.ClientSession,
) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(10)
        return web.Response(status=500)

    app, counts = counting_agent(hang)
    client = AgentClient(session, timeout_seconds=TIMEOUT, concurrency=4, host_concurrency=1)
    host = uuid.uuid4()
    async with running_app(app) as url:
        results = await asyncio.gather(
            *(client.delete_files(url, uuid.uuid4(), files_for(f"/r/{n}"), host_uuid=host) for n in range(3))
        )
        # Once it answered nothing, later calls (not queued behind that one) are sent again: they are probes.
        later = await client.delete_files(url, uuid.uuid4(), files_for("/r/later"), host_uuid=host)
    assert [r.contact for r in results] == ["unanswered", "not_called", "not_called"]
    assert results[0].error == f"timeout after {TIMEOUT:g}s"
    assert all(r.error is not None and r.error.startswith("host failing since ") for r in results[1:])
    assert all(f"(timeout after {TIMEOUT:g}s); not called" in (r.error or "") for r in results[1:])
    assert later.contact == "unanswered"
    assert counts["calls"] == 2


@pytest.mark.parametrize(
    ("answer", "contact"),
    [
        (web.json_response({"success": False, "error": "disk on fire"}), "answered"),
        (web.json_response({"success": True, "deleted": [], "missing": []}), "answered"),
        (web.Response(status=200, text="{not json", content_type="application/json"), "answered"),
        (web.Response(status=500, text="boom"), "unanswered"),
        (web.Response(status=404), "unanswered"),
    ],
)
async def test_any_whole_200_answer_is_an_answer_and_anything_else_is_not(
    session: aiohttp.ClientSession, answer: web.Response, contact: str
) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return answer

    result = await call_agent_with(session, reply)
    assert not result.ok and result.contact == contact


async def test_a_refused_connection_is_unanswered(session: aiohttp.ClientSession) -> None:
    client = AgentClient(session, timeout_seconds=TIMEOUT, concurrency=1)
    result = await client.delete_files(f"http://127.0.0.1:{closed_port()}", uuid.uuid4(), files_for("/r/a"))
    assert result.error == "connection refused" and result.contact == "unanswered"
