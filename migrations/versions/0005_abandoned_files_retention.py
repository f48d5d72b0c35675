"""Abandoned files of decommissioned hosts; the indexes job retention prunes by

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FINISHED = sa.text("state IN ('succeeded', 'failed')")


def upgrade() -> None:
    op.create_table(
        "abandoned_files",
        sa.Column("uuid", sa.Uuid(), nullable=False),
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("vm_uuid", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("abandoned_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("uuid"),
    )
    op.create_index("ix_abandoned_files_host_uuid", "abandoned_files", ["host_uuid", "uuid"], unique=False)
    op.create_index("ix_confirmed_deletions_job_id", "confirmed_deletions", ["job_id"], unique=False)
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"], unique=False, postgresql_where=_FINISHED)


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", table_name="jobs", postgresql_where=_FINISHED)
    op.drop_index("ix_confirmed_deletions_job_id", table_name="confirmed_deletions")
    op.drop_index("ix_abandoned_files_host_uuid", table_name="abandoned_files")
    op.drop_table("abandoned_files")
