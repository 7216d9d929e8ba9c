"""Quality gates: the gates that fired on an article (status `long` needs no schema change).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generated_content") as articles:
        articles.add_column(
            sa.Column("quality_gates", sa.String(300), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("generated_content") as articles:
        articles.drop_column("quality_gates")
