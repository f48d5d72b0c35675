"""Trace context: a job keeps its creating request's W3C trace context, an orphan file its job's

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 17:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("trace_context", sa.Text(), nullable=True))
    op.add_column("orphan_files", sa.Column("trace_context", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("orphan_files", "trace_context")
    op.drop_column("jobs", "trace_context")
