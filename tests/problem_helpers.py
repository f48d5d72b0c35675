"""Assertions on RFC 9457 problem answers, shared by the tests of every kind of error."""

from typing import Any

import httpx

PROBLEM_KEYS = {"type", "title", "status", "detail"}


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    """Check that `answer` is an `application/problem+json` answer with `status`; its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].split(";")[0].strip() == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body.keys() >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body
