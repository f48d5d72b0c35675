"""The host agent the project ships: deletes a VM's state files on one host, confined to a root directory.

It speaks the host-agent protocol of CONTRACT.md. Confinement follows ZStack's agent: a path is only
touched when it is absolute, free of ".." and NUL, and both the directory entry named and the file
it resolves to (links followed) lie under the real path of the root. A request naming even one path
that fails these checks deletes nothing.
"""

import asyncio
import hmac
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

FILE_TYPES = frozenset({"TpmState", "NvRam"})
# The contract bounds a recorded path to 4096 bytes (PATH_MAX); a longer one cannot be ours.
MAX_PATH_BYTES = 4096
# A request lists one VM's files on one host: a handful in practice, but let a few thousand paths
# through before aiohttp's default 1 MiB cap would answer 413.
MAX_REQUEST_BYTES = 16 * 1024 * 1024

_ROOT_KEY = web.AppKey("root", Path)
_TOKEN_KEY = web.AppKey("token", str)
_DELAY_KEY = web.AppKey("delay_seconds", float)


class _BadRequest(Exception):
    """A request body that does not follow the protocol; answered with 400 and this text."""


@dataclass
class _DeleteOutcome:
    """What a batch of deletes came to, in the protocol's terms."""

    deleted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    refused: str | None = None
    errors: list[str] = field(default_factory=list)


def create_agent_app(root: Path, *, token: str | None = None, delay_seconds: float = 0.0) -> web.Application:
    """Build the agent's web application, confined to `root`, optionally requiring a bearer token.

    `delay_seconds` holds every delete answer back that long, to play a slow host in tests and
    benchmarks.
    """
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[_ROOT_KEY] = Path(os.path.realpath(root))
    if token is not None:
        app[_TOKEN_KEY] = token
    app[_DELAY_KEY] = delay_seconds
    app.router.add_post("/host-files/delete", delete_host_files)
    app.router.add_get("/healthz", healthz)
    return app


async def serve_agent(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    token: str | None = None,
    delay_seconds: float = 0.0,
) -> None:
    """Run the agent on host:port until cancelled, then shut it down cleanly."""
    app = create_agent_app(root, token=token, delay_seconds=delay_seconds)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            logger.info(
                "agent listening host=%s port=%s root=%s auth=%s",
                address[0],
                address[1],
                app[_ROOT_KEY],
                "token" if token is not None else "none",
            )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def healthz(request: web.Request) -> web.Response:
    """Tell a prober the agent is up."""
    return web.json_response({"status": "ok"})


async def delete_host_files(request: web.Request) -> web.Response:
    """Delete the requested files of one VM, all or nothing as far as the path checks go."""
    expected_token = request.app.get(_TOKEN_KEY)
    if expected_token is not None and not _bearer_matches(request, expected_token):
        logger.warning("delete refused reason=unauthorized remote=%s", request.remote)
        return web.json_response({"success": False, "error": "unauthorized"}, status=401)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"success": False, "error": "request body too large"}, status=413)
    try:
        vm_uuid, paths = _parse_delete_request(raw)
    except _BadRequest as exc:
        logger.warning("delete rejected reason=bad_request error=%r", str(exc))
        return web.json_response({"success": False, "error": str(exc)}, status=400)

    delay = request.app[_DELAY_KEY]
    if delay > 0:
        await asyncio.sleep(delay)

    root = request.app[_ROOT_KEY]
    # realpath, lstat and unlink are blocking syscalls; for many files (or a slow disk) they would
    # stall every other request, so the whole batch runs in a worker thread.
    outcome = await asyncio.to_thread(_delete_confined, root, paths)
    if outcome.refused is not None:
        logger.warning(
            "delete refused vm_uuid=%s count=%d root=%s reason=%r", vm_uuid, len(paths), root, outcome.refused
        )
        return web.json_response({"success": False, "error": outcome.refused})
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
        return web.json_response({"success": False, "error": "; ".join(outcome.errors)})
    logger.info(
        "files deleted vm_uuid=%s count=%d deleted=%d missing=%d root=%s",
        vm_uuid,
        len(paths),
        len(outcome.deleted),
        len(outcome.missing),
        root,
    )
    return web.json_response({"success": True, "deleted": outcome.deleted, "missing": outcome.missing})


def _bearer_matches(request: web.Request, token: str) -> bool:
    """Check the request's bearer token in constant time, so its timing leaks nothing of the token."""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest(given, expected)


def _parse_delete_request(raw: bytes) -> tuple[uuid.UUID, list[str]]:
    """Read the VM and the paths (deduplicated, in order) from a delete request body."""
    try:
        body: Any = json.loads(raw)
    except ValueError as exc:
        raise _BadRequest("body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    vm_uuid = body.get("vm_uuid")
    if not isinstance(vm_uuid, str):
        raise _BadRequest("vm_uuid must be a UUID string")
    try:
        parsed_uuid = uuid.UUID(vm_uuid)
    except ValueError as exc:
        raise _BadRequest("vm_uuid must be a UUID string") from exc
    files = body.get("files")
    if not isinstance(files, list):
        raise _BadRequest("files must be a list")
    paths: list[str] = []
    for index, item in enumerate(files):
        if not isinstance(item, dict):
            raise _BadRequest(f"files[{index}] must be an object")
        if not isinstance(item.get("path"), str):
            raise _BadRequest(f"files[{index}].path must be a string")
        if item.get("type") not in FILE_TYPES:
            raise _BadRequest(f"files[{index}].type must be one of {', '.join(sorted(FILE_TYPES))}")
        paths.append(item["path"])
    # A path listed twice would otherwise come back both deleted and missing.
    return parsed_uuid, list(dict.fromkeys(paths))


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
