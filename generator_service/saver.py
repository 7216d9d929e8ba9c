"""PersistenceSaver: the pipeline's ArticleSaver, backed by persistence_service."""

from __future__ import annotations

import json

from generator_service.domain import ArticleRecord
from persistence_service.client import PersistenceClient
from tierwriter.persistence.v1 import persistence_service_pb2 as persistence_pb


class PersistenceSaver:
    """Saves terminal records through SaveArticle (idempotent on the article's key)."""

    def __init__(self, client: PersistenceClient) -> None:
        self._client = client

    def save(self, record: ArticleRecord) -> tuple[int, bool]:
        response = self._client.save_article(
            persistence_pb.Article(
                job_id=record.job_id,
                project_id=record.project_id,
                tier=record.tier,
                article_index=record.article_index,
                keyword=record.keyword,
                title=record.title,
                outline_json=json.dumps(record.outline) if record.outline is not None else "",
                content=record.content,
                word_count=record.word_count,
                status=record.status,
                error_stage=record.error_stage,
                error=record.error,
                site=record.site,
                api_calls=record.api_calls,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )
        )
        return response.article.id, response.created
