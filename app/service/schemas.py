"""Request and response bodies of the HTTP API (pydantic v2)."""

from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, PrivateAttr, StrictBool

from app.protocol import FILE_TYPES, MAX_PATH_BYTES, SECRET_FILE_NAME_PATTERN, FileType, PathFileType, SecretFileType
from app.service.jobs.types import JobType

JobState = Literal["queued", "running", "succeeded", "failed"]
HostState = Literal["pending", "deleted", "scanned", "failed"]
HealthState = Literal["ok", "failing"]


def _utc_rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcTime = Annotated[datetime, PlainSerializer(_utc_rfc3339, return_type=str)]


def _check_no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refused here it is a 422, not a database error (500).
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


# Regular expressions, so that the OpenAPI schema states exactly what is enforced; in the subset that JSON Schema,
# pydantic's Rust regex and Python's re share (no lookaround).
_HOST_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
# An IPv6 address as RFC 3986 spells it (IPv6address), so that every URL the pattern lets in parses as one
# (Python's urlsplit, and the clients of this API, refuse a bracketed host that is no address).
_H16 = r"[0-9A-Fa-f]{1,4}"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LS32 = rf"(?:{_H16}:{_H16}|{_OCTET}(?:\.{_OCTET}){{3}})"
_IPV6 = "|".join(
    (
        rf"(?:{_H16}:){{6}}{_LS32}",
        rf"::(?:{_H16}:){{5}}{_LS32}",
        rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
        rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
        rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    )
)
_IPV6_HOST = rf"\[(?:{_IPV6})\]"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# Unreserved characters, sub-delimiters, ':', '@', '%' and '/' (RFC 3986): no query, no fragment.
_URL_PATH = r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*"
AGENT_URL_PATTERN = rf"^https?://(?:{_HOST_NAME}|{_IPV6_HOST})(?::{_PORT})?(?:{_URL_PATH})?$"
# One path segment that is not '..': empty, '.', or any run of characters but '/' and NUL that is not '..'.
_PATH_SEGMENT = r"(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+|\.)?"
HOST_PATH_PATTERN = f"^(?:/{_PATH_SEGMENT})+$"
SECRET_PATH_PATTERN = f"^(?:/{_PATH_SEGMENT})*/{SECRET_FILE_NAME_PATTERN}$"
PATTERN_RULES = {
    AGENT_URL_PATTERN: "must be an http:// or https:// URL of a host, with an optional port (1-65535) and path, "
    "and no credentials, query or fragment",
    HOST_PATH_PATTERN: "must be an absolute path with no '..' segment and no NUL",
    SECRET_PATH_PATTERN: "a Secret's path must be absolute, with no '..' segment and no NUL, and end in the "
    "secret's lowercase UUID followed by .xml",
}
"""Each pattern's rule in words, for the detail of an answer that refuses a value."""


def _check_path_bytes(value: str) -> str:
    # A rule on UTF-8 bytes, which no JSON Schema keyword counts: maxLength bounds the characters in the schema.
    if len(value.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"must be at most {MAX_PATH_BYTES} bytes in UTF-8")
    return value


AgentUrl = Annotated[
    str,
    Field(
        max_length=2048,
        pattern=AGENT_URL_PATTERN,
        examples=["http://10.0.0.5:8100"],
        description="http:// or https:// URL of the host's agent: a host, an optional port, an optional path",
    ),
]
HostPath = Annotated[
    str,
    Field(
        max_length=MAX_PATH_BYTES,
        pattern=HOST_PATH_PATTERN,
        examples=["/var/lib/libvirt/swtpm/0b1c2d3e-0000-4000-8000-000000000001/tpm2/tpm2-00.permall"],
        description=f"Absolute path on the host; no '..' segment, no NUL, at most {MAX_PATH_BYTES} bytes (UTF-8)",
    ),
    AfterValidator(_check_path_bytes),
]
SecretPath = Annotated[
    str,
    Field(
        max_length=MAX_PATH_BYTES,
        pattern=SECRET_PATH_PATTERN,
        examples=["/etc/libvirt/secrets/6f0e2b8c-3b7a-4c1e-9d2f-5a4b3c2d1e0f.xml"],
        description="libvirt's definition file of the secret: its last part is the lowercase secret UUID + .xml",
    ),
    AfterValidator(_check_path_bytes),
]
Name = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_check_no_nul)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostIn(_Body):
    """What PUT /hosts/{host_uuid} takes."""

    name: Name
    agent_url: AgentUrl


class HostHealthOut(BaseModel):
    """Whether a host's agent answers calls, as every replica sees it."""

    state: HealthState = Field(
        description="failing from the first call the host left unanswered, ok from the first it answered with a 200"
    )
    consecutive_failures: int = Field(description="unanswered calls since the host last answered")
    last_error: str | None = Field(description="why the last unanswered call failed")
    next_probe_at: UtcTime | None = Field(description="while failing: not before this time is it called again")


