"""JobRunner: runs a validated job file (or resumes a stored job) across the generator and
persistence, as a stream of JobEvents. Per job: project and sites → job record → one article
stream for its tiers (only the articles without a terminal record; re-sent to a generator that
answers again when one is lost), on which each tier's titles feed its articles and the next
tier's follow the last tier's → per tier, once its articles are terminal: its stats; then
(every article terminal) post-processing; then the run's summary, from the database."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import grpc

from generator_service.client import TERMINAL_KINDS, GeneratorClient
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
    stored_titles: list[str] | None  # a resumed tier's own titles; None: it never started

    def needed(self, index: int, stored: dict[int, db_pb.Article]) -> bool:
        """Whether article `index` is to be written: it has no terminal record yet, or was
        skipped for the budget (or, retrying, failed)."""
        record = stored.get(index)
        return (
            record is None
            or record.status == article_pb.ARTICLE_STATUS_SKIPPED
            or (self.retry_failed and record.status == article_pb.ARTICLE_STATUS_FAILED)
        )

    def site(self, index: int) -> str:
        """The site article `index` is assigned to (round robin), "" for none."""
        sites = self.spec.sites_of(self.tier)
        return sites[index % len(sites)] if sites else ""


@dataclass(frozen=True)
class TierOutcome:
    """What a tier's article stream ended with."""

    failure: str  # the first failure that stops the job (continue_on_error false), else ""


