"""JobRunner: runs a validated job file (or resumes a stored job) across the generator and
persistence, as a stream of JobEvents. Per job: project and sites → job record → per tier:
titles → article stream (only the articles without a terminal record; re-sent to a generator
that answers again when one is lost) → tier stats; then (every article terminal)
post-processing; then the run's summary, from the database."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import grpc

from generator_service.client import GeneratorClient
from orchestrator_service import publish
from orchestrator_service.auth import Principal
from orchestrator_service.config import Settings
from orchestrator_service.events import JobEventLog
from orchestrator_service.jobfile import JobFile, JobFileError, JobSpec, TierSpec, parse_job_file
from orchestrator_service.postprocess import JobPublisher, write_atomically
from orchestrator_service.title_feed import TitleFeed
from persistence_service.client import PersistenceClient
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.job.v1 import job_pb2
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError
from tierwriter.statuses import JobStatusValue

log = logging.getLogger(__name__)


SERVER_STOPPING = "the orchestrator is stopping"
# Far more events than a run can stream unstored (those of its articles in flight, while
# persistence is away); int32 in the database still allows ~21,000 takeovers of one job.
TAKEOVER_SEQ_GAP = 100_000
# A lost generator shows as one of these on the article stream; anything else is not retried.
_GENERATOR_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
_RECONNECT_MAX_DELAY = 30.0


@dataclass
class Cancellation:
    """How a run is stopped: the event its generator streams watch, and the first reason. A
    hand-off stops the run too, but the job goes on elsewhere: no grace period (in-flight
    articles finish and are recorded) and no final status."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    handoff: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self, reason: str) -> None:
        with self._lock:
            self.reason = self.reason or reason
        self.event.set()

    def hand_off(self, reason: str) -> None:
        with self._lock:
            self.handoff = True
            self.reason = self.reason or reason
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    @property
    def message(self) -> str:
        return f"cancelled: {self.reason or 'the job was cancelled'}"


@dataclass(frozen=True)
class TierRun:
    """One tier of a job being run: what each of its steps (titles, the article stream, the
    tier's counts) needs."""

    job: db_pb.Job
    project: db_pb.Project
    spec: JobSpec
    name: str
    tier: TierSpec
    cancellation: Cancellation
    retry_failed: bool  # a resume that also redoes the failed articles
    used_titles: list[str]  # titles this tier's must differ from; its new ones are added
    stored_titles: list[str] | None  # a resumed tier's own titles; None: it never started


@dataclass(frozen=True)
class TierOutcome:
    """What a tier's article stream ended with."""

    failure: str  # the first failure that stops the job (continue_on_error false), else ""


def _count_published(event: pb.JobEvent, published: pb.Summary) -> str:
    """Add what a post-processing step made (and a throttle's low point) to the run's summary;
    the step's error, if any."""
    kind = event.WhichOneof("event")
    if kind == "article":
        article = event.article
        if article.kind == article_pb.ARTICLE_EVENT_KIND_THROTTLED and not article.restored:
            lowest = published.lowest_concurrency or article.concurrency_after
            published.lowest_concurrency = min(lowest, article.concurrency_after)
    elif kind == "post_processing":
        step = event.post_processing
        if step.step == pb.POST_STEP_LINKS:
            published.links_placed += step.count
        elif step.step == pb.POST_STEP_EXPORT:
            published.pages_written += step.count
        if step.error:
            return f"post-processing {step.error}"
    return ""


def tier_finished(job_id: int, stats: db_pb.TierStats) -> pb.TierFinished:
    """A tier's stored counts as the public TierFinished."""
    c = stats.counts
    return pb.TierFinished(
        job_id=job_id,
        tier=stats.tier,
        generated=c.generated,
        augmented=c.augmented,
        failed=c.failed,
        short=c.short,
        skipped=c.skipped,
        cost_usd=c.cost_usd,
    )


@dataclass
class JobRun:
    """One run of a job on this orchestrator: its thread, how it is stopped, its events."""

    cancellation: Cancellation
    log: JobEventLog
    thread: threading.Thread = field(init=False)  # made once the run exists: it runs it


