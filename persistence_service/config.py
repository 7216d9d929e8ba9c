"""Settings of persistence_service, from the environment."""

from __future__ import annotations

from pydantic import Field, SecretStr

from tierwriter.settings import ServiceSettings

DEFAULT_DATABASE_URL = "sqlite:///data/tierwriter.db"


class Settings(ServiceSettings):
    """Every knob of persistence_service, typed, with its default."""

    database_url: str = Field(DEFAULT_DATABASE_URL, alias="DATABASE_URL")
    persistence_address: str = Field("127.0.0.1:50053", alias="PERSISTENCE_ADDRESS")
    # gRPC threads; also the PostgreSQL pool size, so a call never waits for a connection.
    persistence_threads: int = Field(32, ge=1, alias="PERSISTENCE_THREADS")
    # The first admin's password; checked like any password, so the admin can always log in.
    admin_password: SecretStr | None = Field(
        None, min_length=8, max_length=1024, alias="TIERWRITER_ADMIN_PASSWORD"
    )
    # At start, how long to wait for the database to answer (health NOT_SERVING meanwhile).
    database_wait_seconds: float = Field(120.0, ge=0, alias="DATABASE_WAIT_SECONDS")
