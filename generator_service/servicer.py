"""GeneratorServicer: proto ⇄ domain objects, domain errors ⇄ status codes, stream plumbing."""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterator

import grpc

from generator_service.batch import ArticleBatch
from generator_service.domain import (
    MAX_WORKERS_LIMIT,
    ArticleEvent,
    ArticleTask,
    BatchContext,
    EventKind,
    InvalidRequestError,
    ProjectInfo,
    StageModels,
    TierShape,
    validate_batch,
    validate_task,
)
from generator_service.lease import JobLease, LeaseCheck
from generator_service.pipeline import ArticlePipeline
from generator_service.titles import TitlesResult, TitleWriter
from tierwriter import runtime
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as pb_grpc
from tierwriter.statuses import article_status

log = logging.getLogger(__name__)
MAX_TITLES = 10_000
_DONE = object()
_ENDINGS = (EventKind.SAVED, EventKind.FAILED, EventKind.SKIPPED)


def project_from_proto(p: pb.ProjectContext) -> ProjectInfo:
    """The project context as a domain object."""
    return ProjectInfo(p.project_id, p.main_keyword, list(p.entities), list(p.related_searches))


def event_to_proto(e: ArticleEvent, tier_count: int) -> article_pb.ArticleEvent:
    """A domain event as its message; `tier_count` is the tier's article count."""
    return article_pb.ArticleEvent(
        kind=article_pb.ArticleEventKind.Value(f"ARTICLE_EVENT_KIND_{e.kind.value}"),
        tier_count=tier_count,
        tier=e.tier,
        article_index=e.index,
        title=e.title,
        site=e.site,
        h2_count=e.h2_count,
        outline_fix=e.outline_fix,
        h3_count=e.h3_count,
        word_count=e.word_count,
        min_word_count=e.min_word_count,
        article_id=e.article_id,
        status=article_status(e.status),
        stage=e.stage,
        error=e.error,
        attempt=e.attempt,
        retry_delay=e.retry_delay,
        fatal=e.fatal,
        error_type=e.error_type,
        endpoint=e.endpoint,
        cost_usd=e.cost_usd,
        tokens=e.tokens,
        concurrency_before=e.concurrency_before,
        concurrency_after=e.concurrency_after,
        model=e.model,
        restored=e.restored,
        gate=e.gate,
        quality_gates=e.quality_gates,
        max_word_count=e.max_word_count,
    )


