"""Leases become fencing tokens: each job carries the epoch of its latest claim.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


# Plain ALTER TABLE (SQLite has had ADD and DROP COLUMN since 3.35): a batch rebuild of `jobs`
# would be refused by the foreign keys that point at it.
def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("lease_epoch", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    op.drop_column("jobs", "lease_epoch")
