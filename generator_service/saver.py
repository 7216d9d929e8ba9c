"""PersistenceSaver: the pipeline's ArticleSaver, backed by persistence_service."""

from __future__ import annotations

import logging
from dataclasses import asdict

import grpc
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from generator_service.domain import ArticleRecord
from persistence_service.client import PersistenceClient, outline_to_proto
from tierwriter.persistence.v1 import persistence_service_pb2 as persistence_pb
from tierwriter.runtime import ServiceCallError
from tierwriter.statuses import article_status

log = logging.getLogger(__name__)
# Each try already waits for persistence (wait_for_ready, up to the client's deadline); a save
# keeps trying this long in all before the article's record is given up.
SAVE_RETRY_SECONDS = 180.0


def _persistence_down(error: BaseException) -> bool:
    return isinstance(error, ServiceCallError) and error.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("saving an article failed (%s); trying again", error)


class PersistenceSaver:
    """Saves terminal records through SaveArticle (idempotent on the article's key, so a save
    repeated after a lost reply stores nothing twice). Rides out a persistence restart."""

    def __init__(
        self, client: PersistenceClient, retry_seconds: float = SAVE_RETRY_SECONDS
    ) -> None:
        self._client = client
        self._retrying = Retrying(
            stop=stop_after_delay(retry_seconds),
            wait=wait_exponential(multiplier=0.5, max=10),
            retry=retry_if_exception(_persistence_down),
            before_sleep=_log_retry,
            reraise=True,
        )

    def save(self, record: ArticleRecord, replace_failed: bool = False) -> tuple[int, bool]:
        fields = asdict(record)
        outline, status = fields.pop("outline"), fields.pop("status")
        article = persistence_pb.Article(
            **fields, status=article_status(status), outline=outline_to_proto(outline)
        )
        retrying = self._retrying.copy()  # one per call: saves run on many threads at once
        response = retrying(self._client.save_article, article, replace_failed)
        return response.article.id, response.created
