"""The host's active libvirt domains, and what of the host each one uses: its NVRAM, TPM state and TPM secret.

Active is any domain state but shut off: `virsh list` without `--all` lists exactly those. Each one's live
definition (`virsh dumpxml`) names its NVRAM image (`<os><nvram>`), and the emulator TPM's secret
(`<encryption secret=.../>`) and, where set, its state directory (`<backend><source path=.../>`).
"""

import asyncio
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from app.agent.libvirt import VIRSH_CONCURRENCY, Libvirt, LibvirtError, not_answering, run_virsh

# What virsh says for a domain it cannot look up: it stopped and went away (a transient one) since the list.
_NOT_FOUND = "error: failed to get domain"


@dataclass(frozen=True)
class ActiveDomain:
    """A libvirt domain and the host files and secrets it uses (`active_domains` lists only those not shut off)."""

    uuid: str
    name: str
    paths: tuple[str, ...]
    secrets: tuple[str, ...]


async def active_domains(libvirt: Libvirt) -> list[ActiveDomain]:
    """Every active domain of the host's libvirt with what it uses; LibvirtError when libvirt cannot tell."""
    return await _listed_domains(libvirt)


async def defined_domains(libvirt: Libvirt) -> list[ActiveDomain]:
    """Every domain of the host's libvirt, shut off too, with what it would use; LibvirtError when it cannot tell.

    A scan names the VM of an NVRAM image by it, whether the VM runs or not.
    """
    return await _listed_domains(libvirt, "--all")


async def _listed_domains(libvirt: Libvirt, *flags: str) -> list[ActiveDomain]:
    """The domains `virsh list` gives with `flags`, with what each uses.

    The whole listing is bounded by the one time bound of a virsh call, so that it fits the agent's budget.
    """
    try:
        async with asyncio.timeout(libvirt.timeout_seconds):
            listed = await run_virsh(libvirt, "list", "--uuid", *flags) or ""
            limit = asyncio.Semaphore(VIRSH_CONCURRENCY)
            uuids = [line.strip() for line in listed.splitlines() if line.strip()]
            definitions = await asyncio.gather(*(_definition(libvirt, uuid, limit) for uuid in uuids))
    except TimeoutError:
        raise not_answering(libvirt) from None
    return [domain_of(definition) for definition in definitions if definition is not None]


def domain_of(definition: str) -> ActiveDomain:
    """What a domain's XML definition says it is and uses."""
    try:
        # libvirt formats this XML itself, without a DTD; expat bounds entity expansion besides.
        domain = ElementTree.fromstring(definition)  # noqa: S314 - libvirt's own XML, not a caller's
    except ElementTree.ParseError as exc:
        raise LibvirtError(f"unreadable domain definition: {exc}") from None
    paths: list[str] = []
    nvram = domain.find("os/nvram")
    if nvram is not None:
        # libvirt writes a local NVRAM as the element's text; since 8.5 also as <source file=.../>.
        source = nvram.find("source")
        paths.append((nvram.text or "").strip() if source is None else source.get("file", ""))
    secrets = []
    for backend in domain.iterfind("devices/tpm/backend"):
        source = backend.find("source")
        if source is not None:
            paths.append(source.get("path", ""))
        encryption = backend.find("encryption")
        if encryption is not None:
            secrets.append(encryption.get("secret", ""))
    return ActiveDomain(
        uuid=(domain.findtext("uuid") or "").strip(),
        name=(domain.findtext("name") or "").strip(),
        paths=tuple(path for path in paths if path),
        secrets=tuple(secret for secret in secrets if secret),
    )


async def _definition(libvirt: Libvirt, uuid: str, limit: asyncio.Semaphore) -> str | None:
    """The live XML definition of a domain, or None when it went away since it was listed."""
    async with limit:
        return await run_virsh(libvirt, "dumpxml", uuid, not_found=_NOT_FOUND)
