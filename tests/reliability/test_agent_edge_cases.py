"""Agents that misbehave on the wire, end to end through a removal: each is a failure of that host alone.

A raw TCP server plays the bad agent, so that it can do what no well-behaved HTTP server does: hold its
answer back, dribble it out byte by byte, send tens of megabytes, promise more body than it sends, or
hang up in the middle. The job must still succeed within AGENT_TIMEOUT_SECONDS (plus slack for a busy
machine), with the bad host `failed` and a reason that says what happened, its files kept as orphans,
and the good host's files deleted.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from app.service.audit import audit
from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm

pytestmark = pytest.mark.reliability

AGENT_TIMEOUT_SECONDS = 2.0
# A job with one misbehaving host ends within the agent timeout; this much more absorbs a loaded machine.
SLACK_SECONDS = 15.0
# Longer than any test runs: a bad agent that is "slow" never finishes on its own.
FOREVER_SECONDS = 600.0
HUGE_BYTES = 32 * 1024 * 1024
CHUNK_BYTES = 64 * 1024

Behaviour = Callable[[asyncio.StreamWriter, bytes], Awaitable[None]]


def confirming_answer(request_body: bytes) -> bytes:
    """The answer a good agent would give: every requested path deleted."""
    paths = [f["path"] for f in json.loads(request_body)["files"]]
    return json.dumps({"success": True, "deleted": paths, "missing": []}).encode()


def head(**headers: str | int) -> bytes:
    """A 200 status line and these headers (names with underscores become dashes)."""
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/json", "Connection: close"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def slow_to_start(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Accepts the request and never starts the answer."""
    await asyncio.sleep(FOREVER_SECONDS)


async def slow_to_stream(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Starts a valid answer at once, then dribbles it out a byte every half second."""
    answer = confirming_answer(body)
    writer.write(head(content_length=len(answer)))
    for byte in answer:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.5)


async def huge_declared(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Announces (and starts sending) a body of tens of megabytes."""
    writer.write(head(content_length=HUGE_BYTES))
    for _ in range(HUGE_BYTES // CHUNK_BYTES):
        writer.write(b" " * CHUNK_BYTES)
        await writer.drain()


async def huge_streamed(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Streams tens of megabytes, chunked, without saying how much will come."""
    writer.write(head(transfer_encoding="chunked"))
    writer.write(chunk(b'{"success": true, "deleted": [], "missing": [], "padding": "'))
    for _ in range(HUGE_BYTES // CHUNK_BYTES):
        writer.write(chunk(b"x" * CHUNK_BYTES))
        await writer.drain()


async def truncated(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Sends a complete, confirming JSON answer, but declares more body than that, and hangs up."""
    answer = confirming_answer(body)
    writer.write(head(content_length=len(answer) + 1000) + answer)


async def closed_mid_body(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Sends the first half of a confirming answer in a chunk, then hangs up without the last chunk."""
    answer = confirming_answer(body)
    writer.write(head(transfer_encoding="chunked") + chunk(answer[: len(answer) // 2]))


async def closed_before_answering(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Reads the request and hangs up without a word."""


@asynccontextmanager
async def misbehaving_agent(behaviour: Behaviour) -> AsyncIterator[str]:
    """A raw HTTP/1.1 server on a free loopback port that reads each request and answers with `behaviour`."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            request_head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in request_head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await behaviour(writer, await reader.readexactly(length))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the service gave up on us, as it should
        finally:
            # Whatever was written still goes out first; then the connection ends, answer complete or not.
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (slow_to_start, f"timeout after {AGENT_TIMEOUT_SECONDS:g}s"),
        (slow_to_stream, f"timeout after {AGENT_TIMEOUT_SECONDS:g}s"),
        (huge_declared, "answer too large"),
        (huge_streamed, "answer too large"),
        (truncated, "answer cut short"),
        (closed_mid_body, "answer cut short"),
        (closed_before_answering, "connection closed by agent before answering"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
async def test_a_misbehaving_agent_fails_only_its_own_host_within_the_agent_timeout(
    make_client: AppFactory, tmp_path: Path, behaviour: Behaviour, reason: str
) -> None:
    client = await make_client(agent_timeout_seconds=AGENT_TIMEOUT_SECONDS, orphan_retry_seconds=600)
    vm = await put_vm(client)
    good_root, bad_root = tmp_path / "good", tmp_path / "bad"
    async with running_agent(good_root) as good_url, misbehaving_agent(behaviour) as bad_url:
        good_host, bad_host = await put_host(client, good_url), await put_host(client, bad_url)
        good_files = make_files(good_root, vm, "tpm2-00.permall", "nvram.fd")
        bad_files = make_files(bad_root, vm, "tpm2-00.permall", "nvram.fd")
        for host, files in ((good_host, good_files), (bad_host, bad_files)):
            await add_file(client, vm, host, files[0])
            await add_file(client, vm, host, files[1], type="NvRam")

        started = time.monotonic()
        job = await remove_tpm(client, vm, timeout=AGENT_TIMEOUT_SECONDS + SLACK_SECONDS)
        elapsed = time.monotonic() - started

    assert job["state"] == "succeeded" and job["error"] is None, job
    assert elapsed < AGENT_TIMEOUT_SECONDS + SLACK_SECONDS
    outcomes = {h["host_uuid"]: h for h in job["hosts"]}
    assert outcomes[good_host]["state"] == "deleted" and outcomes[good_host]["error"] is None
    assert outcomes[bad_host]["state"] == "failed" and reason in outcomes[bad_host]["error"], outcomes[bad_host]
    assert not [f for f in good_files if f.exists()] and all(f.exists() for f in bad_files)
    assert job["orphan_files"] == len(bad_files)
    orphans = (await client.get("/orphan-files", params={"host_uuid": bad_host})).json()
    assert sorted(o["path"] for o in orphans) == sorted(str(f) for f in bad_files)
    assert all(o["vm_uuid"] == vm and reason in o["last_error"] for o in orphans), orphans
    async with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        report = await audit(session, vm_uuids=[uuid.UUID(vm)])
    assert report.ok and report.ledger_files == len(good_files) + len(bad_files), report.render()
