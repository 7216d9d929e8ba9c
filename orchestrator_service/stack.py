"""LocalStack: all three services (and the simulator when no API key is set) on this machine.
`tierwriter up`, `tierwriter demo`, the integration tests and the benchmark all start tierwriter
this one way: in this process (threads: quick to start, what tests and the demo use), or with
`processes=True` one process per service, so that the three use every core instead of sharing
one interpreter lock (`tierwriter up`, the benchmark)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
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
from tierwriter import healthcheck, runtime
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
    # One process per service (python -m <service>), each started with this environment plus
    # the settings above; False: threads of this process.
    processes: bool = False
    # With processes: this many generator processes, each on a port of its own, all given to
    # the orchestrator as one GENERATOR_ADDRESS (ipv4:a,b,c), as a cluster's DNS name would be.
    generators: int = 1

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
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # by package

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
        if c.processes:
            self._start_processes()
            return
        if c.generators != 1:
            raise ValueError("StackConfig.generators: more than one generator needs processes=True")
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

    def _start_processes(self) -> None:
        """persistence, generator, orchestrator: each `python -m` its package, in that order,
        each SERVING before the next starts (the next one's first calls go to it)."""
        c = self.config
        env = {
            **os.environ,
            "SERVICE_TOKEN": self.service_token,
            runtime.PARENT_PID_VARIABLE: str(os.getpid()),  # they stop if we are killed
        }
        if c.simulator is not None or not (
            os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")
        ):
            self.simulator = LlmSimulator(c.simulator or SimulatorConfig()).start()
            env.pop("OPENAI_API_KEY", None)
            env["OPENAI_BASE_URL"] = self.simulator.base_url
        self.persistence_address = _bindable(c.persistence_address, "PERSISTENCE_ADDRESS")
        generators = [_bindable(c.generator_address, "GENERATOR_ADDRESS")]
        generators += [_bindable(f"{generators[0].rpartition(':')[0]}:0", "GENERATOR_ADDRESS")
                       for _ in range(c.generators - 1)]  # fmt: skip
        self.generator_address = generators[0] if len(generators) == 1 else (
            "ipv4:" + ",".join(generators)
        )  # fmt: skip
        self.orchestrator_address = _bindable(c.orchestrator_address, "ORCHESTRATOR_ADDRESS")
        env.update(
            PERSISTENCE_ADDRESS=self.persistence_address,
            GENERATOR_ADDRESS=self.generator_address,
            ORCHESTRATOR_ADDRESS=self.orchestrator_address,
            **{
                name: str(value)
                for name, value in {
                    "DATABASE_URL": c.database_url,
                    "OUTPUT_DIR": c.output_dir,
                    "TEMPLATES_DIR": c.templates_dir,
                    "CONCURRENT_WORKERS": c.concurrent_workers,
                    "WORD_COUNT_COMPENSATION": c.word_count_compensation,
                    "TIERWRITER_ADMIN_PASSWORD": c.admin_password,
                }.items()
                if value is not None
            },
            **_environment(GeneratorSettings, c.generator_settings),
            **_environment(OrchestratorSettings, c.orchestrator_settings),
        )
        # Keyed by package; the second generator on is "generator_service.2", and so on.
        services = [
            ("persistence_service", self.persistence_address),
            *(
                (f"generator_service{f'.{n}' if n > 1 else ''}", address)
                for n, address in enumerate(generators, 1)
            ),
            ("orchestrator_service", self.orchestrator_address),
        ]
        for name, address in services:
            package = name.partition(".")[0]
            # Output and logs go where ours go; persistence prints a generated admin password.
            # A generator listens on its own address; the orchestrator is given them all.
            own = {"GENERATOR_ADDRESS": address} if package == "generator_service" else {}
            process = subprocess.Popen([sys.executable, "-m", package], env={**env, **own})
            self._processes[name] = process
            _wait_until_serving(process, package, address)

    def service_pids(self) -> dict[str, int]:
        """The service processes' PIDs by name: the package's, the second generator on
        "generator_service.2" … (processes=True; empty otherwise)."""
        return {package: process.pid for package, process in self._processes.items()}

    def stop(self, grace: float = 5.0) -> None:
        """Stop every server this stack started (in-flight calls get `grace` seconds), then the
        simulator."""
        while self._running:
            self._running.pop().stop(grace)
        while self._processes:
            _package, process = self._processes.popitem()  # the last started first
            process.send_signal(signal.SIGTERM)  # each stops gracefully, as in production
            try:
                process.wait(timeout=grace + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None


# How long a service process may take to import, migrate the database and answer SERVING.
START_SECONDS = 120.0


def _bindable(address: str | None, variable: str) -> str:
    """The address a service process listens on: the given one, else its *_ADDRESS setting; a
    free port for port 0 (a child process could not tell us which one it picked)."""
    address = address or os.environ.get(variable) or DEFAULT_ADDRESSES[variable]
    host, _, port = address.rpartition(":")
    if port != "0":
        return address
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"{host}:{probe.getsockname()[1]}"


DEFAULT_ADDRESSES = {
    "PERSISTENCE_ADDRESS": PersistenceSettings.model_fields["persistence_address"].default,
    "GENERATOR_ADDRESS": GeneratorSettings.model_fields["generator_address"].default,
    "ORCHESTRATOR_ADDRESS": OrchestratorSettings.model_fields["orchestrator_address"].default,
}


def _environment(settings: type[Any], values: dict[str, Any]) -> dict[str, str]:
    """Settings given by field name as the environment variables they are read from."""
    fields = settings.model_fields
    return {(fields[name].alias or name.upper()): str(value) for name, value in values.items()}


def _ready(package: str, address: str) -> bool:
    """Whether the service answers SERVING. Only the orchestrator serves TLS (TLS_CERT_FILE):
    the probe speaks it as a container's does when TLS_SERVER_NAME says which name the
    certificate holds; without it the certificate may not name 127.0.0.1, and that the port
    accepts connections is all this can check."""
    roots = healthcheck.trusted_roots() if package == "orchestrator_service" else None
    name = os.environ.get("TLS_SERVER_NAME", "")
    if roots is not None and not name:
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2.0).close()
        except OSError:
            return False
        return True
    return healthcheck.check(address, timeout=2.0, root_certificates=roots, server_name=name)


def _wait_until_serving(process: subprocess.Popen[bytes], package: str, address: str) -> None:
    """Until the service answers SERVING; RuntimeError when it exits first or never does."""
    deadline = time.monotonic() + START_SECONDS
    while not _ready(package, address):
        if process.poll() is not None:
            raise RuntimeError(
                f"{package} exited with code {process.returncode} before serving on {address} "
                "(its messages are above)"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{package} did not serve on {address} within {START_SECONDS:.0f} s")
        time.sleep(0.2)
