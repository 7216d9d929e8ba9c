"""JobRunner: runs a validated job file across the generator and persistence, as a stream of
JobEvents. Per job: project and sites → job record → per tier: titles → article stream → tier
stats; then (every article terminal) post-processing; then the run's summary, from the
database."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass

import grpc

from generator_service.client import GeneratorClient
from orchestrator_service import publish
from orchestrator_service.config import Settings
from orchestrator_service.jobfile import JobFile, JobFileError, JobSpec, TierSpec, parse_job_file
from orchestrator_service.postprocess import JobPublisher, write_atomically
from persistence_service.client import PersistenceClient
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError

log = logging.getLogger(__name__)


CANCELLED = "cancelled: the client disconnected or the server is stopping"


class JobStopped(Exception):
    """A job ended early; the message says why and is shown to the user."""


@dataclass(frozen=True)
class TierOutcome:
    """What a tier's article stream ended with."""

    failure: str  # the first failure that stops the job (continue_on_error false), else ""


def progress_from_generator(
    event: gen_pb.ArticleEvent, job_id: int, tier_count: int
) -> pb.ArticleProgress:
    """A generator event as the public ArticleProgress (the enums share their suffixes)."""
    step_name = gen_pb.ArticleEventKind.Name(event.kind).removeprefix("ARTICLE_EVENT_KIND_")
    return pb.ArticleProgress(
        job_id=job_id,
        step=pb.ArticleStep.Value(f"ARTICLE_STEP_{step_name}"),
        tier=event.tier,
        article_index=event.article_index,
        tier_count=tier_count,
        title=event.title,
        site=event.site,
        h2_count=event.h2_count,
        h3_count=event.h3_count,
        outline_fix=event.outline_fix,
        word_count=event.word_count,
        min_word_count=event.min_word_count,
        article_id=event.article_id,
        status=event.status,
        stage=event.stage,
        error=event.error,
        traceback=event.traceback,
        attempt=event.attempt,
        retry_delay=event.retry_delay,
    )


