"""Start generator_service: build_server for tests and the local stack, serve for production."""

from __future__ import annotations

import logging
from collections.abc import Callable

from generator_service.calibration import WordTargets
from generator_service.config import Settings
from generator_service.llm import LlmClient, OpenAiLlm
from generator_service.llm.limits import ProviderGate
from generator_service.llm.pricing import PriceTable
from generator_service.llm.retry import RetryingLlm, RetryPolicy
from generator_service.llm.simulator import LlmSimulator
from generator_service.pipeline import ArticlePipeline
from generator_service.saver import PersistenceSaver
from generator_service.servicer import GeneratorServicer
from generator_service.titles import TitleWriter
from persistence_service.client import PersistenceClient
from tierwriter import runtime
from tierwriter.generator.v1 import generator_service_pb2_grpc as pb_grpc
from tierwriter.service_auth import ServiceTokenInterceptor, required_token

log = logging.getLogger(__name__)
SERVICE_NAME = "tierwriter.generator.v1.GeneratorService"
# A key the SDK accepts for endpoints that need none (vLLM, the simulator); not a secret.
NO_KEY = "no-key-needed"


def build_llm(settings: Settings, closers: list[Callable[[], None]]) -> OpenAiLlm:
    """The openai-SDK client for the configured endpoint; with neither OPENAI_API_KEY nor
    OPENAI_BASE_URL set, an embedded simulator is started and used."""
    base_url = settings.openai_base_url
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else NO_KEY
    if settings.openai_api_key is None and base_url is None:
        simulator = LlmSimulator().start()
        closers.append(simulator.stop)
        base_url = simulator.base_url
        log.info("no OPENAI_API_KEY set: using the bundled LLM simulator at %s", base_url)
    llm = OpenAiLlm(base_url, key, settings.llm_timeout_seconds)
    closers.append(llm.close)
    return llm


def build_server(
    settings: Settings, address: str | None = None, llm: LlmClient | None = None
) -> runtime.RunningServer:
    """Start serving on `address` (default GENERATOR_ADDRESS); articles are saved through
    PERSISTENCE_ADDRESS."""
    closers: list[Callable[[], None]] = []
    listen = address or settings.generator_address
    token = required_token(settings.service_token_value(), listen, "generator_service")
    persistence = PersistenceClient(
        settings.persistence_address, service_token=settings.service_token_value()
    )
    closers.append(persistence.close)
    try:
        policy = RetryPolicy(
            attempts=settings.llm_max_retries + 1,
            base_delay=settings.llm_backoff_seconds,
            max_delay=settings.llm_backoff_max_seconds,
        )
        default_limits, model_limits = settings.model_limits()
        gate = ProviderGate(default_limits, model_limits)
        model = RetryingLlm(llm or build_llm(settings, closers), policy, gate=gate)
        prices = PriceTable.with_file(settings.llm_prices_file)
        targets = WordTargets(settings.word_count_compensation, persistence.word_samples)
        saver = PersistenceSaver(persistence)
        closers.append(saver.close)  # closers run last first: the saves end before the channel
        pipeline = ArticlePipeline(model, saver, targets, prices)
        titles = TitleWriter(model, prices, (settings.title_min_chars, settings.title_max_chars))
        servicer = GeneratorServicer(pipeline, titles, settings.default_model)
        return runtime.build_server(
            listen,
            [(pb_grpc.add_GeneratorServiceServicer_to_server, servicer, SERVICE_NAME)],
            max_workers=settings.generator_threads,
            interceptors=[ServiceTokenInterceptor(token, [SERVICE_NAME])] if token else [],
            closers=closers,
        )
    except BaseException:
        for close in reversed(closers):
            close()
        raise


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    runtime.configure_logging(settings.log_level)
    runtime.serve_until_stopped(build_server(settings), "generator_service")