HEALTHY = HostHealthOut(state="ok", consecutive_failures=0, last_error=None, next_probe_at=None)
"""The health of a host that never left a call unanswered."""


class HostOut(BaseModel):
    """A KVM host, its agent and its health."""

    uuid: UUID
    name: str
    agent_url: str
    health: HostHealthOut


class VmIn(_Body):
    """What PUT /vms/{vm_uuid} takes."""

    name: Name
    secure_boot: StrictBool


class VmOut(BaseModel):
    """A virtual machine."""

    uuid: UUID
    name: str
    secure_boot: bool


class TpmIn(_Body):
    """What POST /vms/{vm_uuid}/tpm takes."""

    key_provider_uuid: UUID | None = None


class PathFileIn(_Body):
    """A TPM state or NVRAM file or directory, as POST /vms/{vm_uuid}/host-files takes it."""

    host_uuid: UUID
    path: HostPath
    type: PathFileType = Field(description="a file or a directory")
    backup: StrictBool = Field(default=False, description="a backup copy of a state file")


class SecretFileIn(_Body):
    """The libvirt secret that encrypts the TPM state, as POST /vms/{vm_uuid}/host-files takes it.

    Named by its definition file, e.g. /etc/libvirt/secrets/<lowercase secret uuid>.xml; never a backup.
    """

    host_uuid: UUID
    path: SecretPath
    type: SecretFileType
    backup: Literal[False] = Field(default=False, description="a Secret is never a backup")


HostFileIn = Annotated[PathFileIn | SecretFileIn, Field(discriminator="type")]
"""What POST /vms/{vm_uuid}/host-files takes: the type decides the path's rule."""
UNION_TAGS = frozenset(FILE_TYPES)
"""The tags of the request unions, which pydantic puts in an error's location and a caller never wrote."""


class HostFileOut(BaseModel):
    """A file a VM keeps on a host."""

    uuid: UUID
    vm_uuid: UUID
    host_uuid: UUID
    path: str
    type: FileType
    backup: bool


class TpmOut(BaseModel):
    """A VM's virtual TPM and its key-provider binding."""

    uuid: UUID
    vm_uuid: UUID
    key_provider_uuid: UUID | None


class TpmWithFilesOut(TpmOut):
    """A TPM with the host files that its removal would delete."""

    host_files: list[HostFileOut]


class JobHostOut(BaseModel):
    """How one host's call of a job went: its delete call, or its scan (`scanned`; `files`: the entries it listed)."""

    host_uuid: UUID
    files: int
    state: HostState
    error: str | None


class JobOut(BaseModel):
    """A job that removes a VM's TPM (`remove-tpm`), deletes the VM (`delete-vm`) or scans a host (`scan-host`)."""

    id: UUID
    type: JobType
    vm_uuid: UUID | None = Field(description="The VM the job removes files of; null for a scan-host job")
    tpm_uuid: UUID | None = Field(description="The TPM the job removes; null for a delete-vm job of a VM without one")
    state: JobState
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    hosts: list[JobHostOut]
    orphan_files: int
    error: str | None
    strays: int | None = Field(
        default=None, description="A scan-host job's: how many strays the scan left on its host's list"
    )
    # Not part of the body: the answer's Retry-After header.
    _retry_after: int | None = PrivateAttr(default=None)

    @property
    def retry_after(self) -> int | None:
        """When to look at the job again, in whole seconds (`Retry-After`); None once it has ended."""
        return self._retry_after

    @retry_after.setter
    def retry_after(self, seconds: int | None) -> None:
        self._retry_after = seconds


class _UnconfirmedFileOut(BaseModel):
    """A file that may still be on its host: its host never confirmed its deletion."""

    uuid: UUID
    host_uuid: UUID
    vm_uuid: UUID
    path: str
    type: FileType
    attempts: int
    last_error: str | None


class OrphanFileOut(_UnconfirmedFileOut):
    """A file whose host has not yet confirmed its deletion."""

    next_attempt_at: UtcTime


class AbandonedFileOut(_UnconfirmedFileOut):
    """An orphan file of a decommissioned host: never retried nor deleted; it may still be on that disk."""

    abandoned_at: UtcTime


class StrayFileOut(BaseModel):
    """Something a host holds that no record names, as the host's last scan found it."""

    uuid: UUID
    host_uuid: UUID
    path: str
    type: FileType
    vm_uuid: UUID | None = Field(description="The VM its name or libvirt says it belongs to; null when none says")
    vm_known: bool = Field(description="Whether vm_uuid names a VM of the inventory")
    bytes: int
    modified_at: UtcTime
    first_seen_at: UtcTime
    last_seen_at: UtcTime


class Problem(BaseModel):
    """An RFC 9457 problem answer (application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
