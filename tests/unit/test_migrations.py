"""The Alembic migrations: they build exactly the models' schema, and upgrade a database of the
first release in place with its records kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from persistence_service.migrate import upgrade_schema
from persistence_service.models import Base
from persistence_service.store import Store
from persistence_service.unit_of_work import make_engine, make_session_factory
from tests.unit import first_release_models  # its databases were made by create_all


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
                " '{}', 5, 2, '{}', 0, 0, 0, '', '2026-01-01')"
            )
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
        assert Store(make_session_factory(upgraded)).get_job(1).title_shortfall == 0
        # The project now belongs to whoever ran its first job.
        assert Store(make_session_factory(upgraded)).get_project(name="p", owner="admin").id == 1
        with upgraded.connect() as connection:  # foreign keys are enforced again afterwards
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        upgrade_schema(upgraded)  # a second start changes nothing
        assert inspect(upgraded).has_table("sites")
    finally:
        upgraded.dispose()
