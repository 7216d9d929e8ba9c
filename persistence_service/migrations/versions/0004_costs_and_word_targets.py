"""Real providers: what each article and the titles cost, 429s met, what the content prompt
asked of which model and what came back (learned word targets); statuses short and skipped need
no schema change.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # server_default fills the rows that exist already; new rows get the models' defaults.
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("title_cost_usd", sa.Float(), nullable=False, server_default="0"))
    with op.batch_alter_table("generated_content") as articles:
        articles.add_column(sa.Column("cost_usd", sa.Float(), nullable=False, server_default="0"))
        articles.add_column(
            sa.Column("rate_limited", sa.Integer(), nullable=False, server_default="0")
        )
        articles.add_column(
            sa.Column("content_model", sa.String(200), nullable=False, server_default="")
        )
        articles.add_column(
            sa.Column("asked_words", sa.Integer(), nullable=False, server_default="0")
        )
        articles.add_column(
            sa.Column("draft_words", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_index(
        "ix_generated_content_content_model", "generated_content", ["content_model", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_generated_content_content_model", "generated_content")
    with op.batch_alter_table("generated_content") as articles:
        for column in ("draft_words", "asked_words", "content_model", "rate_limited", "cost_usd"):
            articles.drop_column(column)
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("title_cost_usd")
