"""The generator's plain data: what a batch is, what an article task is, what events say."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


@dataclass(frozen=True)
class ProjectInfo:
    """What the prompts need to know about the project."""

    project_id: int
    keyword: str
    entities: list[str] = field(default_factory=list)
    related_searches: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TierShape:
    """The bounds every article of a tier must respect, as the user wrote them."""

    name: str
    count: int
    min_word_count: int
    max_word_count: int
    min_h2: int
    max_h2: int
    min_h3: int
    max_h3: int


@dataclass(frozen=True)
class StageModels:
    """The model per stage; already resolved against the configured default."""

    title: str
    outline: str
    content: str


@dataclass(frozen=True)
class BatchContext:
    """Everything shared by the articles of one GenerateArticles stream."""

    job_id: int
    project: ProjectInfo
    tier: TierShape
    models: StageModels
    max_workers: int
    continue_on_error: bool
    replace_failed: bool = False  # a resume retrying failed articles
    # USD the batch may still spend (the job's max_cost_usd less what it spent before); 0: no
    # limit. Articles that would pass it are recorded as skipped.
    budget_usd: float = 0.0
    # The lease epoch the orchestrator runs the job under: every save carries it (fencing).
    lease_epoch: int = 0


@dataclass(frozen=True)
class ArticleTask:
    """One article to write."""

    index: int
    title: str
    site: str = ""
    tier: str = ""  # in a batch of several tiers, which; "": the batch's first


class EventKind(Enum):
    """The steps an article goes through; names match the proto enum's suffixes."""

    STARTED = "STARTED"
    OUTLINE_STARTED = "OUTLINE_STARTED"
    OUTLINE_DONE = "OUTLINE_DONE"
    CONTENT_STARTED = "CONTENT_STARTED"
    CONTENT_DONE = "CONTENT_DONE"
    AUGMENTING = "AUGMENTING"
    AUGMENTED = "AUGMENTED"
    SAVED = "SAVED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    OUTLINE_REPAIRING = "OUTLINE_REPAIRING"
    RETRYING = "RETRYING"
    RETRY_SUCCEEDED = "RETRY_SUCCEEDED"
    THROTTLED = "THROTTLED"
    CONTENT_REJECTED = "CONTENT_REJECTED"
    SHORTENING = "SHORTENING"


@dataclass(frozen=True)
class ArticleEvent:
    """One step of one article; only the fields of its kind are set."""

    kind: EventKind
    tier: str
    index: int
    title: str = ""
    site: str = ""
    h2_count: int = 0
    h3_count: int = 0
    outline_fix: str = ""
    word_count: int = 0
    min_word_count: int = 0
    article_id: int = 0
    status: str = ""
    stage: str = ""
    error: str = ""
    attempt: int = 0
    retry_delay: float = 0.0
    fatal: bool = False  # FAILED by an API error that ends the job (key, model, endpoint)
    error_type: str = ""  # FAILED: the error's class name
    endpoint: str = ""  # FAILED: the model API the generator called
    cost_usd: float = 0.0
    tokens: int = 0  # prompt + completion (SAVED, FAILED)
    concurrency_before: int = 0  # THROTTLED
    concurrency_after: int = 0
    model: str = ""  # THROTTLED
    restored: bool = False  # THROTTLED: the throttle was lifted
    gate: str = ""  # CONTENT_REJECTED, FAILED: the quality gate that fired (gates.py)
    quality_gates: str = ""  # SAVED, FAILED: every gate that fired, comma-separated
    max_word_count: int = 0  # SHORTENING

    @property
    def terminal(self) -> bool:
        """SAVED, FAILED and SKIPPED end an article's events."""
        return self.kind in (EventKind.SAVED, EventKind.FAILED, EventKind.SKIPPED)


@dataclass
class ArticleRecord:
    """An article's terminal record as the generator hands it to persistence."""

    job_id: int
    project_id: int
    tier: str
    article_index: int
    keyword: str
    title: str
    status: str
    outline: list[dict[str, Any]] | None = None
    content: str = ""
    word_count: int = 0
    error_stage: str = ""
    error: str = ""
    error_traceback: str = ""  # a failure's: for the job's owner, never in the events
    site: str = ""
    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0  # 429 answers on the way
    content_model: str = ""
    asked_words: int = 0  # the lower word bound the content prompt asked for
    draft_words: int = 0  # words of the content reply, before any augmentation
    quality_gates: str = ""  # the content gates that fired, comma-separated (gates.py)


class ArticleSaver(Protocol):
    """Where terminal records go; returns (record id, created). Must be thread-safe. A stored
    skipped record of the same key is replaced, and with `replace_failed` a failed one too.
    Raises LeaseLostError when `lease_epoch` is no longer the job's (nothing is stored)."""

    def save(
        self, record: ArticleRecord, replace_failed: bool = False, lease_epoch: int = 0
    ) -> tuple[int, bool]: ...


class InvalidRequestError(ValueError):
    """A request breaks a rule; the message names the field and the problem."""


MAX_WORKERS_LIMIT = 256


def validate_batch(batch: BatchContext, tier_field: str = "settings.tier") -> None:
    """Raise InvalidRequestError for settings no article could be written with; `tier_field`
    is where the tier came from, for the message."""
    tier = batch.tier
    checks = [
        (batch.job_id > 0, "settings.job_id: must be a positive job id"),
        (
            1 <= batch.max_workers <= MAX_WORKERS_LIMIT,
            f"settings.max_workers: must be between 1 and {MAX_WORKERS_LIMIT}, "
            f"got {batch.max_workers}",
        ),
        (bool(tier.name), f"{tier_field}.name: must not be empty"),
        (bool(batch.project.keyword.strip()), "settings.project.main_keyword: must not be empty"),
        (
            0 < tier.min_word_count <= tier.max_word_count,
            f"{tier_field}: need 0 < min_word_count <= max_word_count",
        ),
        (0 < tier.min_h2 <= tier.max_h2, f"{tier_field}: need 0 < min_h2_tags <= max_h2_tags"),
        (0 <= tier.min_h3 <= tier.max_h3, f"{tier_field}: need 0 <= min_h3_tags <= max_h3_tags"),
        (batch.budget_usd >= 0, "settings.budget_usd: must not be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidRequestError(message)


def validate_task(task: ArticleTask, tier: TierShape) -> None:
    """Raise InvalidRequestError for an article request that does not fit its tier."""
    if not 0 <= task.index < tier.count:
        raise InvalidRequestError(
            f"article.article_index: must be between 0 and {tier.count - 1}, got {task.index}"
        )
    if not task.title.strip():
        raise InvalidRequestError(f"article.title: article {task.index} has an empty title")
