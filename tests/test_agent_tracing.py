"""The agent reads each request's `traceparent` and logs its trace id with the request and its outcome."""

import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from app.agent.tracing import TraceIdFilter, trace_id_of
from app.protocol import DELETE_PATH
from tests.agent_helpers import running_agent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("traceparent", "trace_id"),
    [
        (TRACEPARENT, TRACE_ID),
        (f" {TRACEPARENT} ", TRACE_ID),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-00-later-fields", TRACE_ID),  # a later version may add fields
        (None, None),
        ("", None),
        ("garbage", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra", None),
        (f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01", None),
    ],
)
def test_trace_id_of_a_traceparent_is_read_as_w3c_trace_context_says(traceparent: str | None, trace_id: str) -> None:
    assert trace_id_of(traceparent) == trace_id


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The agent's log lines, each with the trace id field its command line's handler adds."""
    trace_ids = TraceIdFilter()
    caplog.handler.addFilter(trace_ids)
    caplog.set_level(logging.INFO, logger="app.agent")
    yield caplog
    caplog.handler.removeFilter(trace_ids)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{record.getMessage()}{record.trace_id_field}"
        for record in caplog.records
        if record.name.startswith("app.agent")
    ]


async def test_each_request_and_its_outcome_are_logged_with_its_trace_id(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state").write_bytes(b"x")
    body = {
        "vm_uuid": "3f1c6f0e-4a55-4c8e-9a57-2f7f6f0f1a11",
        "files": [{"path": str(tmp_path / "state"), "type": "TpmState"}],
    }
    async with running_agent(tmp_path) as url, aiohttp.ClientSession() as session:
        async with session.post(url + DELETE_PATH, json=body, headers={"traceparent": TRACEPARENT}) as answer:
            assert answer.status == 200 and (await answer.json())["success"] is True
        outside = {"vm_uuid": body["vm_uuid"], "files": [{"path": "/etc/passwd", "type": "NvRam"}]}
        async with session.post(url + DELETE_PATH, json=outside, headers={"traceparent": "garbage"}) as answer:
            assert answer.status == 200 and (await answer.json())["success"] is False
        async with session.get(url + "/healthz", headers={"traceparent": TRACEPARENT}) as answer:
            assert answer.status == 200

    logged = lines(agent_log)
    traced = [line for line in logged if line.endswith(f" trace_id={TRACE_ID}")]
    assert [line.split(" ", 1)[0] for line in traced] == ["request", "files"], logged
    # A request without a valid trace id is logged as before, with no trace id; a health check not at all.
    untraced = [line for line in logged if "trace_id=" not in line]
    assert [line.split(" ", 1)[0] for line in untraced] == ["request", "delete"], logged
    assert not any("/healthz" in line for line in logged)
