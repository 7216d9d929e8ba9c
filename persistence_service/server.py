"""Start persistence_service: build_server for tests and the local stack, serve for production."""

from __future__ import annotations

import logging
import time

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from persistence_service.config import Settings
from persistence_service.migrate import schema_is_current, upgrade_schema
from persistence_service.servicer import PersistenceServicer
from persistence_service.store import Store
from persistence_service.unit_of_work import make_engine, make_session_factory
from tierwriter import runtime
from tierwriter.persistence.v1 import persistence_service_pb2_grpc as pb_grpc
from tierwriter.service_auth import ServiceTokenInterceptor, required_token

log = logging.getLogger(__name__)
SERVICE_NAME = "tierwriter.persistence.v1.PersistenceService"


def build_server(
    settings: Settings, address: str | None = None, wait_for_database: bool = False
) -> tuple[runtime.RunningServer, Store]:
    """Open the database, bring its schema up to date, and serve on `address`. With
    `wait_for_database`, the server answers NOT_SERVING while the database is waited for (up to
    DATABASE_WAIT_SECONDS), and the caller reports SERVING when it is ready (set_serving);
    without, the database must answer now and the server is SERVING on return."""
    listen = address or settings.persistence_address
    token = required_token(settings.service_token_value(), listen, "persistence_service")
    engine = make_engine(
        settings.database_url, pool_size=settings.persistence_threads, migrate=False
    )
    store = Store(make_session_factory(engine), settings.password_hashes_at_once)
    try:
        running = runtime.build_server(
            listen,
            [
                (
                    pb_grpc.add_PersistenceServiceServicer_to_server,
                    PersistenceServicer(store),
                    SERVICE_NAME,
                )
            ],
            max_workers=settings.persistence_threads,
            interceptors=[ServiceTokenInterceptor(token, [SERVICE_NAME])] if token else [],
            closers=[engine.dispose],
            serving=False,
        )
    except BaseException:
        engine.dispose()
        raise
    try:
        wait = settings.database_wait_seconds if wait_for_database else 0.0
        if settings.database_migrate:
            _migrate(engine, wait)
        else:
            _wait_for_schema(engine, wait)
    except BaseException:
        running.stop(0)
        raise
    if not wait_for_database:
        running.set_serving()
    return running, store


def _migrate(engine: Engine, wait_seconds: float) -> None:
    """upgrade_schema, retried while the database does not answer, for up to `wait_seconds`."""
    deadline, delay = time.monotonic() + wait_seconds, 0.5
    while True:
        try:
            upgrade_schema(engine)
            return
        except OperationalError as e:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("the database does not answer yet (%s); trying again", e.orig)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _wait_for_schema(engine: Engine, wait_seconds: float) -> None:
    """Until the database answers with the newest schema (a migration Job is running), for up
    to `wait_seconds`; RuntimeError naming what to run when it never does."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            if schema_is_current(engine):
                return
            problem = "its schema is not the newest yet"
        except OperationalError as e:
            problem = f"it does not answer yet ({e.orig})"
        if time.monotonic() + 2.0 > deadline:
            raise RuntimeError(
                f"the database: {problem}, and DATABASE_MIGRATE is false: run "
                "`python -m persistence_service.migrate` (the migration Job) first"
            )
        log.warning("the database: %s; waiting for the migration", problem)
        time.sleep(2.0)


def migrate_and_exit(settings: Settings) -> None:
    """`python -m persistence_service.migrate`: bring the database to the newest schema
    (waiting up to DATABASE_WAIT_SECONDS for it to answer), then exit."""
    runtime.configure_logging(settings.log_level)
    engine = make_engine(settings.database_url, pool_size=1, migrate=False)
    try:
        _migrate(engine, settings.database_wait_seconds)
    finally:
        engine.dispose()
    log.info("the database schema is the newest")


def bootstrap_admin(store: Store, settings: Settings) -> str | None:
    """Create `admin` on first start with TIERWRITER_ADMIN_PASSWORD, or with a generated password
    that is returned so the caller can show it once (it is never logged)."""
    password = settings.admin_password.get_secret_value() if settings.admin_password else None
    return store.ensure_admin(password)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    runtime.configure_logging(settings.log_level)
    running, store = build_server(settings, wait_for_database=True)
    generated = bootstrap_admin(store, settings)
    if generated:
        print(f"Created user 'admin' with generated password: {generated}", flush=True)
    # SERVING only once the admin exists and SIGTERM is handled.
    runtime.serve_until_stopped(running, "persistence_service", on_ready=running.set_serving)
