"""Every process working in the service's database writes out the pages it evicts as it goes, autovacuum's too

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 05:40:00.000000

A process that evicts a dirty page from shared buffers leaves it to the kernel, which writes it out 30 s later, unless
`backend_flush_after` is set (its default is 0). After a backlog of finished jobs is pruned, autovacuum rewrites
every page the backlog held, and on the benchmark machine the kernel then wrote up to 116 MB out at once while
requests' commits waited behind it (docs/BENCHMARK.md, seventh round). A setting of the service's own connections
did not reach autovacuum's workers; a setting of the database reaches every session in it, theirs included. With it,
dirty pages stayed under 10 MB throughout a pruning. 256 kB is PostgreSQL's own default for its checkpointer.

Only the database's owner (or a superuser) may set it. Another role migrates without it and is warned: the service
works the same, and whoever owns the database may set it (ALTER DATABASE, or postgresql.conf for the whole server).
"""

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FLUSH_AFTER = "256kB"

log = logging.getLogger(f"alembic.{__name__}")

# Whether this role owns the database (directly or through a role it has), and the database's name as SQL.
_MAY_ALTER_AND_NAME = text(
    "SELECT pg_has_role(datdba, 'USAGE'), quote_ident(datname) FROM pg_database WHERE datname = current_database()"
)


def _alter_database(change: str) -> None:
    """ALTER DATABASE (this one) `change`, if this role owns the database; a warning if it does not."""
    may, name = op.get_bind().execute(_MAY_ALTER_AND_NAME).one()
    if not may:
        log.warning(
            "this role does not own the database and cannot %s; its owner may (ALTER DATABASE ... %s)", change, change
        )
        return
    op.execute(f"ALTER DATABASE {name} {change}")


def upgrade() -> None:
    _alter_database(f"SET backend_flush_after = '{FLUSH_AFTER}'")


def downgrade() -> None:
    _alter_database("RESET backend_flush_after")
