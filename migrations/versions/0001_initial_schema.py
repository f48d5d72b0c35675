"""Initial schema: inventory, the job queue, orphan files, the file ledgers, job notifications

Revision ID: 0001
Revises:
Create Date: 2026-11-25 17:04:15.857359
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Notifications are sent by triggers so that no code path that changes a job can forget them; PostgreSQL
# delivers them on commit and folds duplicates within one transaction.
#   tpm_job_queued:  a job became claimable (workers in every replica wake up)
#   tpm_job_changed: something a caller sees of a job changed (long-polls in every replica wake up)
_TRIGGERS = (
    """
CREATE FUNCTION notify_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tpm_job_changed', NEW.id::text);
    IF NEW.state = 'queued' THEN
        PERFORM pg_notify('tpm_job_queued', NEW.id::text);
    END IF;
    RETURN NULL;
END $$
""",
    """
CREATE FUNCTION notify_job_host_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tpm_job_changed', NEW.job_id::text);
    RETURN NULL;
END $$
""",
    """
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION notify_job_changed()
""",
    """
-- Lease renewals change only lease columns and stay silent.
CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN ((OLD.state, OLD.started_at, OLD.finished_at, OLD.orphan_files, OLD.error, OLD.planned)
          IS DISTINCT FROM (NEW.state, NEW.started_at, NEW.finished_at, NEW.orphan_files, NEW.error, NEW.planned))
    EXECUTE FUNCTION notify_job_changed()
""",
    """
CREATE TRIGGER job_hosts_notify AFTER INSERT OR UPDATE ON job_hosts
    FOR EACH ROW EXECUTE FUNCTION notify_job_host_changed()
""",
)


_DROP_TRIGGERS = (
    """
DROP TRIGGER IF EXISTS job_hosts_notify ON job_hosts
""",
    """
DROP TRIGGER IF EXISTS jobs_notify_update ON jobs
""",
    """
DROP TRIGGER IF EXISTS jobs_notify_insert ON jobs
""",
    """
DROP FUNCTION IF EXISTS notify_job_host_changed()
""",
    """
DROP FUNCTION IF EXISTS notify_job_changed()
""",
)


def upgrade() -> None:
    op.create_table(
        "confirmed_deletions",
        sa.Column("file_uuid", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("file_uuid"),
    )
    op.create_table(
        "file_ledger",
        sa.Column("file_uuid", sa.Uuid(), nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("file_uuid"),
    )
    op.create_table(
        "hosts",
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("agent_url", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_table(
        "vms",
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("secure_boot", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_table(
        "host_files",
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("backup", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("type IN ('TpmState', 'NvRam')", name="ck_host_files_type"),
        sa.ForeignKeyConstraint(["host_uuid"], ["hosts.uuid"], ondelete="RESTRICT"),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("uuid"),
        sa.UniqueConstraint("host_uuid", "path", name="uq_host_files_host_path"),
    )
    op.create_index("ix_host_files_vm_uuid", "host_files", ["vm_uuid"], unique=False)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=32), server_default="remove-tpm", nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=False),
        sa.Column("tpm_uuid", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_after", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("lease_token", sa.Uuid(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("planned", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("orphan_files", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed')", name="ck_jobs_state"),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_jobs_claimable",
        "jobs",
        ["run_after"],
        unique=False,
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"], unique=False)
    op.create_index("ix_jobs_vm_uuid_created_at", "jobs", ["vm_uuid", "created_at"], unique=False)
    op.create_index(
        "uq_jobs_one_active_per_vm",
        "jobs",
        ["vm_uuid"],
        unique=True,
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )
    op.create_table(
        "orphan_files",
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claim_token", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("type IN ('TpmState', 'NvRam')", name="ck_orphan_files_type"),
        sa.ForeignKeyConstraint(["host_uuid"], ["hosts.uuid"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_index("ix_orphan_files_due", "orphan_files", ["next_attempt_at"], unique=False)
    op.create_index("ix_orphan_files_host_uuid", "orphan_files", ["host_uuid", "uuid"], unique=False)
    op.create_table(
        "tpms",
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["vm_uuid"], ["vms.uuid"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("uuid"),
        sa.UniqueConstraint("vm_uuid"),
    )
    op.create_table(
        "job_files",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("file_uuid", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "file_uuid"),
    )
    op.create_index("ix_job_files_job_host", "job_files", ["job_id", "host_uuid"], unique=False)
    op.create_table(
        "job_hosts",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'deleted', 'failed')", name="ck_job_hosts_state"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "host_uuid"),
    )
    op.create_table(
        "tpm_key_bindings",
        sa.Column("tpm_uuid", sa.Uuid(), nullable=False),
        sa.Column("key_provider_uuid", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["tpm_uuid"], ["tpms.uuid"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("tpm_uuid"),
    )
    for statement in _TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    for statement in _DROP_TRIGGERS:
        op.execute(statement)
    op.drop_table("tpm_key_bindings")
    op.drop_table("job_hosts")
    op.drop_index("ix_job_files_job_host", table_name="job_files")
    op.drop_table("job_files")
    op.drop_table("tpms")
    op.drop_index("ix_orphan_files_host_uuid", table_name="orphan_files")
    op.drop_index("ix_orphan_files_due", table_name="orphan_files")
    op.drop_table("orphan_files")
    op.drop_index(
        "uq_jobs_one_active_per_vm",
        table_name="jobs",
        postgresql_where=sa.text("state IN ('queued', 'running')"),
    )
    op.drop_index("ix_jobs_vm_uuid_created_at", table_name="jobs")
    op.drop_index("ix_jobs_created_at", table_name="jobs")
    op.drop_index("ix_jobs_claimable", table_name="jobs", postgresql_where=sa.text("state IN ('queued', 'running')"))
    op.drop_table("jobs")
    op.drop_index("ix_host_files_vm_uuid", table_name="host_files")
    op.drop_table("host_files")
    op.drop_table("vms")
    op.drop_table("hosts")
    op.drop_table("file_ledger")
    op.drop_table("confirmed_deletions")
