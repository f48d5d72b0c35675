"""Gentler autovacuum of the tables job retention deletes from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 03:50:00.000000

Pruning a backlog of finished jobs leaves dead rows on every page it held, and autovacuum then rewrites all those
pages at once. At the default cost delay (2 ms) it dirtied 140 MB of the kernel's page cache in 8 s on the
benchmark machine after 100,000 pruned jobs, while requests' commits came in slow bursts (docs/BENCHMARK.md,
sixth round). Five times the delay spreads the same work over about five times as long, which these tables, written
once per job and read by primary key, can afford.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PRUNED_TABLES = ("jobs", "job_hosts", "job_files", "confirmed_deletions", "file_ledger")
VACUUM_COST_DELAY_MS = 10


def upgrade() -> None:
    for table in PRUNED_TABLES:
        op.execute(f"ALTER TABLE {table} SET (autovacuum_vacuum_cost_delay = {VACUUM_COST_DELAY_MS})")


def downgrade() -> None:
    for table in PRUNED_TABLES:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_cost_delay)")
