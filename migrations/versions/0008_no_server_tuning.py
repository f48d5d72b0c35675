"""Reset what 0006 and 0007 set on PostgreSQL itself: the server's tuning is its operator's, not a migration's

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 17:20:00.000000

0006 set the pruned tables' `autovacuum_vacuum_cost_delay` and 0007 the database's `backend_flush_after`; both go
back to the server's values. docs/operations.md says when to set them and what they measured.
"""

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TUNED_TABLES = ("jobs", "job_hosts", "job_files", "confirmed_deletions", "file_ledger")

log = logging.getLogger(f"alembic.{__name__}")

# Whether this role owns the database, its name as SQL, and whether the database sets backend_flush_after for all.
_OWNER_NAME_AND_FLUSH_SET = text(
    "SELECT pg_has_role(d.datdba, 'USAGE'), quote_ident(d.datname), EXISTS ("
    " SELECT FROM pg_db_role_setting s, unnest(s.setconfig) AS c"
    " WHERE s.setdatabase = d.oid AND s.setrole = 0 AND c LIKE 'backend_flush_after=%')"
    " FROM pg_database d WHERE d.datname = current_database()"
)


def upgrade() -> None:
    for table in TUNED_TABLES:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_cost_delay)")
    owner, name, flush_set = op.get_bind().execute(_OWNER_NAME_AND_FLUSH_SET).one()
    if owner:
        op.execute(f"ALTER DATABASE {name} RESET backend_flush_after")
    elif flush_set:
        # Only the owner could have set it (0007 skips other roles), so it is the owner's to keep or reset.
        log.warning("the database keeps backend_flush_after as its owner set it; see docs/operations.md, Tuning")


def downgrade() -> None:
    """Nothing: the tuning 0006 and 0007 set is the operator's to choose, not a schema to restore."""
