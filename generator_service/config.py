"""Settings of generator_service, from the environment."""

from __future__ import annotations

from pydantic import Field, SecretStr

from tierwriter.settings import ServiceSettings


class Settings(ServiceSettings):
    """Every knob of generator_service, typed, with its default."""

    generator_address: str = Field("127.0.0.1:50052", alias="GENERATOR_ADDRESS")
    persistence_address: str = Field("127.0.0.1:50053", alias="PERSISTENCE_ADDRESS")
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY")
    default_model: str = Field("gpt-4o-mini", alias="DEFAULT_MODEL")
    # Added to both word bounds in the content prompt: models undershoot by ~150-200 words.
    word_count_compensation: int = Field(200, ge=0, alias="WORD_COUNT_COMPENSATION")
    llm_timeout_seconds: float = Field(180.0, gt=0, alias="LLM_TIMEOUT_SECONDS")
    # Retries of a model call after 429, 5xx, timeouts and lost connections (0: none).
    llm_max_retries: int = Field(3, ge=0, le=20, alias="LLM_MAX_RETRIES")
    # Exponential backoff with full jitter: the n-th retry waits up to base * 2^(n-1) seconds,
    # at most the maximum, and never less than the server's Retry-After.
    llm_backoff_seconds: float = Field(1.0, gt=0, alias="LLM_BACKOFF_SECONDS")
    llm_backoff_max_seconds: float = Field(30.0, gt=0, alias="LLM_BACKOFF_MAX_SECONDS")
    # gRPC threads: each GenerateArticles stream holds one; articles run on the stream's own pool.
    generator_threads: int = Field(32, ge=2, alias="GENERATOR_THREADS")
