"""Sites belong to a user: the owner of the first job that used each one.

Before, a site was shared by hostname across users, so anyone could change its template and
take its URLs. A stored site goes to the owner of the earliest job with a record on it, else of
the earliest job whose spec names it, else to `admin`.

Revision ID: 0009
Revises: 0008
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _hostnames(spec: Any) -> set[str]:
    """Every `hostname` in a job spec (its JSON form: sites sit at several levels)."""
    if isinstance(spec, dict):
        found = {spec["hostname"]} if isinstance(spec.get("hostname"), str) else set()
        for value in spec.values():
            found |= _hostnames(value)
        return found
    if isinstance(spec, list):
        return set().union(*map(_hostnames, spec)) if spec else set()
    return set()


def upgrade() -> None:
    with op.batch_alter_table("sites") as sites:
        sites.add_column(sa.Column("owner", sa.String(200), nullable=False, server_default=""))
        sites.create_index("ix_sites_owner", ["owner"])
    bind = op.get_bind()
    owners: dict[str, str] = {}
    # One row per site: the earliest job (with an owner) that has a record on it.
    first_records = bind.execute(
        sa.text(
            "SELECT f.site, j.owner FROM (SELECT a.site AS site, MIN(a.job_id) AS first_job"
            " FROM generated_content a JOIN jobs o ON o.id = a.job_id WHERE o.owner != ''"
            " GROUP BY a.site) f JOIN jobs j ON j.id = f.first_job"
        )
    )
    owners.update({hostname: owner for hostname, owner in first_records})
    jobs = sa.table("jobs", sa.column("id"), sa.column("owner"), sa.column("spec", sa.JSON))
    for owner, spec in bind.execute(sa.select(jobs.c.owner, jobs.c.spec).order_by(jobs.c.id)):
        for hostname in _hostnames(spec):
            if owner:
                owners.setdefault(hostname, owner)
    stored = bind.execute(sa.text("SELECT hostname FROM sites")).scalars().all()
    for hostname in stored:
        bind.execute(
            sa.text("UPDATE sites SET owner = :owner WHERE hostname = :hostname"),
            {"owner": owners.get(hostname, "admin"), "hostname": hostname},
        )


def downgrade() -> None:
    with op.batch_alter_table("sites") as sites:
        sites.drop_index("ix_sites_owner")
        sites.drop_column("owner")
