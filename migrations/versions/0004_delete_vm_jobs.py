"""Delete-vm jobs: a job may outlive its VM, and may have no TPM

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 21:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The name PostgreSQL gave the unnamed foreign key of 0001.
_JOBS_VM_FKEY = "jobs_vm_uuid_fkey"


def upgrade() -> None:
    op.drop_constraint(_JOBS_VM_FKEY, "jobs", type_="foreignkey")
    op.alter_column("jobs", "tpm_uuid", existing_type=sa.Uuid(), nullable=True)


def downgrade() -> None:
    # The old code runs no delete-vm job, and the old schema holds no job whose VM is gone (a deleted VM's TPM
    # removals): those jobs go, with their host outcomes and planned files. Their orphan files and confirmations
    # stay, as they refer to no job by a key.
    op.execute(
        "DELETE FROM jobs WHERE type <> 'remove-tpm' OR NOT EXISTS (SELECT 1 FROM vms WHERE vms.uuid = jobs.vm_uuid)"
    )
    op.alter_column("jobs", "tpm_uuid", existing_type=sa.Uuid(), nullable=False)
    op.create_foreign_key(_JOBS_VM_FKEY, "jobs", "vms", ["vm_uuid"], ["uuid"], ondelete="RESTRICT")
