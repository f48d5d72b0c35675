"""Stray files: the `scan-host` job (a job of a host, not a VM) and each host's list of strays

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE_JOB = sa.text("state IN ('queued', 'running')")
HOST_STATES = "state IN ('pending', 'deleted', 'failed')"
HOST_STATES_WITH_SCANNED = "state IN ('pending', 'deleted', 'scanned', 'failed')"


def upgrade() -> None:
    op.alter_column("jobs", "vm_uuid", existing_type=sa.Uuid(), nullable=True)
    op.add_column("hosts", sa.Column("next_scan_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_hosts_next_scan_at", "hosts", ["next_scan_at"])
    op.add_column("jobs", sa.Column("host_uuid", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("strays", sa.Integer(), nullable=True))
    op.create_index("uq_jobs_one_active_per_host", "jobs", ["host_uuid"], unique=True, postgresql_where=ACTIVE_JOB)
    op.drop_constraint("ck_job_hosts_state", "job_hosts", type_="check")
    op.create_check_constraint("ck_job_hosts_state", "job_hosts", HOST_STATES_WITH_SCANNED)
    op.create_table(
        "stray_files",
        sa.Column("uuid", sa.Uuid(), primary_key=True),
        sa.Column("host_uuid", sa.Uuid(), sa.ForeignKey("hosts.uuid", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("modified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("type IN ('TpmState', 'NvRam', 'Secret')", name="ck_stray_files_type"),
        sa.UniqueConstraint("host_uuid", "path", name="uq_stray_files_host_path"),
    )
    # A scan asks, for each entry, whether an orphan or an abandoned file has its host and path.
    op.create_index("ix_orphan_files_host_path", "orphan_files", ["host_uuid", "path"])
    op.create_index("ix_abandoned_files_host_path", "abandoned_files", ["host_uuid", "path"])


def downgrade() -> None:
    op.drop_index("ix_abandoned_files_host_path", "abandoned_files")
    op.drop_index("ix_orphan_files_host_path", "orphan_files")
    op.drop_table("stray_files")
    op.execute("DELETE FROM jobs WHERE type = 'scan-host'")
    op.drop_constraint("ck_job_hosts_state", "job_hosts", type_="check")
    op.create_check_constraint("ck_job_hosts_state", "job_hosts", HOST_STATES)
    op.drop_index("uq_jobs_one_active_per_host", "jobs")
    op.drop_column("jobs", "strays")
    op.drop_column("jobs", "host_uuid")
    op.alter_column("jobs", "vm_uuid", existing_type=sa.Uuid(), nullable=False)
    op.drop_index("ix_hosts_next_scan_at", "hosts")
    op.drop_column("hosts", "next_scan_at")
