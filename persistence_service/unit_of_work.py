"""The engine (built once per server) and the unit of work (one per RPC)."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from persistence_service.migrate import upgrade_schema


def make_engine(database_url: str, pool_size: int, migrate: bool = True) -> Engine:
    """An engine for `database_url`; with `migrate`, its schema brought to the newest revision
    now (which needs the database to answer).

    SQLite gets WAL (readers never block the writer) and a busy timeout (writers queue instead of
    failing); PostgreSQL gets a pool as large as the server's thread pool, so no call waits."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # No pre-ping: a file has no server to go away, and a ping per checkout costs a query
        # per call.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = create_engine(url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True)
    if migrate:
        upgrade_schema(engine)
    return engine


class UnitOfWork:
    """A session for one call: commit() makes the work stick; leaving the block without it
    rolls back. Never shared between threads."""

    session: Session

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def __enter__(self) -> UnitOfWork:
        self.session = self._session_factory()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() rolls back whatever was not committed and detaches the objects without expiring
        # them (rollback() would expire them), so the servicer can still read what was loaded.
        self.session.close()

    def commit(self) -> None:
        """Make this call's changes permanent."""
        self.session.commit()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the servicer converts them after)."""
    return sessionmaker(engine, expire_on_commit=False)
