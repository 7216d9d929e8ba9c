"""Tiers that link: sites with template sets, one article per URL, the final page, and the
titles a job could not get.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("hostname", sa.String(253), nullable=False, unique=True),
        sa.Column("template", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # server_default fills the rows that exist already; new rows get the models' defaults.
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(
            sa.Column("title_shortfall", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("generated_content") as articles:
        articles.add_column(sa.Column("html", sa.Text(), nullable=False, server_default=""))
    # The first release kept URLs unique per job only. Where two records share one, the older
    # keeps it; the later gets none and a new one when its job is published again.
    op.execute(
        "UPDATE generated_content SET url = '' WHERE url != '' AND id NOT IN "
        "(SELECT MIN(id) FROM generated_content WHERE url != '' GROUP BY url)"
    )
    op.create_index(
        "uq_article_url",
        "generated_content",
        ["url"],
        unique=True,
        sqlite_where=sa.text("url != ''"),
        postgresql_where=sa.text("url != ''"),
    )


def downgrade() -> None:
    op.drop_index("uq_article_url", table_name="generated_content")
    with op.batch_alter_table("generated_content") as articles:
        articles.drop_column("html")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("title_shortfall")
    op.drop_table("sites")
