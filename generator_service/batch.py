"""ArticleBatch: the articles of one stream on a pool of exactly `max_workers` threads."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from generator_service.domain import ArticleEvent, ArticleTask, BatchContext, EventKind
from generator_service.pipeline import ArticlePipeline, Emit


class ArticleBatch:
    """Runs tasks as they arrive, at most `max_workers` at once and exactly that many while work
    is waiting (a ThreadPoolExecutor of that size). With continue_on_error false, the first
    failure stops new articles from starting: those in flight finish and are recorded, the rest
    are reported SKIPPED. `stop()` does the same from outside (the caller went away)."""

    def __init__(self, pipeline: ArticlePipeline, context: BatchContext) -> None:
        self._pipeline = pipeline
        self._context = context
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # guards _stop_reason: workers and the feed may race
        self._stop_reason = ""

    def stop(self, reason: str) -> None:
        """Start no further article; in-flight ones finish. The first reason given is kept."""
        with self._lock:
            self._stop_reason = self._stop_reason or reason
        self._stopped.set()

    def run(self, tasks: Iterable[ArticleTask], emit: Emit) -> None:
        """Run every task; returns when each has had its terminal event."""
        with ThreadPoolExecutor(
            max_workers=self._context.max_workers,
            thread_name_prefix=f"job{self._context.job_id}-{self._context.tier.name}",
        ) as pool:
            for task in tasks:
                pool.submit(self._one, task, emit)

    def _reason(self) -> str:
        with self._lock:
            return self._stop_reason

    def _one(self, task: ArticleTask, emit: Emit) -> None:
        if self._stopped.is_set():
            emit(
                ArticleEvent(
                    EventKind.SKIPPED,
                    self._context.tier.name,
                    task.index,
                    title=task.title,
                    error=self._reason(),
                )
            )
            return

        def emit_and_stop(event: ArticleEvent) -> None:
            # Stop before the FAILED event goes out: whoever sees it can count on no new start.
            if event.kind is EventKind.FAILED and not self._context.continue_on_error:
                self.stop(
                    f"not started: article {task.index + 1} failed and continue_on_error is false"
                )
            emit(event)

        self._pipeline.run(self._context, task, emit_and_stop)
