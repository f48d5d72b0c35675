"""The host agent the project ships: deletes a VM's state files and directories on one host, under its roots,
and its vTPM secrets through libvirt.

It speaks the host-agent protocol of CONTRACT.md over HTTP; which paths it may delete, and how it deletes them
without a race, is `app.agent.confinement`; which secrets it may undefine, and how, is `app.agent.secrets`;
whether anything of a request is in use on the host, `app.agent.in_use`. A request naming even one refused path
or secret, or anything in use, deletes nothing.
"""

import asyncio
import hmac
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from app.agent.confinement import ConfinedPath, PathRefused, confine_paths, delete_confined, real_roots
from app.agent.domains import ActiveDomain, active_domains
from app.agent.in_use import UsageUnknown, in_use
from app.agent.libvirt import NO_LIBVIRT_URI, Libvirt, LibvirtError
from app.agent.outcome import DeleteOutcome
from app.agent.scan import scan_host
from app.agent.secrets import SecretPlan, plan_secrets, undefine_secrets
from app.agent.tracing import log_trace_ids
from app.protocol import (
    DELETE_PATH,
    HEALTH_PATH,
    MAX_REQUEST_BYTES,
    SCAN_PATH,
    DeleteFailed,
    DeleteRequest,
    DeleteSucceeded,
    ScanRequest,
    ScanSucceeded,
    describe_invalid,
)

logger = logging.getLogger(__name__)

Message = TypeVar("Message", bound=BaseModel)

_ROOTS_KEY: web.AppKey[tuple[Path, ...]] = web.AppKey("roots")
_TOKEN_KEY = web.AppKey("token", str)
_LIBVIRT_KEY: web.AppKey[Libvirt | None] = web.AppKey("libvirt")


def create_agent_app(*roots: Path, libvirt: Libvirt | None, token: str | None = None) -> web.Application:
    """Build the agent's web application, confined to `roots` and `libvirt`, optionally requiring a bearer token.

    `libvirt=None` is a host without libvirt (`--libvirt-uri none`): it refuses secrets, and locks alone say what
    is in use.
    """
    if not roots:
        raise ValueError("the agent needs at least one root")
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[log_trace_ids])
    app[_ROOTS_KEY] = real_roots(roots)
    app[_LIBVIRT_KEY] = libvirt
    if token is not None:
        app[_TOKEN_KEY] = token
    app.router.add_post(DELETE_PATH, delete_host_files)
    app.router.add_post(SCAN_PATH, scan_host_files)
    app.router.add_get(HEALTH_PATH, healthz)
    return app


