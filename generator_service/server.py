"""Start generator_service: build_server for tests and the local stack, serve for production."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable

from generator_service.calibration import WordTargets
from generator_service.config import Settings
from generator_service.llm import LlmClient, OpenAiLlm
from generator_service.llm.limits import BucketFactory, ProviderGate, SharedBucket
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
from tierwriter.persistence.v1 import persistence_service_pb2 as pb_persistence
from tierwriter.service_auth import ServiceTokenInterceptor, required_token

log = logging.getLogger(__name__)
SERVICE_NAME = "tierwriter.generator.v1.GeneratorService"
# A key the SDK accepts for endpoints that need none (vLLM, the simulator); not a secret.
NO_KEY = "no-key-needed"
FAST_CALL_SECONDS = 5.0


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
    log.info("model endpoint %s, default model %s", llm.endpoint, settings.default_model)
    return llm


def shared_buckets(
    settings: Settings,
    endpoint: str,
    reserve_rate: Callable[[str, float, float, str], pb_persistence.ReserveRateResponse],
) -> BucketFactory:
    """Each model's limits as buckets every generator on the database shares, one per endpoint
    (`https://api.openai.com/v1 gpt-4o rpm`): the account's limit, however many replicas."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def reserve(name: str, per_minute: float, amount: float, who: str) -> tuple[float, int]:
        answer = reserve_rate(name, per_minute, amount, who)
        return answer.wait_seconds, answer.holders

    return lambda model, kind, per_minute: SharedBucket(
        f"{endpoint} {model} {kind}",
        per_minute,
        reserve,
        holder,
        settings.llm_limit_fallback_replicas,
    )


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
    # Lease checks and shared rate limits, before model calls, fail fast: persistence away counts
    # as a lease held (the saves are fenced anyway) and as a fall back to this generator's share
    # of the limits; a model call should not wait half a minute to learn that.
    fast = PersistenceClient(
        settings.persistence_address,
        deadline=FAST_CALL_SECONDS,
        service_token=settings.service_token_value(),
        wait_for_ready=False,
    )
    closers.append(fast.close)
    try:
        policy = RetryPolicy(
            attempts=settings.llm_max_retries + 1,
            base_delay=settings.llm_backoff_seconds,
            max_delay=settings.llm_backoff_max_seconds,
        )
        client = llm or build_llm(settings, closers)
        endpoint = getattr(client, "endpoint", "custom")  # without credentials
        default_limits, model_limits = settings.model_limits()
        gate = ProviderGate(
            default_limits,
            model_limits,
            buckets=shared_buckets(settings, endpoint, fast.reserve_rate),
        )
        model = RetryingLlm(client, policy, gate=gate)
        prices = PriceTable.with_file(settings.llm_prices_file)
        targets = WordTargets(settings.word_count_compensation, persistence.word_samples)
        saver = PersistenceSaver(persistence)
        closers.append(saver.close)  # closers run last first: the saves end before the channel
        pipeline = ArticlePipeline(
            model, saver, targets, prices, endpoint, settings.outline_heading_max_chars
        )
        titles = TitleWriter(
            model,
            prices,
            (settings.title_min_chars, settings.title_max_chars),
            settings.title_similarity,
        )
        servicer = GeneratorServicer(
            pipeline, titles, settings.default_model, check_lease=fast.check_lease
        )
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
