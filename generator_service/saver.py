"""PersistenceSaver: the pipeline's ArticleSaver, backed by persistence_service."""

from __future__ import annotations

import json
from dataclasses import asdict

from generator_service.domain import ArticleRecord
from persistence_service.client import PersistenceClient
from tierwriter.persistence.v1 import persistence_service_pb2 as persistence_pb


class PersistenceSaver:
    """Saves terminal records through SaveArticle (idempotent on the article's key)."""

    def __init__(self, client: PersistenceClient) -> None:
        self._client = client

    def save(self, record: ArticleRecord, replace_failed: bool = False) -> tuple[int, bool]:
        fields = asdict(record)
        outline = fields.pop("outline")
        response = self._client.save_article(
            persistence_pb.Article(
                **fields, outline_json=json.dumps(outline) if outline is not None else ""
            ),
            replace_failed=replace_failed,
        )
        return response.article.id, response.created
