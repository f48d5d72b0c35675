"""The host agent the project ships: deletes a VM's state files and directories on one host, under its roots.

It speaks the host-agent protocol of CONTRACT.md over HTTP; which paths it may delete, and how it deletes them
without a race, is `app.agent.confinement`. A request naming even one refused path deletes nothing.
"""

import asyncio
import hmac
import logging
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from app.agent.confinement import PathRefused, confine_paths, delete_confined, real_roots
from app.protocol import (
    DELETE_PATH,
    HEALTH_PATH,
    MAX_REQUEST_BYTES,
    DeleteFailed,
    DeleteRequest,
    DeleteSucceeded,
    describe_invalid,
)

logger = logging.getLogger(__name__)

_ROOTS_KEY: web.AppKey[tuple[Path, ...]] = web.AppKey("roots")
_TOKEN_KEY = web.AppKey("token", str)


def create_agent_app(*roots: Path, token: str | None = None) -> web.Application:
    """Build the agent's web application, confined to `roots`, optionally requiring a bearer token."""
    if not roots:
        raise ValueError("the agent needs at least one root")
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[_ROOTS_KEY] = real_roots(roots)
    if token is not None:
        app[_TOKEN_KEY] = token
    app.router.add_post(DELETE_PATH, delete_host_files)
    app.router.add_get(HEALTH_PATH, healthz)
    return app


async def serve_agent(
    roots: Sequence[Path], *, host: str = "127.0.0.1", port: int = 8100, token: str | None = None
) -> None:
    """Run the agent on host:port until cancelled, then shut it down cleanly."""
    app = create_agent_app(*roots, token=token)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            logger.info(
                "agent listening host=%s port=%s roots=%s auth=%s",
                address[0],
                address[1],
                ",".join(str(root) for root in app[_ROOTS_KEY]),
                "token" if token is not None else "none",
            )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def healthz(request: web.Request) -> web.Response:
    """Tell a prober the agent is up."""
    return web.json_response({"status": "ok"})


def answer(message: DeleteSucceeded | DeleteFailed, status: int = 200) -> web.Response:
    """An answer of the protocol, as the agent (and the test agents standing in for it) sends it."""
    return web.Response(text=message.model_dump_json(), status=status, content_type="application/json")


async def delete_host_files(request: web.Request) -> web.Response:
    """Delete the requested files of one VM, all or nothing as far as the path checks go."""
    expected_token = request.app.get(_TOKEN_KEY)
    if expected_token is not None and not _bearer_matches(request, expected_token):
        logger.warning("delete refused reason=unauthorized remote=%s", request.remote)
        return answer(DeleteFailed(error="unauthorized"), status=401)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return answer(DeleteFailed(error="request body too large"), status=413)
    try:
        delete = DeleteRequest.model_validate_json(raw)
    except ValidationError as exc:
        reason = describe_invalid(exc)
        logger.warning("delete rejected reason=bad_request error=%r", reason)
        return answer(DeleteFailed(error=f"bad request: {reason}"), status=400)
    vm_uuid = delete.vm_uuid
    # A path listed twice would otherwise come back both deleted and missing.
    paths = list(dict.fromkeys(f.path for f in delete.files))

    # realpath, open, unlink and rmtree are blocking syscalls; for many files, a big directory or a slow disk
    # they would stall every other request, so checks and deletes run in a worker thread.
    try:
        roots = request.app[_ROOTS_KEY]
        confined = await asyncio.to_thread(confine_paths, roots, paths)
    except PathRefused as refusal:
        logger.warning("delete refused vm_uuid=%s count=%d reason=%r", vm_uuid, len(paths), str(refusal))
        return answer(DeleteFailed(error=str(refusal)))
    outcome = await asyncio.to_thread(delete_confined, confined)
    if outcome.errors:
        logger.error(
            "delete failed vm_uuid=%s count=%d deleted=%d missing=%d errors=%r",
            vm_uuid,
            len(paths),
            len(outcome.deleted),
            len(outcome.missing),
            outcome.errors,
        )
        return answer(DeleteFailed(error="; ".join(outcome.errors)))
    logger.info(
        "files deleted vm_uuid=%s count=%d deleted=%d missing=%d",
        vm_uuid,
        len(paths),
        len(outcome.deleted),
        len(outcome.missing),
    )
    return answer(DeleteSucceeded(deleted=outcome.deleted, missing=outcome.missing))


def _bearer_matches(request: web.Request, token: str) -> bool:
    """Check the request's bearer token in constant time, so its timing leaks nothing of the token."""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest(given, expected)
