"""Settings of orchestrator_service, from the environment."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from tierwriter.refused_calls import canonical_ip
from tierwriter.settings import ServiceSettings


class Settings(ServiceSettings):
    """Every knob of orchestrator_service, typed, with its default."""

    orchestrator_address: str = Field("127.0.0.1:50051", alias="ORCHESTRATOR_ADDRESS")
    generator_address: str = Field("127.0.0.1:50052", alias="GENERATOR_ADDRESS")
    persistence_address: str = Field("127.0.0.1:50053", alias="PERSISTENCE_ADDRESS")
    # Articles in flight per job unless the job file sets max_workers; 1 = strictly sequential.
    concurrent_workers: int = Field(5, ge=1, le=256, alias="CONCURRENT_WORKERS")
    output_dir: Path = Field(Path("output"), alias="OUTPUT_DIR")
    # OUTPUT_DIR as the user sees it, for the paths the orchestrator reports: in a container,
    # the host folder it is mounted from (docker-compose sets ./output). Unset: OUTPUT_DIR.
    public_output_dir: Path | None = Field(None, alias="PUBLIC_OUTPUT_DIR")
    # Jinja2 templates: its article.html/index.html replace the bundled ones, its subfolders are
    # template sets that sites name.
    templates_dir: Path | None = Field(None, alias="TEMPLATES_DIR")
    # After a cancel, articles in flight get this long to finish before they are recorded as
    # failed with reason "cancelled" (checked before each model call).
    cancel_grace_seconds: float = Field(30.0, gt=0, alias="CANCEL_GRACE_SECONDS")
    # A run whose first this many articles all fail at the same stage with the same kind of
    # error, none written between, is stopped: the endpoint cannot serve the job (0: never).
    stop_after_same_failures: int = Field(5, ge=0, le=1000, alias="STOP_AFTER_SAME_FAILURES")
    # When the generator is lost mid-tier, wait for one to answer again this many times (with
    # exponential backoff from 1 s, at most 30 s apart) before the job fails.
    generator_reconnect_attempts: int = Field(6, ge=0, le=30, alias="GENERATOR_RECONNECT_ATTEMPTS")
    # Threads for short calls (login, get, list, cancel, submit); watch streams have their own.
    orchestrator_threads: int = Field(16, ge=2, alias="ORCHESTRATOR_THREADS")
    # Open WatchJob streams at most; one more gets RESOURCE_EXHAUSTED and never takes a thread
    # that short calls need.
    orchestrator_max_watches: int = Field(256, ge=1, le=10_000, alias="ORCHESTRATOR_MAX_WATCHES")
    # A user's jobs beyond this many running ones wait as `queued`, in order (0: no limit).
    jobs_per_user: int = Field(2, ge=0, le=1000, alias="ORCHESTRATOR_JOBS_PER_USER")
    # Jobs one orchestrator runs at once; more wait queued (or for another orchestrator).
    max_running_jobs: int = Field(32, ge=1, le=1000, alias="ORCHESTRATOR_MAX_JOBS")
    # An orchestrator holds a lease on each job it runs and renews it every third of this; when
    # it dies, another orchestrator on the database takes the job over once the lease expires.
    lease_seconds: float = Field(30.0, ge=1, le=3600, alias="ORCHESTRATOR_LEASE_SECONDS")
    # How long a job's calls to persistence are retried while it (or its database) is down.
    database_wait_seconds: float = Field(120.0, ge=0, alias="DATABASE_WAIT_SECONDS")
    # Signs session tokens (HMAC-SHA256). Unset: persistence generates one once and keeps it, so
    # every orchestrator replica on one database accepts the others' tokens.
    token_signing_secret: SecretStr | None = Field(
        None, min_length=32, alias="TOKEN_SIGNING_SECRET"
    )
    # How long a token from `tierwriter login` works.
    token_ttl_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600, alias="TOKEN_TTL_SECONDS")
    # The login brake's first delay, after 3 failed logins at an account or 10 from an address;
    # each further failure doubles it, up to 5 minutes.
    login_delay_seconds: float = Field(1.0, gt=0, le=300, alias="LOGIN_DELAY_SECONDS")
    # Addresses of proxies in front of the orchestrator (comma-separated IPs): a call from one
    # of them is taken to come from the last address it appended to `x-forwarded-for`, so the
    # login brake slows down the client instead of everyone behind the proxy.
    trusted_proxies: str = Field("", alias="ORCHESTRATOR_TRUSTED_PROXIES")
    # Serve TLS with this PEM certificate (chain) and key; both or neither.
    tls_cert_file: Path | None = Field(None, alias="TLS_CERT_FILE")
    tls_key_file: Path | None = Field(None, alias="TLS_KEY_FILE")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_ip_addresses(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_address(part)
            except ValueError:
                raise ValueError("must be IP addresses, separated by commas") from None
        return value

    def trusted_proxy_addresses(self) -> frozenset[str]:
        """ORCHESTRATOR_TRUSTED_PROXIES as a set, in the form gRPC's peer() shows them."""
        named = (canonical_ip(p.strip()) for p in self.trusted_proxies.split(",") if p.strip())
        return frozenset(ip for ip in named if ip)  # the validator let only IPs through

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE: set both to serve TLS, or neither")
        return self

    def signing_secret_value(self) -> str | None:
        """TOKEN_SIGNING_SECRET as text, for the token signer only (never logged)."""
        return self.token_signing_secret.get_secret_value() if self.token_signing_secret else None

    def shown_output_dir(self) -> Path:
        """Where the user finds OUTPUT_DIR."""
        return self.public_output_dir or self.output_dir