class StreamProgress:
    """How far one article stream got with each tier: what its feeder sent, which tiers it is
    done with, and the terminal events back. A stream that was lost keeps its own: its feeder
    can outlive it, and must not count on the next one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the feeder writes, the job's thread reads
        self._sent: dict[str, int] = {}
        self._fed: set[str] = set()
        self._terminal: dict[str, int] = {}  # the job's thread only
        self.over = threading.Event()  # lost or ended: its feeder begins no further tier

    def sent(self, tier: str) -> None:
        with self._lock:
            self._sent[tier] = self._sent.get(tier, 0) + 1

    def fed(self, tier: str) -> None:
        """The feeder sent every article of `tier` it will."""
        with self._lock:
            self._fed.add(tier)

    def terminal(self, tier: str) -> None:
        self._terminal[tier] = self._terminal.get(tier, 0) + 1

    def all_terminal(self, tier: str) -> bool:
        """Every article of `tier` this stream will carry had its terminal event."""
        with self._lock:
            return tier in self._fed and self._terminal.get(tier, 0) >= self._sent.get(tier, 0)


class RunningTier:
    """A tier on an article stream that it may share with the job's next tiers. It begins once
    (its records read, its titles asked for), on whichever thread reaches it first; the stream's
    feeder then sends its articles as titles come, and the job's thread reports it."""

    def __init__(self, run: TierRun) -> None:
        self.run = run
        self._begin_lock = threading.Lock()
        self.began = threading.Event()
        # Set when it begins, read only after `began`:
        self.records: dict[int, db_pb.Article] = {}  # read again after a lost generator
        self.want = 0  # titles asked for
        self.feed = TitleFeed([])
        # The job's thread only: what has been reported.
        self.announced = False  # tier_started
        self.titles_failure: str | None = None  # None until titles_ready; then why they stop it
        self.finished = False  # tier_finished

    def begin(self, start: Callable[[RunningTier], None]) -> None:
        """`start(self)` exactly once, whoever asks first."""
        with self._begin_lock:
            if not self.began.is_set():
                start(self)
                self.began.set()

    def titles_allow_next(self) -> bool:
        """Its titles are in and did not fail in a way that ends the job: the next tier's may
        be asked for (they must differ from these)."""
        if not self.feed.done or self.feed.error is not None:
            return False
        return not (self.feed.result is not None and self.feed.result.fatal)


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
            tiers = [
                TierRun(
                    job, project, spec, tier_name, tier, cancellation, retry_failed,
                    titles.get(tier_name),
                )
                for tier_name, tier in spec.ordered_tiers()
            ]  # fmt: skip
            # The tiers share one article stream: the next one's articles start on workers the
            # last ones of the tier before leave free. A job that stops at its first failure or
            # keeps a budget runs them one after the other instead, so nothing of a tier is paid
            # for once the tier before has stopped the job or spent the budget.
            shared = spec.continue_on_error and not spec.max_cost_usd
            for group in [tiers] if shared else [[t] for t in tiers]:
                if cancellation.is_set():
                    error = cancellation.message
                    break
                outcome = yield from self._run_tiers(group, used)
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

    def _run_tiers(
        self, group: list[TierRun], used: list[str]
    ) -> Generator[pb.JobEvent, None, TierOutcome]:
        """Tiers on one article stream, in order. The first begins now; each next one begins
        (its titles asked for) once the titles of the one before are in, and its articles go
        out after that one's, on the same `max_workers`. A tier's tier_started comes before
        its articles' events, its tier_finished once each of its articles is terminal. `used`:
        the titles new ones must differ from; the tiers' new titles are added to it."""
        first = group[0]
        job, spec, cancellation = first.job, first.spec, first.cancellation
        job_id = job.id
        if (
            first.stored_titles is None
            and spec.max_cost_usd
            and not self._can_pay(job_id, spec.max_cost_usd)
        ):
            # Titles cost too: a tier that cannot pay for one article does not ask for them.
            yield pb.JobEvent(
                notice=pb.Notice(
                    job_id=job_id,
                    tier=first.name,
                    message=f"not started: the job's max_cost_usd ${spec.max_cost_usd:g} is spent",
                )
            )
            return TierOutcome("")
        context = gen_pb.ProjectContext(
            project_id=first.project.id,
            main_keyword=first.project.main_keyword,
            entities=first.project.entities,
            related_searches=first.project.related_searches,
        )
        tiers = [RunningTier(run) for run in group]
        group_stop = threading.Event()  # titles failed: start no further article of the group
        before = list(used)  # the feeder's copy: `used` belongs to this thread
        progress = StreamProgress()  # the current stream's

        def stopped() -> bool:
            return cancellation.is_set() or group_stop.is_set()

        def begin(n: int) -> None:
            """Begin tier n: read its records, ask for the titles it lacks. Its titles must
            differ from the job's and project's others, and from the tiers' before it."""

            def start(tier: RunningTier) -> None:
                run = tier.run
                tier.records = self._stored(run)
                earlier = [
                    title
                    for t in tiers[:n]
                    for title in [*t.feed.titles(), *(r.title for r in t.records.values())]
                ]
                if run.stored_titles is None:  # new, or its titles were never kept
                    tier.want = run.tier.count
                elif run.retry_failed:  # resumed: new titles only for those that had none
                    tier.want = sum(
                        1
                        for index, record in tier.records.items()
                        if index >= len(run.stored_titles) and record.error_stage == "titles"
                    )
                tier.feed = TitleFeed(run.stored_titles or [])
                if not tier.want:
                    return  # nothing to ask for, nothing to report
                recorded = [r.title for r in tier.records.values()]
                self._start_titles(
                    run, context, tier.feed, tier.want, [*before, *earlier, *recorded]
                )

            tiers[n].begin(start)

        def article_requests(
            pending: list[int], stream: StreamProgress
        ) -> Iterator[gen_pb.ArticleRequest]:
            """The feeder: each needed article of the pending tiers as soon as its title is
            there (it blocks while titles come); the next tier begins once this one's titles
            are in."""
            for position, n in enumerate(pending):
                tier = tiers[n]
                if not tier.began.is_set():
                    if stopped() or stream.over.is_set() or not tiers[n - 1].titles_allow_next():
                        return
                    begin(n)
                try:
                    index = 0
                    while (title := tier.feed.wait_for(index, stopped)) is not None:
                        if tier.run.needed(index, tier.records):
                            stream.sent(tier.run.name)
                            yield gen_pb.ArticleRequest(
                                article_index=index,
                                title=title,
                                site=tier.run.site(index),
                                tier=tier.run.name,
                            )
                        index += 1
                        following = pending[position + 1] if position + 1 < len(pending) else None
                        if (
                            following is not None
                            and tier.titles_allow_next()
                            and not stopped()
                            and not stream.over.is_set()
                        ):
                            begin(following)  # its titles come while this tier's articles run
                finally:
                    stream.fed(tier.run.name)

        def report_titles() -> Generator[pb.JobEvent, None, None]:
            """Before an article's event: tier_started of the tiers that began, and
            titles_ready (once) of those whose titles are in; in tier order."""
            for tier in tiers:
                if not tier.began.is_set():
                    break
                if not tier.announced:
                    tier.announced = True
                    yield self._tier_started(tier.run)
                if tier.titles_failure is None and not tier.want:
                    tier.titles_failure = ""  # it asked for none
                elif tier.titles_failure is None and tier.feed.done:
                    # Read again: a lost generator may have saved records since it began.
                    outcome = yield from self._titles_done(
                        tier.run, tier.feed, tier.want, self._stored(tier.run), used
                    )
                    tier.titles_failure = outcome.failure
                    if outcome.failure:
                        group_stop.set()

        def report_finished() -> Generator[pb.JobEvent, None, None]:
            """After an article's event: tier_finished of the tiers whose articles are all
            terminal, in tier order."""
            for tier in tiers:
                if not tier.finished:
                    reported = tier.began.is_set() and tier.titles_failure is not None
                    if not reported or not progress.all_terminal(tier.run.name):
                        return
                    tier.finished = True
                    yield self._tier_finished(job_id, tier.run.name)

        def budget() -> float:
            """What the job may still spend (0: no limit); read again for every stream, since a
            lost generator spent some. Nothing left still needs a positive limit, which then
            skips every article."""
            if not spec.max_cost_usd:
                return 0.0
            return max(self._budget_left(job_id, spec.max_cost_usd)[0], 1e-9)

        def tier_spec(run: TierRun) -> job_pb2.TierSpec:
            return job_pb2.TierSpec(
                name=run.name, **run.tier.model_dump(exclude={"deployment_targets"})
            )

        settings = gen_pb.BatchSettings(
            job_id=job_id,
            project=context,
            tier=tier_spec(first),
            more_tiers=[tier_spec(run) for run in group[1:]],
            models=job_pb2.ModelsSpec(**spec.models.model_dump()),
            max_workers=job.max_workers,
            continue_on_error=spec.continue_on_error,
            replace_failed=first.retry_failed,
        )
        failure = ""
        try:
            begin(0)
            yield from report_titles()  # tier_started before the titles come
            if spec.max_cost_usd:
                # With a budget, the titles come first: what they cost counts before any article.
                tiers[0].feed.wait()
                yield from report_titles()
            pending = list(range(len(tiers)))
            for attempt in range(self._settings.generator_reconnect_attempts + 1):
                if stopped():
                    break
                settings.budget_usd = budget()
                progress = StreamProgress()
                try:
                    # A cancel becomes a stop message: nothing new starts, in-flight articles
                    # finish (or stop after the grace period) and are recorded; the stream still
                    # ends only when every article is terminal.
                    with closing(
                        self._generator.generate_articles(
                            settings,
                            article_requests(pending, progress),
                            stop=stopped,
                            stop_reason=lambda: (
                                cancellation.reason
                                or next((t.titles_failure for t in tiers if t.titles_failure), "")
                                or "the job was cancelled"
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
                            yield from report_titles()  # "titles ready" before what follows
                            yield pb.JobEvent(article=event)  # the generator's event, as it is
                            if event.kind in TERMINAL_KINDS:
                                progress.terminal(event.tier)
                            if event.kind == article_pb.ARTICLE_EVENT_KIND_FAILED and not failure:
                                if event.fatal:
                                    failure = f"stopped: {event.error}"
                                elif not spec.continue_on_error:
                                    failure = (
                                        f"{event.tier} article {event.article_index + 1}/"
                                        f"{event.tier_count} failed and continue_on_error is "
                                        f"false: {event.error}"
                                    )
                            yield from report_finished()
                    break
                except ServiceCallError as e:
                    progress.over.set()  # its feeder begins no further tier
                    if e.code not in _GENERATOR_LOST or cancellation.is_set() or failure:
                        raise
                    if attempt == self._settings.generator_reconnect_attempts:
                        raise
                    delay = min(_RECONNECT_MAX_DELAY, 2.0**attempt)
                    yield pb.JobEvent(
                        notice=pb.Notice(
                            job_id=job_id,
                            tier=next(t.run.name for t in tiers if not t.finished),
                            message=f"lost the generator ({e.details}); trying "
                            f"again in {delay:g}s ({attempt + 1}/"
                            f"{self._settings.generator_reconnect_attempts})",
                        )
                    )
                    cancellation.event.wait(delay)
                    begun = [t for t in tiers if t.began.is_set()]
                    for tier in begun:
                        tier.feed.wait()  # its titles ended too (or went on elsewhere)
                    yield from report_titles()
                    if stopped():
                        break  # titles were lost with it: the tiers end (a resume goes on)
                    pending = [n for n, t in enumerate(tiers) if not t.finished]
                    for tier in begun:
                        if tier.finished:
                            continue
                        tier.records = self._stored(tier.run)  # what it saved is not redone
                        missing = sum(
                            1
                            for i in range(len(tier.feed.titles()))
                            if tier.run.needed(i, tier.records)
                        )
                        yield pb.JobEvent(
                            notice=pb.Notice(
                                job_id=job_id,
                                tier=tier.run.name,
                                message=f"sending the {missing} articles without a record again",
                            )
                        )
            progress.over.set()
            for tier in tiers:
                if stopped():
                    tier.feed.stop()  # cancelled, or titles failed: no more titles are wanted
                tier.feed.wait()
            yield from report_titles()
        finally:
            group_stop.set()  # a feed still waiting for titles ends
            for tier in tiers:
                tier.feed.stop()
                tier.feed.wait()
        if cancellation.is_set() and not failure:
            failure = cancellation.message
        for tier in tiers:
            if tier.began.is_set() and not tier.finished:
                tier.finished = True
                yield self._tier_finished(job_id, tier.run.name)
        titles_failure = next((t.titles_failure for t in tiers if t.titles_failure), "")
        return TierOutcome(failure or titles_failure)

    def _stored(self, run: TierRun) -> dict[int, db_pb.Article]:
        """The tier's records so far, by article index."""
        return {
            a.article_index: a
            for a in self._persistence.list_articles(run.job.id, run.name, metadata_only=True)
        }

    @staticmethod
    def _tier_started(run: TierRun) -> pb.JobEvent:
        return pb.JobEvent(
            tier_started=pb.TierStarted(
                job_id=run.job.id,
                tier=run.name,
                count=run.tier.count,
                max_workers=run.job.max_workers,
            )
        )

    def _start_titles(
        self,
        run: TierRun,
        context: gen_pb.ProjectContext,
        feed: TitleFeed,
        want: int,
        existing: list[str],
    ) -> None:
        """Ask the generator for `want` more titles, streaming into `feed`. They must differ
        from `existing` and from those the feed has."""
        request = gen_pb.GenerateTitlesRequest(
            project=context,
            tier=run.name,
            count=want,
            model=run.spec.models.title,
            max_parallel_calls=run.job.max_workers,
            existing_titles=[*existing, *feed.titles()],
        )
        feed.start(lambda on_titles: self._generator.generate_titles(request, on_titles))

    def _titles_done(
        self,
        run: TierRun,
        feed: TitleFeed,
        want: int,
        records: dict[int, db_pb.Article],
        used: list[str],
    ) -> Generator[pb.JobEvent, None, TierOutcome]:
        """The titles are in: keep them with the job and beside the output, give articles whose
        title could not be made (the model failed) failed records at stage `titles`, so every
        requested article still ends as exactly one record, and report. The titles it keeps are
        added to `used`. Returns why the titles stop the tier, or ""."""
        job, project, spec, tier_name = run.job, run.project, run.spec, run.name
        if feed.error is not None:  # the call itself failed (e.g. the generator went away)
            return TierOutcome(f"{tier_name}: titles: {feed.error}")
        made = feed.result
        assert made is not None
        titles = feed.titles()
        first_new = len(titles) - len(made.titles)
        # An article recorded before a crash cut its tier's titles off keeps the title it has.
        for index, record in records.items():
            if index < len(titles) and not run.needed(index, records):
                titles[index] = record.title
        used.extend(titles[first_new:])  # later tiers must differ from these too
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
                    site=run.site(index),
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