def _titles_totals(result: TitlesResult) -> pb.GenerateTitlesResponse:
    """The last message of a titles stream: what the titles cost and what is missing."""
    return pb.GenerateTitlesResponse(
        shortfall=result.shortfall,
        api_calls=result.api_calls,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        error=result.error,
        fatal=result.fatal,
        cost_usd=result.cost_usd,
        rejected=result.rejected,
        retries=[
            pb.TitleRetry(attempt=r.attempt, reason=r.reason, delay=r.delay) for r in result.retries
        ],
    )


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    """Translates GeneratorService calls onto TitleWriter and ArticleBatch."""

    def __init__(
        self,
        pipeline: ArticlePipeline,
        titles: TitleWriter,
        default_model: str,
        check_lease: LeaseCheck | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._titles = titles
        self._default_model = default_model
        self._check_lease = check_lease  # None: leases are not checked (unit tests)

    def _lease(self, job_id: int, epoch: int) -> JobLease:
        return JobLease(job_id, epoch, self._check_lease) if job_id else JobLease.unchecked()

    def _model(self, name: str) -> str:
        return name or self._default_model

    def GenerateTitles(
        self, request: pb.GenerateTitlesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateTitlesResponse]:
        if not 1 <= request.count <= MAX_TITLES:
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"count: must be between 1 and {MAX_TITLES}, got {request.count}",
            )
        if not request.project.main_keyword.strip():
            runtime.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "project.main_keyword: must not be empty"
            )
        parallel = min(max(request.max_parallel_calls, 1), MAX_WORKERS_LIMIT)
        # A line per call: with several generators, the log shows which one served what.
        log.info(
            "project %d %s: %d titles asked for", request.project.project_id, request.tier,
            request.count,
        )  # fmt: skip
        lease = self._lease(request.job_id, request.lease_epoch)
        for item in self._titles.stream(
            project_from_proto(request.project),
            request.count,
            self._model(request.model),
            parallel,
            list(request.existing_titles),
            stopped=lambda: not context.is_active(),
            lease=lease,
        ):
            if lease.lost:  # the caller's run of the job is over: it gets nothing more
                runtime.abort(context, grpc.StatusCode.ABORTED, lease.lost)
            if isinstance(item, TitlesResult):
                yield _titles_totals(item)
            else:
                yield pb.GenerateTitlesResponse(titles=item)

    def _batch_contexts(self, s: pb.BatchSettings) -> list[BatchContext]:
        """One context per tier of the stream, `settings.tier`'s first; each checked."""
        contexts: list[BatchContext] = []
        for field, t in [("settings.tier", s.tier)] + [
            (f"settings.more_tiers[{n}]", t) for n, t in enumerate(s.more_tiers)
        ]:
            context = BatchContext(
                job_id=s.job_id,
                project=project_from_proto(s.project),
                tier=TierShape(
                    t.name,
                    t.count,
                    t.min_word_count,
                    t.max_word_count,
                    t.min_h2_tags,
                    t.max_h2_tags,
                    t.min_h3_tags,
                    t.max_h3_tags,
                ),
                models=StageModels(
                    self._model(s.models.title),
                    self._model(s.models.outline),
                    self._model(s.models.content),
                ),
                max_workers=s.max_workers,
                continue_on_error=s.continue_on_error,
                replace_failed=s.replace_failed,
                budget_usd=s.budget_usd,
                lease_epoch=s.lease_epoch,
            )
            validate_batch(context, field)
            if any(c.tier.name == t.name for c in contexts):
                raise InvalidRequestError(f"{field}.name: tier {t.name!r} is in the stream twice")
            self._pipeline.check_budget(context)
            contexts.append(context)
        return contexts

    def GenerateArticles(
        self, request_iterator: Iterator[pb.GenerateArticlesRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateArticlesResponse]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "settings":
            runtime.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message of the stream must carry the batch settings",
            )
        try:
            batch_context, *more_tiers = self._batch_contexts(first.settings)
        except InvalidRequestError as e:
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        lease = self._lease(batch_context.job_id, batch_context.lease_epoch)
        batch = ArticleBatch(self._pipeline, batch_context, more_tiers, lease)
        log.info(
            "job %d: article stream for %s, %d workers",
            batch_context.job_id, ", ".join(batch.tier_names), batch_context.max_workers,
        )  # fmt: skip
        # The caller went away (cancelled, deadline, crash): start nothing new.
        context.add_callback(lambda: batch.stop("not started: the stream was cancelled"))

        events: queue.Queue[object] = queue.Queue()
        problems: list[str] = []

        def tasks() -> Iterator[ArticleTask]:
            seen: set[tuple[str, int]] = set()  # owned by the feed thread
            for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "stop":
                    reason = message.stop.reason or "the batch was stopped"
                    batch.stop(f"not started: {reason}", message.stop.grace_seconds)
                    log.info("job %d: stop: %s", batch_context.job_id, reason)
                    continue
                if kind != "article":
                    raise InvalidRequestError("only the first message may carry settings")
                article = message.article
                tier = batch.tier(article.tier)
                if tier is None:
                    raise InvalidRequestError(
                        f"article.tier: {article.tier!r} is not one of the stream's tiers"
                    )
                task = ArticleTask(article.article_index, article.title, article.site, tier.name)
                validate_task(task, tier)
                if (tier.name, task.index) in seen:
                    raise InvalidRequestError(
                        f"article.article_index: {tier.name} article {task.index} was sent twice"
                    )
                seen.add((tier.name, task.index))
                yield task

        def produce() -> None:
            try:
                batch.run(tasks(), events.put)
            except InvalidRequestError as e:
                problems.append(str(e))
            except Exception as e:  # the request stream broke: finish what runs, start nothing
                log.warning("job %d: request stream ended abnormally: %s", batch_context.job_id, e)
                batch.stop("not started: the request stream broke")
            finally:
                events.put(_DONE)

        producer = threading.Thread(
            target=produce, name=f"job{batch_context.job_id}-feed", daemon=True
        )
        producer.start()
        ended: Counter[EventKind] = Counter()  # articles by how they ended here (this thread's)
        try:
            while (item := events.get()) is not _DONE:
                assert isinstance(item, ArticleEvent)
                shape = batch.tier(item.tier)
                assert shape is not None  # events are of tasks, and tasks of the stream's tiers
                if item.kind in _ENDINGS:
                    ended[item.kind] += 1
                yield pb.GenerateArticlesResponse(event=event_to_proto(item, shape.count))
        finally:
            # Also on cancellation: in-flight articles finish and are recorded before we return.
            producer.join()
            # With several generators, these lines say which one wrote how many of a job.
            log.info(
                "job %d: article stream ended: %d saved, %d failed, %d skipped here",
                batch_context.job_id, *(ended[kind] for kind in _ENDINGS),
            )  # fmt: skip
        if problems:
            runtime.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problems[0])
