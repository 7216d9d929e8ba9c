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
    # A folder whose article.html replaces the bundled template.
    templates_dir: Path | None = Field(None, alias="TEMPLATES_DIR")
    orchestrator_threads: int = Field(16, ge=2, alias="ORCHESTRATOR_THREADS")
