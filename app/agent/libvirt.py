"""How the host agent reaches the host's libvirt: one `virsh` runner for its secrets and its domains.

Each `virsh` call runs as an asyncio subprocess, bounded by a timeout well under the service's agent timeout,
so that a libvirt that hangs fails the agent's call with a reason instead of the service's call timing out.
"""

import asyncio
import os
from dataclasses import dataclass

DEFAULT_LIBVIRT_URI = "qemu:///system"
# What `--libvirt-uri` says for a host without libvirt (CONTRACT.md): no secrets, and the locks alone decide.
NO_LIBVIRT_URI = "none"
# Well under the service's AGENT_TIMEOUT_SECONDS (10 s): the checks (run side by side) and an undefine, each
# bounded by this, fit.
VIRSH_TIMEOUT_SECONDS = 3.0
# Most virsh processes one request starts at once: a request names a secret or two, a host runs some dozens of
# domains; the bound keeps a large host or request from starting a process for each at once.
VIRSH_CONCURRENCY = 8


class LibvirtError(Exception):
    """libvirt could not be asked, or answered with an error other than an unknown object."""


@dataclass(frozen=True)
class Libvirt:
    """How the agent reaches the host's libvirt: the connection URI, the virsh program and its time bound."""

    uri: str = DEFAULT_LIBVIRT_URI
    timeout_seconds: float = VIRSH_TIMEOUT_SECONDS
    virsh: str = "virsh"


def libvirt_at(uri: str) -> Libvirt | None:
    """The libvirt that `--libvirt-uri` names, or None for a host without libvirt (`none`)."""
    return None if uri == NO_LIBVIRT_URI else Libvirt(uri=uri)


async def run_virsh(libvirt: Libvirt, *args: str, not_found: str | None = None) -> str | None:
    """Run one virsh command; its output, or None when virsh reports `not_found` (an unknown secret or domain).

    `not_found` is the start of virsh's error line for libvirt's "no such object" error, in the C locale that
    every call runs in (e.g. "error: Secret not found").
    """
    try:
        process = await asyncio.create_subprocess_exec(
            libvirt.virsh,
            "--quiet",
            "--connect",
            libvirt.uri,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # The C locale keeps libvirt's messages untranslated, so that "not found" can be told apart.
            env={**os.environ, "LC_ALL": "C"},
        )
    except OSError as exc:
        raise LibvirtError(f"cannot run {libvirt.virsh}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(libvirt.timeout_seconds):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        raise not_answering(libvirt) from None
    finally:
        # A call that timed out or was cancelled (the service gave up) must not leave a virsh behind.
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode == 0:
        return stdout.decode(errors="replace")
    message = stderr.decode(errors="replace")
    if not_found is not None and any(line.startswith(not_found) for line in message.splitlines()):
        return None
    reasons = [line.removeprefix("error: ") for line in message.splitlines() if line.strip()]
    raise LibvirtError(" ".join(reasons)[:500] or f"virsh exited with status {process.returncode}")


def not_answering(libvirt: Libvirt) -> LibvirtError:
    """The error of a libvirt that did not answer within the agent's time bound."""
    return LibvirtError(f"libvirt at {libvirt.uri} did not answer within {libvirt.timeout_seconds:g} s")
