"""Request and response bodies of the HTTP API (pydantic v2)."""

from datetime import UTC, datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, StrictBool

from app.protocol import MAX_PATH_BYTES, FileType

JobState = Literal["queued", "running", "succeeded", "failed"]
HostState = Literal["pending", "deleted", "failed"]


def _utc_rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcTime = Annotated[datetime, PlainSerializer(_utc_rfc3339, return_type=str)]


def _check_no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: refused here it is a 422, not a database error (500).
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _check_agent_url(value: str) -> str:
    parts = urlsplit(_check_no_nul(value))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry a query, fragment or credentials")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as error:
        raise ValueError(f"has an invalid port: {error}") from None
    return value


def _check_host_path(value: str) -> str:
    if len(_check_no_nul(value).encode()) > MAX_PATH_BYTES:
        raise ValueError(f"must be at most {MAX_PATH_BYTES} bytes")
    if not value.startswith("/"):
        raise ValueError("must be absolute")
    if ".." in value.split("/"):
        raise ValueError("must not contain a '..' segment")
    return value


AgentUrl = Annotated[
    str,
    Field(max_length=2048, examples=["http://10.0.0.5:8100"]),
    AfterValidator(_check_agent_url),
]
HostPath = Annotated[
    str,
    Field(
        min_length=1,
        examples=["/var/lib/libvirt/swtpm/0b1c2d3e-0000-4000-8000-000000000001/tpm2/tpm2-00.permall"],
        description="Absolute path on the host; no '..' segment, no NUL, at most 4096 bytes (UTF-8)",
    ),
    AfterValidator(_check_host_path),
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

    state: Literal["ok", "failing"] = Field(
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


class HostFileIn(_Body):
    """What POST /vms/{vm_uuid}/host-files takes."""

    host_uuid: UUID
    path: HostPath
    type: FileType
    backup: StrictBool = False


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
    """How one host's delete call of a job went."""

    host_uuid: UUID
    files: int
    state: HostState
    error: str | None


class JobOut(BaseModel):
    """A removal job."""

    id: UUID
    type: Literal["remove-tpm"]
    vm_uuid: UUID
    tpm_uuid: UUID
    state: JobState
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    hosts: list[JobHostOut]
    orphan_files: int
    error: str | None


class OrphanFileOut(BaseModel):
    """A file whose host has not yet confirmed its deletion."""

    uuid: UUID
    host_uuid: UUID
    vm_uuid: UUID
    path: str
    type: FileType
    attempts: int
    last_error: str | None
    next_attempt_at: UtcTime


class Problem(BaseModel):
    """An RFC 9457 problem answer (application/problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
