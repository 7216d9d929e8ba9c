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
    # The openai SDK's own retries: 429, 5xx, timeouts and connection errors, honouring Retry-After.
    llm_max_retries: int = Field(3, ge=0, alias="LLM_MAX_RETRIES")
    # gRPC threads: each GenerateArticles stream holds one; articles run on the stream's own pool.
    generator_threads: int = Field(32, ge=2, alias="GENERATOR_THREADS")
