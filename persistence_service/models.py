"""The database tables, as SQLAlchemy 2.0 typed mappings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# short: still below the minimum after augmentation; long: over the maximum after trimming and
# one request to shorten; skipped: over the job's budget (a resume writes it, replacing the
# record).
ARTICLE_STATUSES = ("generated", "augmented", "short", "long", "failed", "skipped")
# queued: stored, waiting for an orchestrator to claim it (ClaimJobs) under its owner's limit.
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
# A job in one of these is not running; all but `completed` can be resumed.
FINAL_JOB_STATUSES = ("completed", "failed", "cancelled", "interrupted")


def utcnow() -> datetime:
    """Timezone-aware now, so SQLite and PostgreSQL store the same thing."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Project(Base):
    """The subject a job's articles are about; its owner finds it again by name (names are unique
    per owner, so two users never see or block each other's)."""

    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("owner", "name", name="uq_project_owner_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), default="")
    name: Mapped[str] = mapped_column(String(200))
    main_keyword: Mapped[str] = mapped_column(String(500))
    entities: Mapped[list[str]] = mapped_column(JSON, default=list)
    related_searches: Mapped[list[str]] = mapped_column(JSON, default=list)
    money_site_url: Mapped[str] = mapped_column(String(2000), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One entry of a job file, run once."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    owner: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(20), default="running")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_workers: Mapped[int] = mapped_column(Integer)
    requested_articles: Mapped[int] = mapped_column(Integer)
    titles: Mapped[dict[str, list[str]]] = mapped_column(JSON, default=dict)
    title_api_calls: Mapped[int] = mapped_column(Integer, default=0)
    title_prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    title_completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    title_shortfall: Mapped[int] = mapped_column(Integer, default=0)
    title_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The orchestrator running the job holds a lease it renews; when it dies the lease expires
    # and another orchestrator takes the job over. Empty / None while nobody runs it.
    lease_owner: Mapped[str] = mapped_column(String(100), default="")
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    cancel_reason: Mapped[str] = mapped_column(Text, default="")  # set by any orchestrator
    retry_failed: Mapped[bool] = mapped_column(default=False)  # the queued resume retries failed
    last_event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # The lease's fencing token: every claim (and every publication of an ended job) raises it,
    # and a write for the job made under an older one is refused (invariant 10).
    lease_epoch: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    """One event of a job, as the orchestrator streamed it (a serialized JobEvent); a watcher
    reads them from any sequence number on."""

    __tablename__ = "job_events"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AppliedRequest(Base):
    """A non-idempotent call that was applied, by its request id: a retry of it (the answer
    was lost, not the call) changes nothing and returns the same job."""

    __tablename__ = "applied_requests"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Article(Base):
    """An article request's one terminal record: generated, augmented or failed."""

    __tablename__ = "generated_content"
    # The key of invariant 1: one record per (job, tier, article index), whatever retries happen.
    __table_args__ = (
        UniqueConstraint("job_id", "tier", "article_index", name="uq_article_key"),
        # A URL names one page: two jobs publishing on one site never share a slug. Partial, so
        # the many records without a URL yet do not collide.
        Index(
            "uq_article_url",
            "url",
            unique=True,
            sqlite_where=text("url != ''"),
            postgresql_where=text("url != ''"),
        ),
        # A model's latest drafts, for its learned word targets.
        Index("ix_generated_content_content_model", "content_model", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    tier: Mapped[str] = mapped_column(String(50))
    article_index: Mapped[int] = mapped_column(Integer)
    keyword: Mapped[str] = mapped_column(String(500))
    title: Mapped[str] = mapped_column(String(1000))
    outline: Mapped[Any] = mapped_column(JSON, nullable=True)
    content: Mapped[str] = mapped_column(Text, default="")
    word_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20))
    error_stage: Mapped[str] = mapped_column(String(50), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    error_traceback: Mapped[str] = mapped_column(Text, default="")  # a failure's, for its owner
    site: Mapped[str] = mapped_column(String(300), default="")
    url: Mapped[str] = mapped_column(String(2000), default="")
    output_path: Mapped[str] = mapped_column(String(2000), default="")
    html: Mapped[str] = mapped_column(Text, default="")  # the final page, as written
    api_calls: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    rate_limited: Mapped[int] = mapped_column(Integer, default=0)
    # What the content prompt asked of which model and what came back: learned word targets.
    content_model: Mapped[str] = mapped_column(String(200), default="")
    asked_words: Mapped[int] = mapped_column(Integer, default=0)
    draft_words: Mapped[int] = mapped_column(Integer, default=0)
    # The content gates that fired, comma-separated in order (generator_service/gates.py).
    quality_gates: Mapped[str] = mapped_column(String(300), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Site(Base):
    """A site articles are published on, owned by one user; its pages use its template set, if
    it names one."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253), unique=True)
    template: Mapped[str] = mapped_column(String(200), default="")
    # The user whose job first named it: only they (and admins) use it or change its template.
    owner: Mapped[str] = mapped_column(String(200), default="", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    """An account; the password is stored only as an argon2 hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(200), unique=True)
    password_hash: Mapped[str] = mapped_column(String(500))
    role: Mapped[str] = mapped_column(String(20), default="user")
    active: Mapped[bool] = mapped_column(default=True)
    # Raised by every new password: session tokens carry it, so older ones stop working.
    token_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RevokedToken(Base):
    """A session token revoked by Logout before it expired; kept until then, and checked on
    every call that carries it."""

    __tablename__ = "revoked_tokens"

    token_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the token's `jti`
    username: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StoredSecret(Base):
    """A secret the services generated once and share through the database (the token signing
    secret when TOKEN_SIGNING_SECRET is not set)."""

    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobFile(Base):
    """A published file of a job that is not an article page (the pages are the records'
    `html`): a site's index, a tier's title list, the job's index page. With the pages, what
    `jobs export` serves from any orchestrator."""

    __tablename__ = "job_files"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1000), primary_key=True)  # inside the job's folder
    content: Mapped[bytes] = mapped_column(LargeBinary)


class RateBucket(Base):
    """One provider limit (a model's requests or tokens a minute at one endpoint) shared by
    every generator: a continuously refilled bucket whose level may go below zero (reserved
    ahead: the caller waits until it would be back at zero). Times are the database's clock, in
    seconds since the epoch."""

    __tablename__ = "rate_buckets"

    bucket: Mapped[str] = mapped_column(String(500), primary_key=True)
    level: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class RateHolder(Base):
    """A generator that reserved from a bucket, and when it last said so: how many share it."""

    __tablename__ = "rate_holders"

    bucket: Mapped[str] = mapped_column(String(500), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen: Mapped[float] = mapped_column(Float)


class Quota(Base):
    """How much one user (or, with username "", every user without a quota of their own) may
    have queued and running at once; 0: no limit."""

    __tablename__ = "quotas"

    username: Mapped[str] = mapped_column(String(200), primary_key=True)
    max_active_articles: Mapped[int] = mapped_column(Integer)
    max_queued_jobs: Mapped[int] = mapped_column(Integer)
