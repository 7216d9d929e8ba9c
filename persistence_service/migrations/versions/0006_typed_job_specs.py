"""Job specs as the JobSpec message's JSON form: the orchestrator now sends a typed message, not
the job file's JSON, and persistence keeps what it gets. Tiers become a list in link order with
their names inside, hostnames given alone become sites, `null` means unset, and the link style is
the enum's name.

Revision ID: 0006
Revises: 0005
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_jobs = sa.table("jobs", sa.column("id", sa.Integer()), sa.column("spec", sa.JSON()))

# The fields the message has; a key of an older job file that it does not have is dropped.
_JOB_FIELDS = (
    "project", "project_id", "models", "max_workers", "continue_on_error", "max_cost_usd",
    "see_also_links",
)  # fmt: skip
_TIER_FIELDS = (
    "count", "min_word_count", "max_word_count", "min_h2_tags", "max_h2_tags", "min_h3_tags",
    "max_h3_tags",
)  # fmt: skip


def _sites(value: Any) -> list[dict[str, Any]]:
    return [{"hostname": site} if isinstance(site, str) else site for site in value or []]


def _to_message_form(spec: dict[str, Any]) -> dict[str, Any]:
    tiers = spec.get("tiers")
    if not isinstance(tiers, dict):  # already converted (a second run) or no tiers at all
        return spec
    converted = {key: spec[key] for key in _JOB_FIELDS if spec.get(key) is not None}
    converted["tiers"] = [
        {
            "name": name,
            **{key: tier[key] for key in _TIER_FIELDS if tier.get(key) is not None},
            "deployment_targets": _sites(tier.get("deployment_targets")),
        }
        for name, tier in sorted(tiers.items(), key=lambda item: int(item[0].removeprefix("tier")))
    ]
    converted["deployment_targets"] = _sites(spec.get("deployment_targets"))
    style = "RELATIVE" if spec.get("link_style") == "relative" else "ABSOLUTE"
    converted["link_style"] = f"LINK_STYLE_{style}"
    return converted


def _to_job_file_form(spec: dict[str, Any]) -> dict[str, Any]:
    tiers = spec.get("tiers")
    if not isinstance(tiers, list):
        return spec
    converted = {key: spec.get(key) for key in _JOB_FIELDS}
    converted["tiers"] = {
        tier["name"]: {
            **{key: tier[key] for key in _TIER_FIELDS if key in tier},
            "deployment_targets": tier.get("deployment_targets") or None,
        }
        for tier in tiers
    }
    converted["deployment_targets"] = spec.get("deployment_targets", [])
    converted["link_style"] = (
        "relative" if spec.get("link_style") == "LINK_STYLE_RELATIVE" else "absolute"
    )
    return converted


def _rewrite(convert: Any) -> None:
    connection = op.get_bind()
    for job_id, spec in connection.execute(sa.select(_jobs.c.id, _jobs.c.spec)).all():
        if isinstance(spec, dict):
            connection.execute(
                _jobs.update().where(_jobs.c.id == job_id).values(spec=convert(spec))
            )


def upgrade() -> None:
    _rewrite(_to_message_form)


def downgrade() -> None:
    _rewrite(_to_job_file_form)
