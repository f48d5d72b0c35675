"""What deleting a request's paths or secrets came to, in the protocol's terms."""

from dataclasses import dataclass, field


@dataclass
class DeleteOutcome:
    """The paths deleted now, those gone already, and why others could not be deleted."""

    deleted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
