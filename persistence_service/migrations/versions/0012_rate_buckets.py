"""Provider limits shared by every generator: one bucket per limit, and who draws on it.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_buckets",
        sa.Column("bucket", sa.String(500), primary_key=True),
        sa.Column("level", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
    )
    op.create_table(
        "rate_holders",
        sa.Column("bucket", sa.String(500), primary_key=True),
        sa.Column("holder", sa.String(200), primary_key=True),
        sa.Column("seen", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_holders")
    op.drop_table("rate_buckets")
