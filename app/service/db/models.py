"""The database tables of the service.

Inventory (hosts, VMs, TPMs, key bindings, host files) is filled by the systems that own hosts and VMs.
Jobs, their per-host outcomes and their planned files are the durable removal queue. Orphan files, abandoned
files and the two ledgers (every file recorded, every deletion a host confirmed) are what makes "no file is ever
forgotten" checkable by `python -m app audit`. The ledgers only grow, but for what retention prunes with a job:
its confirmations, and the ledger rows of the files they confirm.
"""

from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.protocol import FILE_TYPES

JOB_STATES = ("queued", "running", "succeeded", "failed")
ACTIVE_JOB_STATES = ("queued", "running")
FINISHED_JOB_STATES = ("succeeded", "failed")
HOST_STATES = ("pending", "deleted", "scanned", "failed")
HEALTH_STATES = ("ok", "failing")


def _in(column: str, values: tuple[str, ...]) -> str:
    """A SQL expression: the text column holds one of these values (for CHECKs and index predicates)."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# The predicate of the partial unique index of active jobs, as literal SQL: an ON CONFLICT clause names the
# index by repeating it, and PostgreSQL matches it only when the values are constants, not parameters.
ACTIVE_JOB = text(_in("state", ACTIVE_JOB_STATES))


class Base(DeclarativeBase):
    """Declarative base of every table."""


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Host(Base):
    """A KVM host and the URL of its agent."""

    __tablename__ = "hosts"
    # Periodic scans look for the hosts that are due.
    __table_args__ = (Index("ix_hosts_next_scan_at", "next_scan_at"),)

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    agent_url: Mapped[str] = mapped_column(String(2048), nullable=False)
    created_at: Mapped[datetime] = _created_at()
    # When the host's next periodic scan is due; null until the first round spreads it over the interval.
    next_scan_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Vm(Base):
    """A virtual machine; secure_boot decides whether its NVRAM files go with its TPM."""

    __tablename__ = "vms"

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    secure_boot: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class Tpm(Base):
    """A VM's virtual TPM; a VM has at most one."""

    __tablename__ = "tpms"

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    vm_uuid: Mapped[UUID] = mapped_column(
        Uuid, ForeignKey("vms.uuid", ondelete="RESTRICT"), nullable=False, unique=True
    )
    created_at: Mapped[datetime] = _created_at()