class JobRunner:
    """Runs job files. Thread-safe: each run keeps its state in local variables."""

    def __init__(
        self, settings: Settings, persistence: PersistenceClient, generator: GeneratorClient
    ) -> None:
        self._settings = settings
        self._persistence = persistence
        self._generator = generator
        self._templates = publish.template_environment(settings.templates_dir)
        self.publisher = JobPublisher(persistence, self._templates, settings.output_dir)
        self._lock = threading.Lock()
        self._active: dict[threading.Thread, threading.Event] = {}  # running jobs, by thread

    def validate(self, text: str) -> JobFile:
        """The job file, checked completely before anything is written: schema, then that every
        project_id exists. JobFileError names the field and the problem."""
        job_file = parse_job_file(text)
        for n, spec in enumerate(job_file.jobs):
            for site in spec.all_sites():
                if site.template and not publish.has_template_set(self._templates, site.template):
                    where = self._settings.templates_dir or "(TEMPLATES_DIR is not set)"
                    raise JobFileError(
                        f"jobs[{n}].deployment_targets: {site.hostname}: template set "
                        f"{site.template!r} not found in {where}: it needs "
                        f"{site.template}/{publish.ARTICLE_TEMPLATE}"
                    )
            if spec.project_id is not None:
                try:
                    self._persistence.get_project(spec.project_id)
                except ServiceCallError as e:
                    if e.code == grpc.StatusCode.NOT_FOUND:
                        raise JobFileError(
                            f"jobs[{n}].project_id: project {spec.project_id} does not exist"
                        ) from e
                    raise
        return job_file

    def effective_workers(self, spec: JobSpec) -> int:
        """The job's max_workers, else CONCURRENT_WORKERS (default 5)."""
        return spec.max_workers or self._settings.concurrent_workers

    def launch(
        self,
        job_file: JobFile,
        owner: str,
        cancelled: threading.Event,
        emit: Callable[[pb.JobEvent | None], None],
    ) -> None:
        """Run the job file on a thread of its own and emit its events, then None. The thread,
        not the RPC, owns the job: after a cancel it still stops the generator, waits for the
        in-flight articles and records the final status."""

        def work() -> None:
            try:
                for event in self.run(job_file, owner, cancelled):
                    emit(event)
            except Exception as e:  # run() reports its own failures; this is a last resort
                log.exception("job runner crashed")
                emit(
                    pb.JobEvent(run_finished=pb.RunFinished(ok=False, error=f"internal error: {e}"))
                )
            finally:
                with self._lock:
                    self._active.pop(threading.current_thread(), None)
                emit(None)

        thread = threading.Thread(target=work, name="job-runner")
        with self._lock:
            self._active[thread] = cancelled
        thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Cancel every running job and wait (up to `timeout` each) until it has recorded its
        final status. Called on shutdown, before the clients close."""
        with self._lock:
            active = list(self._active.items())
        for _, cancelled in active:
            cancelled.set()
        for thread, _ in active:
            thread.join(timeout)

    def run(
        self, job_file: JobFile, owner: str, cancelled: threading.Event
    ) -> Iterator[pb.JobEvent]:
        """Run every job in order; the last event is always RunFinished."""
        started = time.monotonic()
        job_ids: list[int] = []
        error = ""
        published = pb.Summary()  # links and pages, as the post-processing steps report them
        unpublished: list[str] = []  # jobs whose articles are stored but not (all) published
        for n, spec in enumerate(job_file.jobs):
            try:
                for event in self._run_job(n, len(job_file.jobs), spec, owner, cancelled, job_ids):
                    if event.WhichOneof("event") == "post_processing":
                        step = event.post_processing
                        if step.step == pb.POST_STEP_LINKS:
                            published.links_placed += step.count
                        elif step.step == pb.POST_STEP_EXPORT:
                            published.pages_written += step.count
                        if step.error:
                            unpublished.append(f"job {step.job_id}: post-processing {step.error}")
                    yield event
            except JobStopped as e:
                error = str(e)
                break
        # A job whose export failed still ran: later jobs go on, but the run is not ok.
        error = error or "; ".join(unpublished)
        finished = self._finish(job_ids, error, time.monotonic() - started)
        finished.summary.MergeFrom(published)
        yield pb.JobEvent(run_finished=finished)

    def _finish(self, job_ids: list[int], error: str, elapsed: float) -> pb.RunFinished:
        summary = pb.Summary(
            execution_seconds=elapsed,
            output_dirs=[str(publish.job_dir(self._settings.output_dir, j)) for j in job_ids],
        )
        if job_ids:
            try:
                stats = self._persistence.job_stats(job_ids)
            except ServiceCallError as e:
                error = error or str(e)
            else:
                t = stats.totals
                summary.MergeFrom(
                    pb.Summary(
                        total_jobs=stats.total_jobs,
                        processed_jobs=stats.processed_jobs,
                        requested_articles=t.requested,
                        generated_articles=t.generated,
                        augmented_articles=t.augmented,
                        failed_articles=t.failed,
                        api_calls=t.api_calls + stats.title_api_calls,
                        prompt_tokens=t.prompt_tokens + stats.title_prompt_tokens,
                        completion_tokens=t.completion_tokens + stats.title_completion_tokens,
                        title_shortfall=stats.title_shortfall,
                    )
                )
        return pb.RunFinished(ok=not error, error=error, summary=summary)

    def _run_job(
        self,
        n: int,
        total: int,
        spec: JobSpec,
        owner: str,
        cancelled: threading.Event,
        job_ids: list[int],
    ) -> Iterator[pb.JobEvent]:
        try:
            project = self._project(spec)
            self._persistence.ensure_sites(
                [db_pb.Site(hostname=s.hostname, template=s.template) for s in spec.all_sites()]
            )
            workers = self.effective_workers(spec)
            job = self._persistence.create_job(
                db_pb.CreateJobRequest(
                    project_id=project.id,
                    spec_json=spec.model_dump_json(),
                    max_workers=workers,
                    requested_articles=spec.requested_articles(),
                    owner=owner,
                )
            )
        except ServiceCallError as e:
            raise JobStopped(str(e)) from e
        job_ids.append(job.id)
        yield pb.JobEvent(
            job_started=pb.JobStarted(
                job_id=job.id,
                project=project.name,
                max_workers=workers,
                requested_articles=spec.requested_articles(),
                job_number=n,
                job_count=total,
            )
        )

        status, error = "failed", ""
        try:
            # Titles must differ from the project's earlier jobs' and from this job's other tiers.
            used_titles = self._persistence.project_titles(project.id, exclude_job_id=job.id)
            for tier_name, tier in spec.ordered_tiers():
                if cancelled.is_set():
                    error = CANCELLED
                    break
                outcome = yield from self._run_tier(
                    job.id, project, spec, tier_name, tier, workers, used_titles, cancelled
                )
                if outcome.failure:
                    error = outcome.failure
                    break
            # Every article of the job has its terminal record now (invariant 5).
            if cancelled.is_set():
                yield self._not_published(job.id, "the job was cancelled")
            else:
                yield from (
                    pb.JobEvent(post_processing=step) for step in self.publisher.publish(job.id)
                )
            status = "failed" if error else "completed"
        except ServiceCallError as e:
            error = str(e)
        except Exception as e:  # a bug must still end the job with a status and a reason
            log.exception("job %d: unexpected error", job.id)
            error = f"internal error: {type(e).__name__}: {e}"
        finally:
            try:
                self._persistence.finish_job(job.id, status, error)
            except ServiceCallError as e:
                log.error("job %d: could not record its final status: %s", job.id, e)
        if error:
            raise JobStopped(f"job {job.id}: {error}")

    def _project(self, spec: JobSpec) -> db_pb.Project:
        if spec.project_id is not None:
            return self._persistence.get_project(spec.project_id)
        assert spec.project is not None
        p = spec.project
        return self._persistence.ensure_project(
            db_pb.Project(
                name=p.name,
                main_keyword=p.main_keyword,
                entities=p.entities,
                related_searches=p.related_searches,
                money_site_url=p.money_site_url,
            )
        )

    def _run_tier(
        self,
        job_id: int,
        project: db_pb.Project,
        spec: JobSpec,
        tier_name: str,
        tier: TierSpec,
        workers: int,
        used_titles: list[str],
        cancelled: threading.Event,
    ) -> Generator[pb.JobEvent, None, TierOutcome]:
        yield pb.JobEvent(
            tier_started=pb.TierStarted(
                job_id=job_id, tier=tier_name, count=tier.count, max_workers=workers
            )
        )
        context = gen_pb.ProjectContext(
            project_id=project.id,
            main_keyword=project.main_keyword,
            entities=project.entities,
            related_searches=project.related_searches,
        )

        sites_of_tier = spec.sites_of(tier)
        titles = self._generator.generate_titles(
            gen_pb.GenerateTitlesRequest(
                project=context,
                tier=tier_name,
                count=tier.count,
                model=spec.models.title,
                max_parallel_calls=workers,
                existing_titles=used_titles,
            )
        )
        used_titles.extend(titles.titles)
        self._persistence.record_titles(
            db_pb.RecordTitlesRequest(
                job_id=job_id,
                tier=tier_name,
                titles=titles.titles,
                api_calls=titles.api_calls,
                prompt_tokens=titles.prompt_tokens,
                completion_tokens=titles.completion_tokens,
                shortfall=titles.shortfall,
            )
        )
        write_atomically(
            publish.titles_path(self._settings.output_dir, job_id, tier_name),
            "".join(f"{title}\n" for title in titles.titles),
        )
        # Titles the model could not be asked for are articles that failed at stage `titles`:
        # each gets its record, so every requested article still ends as exactly one.
        untitled = range(len(titles.titles), tier.count - titles.shortfall) if titles.error else []
        for index in untitled:
            self._persistence.save_article(
                db_pb.Article(
                    job_id=job_id,
                    project_id=project.id,
                    tier=tier_name,
                    article_index=index,
                    keyword=project.main_keyword,
                    title="",
                    status="failed",
                    error_stage="titles",
                    error=titles.error,
                    site=sites_of_tier[index % len(sites_of_tier)] if sites_of_tier else "",
                )
            )
        yield pb.JobEvent(
            titles_ready=pb.TitlesReady(
                job_id=job_id,
                tier=tier_name,
                count=len(titles.titles),
                shortfall=titles.shortfall,
                error=titles.error,
                failed=len(untitled),
            )
        )
        if untitled and not spec.continue_on_error:
            yield self._tier_finished(job_id, tier_name)
            return TierOutcome(
                f"{tier_name}: titles failed and continue_on_error is false: {titles.error}"
            )

        sites = sites_of_tier
        settings = gen_pb.BatchSettings(
            job_id=job_id,
            project=context,
            tier=gen_pb.TierSpec(name=tier_name, **tier.model_dump(exclude={"deployment_targets"})),
            models=gen_pb.Models(**spec.models.model_dump()),
            max_workers=workers,
            continue_on_error=spec.continue_on_error,
        )
        requests = [
            gen_pb.ArticleRequest(
                article_index=i, title=title, site=sites[i % len(sites)] if sites else ""
            )
            for i, title in enumerate(titles.titles)
        ]
        failure = ""
        # A cancel becomes a stop message: nothing new starts, in-flight articles finish and are
        # recorded, and the stream still ends only when every article is terminal.
        with closing(
            self._generator.generate_articles(settings, requests, stop=cancelled)
        ) as events:
            for event in events:
                yield pb.JobEvent(article=progress_from_generator(event, job_id, tier.count))
                if (
                    event.kind == gen_pb.ARTICLE_EVENT_KIND_FAILED
                    and not failure
                    and not spec.continue_on_error
                ):
                    failure = (
                        f"{tier_name} article {event.article_index + 1}/{tier.count} failed "
                        f"and continue_on_error is false: {event.error}"
                    )
        if cancelled.is_set() and not failure:
            failure = CANCELLED
        if titles.shortfall and not failure:
            log.warning("job %d %s: %d titles short", job_id, tier_name, titles.shortfall)

        yield self._tier_finished(job_id, tier_name)
        return TierOutcome(failure)

    def _tier_finished(self, job_id: int, tier: str) -> pb.JobEvent:
        """The tier's counts, from its records."""
        counts = next(
            s.counts for s in self._persistence.job_stats([job_id]).tiers if s.tier == tier
        )
        return pb.JobEvent(
            tier_finished=pb.TierFinished(
                job_id=job_id,
                tier=tier,
                generated=counts.generated,
                augmented=counts.augmented,
                failed=counts.failed,
            )
        )

    @staticmethod
    def _not_published(job_id: int, why: str) -> pb.JobEvent:
        return pb.JobEvent(
            post_processing=pb.PostProcessingStep(
                job_id=job_id,
                step=pb.POST_STEP_URLS,
                error=f"not run: {why}; `tierwriter jobs publish {job_id}` runs it later",
            )
        )
