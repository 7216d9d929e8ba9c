"""Start persistence_service: build_server for tests and the local stack, serve for production."""

from __future__ import annotations

from persistence_service.config import Settings
from persistence_service.servicer import PersistenceServicer
from persistence_service.store import Store
from persistence_service.unit_of_work import make_engine, make_session_factory
from tierwriter import runtime
from tierwriter.persistence.v1 import persistence_service_pb2_grpc as pb_grpc

SERVICE_NAME = "tierwriter.persistence.v1.PersistenceService"


def build_server(
    settings: Settings, address: str | None = None
) -> tuple[runtime.RunningServer, Store]:
    """Open the database (creating missing tables) and start serving on `address`."""
    engine = make_engine(settings.database_url, pool_size=settings.persistence_threads)
    store = Store(make_session_factory(engine))
    try:
        running = runtime.build_server(
            address or settings.persistence_address,
            [
                (
                    pb_grpc.add_PersistenceServiceServicer_to_server,
                    PersistenceServicer(store),
                    SERVICE_NAME,
                )
            ],
            max_workers=settings.persistence_threads,
            closers=[engine.dispose],
        )
    except BaseException:
        engine.dispose()
        raise
    return running, store


def bootstrap_admin(store: Store, settings: Settings) -> str | None:
    """Create `admin` on first start with TIERWRITER_ADMIN_PASSWORD, or with a generated password
    that is returned so the caller can show it once (it is never logged)."""
    password = settings.admin_password.get_secret_value() if settings.admin_password else None
    return store.ensure_admin(password)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    runtime.configure_logging(settings.log_level)
    running, store = build_server(settings)
    generated = bootstrap_admin(store, settings)
    if generated:
        print(f"Created user 'admin' with generated password: {generated}", flush=True)
    runtime.serve_until_stopped(running, "persistence_service")
