"""Quotas: how many articles and queued jobs a user may have at once.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("username", sa.String(200), primary_key=True),
        sa.Column("max_active_articles", sa.Integer(), nullable=False),
        sa.Column("max_queued_jobs", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quotas")
