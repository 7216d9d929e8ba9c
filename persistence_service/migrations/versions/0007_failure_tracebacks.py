"""A failed article's traceback is kept with its record (for `tierwriter jobs show ID --errors`)
instead of travelling in the public event stream.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generated_content") as articles:
        articles.add_column(
            sa.Column("error_traceback", sa.Text(), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("generated_content") as articles:
        articles.drop_column("error_traceback")