class JobRunner:
    """Runs the jobs this orchestrator claimed, each on a thread of its own that emits its
    events into the job's JobEventLog. The runs belong to the server, not to any client."""

    def __init__(
        self,
        settings: Settings,
        persistence: PersistenceClient,
        generator: GeneratorClient,
        owner: str,
        on_finished: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._persistence = persistence  # retries while persistence or the database is down
        self._generator = generator
        self.owner = owner  # this orchestrator's id on the jobs' leases
        self._on_finished = on_finished
        self._templates = publish.template_environment(settings.templates_dir)
        self.publisher = JobPublisher(
            persistence, self._templates, settings.output_dir, settings.shown_output_dir()
        )
        self._lock = threading.Lock()  # guards _runs
        self._runs: dict[int, JobRun] = {}  # by job id: running here, or winding down

    def validate(self, text: str, caller: Principal) -> JobFile:
        """The job file, checked completely before anything is written: schema, then that every
        project_id names a project the caller owns. JobFileError names the field and the
        problem (the same for someone else's project as for none)."""
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
                    owner = self._persistence.get_project(spec.project_id).owner
                except ServiceCallError as e:
                    if e.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    owner = None
                if owner is None or not caller.owns(owner):
                    raise JobFileError(
                        f"jobs[{n}].project_id: you have no project {spec.project_id}"
                    )
        return job_file

    def effective_workers(self, spec: JobSpec) -> int:
        """The job's max_workers, else CONCURRENT_WORKERS (default 5)."""
        return spec.max_workers or self._settings.concurrent_workers

    def submit(self, job_file: JobFile, owner: str) -> list[int]:
        """Store every job of a validated file, queued, in its order; their ids."""
        job_ids = []
        for spec in job_file.jobs:
            project = self._project(spec, owner)
            self._persistence.ensure_sites(
                [db_pb.Site(hostname=s.hostname, template=s.template) for s in spec.all_sites()]
            )
            job = self._persistence.create_job(
                db_pb.CreateJobRequest(
                    project_id=project.id,
                    spec=spec.to_proto(),
                    max_workers=self.effective_workers(spec),
                    requested_articles=spec.requested_articles(),
                    owner=owner,
                )
            )
            job_ids.append(job.id)
        return job_ids

    def running_ids(self) -> list[int]:
        """The jobs this orchestrator runs (and holds the lease of)."""
        with self._lock:
            return [job_id for job_id, run in self._runs.items() if not run.cancellation.handoff]

    def local_log(self, job_id: int) -> JobEventLog | None:
        """The job's events, when its latest run is on this orchestrator."""
        with self._lock:
            run = self._runs.get(job_id)
            return run.log if run else None

    def start(self, job: db_pb.Job, previous_owner: str = "") -> None:
        """Run a job this orchestrator just claimed, on a thread of its own. A run of the same
        job still winding down here (its lease had lapsed) ends first: never two at once."""
        with self._lock:
            previous = self._runs.get(job.id)
            # Taken over: the orchestrator before may have streamed events it never stored, so
            # this run's numbers start past any a watcher can have seen (the gap holds none).
            first_seq = job.last_event_seq + (TAKEOVER_SEQ_GAP if previous_owner else 0)
            run = JobRun(Cancellation(), JobEventLog(job.id, first_seq, self._store_events))
            run.thread = threading.Thread(
                target=self._run,
                args=(job, previous_owner, run, previous.thread if previous else None),
                name=f"job{job.id}",
            )
            self._runs[job.id] = run
        run.thread.start()

    def _store_events(self, job_id: int, events: Sequence[tuple[int, bytes]]) -> object:
        return self._persistence.append_events(job_id, events, self.owner)

    def cancel(self, job_id: int, reason: str) -> bool:
        """Cancel a job running here; False if it does not run here."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is None or run.cancellation.handoff:
            return False
        run.cancellation.cancel(reason)
        return True

    def hand_off(self, job_id: int, reason: str) -> None:
        """Stop running a job without ending it (its lease is gone, or this orchestrator
        stops): nothing new starts, in-flight articles finish and are recorded, no final status
        is written; whoever holds the lease next carries it on."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            log.warning("job %d: handed off: %s", job_id, reason)
            run.cancellation.hand_off(reason)

    def close(self, timeout: float = 60.0) -> list[int]:
        """Hand off every job running here and wait (up to `timeout` each) for its in-flight
        articles; returns their ids, for the caller to release their leases."""
        with self._lock:
            runs = dict(self._runs)
        for job_id in runs:
            self.hand_off(job_id, SERVER_STOPPING)
        for run in runs.values():
            run.thread.join(timeout)
        return list(runs)

    def _run(
        self,
        job: db_pb.Job,
        previous_owner: str,
        run: JobRun,
        previous_thread: threading.Thread | None,
    ) -> None:
        if previous_thread is not None:
            previous_thread.join()
        started = time.monotonic()
        emit, cancellation = run.log.emit, run.cancellation
        status, error = JobStatus.JOB_STATUS_FAILED, ""
        published = pb.Summary()  # links and pages, as the post-processing steps report them
        unpublished: list[str] = []  # a job whose export failed is stored, not (all) published
        try:
            if previous_owner:
                emit(
                    pb.JobEvent(
                        notice=pb.Notice(
                            job_id=job.id,
                            message="taken over: the orchestrator running this job stopped "
                            "answering; the articles without a record are generated now",
                        )
                    )
                )
            spec = JobSpec.from_proto(job.spec)
            project = self._persistence.get_project(job.project_id)
            emit(
                pb.JobEvent(
                    job_started=pb.JobStarted(
                        job_id=job.id,
                        project=project.name,
                        max_workers=job.max_workers,
                        requested_articles=job.requested_articles,
                        job_count=1,
                        resumed=job.last_event_seq > 0,
                    )
                )
            )
            work = self._work(
                job,
                project,
                spec,
                cancellation,
                {t.tier: list(t.titles) for t in job.titles},
                job.retry_failed,
            )
            while True:
                try:
                    event = next(work)
                except StopIteration as done:
                    status, error = done.value
                    break
                if problem := _count_published(event, published):
                    unpublished.append(problem)
                emit(event)
        except (ServiceCallError, ValueError) as e:
            error = f"cannot run: {e}"
        except Exception as e:  # a bug must still end the job with a status and a reason
            log.exception("job %d: unexpected error", job.id)
            error = f"internal error: {type(e).__name__}: {e}"
        try:
            if cancellation.handoff:
                run.log.close()  # whoever takes the job over writes its end
                return
            finished = self._finish(
                job.id, status, error or "; ".join(unpublished), time.monotonic() - started
            )
            finished.summary.MergeFrom(published)
            emit(pb.JobEvent(run_finished=finished))
            run.log.end()  # every event stored before the status says the job ended
            try:
                self._persistence.finish_job(job.id, status, error, self.owner)
            except ServiceCallError as e:
                log.error("job %d: could not record its final status: %s", job.id, e)
            run.log.close()  # watchers here find the job ended, with nothing more to read
        finally:
            with self._lock:
                if self._runs.get(job.id) is run:
                    del self._runs[job.id]
            self._on_finished()

    def _finish(
        self, job_id: int, status: JobStatusValue, error: str, elapsed: float
    ) -> pb.RunFinished:
        """The run's summary: the job's totals from the database, its final status."""
        summary = pb.Summary(
            execution_seconds=elapsed,
            output_dirs=[str(publish.job_dir(self._settings.shown_output_dir(), job_id))],
            total_jobs=1,
            processed_jobs=int(status == JobStatus.JOB_STATUS_COMPLETED),
        )
        try:
            stats = self._persistence.job_stats([job_id])
        except ServiceCallError as e:
            error = error or str(e)
        else:
            t = stats.totals
            summary.MergeFrom(
                pb.Summary(
                    requested_articles=t.requested,
                    generated_articles=t.generated,
                    augmented_articles=t.augmented,
                    failed_articles=t.failed,
                    short_articles=t.short,
                    skipped_articles=t.skipped,
                    api_calls=t.api_calls + stats.title_api_calls,
                    prompt_tokens=t.prompt_tokens + stats.title_prompt_tokens,
                    completion_tokens=t.completion_tokens + stats.title_completion_tokens,
                    title_shortfall=stats.title_shortfall,
                    cost_usd=t.cost_usd + stats.title_cost_usd,
                    rate_limited=t.rate_limited,
                )
            )
        return pb.RunFinished(
            ok=not error, error=f"job {job_id}: {error}" if error else "", summary=summary
        )

    def _work(
        self,
        job: db_pb.Job,
        project: db_pb.Project,
        spec: JobSpec,
        cancellation: Cancellation,
        titles: dict[str, list[str]],
        retry_failed: bool,
    ) -> Generator[pb.JobEvent, None, tuple[JobStatusValue, str]]:
        """A job's tiers and post-processing; returns its final status and why. For a new job
        `titles` is empty, for a resumed one it holds the tiers' stored titles."""
        status, error = JobStatus.JOB_STATUS_FAILED, ""
        try:
            # Titles must differ from the project's other jobs' and from this job's other tiers.
            used = self._persistence.project_titles(project.id, exclude_job_id=job.id)
            used += [title for tier_titles in titles.values() for title in tier_titles]
            for tier_name, tier in spec.ordered_tiers():
                if cancellation.is_set():
                    error = cancellation.message
                    break
                outcome = yield from self._run_tier(
                    TierRun(
                        job, project, spec, tier_name, tier, cancellation, retry_failed,
                        used, titles.get(tier_name),
                    )
                )  # fmt: skip
                if outcome.failure:
                    error = outcome.failure
                    break
            if cancellation.handoff:
                return status, error
            if not error and spec.max_cost_usd:
                error = self._budget_message(job.id, spec.max_cost_usd)
            # Every article of the job has its terminal record now (invariant 5).
            if cancellation.is_set():
                yield self._not_published(job.id, "the job was cancelled")
            else:
                yield from (
                    pb.JobEvent(post_processing=step) for step in self.publisher.publish(job.id)
                )
            status = (
                JobStatus.JOB_STATUS_CANCELLED
                if cancellation.is_set()
                else JobStatus.JOB_STATUS_FAILED
                if error
                else JobStatus.JOB_STATUS_COMPLETED
            )
            error = cancellation.message if cancellation.is_set() else error
        except ServiceCallError as e:
            error = str(e)
        return status, error

    def _budget_left(self, job_id: int, max_cost_usd: float) -> tuple[float, float]:
        """USD the job may still spend, and what its written articles cost on average (0
        before any was written)."""
        stats = self._persistence.job_stats([job_id])
        t = stats.totals
        written = t.generated + t.augmented + t.short + t.failed
        average = t.cost_usd / written if written else 0.0
        return max_cost_usd - t.cost_usd - stats.title_cost_usd, average

    def _can_pay(self, job_id: int, max_cost_usd: float) -> bool:
        """Whether what is left of the budget pays for an article as the job's cost so far."""
        left, average = self._budget_left(job_id, max_cost_usd)
        return left >= max(average, 1e-9)

    def _budget_message(self, job_id: int, max_cost_usd: float) -> str:
        """Why the job did not complete, when its budget kept articles from being written
        (skipped ones, and those of tiers it did not start); else ""."""
        stats = self._persistence.job_stats([job_id])
        t = stats.totals
        recorded = t.generated + t.augmented + t.short + t.failed + t.skipped
        unwritten = t.skipped + max(0, t.requested - recorded - stats.title_shortfall)
        if not unwritten:
            return ""
        spent = t.cost_usd + stats.title_cost_usd
        return (
            f"budget: {unwritten} articles not written to stay within max_cost_usd "
            f"${max_cost_usd:g} (spent ${spent:.4f}); `tierwriter jobs resume {job_id} "
            "--max-cost-usd N` with a higher N writes them"
        )

    def _project(self, spec: JobSpec, owner: str) -> db_pb.Project:
        if spec.project_id is not None:
            return self._persistence.get_project(spec.project_id)
        assert spec.project is not None
        return self._persistence.ensure_project(
            db_pb.Project(**spec.project.model_dump(), owner=owner)
        )

    def _run_tier(self, run: TierRun) -> Generator[pb.JobEvent, None, TierOutcome]:
        job, project, spec, tier_name, tier = run.job, run.project, run.spec, run.name, run.tier
        cancellation, retry_failed = run.cancellation, run.retry_failed
        job_id, workers = job.id, job.max_workers
        stored_titles = run.stored_titles
        # Else its titles were never kept: a new tier, or one that a crash cut off while its
        # titles streamed in (it may have records).
        resuming = stored_titles is not None
        if not resuming and spec.max_cost_usd and not self._can_pay(job_id, spec.max_cost_usd):
            # Titles cost too: a tier that cannot pay for one article does not ask for them.
            yield pb.JobEvent(
                notice=pb.Notice(
                    job_id=job_id,
                    tier=tier_name,
                    message=f"not started: the job's max_cost_usd ${spec.max_cost_usd:g} is spent",
                )
            )
            return TierOutcome("")
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
        sites = spec.sites_of(tier)

        def stored_now() -> dict[int, db_pb.Article]:
            return {
                a.article_index: a
                for a in self._persistence.list_articles(job_id, tier_name, metadata_only=True)
            }

        # A resumed tier's records, or those of one whose titles a crash cut off: its articles
        # start as the titles stream in, before the titles are kept with the job.
        records = stored_now()

        # Titles: a new tier gets all of them; a resumed one keeps its own, and gets new ones
        # only for articles that failed at `titles` when those are retried.
        want = 0 if resuming else tier.count
        if resuming and retry_failed:
            want = sum(
                1
                for index, record in records.items()
                if index >= len(stored_titles or []) and record.error_stage == "titles"
            )
        feed = TitleFeed(stored_titles or [])
        tier_stop = threading.Event()  # the titles failed: start no further article of the tier
        # None while titles are on their way; then why they stop the tier, or "".
        titles_failure: str | None = None if want else ""

        def finish_titles() -> Generator[pb.JobEvent, None, None]:
            """Once the titles are in: keep them with the job, and say how it went (once)."""
            nonlocal titles_failure
            if titles_failure is None and feed.done:
                # Read again: a lost generator may have saved records since the tier began.
                outcome = yield from self._titles_done(run, feed, want, stored_now(), needed)
                titles_failure = outcome.failure
                if titles_failure:
                    tier_stop.set()

        # Exactly the articles that have no terminal record yet or were skipped for the budget
        # (and, retrying, the failed).
        def needed(index: int, stored: dict[int, db_pb.Article]) -> bool:
            record = stored.get(index)
            return (
                record is None
                or record.status == article_pb.ARTICLE_STATUS_SKIPPED
                or (retry_failed and record.status == article_pb.ARTICLE_STATUS_FAILED)
            )

        def stopped() -> bool:
            return cancellation.is_set() or tier_stop.is_set()

        def article_requests(stored: dict[int, db_pb.Article]) -> Iterator[gen_pb.ArticleRequest]:
            """Each needed article as soon as its title is there (a feed that blocks)."""
            index = 0
            while (title := feed.wait_for(index, stopped)) is not None:
                if needed(index, stored):
                    site = sites[index % len(sites)] if sites else ""
                    yield gen_pb.ArticleRequest(article_index=index, title=title, site=site)
                index += 1

        def budget() -> float:
            """What the job may still spend (0: no limit); read again for every stream, since a
            lost generator spent some. Nothing left still needs a positive limit, which then
            skips every article."""
            if not spec.max_cost_usd:
                return 0.0
            return max(self._budget_left(job_id, spec.max_cost_usd)[0], 1e-9)

        settings = gen_pb.BatchSettings(
            job_id=job_id,
            project=context,
            tier=job_pb2.TierSpec(
                name=tier_name, **tier.model_dump(exclude={"deployment_targets"})
            ),
            models=job_pb2.ModelsSpec(**spec.models.model_dump()),
            max_workers=workers,
            continue_on_error=spec.continue_on_error,
            replace_failed=retry_failed,
        )
        failure = ""
        try:
            if want:
                self._start_titles(run, context, feed, want, [r.title for r in records.values()])
            if spec.max_cost_usd:
                # With a budget, the titles come first: what they cost counts before any article.
                feed.wait()
                yield from finish_titles()
                if titles_failure:
                    yield self._tier_finished(job_id, tier_name)
                    return TierOutcome(titles_failure)
            # Read before the titles: records they add replace failed ones, so the set is the same.
            todo = article_requests(records)
            for attempt in range(self._settings.generator_reconnect_attempts + 1):
                settings.budget_usd = budget()
                try:
                    # A cancel becomes a stop message: nothing new starts, in-flight articles
                    # finish (or stop after the grace period) and are recorded; the stream still
                    # ends only when every article is terminal.
                    with closing(
                        self._generator.generate_articles(
                            settings,
                            todo,
                            stop=stopped,
                            stop_reason=lambda: (
                                cancellation.reason or titles_failure or "the job was cancelled"
                            ),
                            # A hand-off lets in-flight articles finish: they are paid for already.
                            grace_seconds=lambda: (
                                0.0
                                if cancellation.handoff or not cancellation.is_set()
                                else self._settings.cancel_grace_seconds
                            ),
                        )
                    ) as events:
                        for event in events:
                            yield from finish_titles()  # "titles ready" before what follows
                            yield pb.JobEvent(article=event)  # the generator's event, as it is
                            if (
                                event.kind == article_pb.ARTICLE_EVENT_KIND_FAILED
                                and not failure
                                and event.fatal
                            ):
                                failure = f"stopped: {event.error}"
                            elif (
                                event.kind == article_pb.ARTICLE_EVENT_KIND_FAILED
                                and not failure
                                and not spec.continue_on_error
                            ):
                                failure = (
                                    f"{tier_name} article {event.article_index + 1}/{tier.count} "
                                    f"failed and continue_on_error is false: {event.error}"
                                )
                    break
                except ServiceCallError as e:
                    if e.code not in _GENERATOR_LOST or cancellation.is_set() or failure:
                        raise
                    if attempt == self._settings.generator_reconnect_attempts:
                        raise
                    delay = min(_RECONNECT_MAX_DELAY, 2.0**attempt)
                    yield pb.JobEvent(
                        notice=pb.Notice(
                            job_id=job_id,
                            tier=tier_name,
                            message=f"lost the generator ({e.details}); trying "
                            f"again in {delay:g}s ({attempt + 1}/"
                            f"{self._settings.generator_reconnect_attempts})",
                        )
                    )
                    cancellation.event.wait(delay)
                    feed.wait()  # the titles ended too (or went on elsewhere): take what came
                    yield from finish_titles()
                    if titles_failure:
                        break  # the titles were lost with it: the tier ends (a resume goes on)
                    stored = stored_now()  # what the lost generator saved is not redone
                    titles = feed.titles()
                    missing = sum(1 for i in range(len(titles)) if needed(i, stored))
                    todo = article_requests(stored)
                    yield pb.JobEvent(
                        notice=pb.Notice(
                            job_id=job_id,
                            tier=tier_name,
                            message=f"sending the {missing} articles without a record again",
                        )
                    )
            if stopped():
                feed.stop()  # cancelled, or the titles failed: no more titles are wanted
            feed.wait()
            yield from finish_titles()
        finally:
            tier_stop.set()  # a feed still waiting for titles ends
            feed.stop()
            feed.wait()
        if cancellation.is_set() and not failure:
            failure = cancellation.message
        yield self._tier_finished(job_id, tier_name)
        return TierOutcome(failure or titles_failure or "")

    def _start_titles(
        self,
        run: TierRun,
        context: gen_pb.ProjectContext,
        feed: TitleFeed,
        want: int,
        recorded: list[str],
    ) -> None:
        """Ask the generator for `want` more titles, streaming into `feed`. They must differ
        from the job's and project's others and from the tier's `recorded` articles' titles."""
        request = gen_pb.GenerateTitlesRequest(
            project=context,
            tier=run.name,
            count=want,
            model=run.spec.models.title,
            max_parallel_calls=run.job.max_workers,
            existing_titles=[*run.used_titles, *feed.titles(), *recorded],
        )
        feed.start(lambda on_titles: self._generator.generate_titles(request, on_titles))

    def _titles_done(
        self,
        run: TierRun,
        feed: TitleFeed,
        want: int,
        records: dict[int, db_pb.Article],
        needed: Callable[[int, dict[int, db_pb.Article]], bool],
    ) -> Generator[pb.JobEvent, None, TierOutcome]:
        """The titles are in: keep them with the job and beside the output, give articles whose
        title could not be made (the model failed) failed records at stage `titles`, so every
        requested article still ends as exactly one record, and report. Returns why the titles
        stop the tier, or ""."""
        job, project, spec, tier_name = run.job, run.project, run.spec, run.name
        if feed.error is not None:  # the call itself failed (e.g. the generator went away)
            return TierOutcome(f"{tier_name}: titles: {feed.error}")
        made = feed.result
        assert made is not None
        tier = spec.tiers[tier_name]
        sites = spec.sites_of(tier)
        titles = feed.titles()
        first_new = len(titles) - len(made.titles)
        # An article recorded before a crash cut its tier's titles off keeps the title it has.
        for index, record in records.items():
            if index < len(titles) and not needed(index, records):
                titles[index] = record.title
        run.used_titles.extend(titles[first_new:])  # later tiers must differ from these too
        self._persistence.record_titles(
            db_pb.RecordTitlesRequest(
                job_id=job.id,
                tier=tier_name,
                titles=titles,
                api_calls=made.api_calls,
                prompt_tokens=made.prompt_tokens,
                completion_tokens=made.completion_tokens,
                shortfall=made.shortfall,
                cost_usd=made.cost_usd,
            )
        )
        for retry in made.retries:  # one line each, as article retries are
            yield pb.JobEvent(
                notice=pb.Notice(
                    job_id=job.id,
                    tier=tier_name,
                    message=f"titles: API Error: {retry.reason}, retried after "
                    f"{round(retry.delay, 1):g}s (attempt {retry.attempt})",
                )
            )
        write_atomically(
            publish.titles_path(self._settings.output_dir, job.id, tier_name),
            "".join(f"{title}\n" for title in titles),
        )
        untitled = range(len(titles), first_new + want - made.shortfall) if made.error else []
        for index in untitled:
            self._persistence.save_article(
                db_pb.Article(
                    job_id=job.id,
                    project_id=project.id,
                    tier=tier_name,
                    article_index=index,
                    keyword=project.main_keyword,
                    title="",
                    status=article_pb.ARTICLE_STATUS_FAILED,
                    error_stage="titles",
                    error=made.error,
                    site=sites[index % len(sites)] if sites else "",
                ),
                replace_failed=run.retry_failed,
            )
        yield pb.JobEvent(
            titles_ready=pb.TitlesReady(
                job_id=job.id,
                tier=tier_name,
                count=len(made.titles),
                shortfall=made.shortfall,
                error=made.error,
                failed=len(untitled),
                rejected=made.rejected,
            )
        )
        if made.fatal:
            return TierOutcome(f"stopped: {made.error}")
        if untitled and not spec.continue_on_error:
            return TierOutcome(
                f"{tier_name}: titles failed and continue_on_error is false: {made.error}"
            )
        return TierOutcome("")

    def _tier_finished(self, job_id: int, tier: str) -> pb.JobEvent:
        """The tier's counts, from its records."""
        stats = next(s for s in self._persistence.job_stats([job_id]).tiers if s.tier == tier)
        return pb.JobEvent(tier_finished=tier_finished(job_id, stats))

    @staticmethod
    def _not_published(job_id: int, why: str) -> pb.JobEvent:
        return pb.JobEvent(
            post_processing=pb.PostProcessingStep(
                job_id=job_id,
                step=pb.POST_STEP_URLS,
                error=f"not run: {why}; `tierwriter jobs publish {job_id}` runs it later",
            )
        )
