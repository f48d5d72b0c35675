"""Host files and orphan files may be libvirt secrets: the type CHECKs take `Secret`

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 21:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The constraints of the type column, by table; a revision keeps its own copy of the values it writes, so that
# a later change of app/protocol.py's FileType cannot rewrite what this revision did.
_TYPE_CHECKS = {"host_files": "ck_host_files_type", "orphan_files": "ck_orphan_files_type"}
# Constraints on the `Secret` file type, which S105 takes for passwords by their names.
_WITH_SECRET = "type IN ('TpmState', 'NvRam', 'Secret')"  # noqa: S105
_WITHOUT_SECRET = "type IN ('TpmState', 'NvRam')"  # noqa: S105


def _replace_type_checks(condition: str) -> None:
    for table, constraint in _TYPE_CHECKS.items():
        op.drop_constraint(constraint, table, type_="check")
        op.create_check_constraint(constraint, table, condition)


def upgrade() -> None:
    _replace_type_checks(_WITH_SECRET)


def downgrade() -> None:
    # A secret's record cannot be kept under the old schema, and dropping it would forget a key on a host.
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM host_files WHERE type = 'Secret')"
        " OR EXISTS (SELECT 1 FROM orphan_files WHERE type = 'Secret') THEN"
        " RAISE EXCEPTION 'secret host files or orphan files exist: remove them before downgrading'; END IF; END $$"
    )
    _replace_type_checks(_WITHOUT_SECRET)
