"""The base of every service's Settings: environment variables by their documented names."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Reads the environment; fields are set by alias (the variable's name) or by field name;
    empty variables count as unset (compose passes `${VAR:-}` through as ""). No .env file is
    read: the one beside docker-compose.yml is compose's, and its container paths would break
    `tierwriter demo` or `up` run in the same folder."""

    model_config = SettingsConfigDict(
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
        # A rejected value is not repeated in the error: it may be a key, a password or a token.
        hide_input_in_errors=True,
    )

    log_level: str = Field("INFO", alias="LOG_LEVEL")
    # Shared by the three services: generator and persistence answer only calls that carry it.
    service_token: SecretStr | None = Field(None, alias="SERVICE_TOKEN")

    def service_token_value(self) -> str | None:
        """The token as text, for the clients and interceptors that need it (never logged)."""
        return self.service_token.get_secret_value() if self.service_token else None
