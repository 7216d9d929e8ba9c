"""Start orchestrator_service: build_server for tests and the local stack, serve for production."""

from __future__ import annotations

from orchestrator_service.auth import Authenticator, LoginBrake
from orchestrator_service.config import Settings
from orchestrator_service.dispatch import GeneratorPool
from orchestrator_service.interceptors import Authentication, ErrorCodes
from orchestrator_service.runner import JobRunner
from orchestrator_service.scheduler import JobScheduler, new_orchestrator_id
from orchestrator_service.servicer import OrchestratorServicer
from persistence_service.client import PersistenceClient
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

SERVICE_NAME = "tierwriter.orchestrator.v1.OrchestratorService"
# A public call rides out a persistence blip for this long; the CLI's deadline is 30 s.
API_RETRY_SECONDS = 20.0


def build_server(settings: Settings, address: str | None = None) -> runtime.RunningServer:
    """Start serving on `address` (default ORCHESTRATOR_ADDRESS)."""
    token = settings.service_token_value()
    tls = None
    if settings.tls_cert_file and settings.tls_key_file:
        tls = runtime.read_tls_files(settings.tls_cert_file, settings.tls_key_file)
    persistence = PersistenceClient(
        settings.persistence_address, service_token=token, retry_seconds=API_RETRY_SECONDS
    )
    # A job's own calls wait out a persistence restart or a database outage.
    job_persistence = PersistenceClient(
        settings.persistence_address,
        service_token=token,
        retry_seconds=settings.database_wait_seconds,
    )
    # The scheduler's calls fail fast instead: a tick that finds persistence down is simply
    # tried again at the next one, and stopping never waits for a stuck call.
    scheduler_persistence = PersistenceClient(
        settings.persistence_address,
        deadline=max(1.0, settings.lease_seconds / 3),
        service_token=token,
        wait_for_ready=False,
    )
    generators = GeneratorPool(settings.generator_address, service_token=token)
    try:
        scheduler: JobScheduler | None = None
        runner = JobRunner(
            settings,
            job_persistence,
            generators,
            new_orchestrator_id(),
            on_finished=lambda: scheduler.wake() if scheduler else None,
        )
        scheduler = JobScheduler(runner, scheduler_persistence, settings)
        authenticator = Authenticator(
            persistence,
            settings.signing_secret_value(),
            settings.token_ttl_seconds,
            brake=LoginBrake(base_delay=settings.login_delay_seconds),
            trusted_proxies=settings.trusted_proxy_addresses(),
        )
        servicer = OrchestratorServicer(
            runner, scheduler, persistence, authenticator, settings.orchestrator_max_watches
        )
        server = runtime.build_server(
            address or settings.orchestrator_address,
            [(pb_grpc.add_OrchestratorServiceServicer_to_server, servicer, SERVICE_NAME)],
            # Watch streams take threads of their own: short calls always find one.
            max_workers=settings.orchestrator_threads + settings.orchestrator_max_watches,
            # Outermost first: ErrorCodes also maps what Authentication raises.
            interceptors=[ErrorCodes(), Authentication(authenticator)],
            # Closed in reverse: watches end, then running jobs are handed off while the
            # clients still work.
            closers=[
                persistence.close,
                job_persistence.close,
                scheduler_persistence.close,
                generators.close,
                scheduler.stop,
                servicer.stop_watches,
            ],
            tls=tls,
        )
    except BaseException:
        persistence.close()
        job_persistence.close()
        scheduler_persistence.close()
        generators.close()
        raise
    scheduler.start()
    return server


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    runtime.configure_logging(settings.log_level)
    runtime.serve_until_stopped(build_server(settings), "orchestrator_service")
