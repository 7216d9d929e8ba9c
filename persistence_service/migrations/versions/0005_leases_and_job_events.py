"""Server-owned jobs: queued jobs, leases held by the orchestrator running a job, cancels any
orchestrator can ask for, the stored event stream of every job, and request ids that make
retried calls safe.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("lease_owner", sa.String(100), nullable=False, server_default=""))
        jobs.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        jobs.add_column(sa.Column("cancel_reason", sa.Text(), nullable=False, server_default=""))
        jobs.add_column(
            sa.Column("retry_failed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        jobs.add_column(
            sa.Column("last_event_seq", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "job_events",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "applied_requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("applied_requests")
    op.drop_table("job_events")
    with op.batch_alter_table("jobs") as jobs:
        for column in (
            "last_event_seq",
            "retry_failed",
            "cancel_reason",
            "lease_expires_at",
            "lease_owner",
        ):
            jobs.drop_column(column)
