"""The host agent's libvirt secrets: a vTPM's secret is undefined through `virsh`, and no other secret is.

A `Secret` host file names a libvirt secret by the file libvirt keeps its definition in,
`/etc/libvirt/secrets/<secret-uuid>.xml`. The agent never touches that file itself: libvirt undefines the
secret, which drops its definition, its stored value and its live copy. The confinement that roots give paths,
libvirt's usage type gives secrets: only a secret whose usage is `vtpm` is undefined, and a request naming any
other (a volume's LUKS key, say) is refused as a whole.
"""

import asyncio
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.agent.libvirt import VIRSH_CONCURRENCY, Libvirt, LibvirtError, run_virsh
from app.agent.outcome import DeleteOutcome
from app.protocol import secret_uuid

# virsh's report of libvirt's VIR_ERR_NO_SECRET ("Secret not found: no secret with matching uuid '...'"),
# in the C locale that every call runs in.
_NOT_FOUND = "error: Secret not found"
_VTPM_USAGE = "vtpm"
# A line of `virsh secret-list`: the secret's UUID, its usage type and the usage's name ("... vtpm VTPM_<uuid>").
_LISTED_SECRET = re.compile(r"\s*([0-9a-f-]{36})\s+(\S+)\s*(.*)")


@dataclass
class SecretPlan:
    """What checking a request's secrets found: the vTPM secrets to undefine, those libvirt does not know.

    `refused` says why the request must delete nothing (a name that is not a secret's, a secret that is not a
    vTPM's); `error` says why libvirt could not tell, which fails the request too.
    """

    to_undefine: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    refused: str | None = None
    error: str | None = None


async def plan_secrets(libvirt: Libvirt, paths: Sequence[str]) -> SecretPlan:
    """Check every secret with libvirt before any is undefined: it must exist with usage `vtpm`, or be unknown."""
    plan = SecretPlan()
    uuids: dict[str, str] = {}
    for path in paths:
        uuid = secret_uuid(path)
        if uuid is None:
            plan.refused = f"secret path does not end in a lowercase UUID followed by .xml: {path!r}"
            return plan
        uuids[path] = uuid
    limit = asyncio.Semaphore(VIRSH_CONCURRENCY)
    usages = await asyncio.gather(*(_usage(libvirt, uuid, limit) for uuid in uuids.values()), return_exceptions=True)
    errors = []
    for (path, uuid), usage in zip(uuids.items(), usages, strict=True):
        if isinstance(usage, LibvirtError):
            errors.append(f"cannot check secret {path}: {usage}")
        elif isinstance(usage, BaseException):
            raise usage
        elif usage is None:
            plan.missing.append(path)
        elif usage != _VTPM_USAGE:
            plan.refused = f"secret is not a vTPM's (usage {usage!r}): {path}"
            return plan
        else:
            plan.to_undefine[path] = uuid
    if errors:
        plan.error = "; ".join(errors)
    return plan


async def undefine_secrets(libvirt: Libvirt, plan: SecretPlan) -> DeleteOutcome:
    """Undefine the secrets a plan cleared; one that is gone meanwhile is missing, any other failure an error."""
    outcome = DeleteOutcome(missing=list(plan.missing))
    limit = asyncio.Semaphore(VIRSH_CONCURRENCY)
    results = await asyncio.gather(
        *(_undefine(libvirt, uuid, limit) for uuid in plan.to_undefine.values()), return_exceptions=True
    )
    for path, undefined in zip(plan.to_undefine, results, strict=True):
        if isinstance(undefined, LibvirtError):
            outcome.errors.append(f"cannot undefine secret {path}: {undefined}")
        elif isinstance(undefined, BaseException):
            raise undefined
        elif undefined:
            outcome.deleted.append(path)
        else:
            outcome.missing.append(path)
    return outcome


@dataclass(frozen=True)
class VtpmSecret:
    """A secret of libvirt whose usage is `vtpm`, and the name its usage gives it."""

    uuid: str
    usage_name: str


async def vtpm_secrets(libvirt: Libvirt) -> list[VtpmSecret]:
    """Every secret of the host's libvirt whose usage is `vtpm`; LibvirtError when libvirt cannot tell."""
    listed = await run_virsh(libvirt, "secret-list") or ""
    secrets = []
    for line in listed.splitlines():
        match = _LISTED_SECRET.fullmatch(line)
        if match is not None and match.group(2) == _VTPM_USAGE:
            secrets.append(VtpmSecret(uuid=match.group(1), usage_name=match.group(3).strip()))
    return secrets


async def _usage(libvirt: Libvirt, uuid: str, limit: asyncio.Semaphore) -> str | None:
    """The usage type libvirt reports for the secret, or None when libvirt does not know it."""
    async with limit:
        definition = await run_virsh(libvirt, "secret-dumpxml", uuid, not_found=_NOT_FOUND)
    if definition is None:
        return None
    try:
        # libvirt formats this XML itself, without a DTD; expat bounds entity expansion besides.
        usage = ElementTree.fromstring(definition).find("usage")  # noqa: S314 - libvirt's own XML, not a caller's
    except ElementTree.ParseError as exc:
        raise LibvirtError(f"unreadable secret definition: {exc}") from None
    # A secret defined without <usage> has none: it is no vTPM's, and is refused like any other usage.
    return "none" if usage is None else usage.get("type", "none")


async def _undefine(libvirt: Libvirt, uuid: str, limit: asyncio.Semaphore) -> bool:
    """Undefine the secret; whether libvirt still knew it."""
    async with limit:
        return await run_virsh(libvirt, "secret-undefine", uuid, not_found=_NOT_FOUND) is not None
