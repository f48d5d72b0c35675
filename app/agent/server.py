"""The host agent the project ships: deletes a VM's state files on one host, confined to a root directory.

It speaks the host-agent protocol of CONTRACT.md. Confinement follows ZStack's agent: a path is only
touched when it is absolute, free of ".." and NUL, and both the directory entry named and the file
it resolves to (links followed) lie under the real path of the root. A request naming even one path
that fails these checks deletes nothing.
"""

import asyncio
import hmac
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from app.protocol import (
    DELETE_PATH,
    HEALTH_PATH,
    MAX_PATH_BYTES,
    MAX_REQUEST_BYTES,
    DeleteFailed,
    DeleteRequest,
    DeleteSucceeded,
    describe_invalid,
)

logger = logging.getLogger(__name__)

_ROOT_KEY = web.AppKey("root", Path)
_TOKEN_KEY = web.AppKey("token", str)


@dataclass
class _DeleteOutcome:
    """What a batch of deletes came to, in the protocol's terms."""

    deleted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    refused: str | None = None
    errors: list[str] = field(default_factory=list)


def create_agent_app(root: Path, *, token: str | None = None) -> web.Application:
    """Build the agent's web application, confined to `root`, optionally requiring a bearer token."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[_ROOT_KEY] = Path(os.path.realpath(root))
    if token is not None:
        app[_TOKEN_KEY] = token
    app.router.add_post(DELETE_PATH, delete_host_files)
    app.router.add_get(HEALTH_PATH, healthz)
    return app


async def serve_agent(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run the agent on host:port (HTTPS only with `ssl_context`, see app/agent/tls.py) until cancelled."""
    app = create_agent_app(root, token=token)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        for address in runner.addresses:
            logger.info(
                "agent listening host=%s port=%s root=%s auth=%s tls=%s",
                address[0],
                address[1],
                app[_ROOT_KEY],
                "token" if token is not None else "none",
                _tls_mode(ssl_context),
            )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _tls_mode(ssl_context: ssl.SSLContext | None) -> str:
    """How the agent serves, for its start-up log line: "off", "server" or "mutual"."""
    if ssl_context is None:
        return "off"
    return "mutual" if ssl_context.verify_mode == ssl.CERT_REQUIRED else "server"


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

    root = request.app[_ROOT_KEY]
    # realpath, lstat and unlink are blocking syscalls; for many files (or a slow disk) they would
    # stall every other request, so the whole batch runs in a worker thread.
    outcome = await asyncio.to_thread(_delete_confined, root, paths)
    if outcome.refused is not None:
        logger.warning(
            "delete refused vm_uuid=%s count=%d root=%s reason=%r", vm_uuid, len(paths), root, outcome.refused
        )
        return answer(DeleteFailed(error=outcome.refused))
    if outcome.errors:
        logger.error(
            "delete failed vm_uuid=%s count=%d deleted=%d missing=%d root=%s errors=%r",
            vm_uuid,
            len(paths),
            len(outcome.deleted),
            len(outcome.missing),
            root,
            outcome.errors,
        )
        return answer(DeleteFailed(error="; ".join(outcome.errors)))
    logger.info(
        "files deleted vm_uuid=%s count=%d deleted=%d missing=%d root=%s",
        vm_uuid,
        len(paths),
        len(outcome.deleted),
        len(outcome.missing),
        root,
    )
    return answer(DeleteSucceeded(deleted=outcome.deleted, missing=outcome.missing))


def _bearer_matches(request: web.Request, token: str) -> bool:
    """Check the request's bearer token in constant time, so its timing leaks nothing of the token."""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest(given, expected)


def _delete_confined(root: Path, paths: Sequence[str]) -> _DeleteOutcome:
    """Check every path against the root, then delete them all, or none if any is refused.

    Checking all before deleting any keeps a bad request from half-applying. An unlink that fails
    for another reason than the file being gone does not stop the others: each file deleted is
    progress the service's retry need not redo, and the failure answer makes it retry the lot.
    """
    entries: list[tuple[str, str]] = []
    for path in paths:
        entry, refusal = _confined_entry(root, path)
        if refusal is not None:
            return _DeleteOutcome(refused=refusal)
        entries.append((path, entry))

    outcome = _DeleteOutcome()
    for path, entry in entries:
        try:
            os.unlink(entry)
        except FileNotFoundError:
            outcome.missing.append(path)
        except OSError as exc:
            outcome.errors.append(f"cannot delete {path}: {exc.strerror or exc}")
        else:
            outcome.deleted.append(path)
    return outcome


def _confined_entry(root: Path, path: str) -> tuple[str, str | None]:
    """Find the directory entry to unlink for `path`, or say why the path is refused.

    The entry is the path with its directory resolved but its last component kept: for a symlink
    inside the root that points at a file inside the root, the link itself is removed and its
    target left alone. That is the safe reading: the service recorded the link's path, and
    removing a target elsewhere would act on a file nobody named.

    The checks assume nobody swaps directories under the root for links between check and unlink
    (the root belongs to the hypervisor's state, not to VM guests).
    """
    if "\x00" in path:
        return "", f"path contains a NUL byte: {path!r}"
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        return "", f"path cannot be encoded for the filesystem: {path!r}"
    if len(encoded) > MAX_PATH_BYTES:
        return "", f"path is longer than {MAX_PATH_BYTES} bytes: {path[:80]!r}..."
    if not os.path.isabs(path):
        return "", f"path is not absolute: {path}"
    if ".." in path.split("/"):
        return "", f"path contains a '..' segment: {path}"
    directory, name = os.path.split(path)
    if name in ("", "."):
        return "", f"path names a directory: {path}"
    entry = os.path.join(os.path.realpath(directory), name)
    if not _is_strictly_under(entry, root):
        return "", f"path is outside the agent root: {path}"
    # A link is refused when its target leaves the root even though only the link would be
    # unlinked: a path whose real file lies elsewhere is not one this agent manages.
    if not _is_strictly_under(os.path.realpath(path), root):
        return "", f"path resolves outside the agent root: {path}"
    if os.path.isdir(path):
        return "", f"path is a directory: {path}"
    return entry, None


def _is_strictly_under(path: str, root: Path) -> bool:
    """Tell whether `path` lies inside `root` (both real paths), the root itself excluded.

    Compares whole components, so that "/srv/rootX/f" is not taken to lie under "/srv/root".
    """
    candidate = Path(path)
    return candidate != root and candidate.is_relative_to(root)
