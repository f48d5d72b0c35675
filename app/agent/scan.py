"""The host agent's scan: what the host holds that may belong to a vTPM (CONTRACT.md, `POST /host-files/scan`).

Each root's direct children are listed, whatever their names: a directory as a `TpmState` (its bytes and newest
modification summed over what it holds, links not followed), anything else as an `NvRam`. A link is listed as
itself, with its own size and time, and never entered. Then each libvirt secret of usage `vtpm`. Whether an entry
is in use is the same check that guards a delete (`app.agent.in_use`). The scan deletes nothing.
"""

import asyncio
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from app.agent.confinement import ConfinedPath
from app.agent.domains import ActiveDomain, active_domains, defined_domains
from app.agent.in_use import UsageUnknown, in_use
from app.agent.libvirt import Libvirt
from app.agent.secrets import VtpmSecret, vtpm_secrets
from app.protocol import MAX_SCAN_ENTRIES, FileType, ScanEntry, ScanSucceeded, uuid_in_name

# Where libvirt keeps a persistent secret's definition; a `Secret` entry is named by that file.
SECRETS_FOLDER = Path("/etc/libvirt/secrets")
# The listing stops, truncated, after this long: libvirt's questions (VIRSH_TIMEOUT_SECONDS) and this together stay
# well under the service's AGENT_TIMEOUT_SECONDS (10 s).
SCAN_BUDGET_SECONDS = 5.0
# The NVRAM image libvirt makes for a domain whose definition names none: `<nvram dir>/<name>_VARS.fd`.
_DEFAULT_NVRAM = "{name}_VARS.fd"
_ANY_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


@dataclass(frozen=True)
class HostView:
    """What libvirt says of the host for a scan: its active domains, all its domains, its vTPM secrets."""

    active: Sequence[ActiveDomain] = ()
    defined: Sequence[ActiveDomain] = ()
    secrets: Sequence[VtpmSecret] = ()


class _OutOfTime(Exception):
    """The scan's budget ran out while it summed up a directory."""


async def scan_host(
    roots: Sequence[Path], libvirt: Libvirt | None, budget_seconds: float = SCAN_BUDGET_SECONDS
) -> ScanSucceeded:
    """List what the host holds under `roots` and its libvirt's vTPM secrets; LibvirtError when libvirt cannot tell.

    `libvirt=None` is a host without libvirt: no secrets, and locks alone say what is in use.
    """
    view = HostView()
    if libvirt is not None:
        active, defined, secrets = await asyncio.gather(
            active_domains(libvirt), defined_domains(libvirt), vtpm_secrets(libvirt)
        )
        view = HostView(active=active, defined=defined, secrets=secrets)
    return await asyncio.to_thread(_scan, roots, view, time.monotonic() + budget_seconds)


def _scan(roots: Sequence[Path], view: HostView, deadline: float) -> ScanSucceeded:
    """The listing itself, stopped at MAX_SCAN_ENTRIES or the deadline. Blocking: a worker thread's."""
    entries: list[ScanEntry] = []
    owners = {os.path.realpath(path): domain.uuid for domain in view.defined for path in domain.paths}
    # A shut-off domain whose firmware libvirt picks names no NVRAM in its definition until it starts again; its
    # image is the one libvirt names after it.
    named = {_DEFAULT_NVRAM.format(name=domain.name): domain.uuid for domain in view.defined}
    try:
        for root in roots:
            with os.scandir(root) as children:
                for child in children:
                    if len(entries) == MAX_SCAN_ENTRIES or time.monotonic() > deadline:
                        return ScanSucceeded(truncated=True, entries=entries)
                    entries.append(_root_child(root, child, view.active, owners, named, deadline))
        for secret in view.secrets:
            if len(entries) == MAX_SCAN_ENTRIES:
                return ScanSucceeded(truncated=True, entries=entries)
            entries.append(_secret_entry(secret, view))
    except _OutOfTime:
        return ScanSucceeded(truncated=True, entries=entries)
    return ScanSucceeded(truncated=False, entries=entries)


def _root_child(
    root: Path,
    child: os.DirEntry[str],
    active: Sequence[ActiveDomain],
    owners: dict[str, str],
    named: dict[str, str],
    deadline: float,
) -> ScanEntry:
    """A root's direct child as a scan lists it: a directory as a `TpmState`, anything else as an `NvRam`.

    `owners` says which domain's NVRAM each image (by its real path) is; `named`, whose default image name it bears.
    """
    status = child.stat(follow_symlinks=False)
    kind: FileType
    if stat.S_ISDIR(status.st_mode):
        kind, (size, modified) = "TpmState", _directory_totals(child.path, status, deadline)
    else:
        kind, size, modified = "NvRam", status.st_size, status.st_mtime
    vm_uuid = uuid_in_name(child.name)
    if vm_uuid is None and kind == "NvRam":
        vm_uuid = owners.get(os.path.realpath(child.path), named.get(child.name))
    confined = ConfinedPath(path=child.path, root=root, parts=(child.name,))
    return ScanEntry(
        path=child.path,
        type=kind,
        vm_uuid=UUID(vm_uuid) if vm_uuid is not None else None,
        bytes=size,
        modified_at=datetime.fromtimestamp(modified, UTC),
        in_use=_used(lambda: in_use([confined], [], vm_uuid, active)),
    )


def _directory_totals(path: str, status: os.stat_result, deadline: float) -> tuple[int, float]:
    """The bytes a directory holds and the newest modification of anything in it, links not followed."""
    size, modified = 0, status.st_mtime
    for directory, folders, files in os.walk(path, followlinks=False):
        if time.monotonic() > deadline:
            raise _OutOfTime
        for name in [*folders, *files]:
            try:
                found = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue  # gone while the scan looked
            modified = max(modified, found.st_mtime)
            if not stat.S_ISDIR(found.st_mode):
                size += found.st_size
    return size, modified


def _secret_entry(secret: VtpmSecret, view: HostView) -> ScanEntry:
    """A vTPM secret as a scan lists it, dated by libvirt's definition file (by the scan where there is none)."""
    path = str(SECRETS_FOLDER / f"{secret.uuid}.xml")
    try:
        status = os.lstat(path)
        size, modified = status.st_size, status.st_mtime
    except OSError:
        size, modified = 0, time.time()
    named = _ANY_UUID.search(secret.usage_name)
    vm_uuid = named.group(0).lower() if named is not None else None
    return ScanEntry(
        path=path,
        type="Secret",
        vm_uuid=UUID(vm_uuid) if vm_uuid is not None else None,
        bytes=size,
        modified_at=datetime.fromtimestamp(modified, UTC),
        in_use=_used(lambda: in_use([], [path], vm_uuid, view.active)),
    )


def _used(check: Callable[[], list[str]]) -> bool:
    """Whether the in-use check finds anything; a file whose locks cannot be tested counts as in use."""
    try:
        return bool(check())
    except UsageUnknown:
        return True
