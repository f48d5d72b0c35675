"""Host health: whether each host's agent answers, shared by every replica

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "host_health",
        sa.Column("host_uuid", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_probe_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('ok', 'failing')", name="ck_host_health_state"),
        sa.ForeignKeyConstraint(["host_uuid"], ["hosts.uuid"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host_uuid"),
    )


def downgrade() -> None:
    op.drop_table("host_health")
