"""Settings of generator_service, from the environment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from generator_service.llm.limits import ModelLimits
from generator_service.outline import HEADING_MAX_CHARS
from generator_service.similar_titles import TITLE_SIMILARITY
from generator_service.titles import DEFAULT_LENGTH
from tierwriter.settings import ServiceSettings


class ModelLimitsOverride(BaseModel):
    """One model's entry in LLM_MODEL_LIMITS; what it leaves out comes from the defaults."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    max_output_tokens: int | None = Field(None, ge=16)


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
    # The provider account's limits per model (0: none): requests and tokens (prompt +
    # max_tokens) per minute, shared by every job and every generator on the database.
    llm_rpm_limit: int = Field(0, ge=0, alias="LLM_RPM_LIMIT")
    llm_tpm_limit: int = Field(0, ge=0, alias="LLM_TPM_LIMIT")
    # While the shared limits cannot be reached (persistence away) a generator keeps to its
    # share of them: the limit over the generators seen drawing on it, or over this many
    # before it has seen any.
    llm_limit_fallback_replicas: int = Field(4, ge=1, le=1000, alias="LLM_LIMIT_FALLBACK_REPLICAS")
    # No call asks for more max_tokens than this (budgets fit each call below it).
    llm_max_output_tokens: int = Field(8192, ge=16, alias="LLM_MAX_OUTPUT_TOKENS")
    # Per-model overrides, JSON: {"gpt-4o": {"rpm": 500, "tpm": 30000, "max_output_tokens": 16384}}
    llm_model_limits: dict[str, ModelLimitsOverride] = Field(
        default_factory=dict, alias="LLM_MODEL_LIMITS"
    )
    # JSON prices, USD per million tokens: {"my-model": {"input": 0.5, "output": 1.5}}.
    llm_prices_file: str | None = Field(None, alias="LLM_PRICES_FILE")
    # Outline headings longer than this (characters) are sentences, not headings: dropped (too
    # few left and the outline is asked for once more).
    outline_heading_max_chars: int = Field(
        HEADING_MAX_CHARS, ge=20, le=500, alias="OUTLINE_HEADING_MAX_CHARS"
    )
    # Titles outside this length (characters) are dropped and asked for again.
    title_min_chars: int = Field(DEFAULT_LENGTH[0], ge=1, alias="TITLE_MIN_CHARS")
    title_max_chars: int = Field(DEFAULT_LENGTH[1], ge=1, le=1000, alias="TITLE_MAX_CHARS")
    # Titles sharing this share of their content words (token Jaccard) are the same title.
    title_similarity: float = Field(TITLE_SIMILARITY, gt=0, le=1, alias="TITLE_SIMILARITY")

    def model_limits(self) -> tuple[ModelLimits, dict[str, ModelLimits]]:
        """The default limits and each overridden model's, defaults filled in."""
        default = ModelLimits(self.llm_rpm_limit, self.llm_tpm_limit, self.llm_max_output_tokens)
        return default, {
            model: ModelLimits(
                default.rpm if o.rpm is None else o.rpm,
                default.tpm if o.tpm is None else o.tpm,
                o.max_output_tokens or default.max_output_tokens,
            )
            for model, o in self.llm_model_limits.items()
        }
