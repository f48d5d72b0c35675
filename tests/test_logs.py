"""Structured logs: request ids passed through, job lines that name their job, VM and host, no token ever."""

import io
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from app.service.logs import JsonFormatter, KeyValueFormatter
from devtools.local_stack import wait_until
from tests.agent_helpers import running_agent
from tests.conftest import AppFactory
from tests.inventory_helpers import add_file, make_files, put_host, put_vm, remove_tpm

API_TOKEN = f"api-secret-{uuid.uuid4().hex}"
AGENT_TOKEN = f"agent-secret-{uuid.uuid4().hex}"


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def add_logging_route(client: httpx.AsyncClient) -> None:
    """A route that writes one log line, to see what a line written while serving a request carries."""
    app: FastAPI = client.app  # type: ignore[attr-defined]

    @app.get("/log-something")
    async def log_something() -> dict[str, str]:
        logging.getLogger("app.test").info("serving a request")
        return {}


async def test_a_callers_request_id_is_echoed_and_put_on_its_log_lines(
    client: httpx.AsyncClient, captured_logs: io.StringIO
) -> None:
    add_logging_route(client)
    answer = await client.get("/log-something", headers={"X-Request-ID": "req-42.abc"})
    assert answer.headers["X-Request-ID"] == "req-42.abc"
    lines = [line for line in json_lines(captured_logs) if line["message"] == "serving a request"]
    assert [line["request_id"] for line in lines] == ["req-42.abc"]


async def test_a_request_without_an_acceptable_id_gets_a_new_one(
    client: httpx.AsyncClient, captured_logs: io.StringIO
) -> None:
    add_logging_route(client)
    given = [None, "has spaces in it", "x" * 200, "quote\"and'more"]
    for value in given:
        headers = {"X-Request-ID": value} if value is not None else {}
        answer = await client.get("/log-something", headers=headers)
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-ID"]), (value, answer.headers)
    ids = [line["request_id"] for line in json_lines(captured_logs) if line["message"] == "serving a request"]
    assert len(set(ids)) == len(given)
    # Problem answers carry the id too, so a caller can quote it.
    assert "X-Request-ID" in (await client.get(f"/vms/{uuid.uuid4()}")).headers


async def test_no_token_is_ever_logged_and_job_lines_name_job_vm_and_host(
    make_client: AppFactory, tmp_path: Path, captured_logs: io.StringIO
) -> None:
    client = await make_client(api_token=API_TOKEN, agent_token=AGENT_TOKEN)
    client.headers["Authorization"] = f"Bearer {API_TOKEN}"
    async with (
        running_agent(tmp_path / "a", token=AGENT_TOKEN) as good,
        running_agent(tmp_path / "b", token="another-agents-token") as refusing,
    ):
        vm = await put_vm(client)
        hosts = {}
        for url, root in ((good, tmp_path / "a"), (refusing, tmp_path / "b")):
            hosts[url] = await put_host(client, url)
            (state,) = make_files(root, vm, "tpm2-00.permall")
            await add_file(client, vm, hosts[url], state)
        job = await remove_tpm(client, vm)
    assert job["state"] == "succeeded" and job["orphan_files"] == 1
    # The job reads succeeded as its cleanup commits; the worker logs so once its handler has returned.
    await wait_until(
        lambda: "job succeeded" in captured_logs.getvalue(), timeout=10, what="the worker logged the job's end"
    )
    unauthorized = await client.get("/orphan-files", headers={"Authorization": "Bearer not-the-token"})
    assert unauthorized.status_code == 401

    text = captured_logs.getvalue()
    assert "host delete failed" in text
    assert API_TOKEN not in text and AGENT_TOKEN not in text and "not-the-token" not in text

    job_lines = [line for line in json_lines(captured_logs) if line.get("job_id") == job["id"]]
    messages = {line["message"] for line in job_lines}
    assert {"job claimed", "host delete failed; its files become orphans", "job succeeded"} <= messages
    for line in job_lines:
        assert line["vm_uuid"] == vm, line
    (failed,) = [line for line in job_lines if line["message"].startswith("host delete failed")]
    assert failed["host_uuid"] == hosts[refusing] and "401" in failed["reason"]
    # No line of the worker or the removal is about a job without naming it.
    for line in json_lines(captured_logs):
        if line["logger"] in ("app.service.jobs.worker", "app.service.removal.run") and "job" in line["message"]:
            assert "job_id" in line and "vm_uuid" in line, line


def test_lines_are_json_for_collectors_and_key_value_for_people() -> None:
    record = logging.makeLogRecord(
        {
            "name": "app.service.removal.run",
            "levelname": "WARNING",
            "msg": "host delete failed",
            "job_id": "j1",
            "reason": "HTTP 500",
        }
    )
    entry = json.loads(JsonFormatter().format(record))
    assert (
        entry["message"] == "host delete failed"
        and entry["level"] == "warning"
        and entry["logger"] == "app.service.removal.run"
    )
    assert entry["job_id"] == "j1" and entry["reason"] == "HTTP 500" and entry["time"].endswith("Z")

    line = KeyValueFormatter().format(record)
    assert line.endswith('app.service.removal.run: host delete failed job_id=j1 reason="HTTP 500"')
