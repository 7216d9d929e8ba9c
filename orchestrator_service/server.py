"""Start orchestrator_service: build_server for tests and the local stack, serve for production."""

from __future__ import annotations

from generator_service.client import GeneratorClient
from orchestrator_service.auth import Authenticator
from orchestrator_service.config import Settings
from orchestrator_service.runner import JobRunner
from orchestrator_service.servicer import OrchestratorServicer
from persistence_service.client import PersistenceClient
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

SERVICE_NAME = "tierwriter.orchestrator.v1.OrchestratorService"


def build_server(settings: Settings, address: str | None = None) -> runtime.RunningServer:
    """Start serving on `address` (default ORCHESTRATOR_ADDRESS)."""
    token = settings.service_token_value()
    tls = None
    if settings.tls_cert_file and settings.tls_key_file:
        tls = runtime.read_tls_files(settings.tls_cert_file, settings.tls_key_file)
    persistence = PersistenceClient(settings.persistence_address, service_token=token)
    generator = GeneratorClient(settings.generator_address, service_token=token)
    try:
        runner = JobRunner(settings, persistence, generator)
        authenticator = Authenticator(
            persistence, settings.signing_secret_value(), settings.token_ttl_seconds
        )
        return runtime.build_server(
            address or settings.orchestrator_address,
            [
                (
                    pb_grpc.add_OrchestratorServiceServicer_to_server,
                    OrchestratorServicer(runner, persistence, authenticator),
                    SERVICE_NAME,
                )
            ],
            max_workers=settings.orchestrator_threads,
            # Closed in reverse: running jobs wind down while their clients still work.
            closers=[persistence.close, generator.close, runner.close],
            tls=tls,
        )
    except BaseException:
        persistence.close()
        generator.close()
        raise


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    runtime.configure_logging(settings.log_level)
    runtime.serve_until_stopped(build_server(settings), "orchestrator_service")
