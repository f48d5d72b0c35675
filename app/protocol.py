"""The host-agent protocol (CONTRACT.md, "The host agent protocol"), defined once for both of its ends.

The service's agent client builds its requests and checks the answers with these models; the shipped agent
parses requests and writes its answers with them; the test agents use them too. Nothing here imports more than
pydantic and the standard library, since the agent runs on every KVM host.
"""

import re
import ssl
from datetime import datetime
from typing import Annotated, Literal, get_args
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# The operations the service calls on every host, and the agent's liveness check.
DELETE_PATH = "/host-files/delete"
SCAN_PATH = "/host-files/scan"
HEALTH_PATH = "/healthz"

# A path type names a file or directory under the agent's roots; a `Secret`, the libvirt secret whose definition file
# it names. Which go with a TPM is the rule `vm_files` (app/service/removal/queries.sql).
PathFileType = Literal["TpmState", "NvRam"]
SecretFileType = Literal["Secret"]
FileType = Literal[PathFileType, SecretFileType]
FILE_TYPES: tuple[str, ...] = get_args(FileType)

# A `Secret` is named by libvirt's definition file of it, `<secret uuid>.xml`, which libvirt writes in lowercase.
# (A file-name pattern, which S105 takes for a password by its name.)
SECRET_FILE_NAME_PATTERN = r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.xml"  # noqa: S105
_SECRET_FILE_NAME = re.compile(SECRET_FILE_NAME_PATTERN)

# A recorded path is bounded to PATH_MAX: a longer one cannot name a file on a host.
MAX_PATH_BYTES = 4096
# Most entries a scan answer lists: a host's vTPM files are a few per VM, so more says the roots hold something else.
MAX_SCAN_ENTRIES = 10_000
# A request lists one VM's files on one host: a handful in practice, but a few thousand paths must fit.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class _Message(BaseModel):
    """A protocol message: immutable, and strict about types so that `"path": 1` is no path."""

    model_config = ConfigDict(frozen=True, strict=True)


class FileToDelete(_Message):
    """One file an agent is asked to delete."""

    path: str
    type: FileType


class DeleteRequest(_Message):
    """The body of `POST {agent_url}/host-files/delete`: one VM's files on one host."""

    vm_uuid: UUID
    files: list[FileToDelete]


class DeleteSucceeded(_Message):
    """Every requested path is gone: deleted now, or missing already (which counts as removed)."""

    success: Literal[True] = True
    deleted: list[str]
    missing: list[str]


class DeleteFailed(_Message):
    """The agent deleted nothing it could vouch for; `error` says why."""

    success: Literal[False] = False
    error: str


DeleteAnswer = Annotated[DeleteSucceeded | DeleteFailed, Field(discriminator="success")]
DELETE_ANSWER: TypeAdapter[DeleteSucceeded | DeleteFailed] = TypeAdapter(DeleteAnswer)


class ScanRequest(_Message):
    """The body of `POST {agent_url}/host-files/scan`: `{}`, nothing to say yet."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class ScanEntry(_Message):
    """One thing a host holds that may belong to a vTPM: a root's direct child, or a vTPM secret of its libvirt."""

    path: str
    type: FileType
    vm_uuid: UUID | None
    bytes: int = Field(ge=0)
    modified_at: datetime
    in_use: bool


class ScanSucceeded(_Message):
    """What the host holds now; `truncated` says it held more than the entries listed."""

    success: Literal[True] = True
    truncated: bool
    entries: list[ScanEntry] = Field(max_length=MAX_SCAN_ENTRIES)


# A failed scan says why as a failed delete does.
ScanAnswer = Annotated[ScanSucceeded | DeleteFailed, Field(discriminator="success")]
SCAN_ANSWER: TypeAdapter[ScanSucceeded | DeleteFailed] = TypeAdapter(ScanAnswer)

# A name that starts with a VM's UUID: `<uuid>`, `<uuid>.snapshot-backup`, `<uuid>.fd`.
_NAME_STARTING_WITH_UUID = re.compile(
    r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?![0-9a-z-])", re.IGNORECASE
)


def uuid_in_name(name: str) -> str | None:
    """The lowercase UUID a file name starts with, or None."""
    match = _NAME_STARTING_WITH_UUID.match(name)
    return match.group(1).lower() if match is not None else None


def secret_uuid(path: str) -> str | None:
    """The UUID of the secret that a `Secret` path names, or None when its last part is no `<lowercase uuid>.xml`."""
    match = _SECRET_FILE_NAME.fullmatch(path.rsplit("/", 1)[-1])
    return match.group(1) if match is not None else None


def describe_invalid(error: ValidationError, *, most: int = 3) -> str:
    """A message that did not validate, said in one short line: where each problem is, and what it is."""
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}" for item in error.errors()[:most]
    ]
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


# Both ends of the protocol may speak it over mutual TLS, each loading PEM files it is given; both say the same
# about one that does not load.
def describe_file_error(error: OSError | ssl.SSLError) -> str:
    """Say in a few words why a PEM file could not be loaded ("No such file or directory", "key values mismatch")."""
    if isinstance(error, ssl.SSLError):
        # OpenSSL's reason code when it gives one (KEY_VALUES_MISMATCH), else its text without the source line.
        detail = error.reason.lower().replace("_", " ") if error.reason else error.args[-1].split(" (_ssl.c")[0]
        return f"not a usable PEM file ({detail})"
    if error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
