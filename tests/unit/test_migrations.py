"""The Alembic migrations: they build exactly the models' schema, and upgrade a database of the
first release in place with its records kept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from orchestrator_service.jobfile import JobSpec
from persistence_service.migrate import MIGRATIONS, alembic_config, upgrade_schema
from persistence_service.models import Base
from persistence_service.servicer import spec_from_dict, spec_to_dict
from persistence_service.store import Store
from persistence_service.unit_of_work import make_engine, make_session_factory
from tests.unit import first_release_models  # its databases were made by create_all

# A job as the first release stored it: the job file's JSON, hostnames given alone.
FIRST_RELEASE_SPEC = {
    "project": {"name": "p", "main_keyword": "k"},
    "tiers": {
        "tier1": {
            "count": 2, "min_word_count": 500, "max_word_count": 900, "min_h2_tags": 3,
            "max_h2_tags": 5, "min_h3_tags": 0, "max_h3_tags": 8, "deployment_targets": None,
        }
    },
    "deployment_targets": ["a.net"],
    "max_workers": 5,
    "max_cost_usd": None,
}  # fmt: skip


def _schema_differences(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_the_migrations_build_the_models_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    make_engine(url, pool_size=5).dispose()
    assert _schema_differences(url) == []


@pytest.mark.postgres
def test_the_migrations_build_the_models_schema_on_postgresql(postgres_server) -> None:
    url = postgres_server.create_database("tw_migrations")
    make_engine(url, pool_size=5).dispose()
    assert _schema_differences(url) == []


def test_a_first_release_database_is_upgraded_with_its_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    first_release_models.Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO projects (name, main_keyword, entities, related_searches,"
                " money_site_url, created_at) VALUES ('p', 'k', '[]', '[]', '', '2026-01-01')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO jobs (project_id, owner, status, spec, max_workers,"
                " requested_articles, titles, title_api_calls, title_prompt_tokens,"
                " title_completion_tokens, error, created_at) VALUES (1, 'admin', 'completed',"
                " :spec, 5, 2, '{}', 0, 0, 0, '', '2026-01-01')"
            ),
            {"spec": json.dumps(FIRST_RELEASE_SPEC)},
        )
        for article_id in (1, 2):  # two jobs' worth of one URL, as the first release allowed
            connection.execute(
                text(
                    "INSERT INTO generated_content (job_id, project_id, tier, article_index,"
                    " keyword, title, content, word_count, status, error_stage, error, site, url,"
                    " output_path, api_calls, prompt_tokens, completion_tokens, created_at)"
                    " VALUES (1, 1, 'tier1', :i, 'k', 't', '<p>x</p>', 1, 'generated', '', '',"
                    " 'a.net', 'https://a.net/t.html', '', 2, 0, 0, '2026-01-01')"
                ),
                {"i": article_id},
            )
    engine.dispose()

    upgraded = make_engine(url, pool_size=5)
    try:
        assert _schema_differences(url) == []
        articles = Store(make_session_factory(upgraded)).list_articles(1)
        assert [(a.url, a.html) for a in articles] == [("https://a.net/t.html", ""), ("", "")]
        job = Store(make_session_factory(upgraded)).get_job(1)
        assert job.title_shortfall == 0
        # The job file's JSON became the JobSpec message's, and reads as the same job.
        spec = JobSpec.from_proto(spec_from_dict(job.spec))
        assert spec.tiers["tier1"].count == 2 and spec.sites_of(spec.tiers["tier1"]) == ["a.net"]
        assert spec.project is not None and spec.project.name == "p" and spec.max_workers == 5
        # The project now belongs to whoever ran its first job.
        assert Store(make_session_factory(upgraded)).get_project(name="p", owner="admin").id == 1
        with upgraded.connect() as connection:  # foreign keys are enforced again afterwards
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        upgrade_schema(upgraded)  # a second start changes nothing
        assert inspect(upgraded).has_table("sites")
    finally:
        upgraded.dispose()


def _typed_specs_migration() -> Any:
    path = MIGRATIONS / "versions" / "0006_typed_job_specs.py"
    spec = importlib.util.spec_from_file_location("typed_job_specs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_migration_0006_writes_what_the_services_now_store_and_back() -> None:
    """Every field of a job spec survives the migration: the stored job file's JSON becomes what
    persistence stores for the same job now, and the downgrade gives the job file's form back."""
    migration = _typed_specs_migration()
    spec = JobSpec.model_validate(
        {
            "project_id": 7,
            "tiers": {
                "tier2": {"count": 3, "min_word_count": 300, "max_word_count": 600},
                "tier1": {
                    "count": 2, "min_word_count": 500, "max_word_count": 900, "min_h2_tags": 2,
                    "max_h3_tags": 6,
                    "deployment_targets": [{"hostname": "b.net", "template": "t"}],
                },
            },
            "models": {"content": "big-model"},
            "deployment_targets": ["a.net"],
            "continue_on_error": False,
            "max_cost_usd": 1.5,
            "see_also_links": True,
            "link_style": "relative",
        }
    )  # fmt: skip
    job_file_form = json.loads(spec.model_dump_json())
    stored = migration._to_message_form(job_file_form)
    message = spec.to_proto()
    assert spec_from_dict(stored) == spec_from_dict(spec_to_dict(message)) == message
    assert JobSpec.from_proto(spec_from_dict(stored)) == spec
    assert JobSpec.model_validate(migration._to_job_file_form(stored)) == spec


def test_migration_0009_gives_each_site_to_the_owner_of_its_first_job(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=5)
    try:
        upgrade_schema(engine)
        store = Store(make_session_factory(engine))
        project = store.ensure_project(
            {"name": "p", "main_keyword": "k", "entities": [], "related_searches": [],
             "money_site_url": ""}
        )  # fmt: skip

        def job(owner: str, hostnames: list[str]) -> int:
            spec = {"tiers": [{"name": "tier1", "count": 1}],
                    "deployment_targets": [{"hostname": h} for h in hostnames]}  # fmt: skip
            return store.create_job(project.id, spec, 5, 1, owner).id

        ann_job, bob_job = job("ann", ["a.net"]), job("bob", ["a.net", "b.net"])
        for job_id in (bob_job, ann_job):  # bob's record is saved first, on ann's older job's site
            store.save_article(
                dict(job_id=job_id, project_id=project.id, tier="tier1", article_index=0,
                     keyword="k", title=f"t{job_id}", status="generated", site="a.net")
            )  # fmt: skip
        store.ensure_sites([("a.net", ""), ("b.net", ""), ("c.net", "")], "x", any_owner=True)
        with engine.begin() as connection:  # back to before sites had owners, and up again
            command.downgrade(alembic_config(connection), "0008")
        assert "owner" not in {c["name"] for c in inspect(engine).get_columns("sites")}
        upgrade_schema(engine)
        owners = {s.hostname: s.owner for s in store.list_sites()}
        # a.net: ann's job is the earliest with a record on it; b.net: only named in bob's
        # spec; c.net: used by no job, so the admin's.
        assert owners == {"a.net": "ann", "b.net": "bob", "c.net": "admin"}
        assert _schema_differences(database_url) == []
    finally:
        engine.dispose()
