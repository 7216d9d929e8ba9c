"""The database schema, kept up to date by Alembic migrations (persistence_service/migrations).

Every persistence_service start runs `upgrade_schema`: a new database gets every migration, an
older one the missing ones, with its data kept. Changing models.py means adding a revision to
migrations/versions/ (next number, `down_revision` the previous one); tests/unit/test_migrations.py
fails until the migrated schema equals the models again."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# The first release created its tables without Alembic; such a database is at this revision.
FIRST_RELEASE = "0001"
# Any number, the same in every replica: concurrent starts on PostgreSQL migrate one at a time.
_PG_LOCK_KEY = 7_305_118


def alembic_config(connection: Connection) -> Config:
    """An Alembic config that runs on `connection` (no alembic.ini, no URL)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest schema, in one transaction."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # SQLite changes a constraint by rebuilding the table, which foreign keys pointing at
            # it would refuse; its documented procedure turns them off (only possible outside a
            # transaction) and checks them all before they are on again.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # ends SQLAlchemy's autobegun transaction; the pragma holds
        try:
            with connection.begin():
                _upgrade(connection)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError("the migration left records pointing at nothing")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    config = alembic_config(connection)
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables and "jobs" in tables:
        log.info("database from the first release: marking it as revision %s", FIRST_RELEASE)
        command.stamp(config, FIRST_RELEASE)
    command.upgrade(config, "head")


def schema_is_current(engine: Engine) -> bool:
    """Whether the database is at the newest revision (a migration Job ran, or this release's
    persistence migrated it)."""
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
        heads = set(ScriptDirectory.from_config(alembic_config(connection)).get_heads())
    return current == heads


if __name__ == "__main__":  # python -m persistence_service.migrate: the Kubernetes Job
    from persistence_service.config import Settings
    from persistence_service.server import migrate_and_exit
    from tierwriter.settings import load_or_exit

    migrate_and_exit(load_or_exit(Settings))