async def serve_agent(
    roots: Sequence[Path],
    *,
    libvirt: Libvirt | None,
    host: str = "127.0.0.1",
    port: int = 8100,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run the agent on host:port (HTTPS only with `ssl_context`, see app/agent/tls.py) until cancelled."""
    app = create_agent_app(*roots, libvirt=libvirt, token=token)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        for address in runner.addresses:
            logger.info(
                "agent listening host=%s port=%s roots=%s libvirt_uri=%s auth=%s tls=%s",
                address[0],
                address[1],
                ",".join(str(root) for root in app[_ROOTS_KEY]),
                libvirt.uri if libvirt is not None else NO_LIBVIRT_URI,
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


def answer(message: DeleteSucceeded | DeleteFailed | ScanSucceeded, status: int = 200) -> web.Response:
    """An answer of the protocol, as the agent (and the test agents standing in for it) sends it."""
    return web.Response(text=message.model_dump_json(), status=status, content_type="application/json")


async def delete_host_files(request: web.Request) -> web.Response:
    """Delete the requested files of one VM, all or nothing as far as the path checks go."""
    delete = await _parsed(request, DeleteRequest, "delete")
    if isinstance(delete, web.Response):
        return delete
    vm_uuid = delete.vm_uuid
    count = len({f.path for f in delete.files})
    try:
        outcome = await _delete_files(request.app[_ROOTS_KEY], request.app[_LIBVIRT_KEY], delete)
    except (PathRefused, SecretRefused) as refusal:
        logger.warning("delete refused vm_uuid=%s count=%d reason=%r", vm_uuid, count, str(refusal))
        return answer(DeleteFailed(error=str(refusal)))
    except InUse as busy:
        logger.warning("delete refused vm_uuid=%s count=%d reason=in_use error=%r", vm_uuid, count, str(busy))
        return answer(DeleteFailed(error=str(busy)))
    if outcome.errors:
        logger.error(
            "delete failed vm_uuid=%s count=%d deleted=%d missing=%d errors=%r",
            vm_uuid,
            count,
            len(outcome.deleted),
            len(outcome.missing),
            outcome.errors,
        )
        return answer(DeleteFailed(error="; ".join(outcome.errors)))
    logger.info(
        "files deleted vm_uuid=%s count=%d deleted=%d missing=%d",
        vm_uuid,
        count,
        len(outcome.deleted),
        len(outcome.missing),
    )
    return answer(DeleteSucceeded(deleted=outcome.deleted, missing=outcome.missing))


async def scan_host_files(request: web.Request) -> web.Response:
    """List what the host holds that may belong to a vTPM, and delete nothing."""
    scan = await _parsed(request, ScanRequest, "scan")
    if isinstance(scan, web.Response):
        return scan
    roots = request.app[_ROOTS_KEY]
    try:
        listed = await scan_host(roots, request.app[_LIBVIRT_KEY])
    except LibvirtError as error:
        logger.error("scan failed error=%r", str(error))
        return answer(DeleteFailed(error=f"cannot ask libvirt: {error}"))
    except OSError as error:
        logger.error("scan failed error=%r", str(error))
        return answer(DeleteFailed(error=f"cannot list the roots: {error.strerror or error}"))
    logger.info("host scanned entries=%d truncated=%s", len(listed.entries), listed.truncated)
    return answer(listed)


async def _parsed(request: web.Request, model: type[Message], operation: str) -> Message | web.Response:
    """The request's body as `model`, or the answer that refuses it: unauthorized, too large, or malformed."""
    expected_token = request.app.get(_TOKEN_KEY)
    if expected_token is not None and not _bearer_matches(request, expected_token):
        logger.warning("%s refused reason=unauthorized remote=%s", operation, request.remote)
        return answer(DeleteFailed(error="unauthorized"), status=401)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return answer(DeleteFailed(error="request body too large"), status=413)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        reason = describe_invalid(exc)
        logger.warning("%s rejected reason=bad_request error=%r", operation, reason)
        return answer(DeleteFailed(error=f"bad request: {reason}"), status=400)


def _bearer_matches(request: web.Request, token: str) -> bool:
    """Check the request's bearer token in constant time, so its timing leaks nothing of the token."""
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest(given, expected)


async def _delete_files(roots: tuple[Path, ...], libvirt: Libvirt | None, delete: DeleteRequest) -> DeleteOutcome:
    """Check every path against the roots, every secret with libvirt and all of it for use, then delete it all.

    Nothing is deleted if anything is refused or in use. Checking all before deleting any keeps a bad request from
    half-applying; a libvirt that cannot say what a secret is, or whether a domain uses it, fails the request before
    anything is deleted, since nothing could vouch for it. Secrets go last, as the key that encrypts the state is
    the last thing of a TPM to drop.
    """
    # A path listed twice would otherwise come back both deleted and missing.
    paths = list(dict.fromkeys(f.path for f in delete.files if f.type != "Secret"))
    secrets = list(dict.fromkeys(f.path for f in delete.files if f.type == "Secret"))
    if secrets and libvirt is None:
        raise SecretRefused(f"this host has no libvirt (--libvirt-uri {NO_LIBVIRT_URI}): cannot undefine {secrets[0]}")
    # realpath, open, unlink and rmtree are blocking syscalls; for many files, a big directory or a slow disk
    # they would stall every other request, so checks and deletes run in a worker thread.
    confined = await asyncio.to_thread(confine_paths, roots, paths)
    plan, domains = await _ask_libvirt(libvirt, secrets)
    if plan.refused is not None:
        raise SecretRefused(plan.refused)
    if plan.error is not None:
        return DeleteOutcome(errors=[plan.error])
    vm_uuid = str(delete.vm_uuid)
    outcome = await asyncio.to_thread(_delete_unless_in_use, confined, secrets, vm_uuid, domains)
    undefined = await undefine_secrets(libvirt, plan) if libvirt is not None else DeleteOutcome()
    outcome.deleted.extend(undefined.deleted)
    outcome.missing.extend(undefined.missing)
    outcome.errors.extend(undefined.errors)
    return outcome


async def _ask_libvirt(libvirt: Libvirt | None, secrets: Sequence[str]) -> tuple[SecretPlan, Sequence[ActiveDomain]]:
    """The request's secrets checked with libvirt, and the host's active domains; none without libvirt.

    Both are asked side by side, so that a libvirt that hangs costs one time bound, not two. When libvirt cannot
    list its domains, the locks alone decide for files, and a request with a secret fails (the plan's error): no
    one could say whether a domain uses it.
    """
    if libvirt is None:
        return SecretPlan(), ()
    plan, listed = await asyncio.gather(plan_secrets(libvirt, secrets), _domains_unless_unreachable(libvirt))
    if not isinstance(listed, LibvirtError):
        return plan, listed
    if secrets:
        plan.error = plan.error or f"cannot list libvirt's active domains: {listed}"
    else:
        logger.warning("libvirt unreachable, locks alone decide what is in use error=%r", str(listed))
    return plan, ()


async def _domains_unless_unreachable(libvirt: Libvirt) -> list[ActiveDomain] | LibvirtError:
    """The host's active domains, or why libvirt could not list them."""
    try:
        return await active_domains(libvirt)
    except LibvirtError as error:
        return error


def _delete_unless_in_use(
    confined: Sequence[ConfinedPath], secrets: Sequence[str], vm_uuid: str, domains: Sequence[ActiveDomain]
) -> DeleteOutcome:
    """Delete the checked paths unless anything of the request is in use: the check right before the delete.

    Raises InUse naming what, or answers the error of a lock that could not be tested. Blocking: a worker thread's.
    """
    try:
        reasons = in_use(confined, secrets, vm_uuid, domains)
    except UsageUnknown as unknown:
        return DeleteOutcome(errors=[str(unknown)])
    if reasons:
        raise InUse(reasons)
    return delete_confined(confined)


class SecretRefused(Exception):
    """A requested secret the agent will not undefine (no secret's name, or not a vTPM's); the message says why."""


# How many things in use an answer names; the service keeps only the first few hundred characters of it.
_IN_USE_NAMED = 3


class InUse(Exception):
    """Something of a request is in use on the host; the message names what and by what, as the answer says it."""

    def __init__(self, reasons: Sequence[str]) -> None:
        more = len(reasons) - _IN_USE_NAMED
        super().__init__("in use: " + "; ".join(reasons[:_IN_USE_NAMED]) + (f" (and {more} more)" if more > 0 else ""))