class TpmKeyBinding(Base):
    """The binding of a TPM to the key provider that encrypts its state; goes with the TPM."""

    __tablename__ = "tpm_key_bindings"

    tpm_uuid: Mapped[UUID] = mapped_column(Uuid, ForeignKey("tpms.uuid", ondelete="RESTRICT"), primary_key=True)
    key_provider_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class HostFile(Base):
    """A file a VM keeps on a host: TPM state or NVRAM, original or backup."""

    __tablename__ = "host_files"
    __table_args__ = (
        # One record per file on a host: the same path recorded twice would be deleted twice.
        UniqueConstraint("host_uuid", "path", name="uq_host_files_host_path"),
        CheckConstraint(_in("type", FILE_TYPES), name="ck_host_files_type"),
        Index("ix_host_files_vm_uuid", "vm_uuid"),
    )

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    vm_uuid: Mapped[UUID] = mapped_column(Uuid, ForeignKey("vms.uuid", ondelete="RESTRICT"), nullable=False)
    host_uuid: Mapped[UUID] = mapped_column(Uuid, ForeignKey("hosts.uuid", ondelete="RESTRICT"), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    backup: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class FileLedger(Base):
    """Every host file the service recorded, kept after its record is deleted until its deletion is confirmed by
    a job that retention prunes."""

    __tablename__ = "file_ledger"

    file_uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    vm_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    host_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    recorded_at: Mapped[datetime] = _created_at()


class ConfirmedDeletion(Base):
    """A host confirmed that a file is gone (deleted or already missing); pruned with its job."""

    __tablename__ = "confirmed_deletions"
    # Retention deletes a pruned job's confirmations by job.
    __table_args__ = (Index("ix_confirmed_deletions_job_id", "job_id"),)

    file_uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    host_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    job_id: Mapped[UUID | None] = mapped_column(Uuid, nullable=True)
    confirmed_at: Mapped[datetime] = _created_at()


class Job(Base):
    """A job that removes a VM's files from its hosts (its TPM's, or all of a VM being deleted): the queue row that
    workers claim, lease and fence."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("state", JOB_STATES), name="ck_jobs_state"),
        # One active job per VM, whatever its type: concurrent DELETEs share it, and a TPM removal and a deletion
        # of the same VM never run together.
        Index(
            "uq_jobs_one_active_per_vm",
            "vm_uuid",
            unique=True,
            postgresql_where=ACTIVE_JOB,
        ),
        # One active scan per host: concurrent scan requests and periodic scans share it.
        Index("uq_jobs_one_active_per_host", "host_uuid", unique=True, postgresql_where=ACTIVE_JOB),
        Index("ix_jobs_vm_uuid_created_at", "vm_uuid", "created_at"),
        Index("ix_jobs_created_at", "created_at"),
        # Retention scans only finished jobs, oldest finished first.
        Index(
            "ix_jobs_finished_at",
            "finished_at",
            postgresql_where=text(_in("state", FINISHED_JOB_STATES)),
        ),
        # The claim query scans only active jobs, oldest first.
        Index(
            "ix_jobs_claimable",
            "run_after",
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
    )

    id: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    type: Mapped[str] = mapped_column(String(32), nullable=False, server_default="remove-tpm")
    # No foreign key: a delete-vm job outlives its VM, and stays readable after it. A scan-host job has none.
    vm_uuid: Mapped[UUID | None] = mapped_column(Uuid)
    # The host a scan-host job scans (no foreign key either: the job outlives a decommissioned host).
    host_uuid: Mapped[UUID | None] = mapped_column(Uuid)
    # How many strays a scan-host job left on its host's list.
    strays: Mapped[int | None] = mapped_column(Integer)
    # The TPM the job removes; a delete-vm job of a VM without one has none.
    tpm_uuid: Mapped[UUID | None] = mapped_column(Uuid)
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default="queued")
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Not before this time may a worker claim the job (backoff after a failed cleanup).
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Fencing: every claim draws a new token; every write of the job's worker carries it in its WHERE.
    lease_token: Mapped[UUID | None] = mapped_column(Uuid)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    failures: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    planned: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    orphan_files: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    # The W3C trace context (JSON of its headers) of the request that created the job: every run of the job, also
    # one resumed by another process, continues that trace (app/service/tracing.py).
    trace_context: Mapped[str | None] = mapped_column(Text)


class JobHost(Base):
    """One host of a job: how many files it holds for the job and how its delete call ended."""

    __tablename__ = "job_hosts"
    __table_args__ = (CheckConstraint(_in("state", HOST_STATES), name="ck_job_hosts_state"),)

    job_id: Mapped[UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    host_uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    files: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    error: Mapped[str | None] = mapped_column(Text)


class JobFile(Base):
    """A file a job planned to remove, copied so the plan survives the deletion of its record."""

    __tablename__ = "job_files"
    __table_args__ = (Index("ix_job_files_job_host", "job_id", "host_uuid"),)

    job_id: Mapped[UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    file_uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    host_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)


class StrayFile(Base):
    """Something a host holds that no record names, as its last scan found it (CONTRACT.md, "Stray files")."""

    __tablename__ = "stray_files"
    __table_args__ = (
        CheckConstraint(_in("type", FILE_TYPES), name="ck_stray_files_type"),
        UniqueConstraint("host_uuid", "path", name="uq_stray_files_host_path"),
    )

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    # A host's stray list goes with the host.
    host_uuid: Mapped[UUID] = mapped_column(Uuid, ForeignKey("hosts.uuid", ondelete="CASCADE"), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    vm_uuid: Mapped[UUID | None] = mapped_column(Uuid)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    modified_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    first_seen_at: Mapped[datetime] = _created_at()
    last_seen_at: Mapped[datetime] = _created_at()


class OrphanFile(Base):
    """A file whose host did not confirm its deletion; retried with backoff until it does."""

    __tablename__ = "orphan_files"
    __table_args__ = (
        CheckConstraint(_in("type", FILE_TYPES), name="ck_orphan_files_type"),
        Index("ix_orphan_files_due", "next_attempt_at"),
        Index("ix_orphan_files_host_uuid", "host_uuid", "uuid"),
        Index("ix_orphan_files_host_path", "host_uuid", "path"),
    )

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    host_uuid: Mapped[UUID] = mapped_column(Uuid, ForeignKey("hosts.uuid", ondelete="RESTRICT"), nullable=False)
    vm_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    job_id: Mapped[UUID | None] = mapped_column(Uuid)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Fencing of the reaper: a claim draws a token and pushes next_attempt_at past the call's end.
    claim_token: Mapped[UUID | None] = mapped_column(Uuid)
    created_at: Mapped[datetime] = _created_at()
    # The trace context of the job that left the orphan: its retries' spans link to that trace.
    trace_context: Mapped[str | None] = mapped_column(Text)


class AbandonedFile(Base):
    """A former orphan of a decommissioned host: never retried, never deleted, left for an operator to clean."""

    __tablename__ = "abandoned_files"
    __table_args__ = (
        Index("ix_abandoned_files_host_uuid", "host_uuid", "uuid"),
        Index("ix_abandoned_files_host_path", "host_uuid", "path"),
    )

    uuid: Mapped[UUID] = mapped_column(Uuid, primary_key=True)
    # No foreign key: the host is gone; its UUID still says which disk to look at. Nor a check of the type: every
    # row is an orphan's, whose type was checked.
    host_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    vm_uuid: Mapped[UUID] = mapped_column(Uuid, nullable=False)
    job_id: Mapped[UUID | None] = mapped_column(Uuid)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    abandoned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class HostHealth(Base):
    """Whether a host's agent answers, shared by every replica; a host without a row has never failed a call.

    Rows are written when a call goes unanswered (and updated when the host answers again), never for every answered
    call: a healthy host's removals then write nothing here, and never queue on this row's lock.
    """

    __tablename__ = "host_health"
    __table_args__ = (CheckConstraint(_in("state", HEALTH_STATES), name="ck_host_health_state"),)

    # A host that is deleted takes its health with it.
    host_uuid: Mapped[UUID] = mapped_column(Uuid, ForeignKey("hosts.uuid", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    consecutive_failures: Mapped[int] = mapped_column(Integer, nullable=False)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Since when the host has been failing without a break; null while it is ok.
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # While failing: not before this time may the next probe be sent. A claimed probe pushes it past the call's end,
    # so that no replica sends a second one meanwhile, and a process that dies mid-probe leaves it due again later.
    next_probe_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
