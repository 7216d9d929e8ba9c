"""Statuses as the protos carry them (enums) and as the database and the console spell them
("queued", "generated"): the one place that maps between the two."""

from __future__ import annotations

from typing import TypeAlias

from tierwriter.article.v1.article_event_pb2 import ArticleEventKind, ArticleStatus
from tierwriter.job.v1.job_pb2 import JobStatus

JobStatusValue: TypeAlias = JobStatus.ValueType
ArticleStatusValue: TypeAlias = ArticleStatus.ValueType

# A job in one of these may still change; a watch of it goes on.
ACTIVE_JOB_STATUSES = (JobStatus.JOB_STATUS_QUEUED, JobStatus.JOB_STATUS_RUNNING)
# An article's last event is one of these: it has its record (or, skipped, never will).
TERMINAL_ARTICLE_EVENTS = frozenset(
    {
        ArticleEventKind.ARTICLE_EVENT_KIND_SAVED,
        ArticleEventKind.ARTICLE_EVENT_KIND_FAILED,
        ArticleEventKind.ARTICLE_EVENT_KIND_SKIPPED,
    }
)


def job_status(word: str) -> JobStatusValue:
    """ "queued" → JOB_STATUS_QUEUED. ValueError for a word that is no status."""
    return JobStatus.Value(f"JOB_STATUS_{word.upper()}")


def job_status_word(status: JobStatusValue) -> str:
    """JOB_STATUS_QUEUED → "queued"; a number this code does not know (a newer peer) as itself."""
    if status not in JobStatus.values():
        return str(status)
    return JobStatus.Name(status).removeprefix("JOB_STATUS_").lower()


def article_status(word: str) -> ArticleStatusValue:
    """ "generated" → ARTICLE_STATUS_GENERATED; "" (no record yet) → UNSPECIFIED. ValueError for
    a word that is no status."""
    if not word:
        return ArticleStatus.ARTICLE_STATUS_UNSPECIFIED
    return ArticleStatus.Value(f"ARTICLE_STATUS_{word.upper()}")


def article_status_word(status: ArticleStatusValue) -> str:
    """ARTICLE_STATUS_GENERATED → "generated"; UNSPECIFIED → ""; an unknown number as itself."""
    if status == ArticleStatus.ARTICLE_STATUS_UNSPECIFIED:
        return ""
    if status not in ArticleStatus.values():
        return str(status)
    return ArticleStatus.Name(status).removeprefix("ARTICLE_STATUS_").lower()
