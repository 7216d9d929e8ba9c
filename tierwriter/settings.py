"""The base of every service's Settings: environment variables by their documented names."""

from __future__ import annotations

import sys
from typing import TypeVar

import pydantic_settings
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="ServiceSettings")
EXIT_BAD_SETTING = 2  # as the CLI's bad input: nothing was started


class BadSettingError(ValueError):
    """The environment has a setting the service cannot run with; one line per problem, each
    naming the variable (never its value: it may be a secret)."""


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


def load(cls: type[S]) -> S:
    """The settings from the environment; BadSettingError naming each rejected variable."""
    try:
        return cls()
    except pydantic_settings.SettingsError as e:  # a JSON value that does not parse
        raise BadSettingError(str(e)) from None
    except ValidationError as e:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or cls.__name__}: {error['msg']}"
            for error in e.errors(include_input=False, include_url=False)
        ]
        raise BadSettingError("; ".join(problems)) from None


def load_or_exit(cls: type[S]) -> S:
    """load(), or one `Error:` line on stderr and exit 2: what a service's main wants."""
    try:
        return load(cls)
    except BadSettingError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_SETTING) from None
