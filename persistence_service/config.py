"""Settings of persistence_service, from the environment."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from sqlalchemy.engine import URL

from tierwriter.settings import ServiceSettings

DEFAULT_DATABASE_URL = "sqlite:///data/tierwriter.db"


class Settings(ServiceSettings):
    """Every knob of persistence_service, typed, with its default."""

    database_url: str = Field(DEFAULT_DATABASE_URL, alias="DATABASE_URL")
    persistence_address: str = Field("127.0.0.1:50053", alias="PERSISTENCE_ADDRESS")
    # gRPC threads; also the PostgreSQL pool size, so a call never waits for a connection.
    persistence_threads: int = Field(32, ge=1, alias="PERSISTENCE_THREADS")
    # argon2 takes 64 MiB a hash: at most this many at once (logins, new users, passwords).
    password_hashes_at_once: int = Field(2, ge=1, le=64, alias="PASSWORD_HASHES_AT_ONCE")
    # The first admin's password; checked like any password, so the admin can always log in.
    admin_password: SecretStr | None = Field(
        None, min_length=8, max_length=1024, alias="TIERWRITER_ADMIN_PASSWORD"
    )
    # At start, how long to wait for the database to answer (health NOT_SERVING meanwhile).
    database_wait_seconds: float = Field(120.0, ge=0, alias="DATABASE_WAIT_SECONDS")
    # Migrate the schema at start (true), or leave it to `python -m persistence_service.migrate`
    # (a Kubernetes Job) and wait, NOT_SERVING, until the schema is the newest (false).
    database_migrate: bool = Field(True, alias="DATABASE_MIGRATE")
    # PostgreSQL by parts (docker-compose sets these): a password may hold @ / : % and still
    # make a valid URL. Used when DATABASE_URL is not set.
    postgres_host: str | None = Field(None, alias="POSTGRES_HOST")
    postgres_port: int = Field(5432, ge=1, le=65535, alias="POSTGRES_PORT")
    postgres_user: str = Field("tierwriter", alias="POSTGRES_USER")
    postgres_password: SecretStr | None = Field(None, alias="POSTGRES_PASSWORD")
    postgres_db: str = Field("tierwriter", alias="POSTGRES_DB")

    @model_validator(mode="after")
    def _url_from_parts(self) -> Settings:
        if self.postgres_host and "database_url" not in self.model_fields_set:
            self.database_url = URL.create(
                "postgresql+psycopg2",
                username=self.postgres_user,
                password=self.postgres_password.get_secret_value()
                if self.postgres_password
                else None,
                host=self.postgres_host,
                port=self.postgres_port,
                database=self.postgres_db,
            ).render_as_string(hide_password=False)
        return self
