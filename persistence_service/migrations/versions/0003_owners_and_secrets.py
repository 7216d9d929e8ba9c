"""Projects belong to users (names unique per owner), users get a token version (a new password
ends older session tokens), and a table for generated service secrets.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _unique_on_name(bind: sa.Connection) -> str | None:
    """The name of the old unique constraint on projects.name (None on SQLite: it is unnamed)."""
    for constraint in sa.inspect(bind).get_unique_constraints("projects"):
        if constraint["column_names"] == ["name"]:
            return constraint["name"] or "uq_projects_name"
    return None


def upgrade() -> None:
    bind = op.get_bind()
    old_unique = _unique_on_name(bind)
    # SQLite's unnamed constraint gets a name by this convention, so batch mode can drop it.
    naming = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
    with op.batch_alter_table("projects", naming_convention=naming) as projects:
        projects.add_column(sa.Column("owner", sa.String(200), nullable=False, server_default=""))
        if old_unique:
            projects.drop_constraint(old_unique, type_="unique")
    # A project belongs to whoever ran its first job; one no job used, to the admin.
    op.execute(
        "UPDATE projects SET owner = COALESCE((SELECT jobs.owner FROM jobs WHERE jobs.project_id"
        " = projects.id AND jobs.owner != '' ORDER BY jobs.id LIMIT 1), 'admin')"
    )
    with op.batch_alter_table("projects") as projects:
        projects.create_unique_constraint("uq_project_owner_name", ["owner", "name"])
    with op.batch_alter_table("users") as users:
        users.add_column(
            sa.Column("token_version", sa.Integer(), nullable=False, server_default="1")
        )
    op.create_table(
        "service_secrets",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("service_secrets")
    with op.batch_alter_table("users") as users:
        users.drop_column("token_version")
    with op.batch_alter_table("projects") as projects:
        projects.drop_constraint("uq_project_owner_name", type_="unique")
        projects.drop_column("owner")
        projects.create_unique_constraint("projects_name_key", ["name"])
