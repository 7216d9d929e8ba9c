"""Settings of orchestrator_service, from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tierwriter.settings import ServiceSettings


class Settings(ServiceSettings):
    """Every knob of orchestrator_service, typed, with its default."""

    orchestrator_address: str = Field("127.0.0.1:50051", alias="ORCHESTRATOR_ADDRESS")
    generator_address: str = Field("127.0.0.1:50052", alias="GENERATOR_ADDRESS")
    persistence_address: str = Field("127.0.0.1:50053", alias="PERSISTENCE_ADDRESS")
    # Articles in flight per job unless the job file sets max_workers; 1 = strictly sequential.
    concurrent_workers: int = Field(5, ge=1, le=256, alias="CONCURRENT_WORKERS")
    output_dir: Path = Field(Path("output"), alias="OUTPUT_DIR")
    # Jinja2 templates: its article.html/index.html replace the bundled ones, its subfolders are
    # template sets that sites name.
    templates_dir: Path | None = Field(None, alias="TEMPLATES_DIR")
    # After a cancel, articles in flight get this long to finish before they are recorded as
    # failed with reason "cancelled" (checked before each model call).
    cancel_grace_seconds: float = Field(30.0, gt=0, alias="CANCEL_GRACE_SECONDS")
    # When the generator is lost mid-tier, wait for one to answer again this many times (with
    # exponential backoff from 1 s, at most 30 s apart) before the job fails.
    generator_reconnect_attempts: int = Field(6, ge=0, le=30, alias="GENERATOR_RECONNECT_ATTEMPTS")
    orchestrator_threads: int = Field(16, ge=2, alias="ORCHESTRATOR_THREADS")
