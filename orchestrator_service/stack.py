"""LocalStack: all three services (and the simulator when no API key is set) in this process,
on loopback. `tierwriter up`, `tierwriter demo`, the integration tests and the benchmark all start
tierwriter this one way."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import SecretStr

from generator_service.config import Settings as GeneratorSettings
from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from generator_service.server import build_server as build_generator
from orchestrator_service.config import Settings as OrchestratorSettings
from orchestrator_service.server import build_server as build_orchestrator
from persistence_service.config import Settings as PersistenceSettings
from persistence_service.server import bootstrap_admin
from persistence_service.server import build_server as build_persistence
from persistence_service.store import Store
from tierwriter import runtime
from tierwriter.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class StackConfig:
    """What differs between `up`, `demo`, a test and a benchmark run. Unset fields fall back to
    the environment (DATABASE_URL, CONCURRENT_WORKERS, …) and then to the defaults."""

    database_url: str | None = None
    output_dir: Path | None = None
    # Start the bundled simulator with this behaviour; None: use OPENAI_* from the environment,
    # or a default simulator when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set.
    simulator: SimulatorConfig | None = None
    concurrent_workers: int | None = None
    word_count_compensation: int | None = None
    admin_password: str | None = None
    # "127.0.0.1:0" picks free ports (tests); None: the *_ADDRESS settings.
    orchestrator_address: str | None = None
    generator_address: str | None = None
    persistence_address: str | None = None
    templates_dir: Path | None = None
    # Generator settings by field name, over the environment's (e.g. llm_rpm_limit=60).
    generator_settings: dict[str, Any] = field(default_factory=dict)
    # Orchestrator settings by field name, over the environment's (e.g. jobs_per_user=1).
    orchestrator_settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on_loopback(cls, **fields: Any) -> StackConfig:
        """A config whose three services listen on free 127.0.0.1 ports (demo, tests, bench)."""
        free = "127.0.0.1:0"
        return cls(
            orchestrator_address=free, generator_address=free, persistence_address=free, **fields
        )


def _given(**values: object) -> dict[str, object]:
    """Only the values that were set, so the environment fills in the rest."""
    return {k: v for k, v in values.items() if v is not None}


@dataclass
class LocalStack:
    """Starts on __enter__, stops everything it started on __exit__, in reverse order."""

    config: StackConfig = field(default_factory=StackConfig)
    simulator: LlmSimulator | None = None
    store: Store | None = None
    admin_password_generated: str | None = None
    service_token: str = ""  # what tests calling the internal services directly must present
    orchestrator_address: str = ""
    generator_address: str = ""
    persistence_address: str = ""
    _running: list[runtime.RunningServer] = field(default_factory=list)

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self) -> None:
        c = self.config
        # The three services trust each other by this token; generated unless SERVICE_TOKEN is
        # set, so even the in-process stack refuses outside callers of its internal services.
        token = SecretStr(ServiceSettings().service_token_value() or secrets.token_urlsafe(32))
        self.service_token = token.get_secret_value()
        generator_settings = GeneratorSettings(
            **_given(  # type: ignore[arg-type]
                word_count_compensation=c.word_count_compensation, service_token=token
            )
        )
        if c.simulator is not None or (
            generator_settings.openai_api_key is None and generator_settings.openai_base_url is None
        ):
            self.simulator = LlmSimulator(c.simulator or SimulatorConfig()).start()
            generator_settings.openai_base_url = self.simulator.base_url
            generator_settings.openai_api_key = None
        for name, value in c.generator_settings.items():
            setattr(generator_settings, name, value)

        persistence_settings = PersistenceSettings(
            **_given(  # type: ignore[arg-type]
                database_url=c.database_url,
                admin_password=SecretStr(c.admin_password) if c.admin_password else None,
                service_token=token,
            )
        )
        persistence, self.store = build_persistence(persistence_settings, c.persistence_address)
        self._running.append(persistence)
        self.persistence_address = runtime.host_port(
            c.persistence_address or persistence_settings.persistence_address, persistence.port
        )
        self.admin_password_generated = bootstrap_admin(self.store, persistence_settings)

        generator_settings.persistence_address = self.persistence_address
        generator = build_generator(generator_settings, c.generator_address)
        self._running.append(generator)
        self.generator_address = runtime.host_port(
            c.generator_address or generator_settings.generator_address, generator.port
        )

        orchestrator_settings = OrchestratorSettings(
            **_given(  # type: ignore[arg-type]
                concurrent_workers=c.concurrent_workers,
                output_dir=c.output_dir,
                templates_dir=c.templates_dir,
                service_token=token,
            )
        )
        for name, value in c.orchestrator_settings.items():
            setattr(orchestrator_settings, name, value)
        orchestrator_settings.generator_address = self.generator_address
        orchestrator_settings.persistence_address = self.persistence_address
        orchestrator = build_orchestrator(orchestrator_settings, c.orchestrator_address)
        self._running.append(orchestrator)
        self.orchestrator_address = runtime.host_port(
            c.orchestrator_address or orchestrator_settings.orchestrator_address, orchestrator.port
        )

    def stop(self, grace: float = 5.0) -> None:
        """Stop every server this stack started (in-flight calls get `grace` seconds), then the
        simulator."""
        while self._running:
            self._running.pop().stop(grace)
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None
