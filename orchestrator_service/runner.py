"""JobRunner: runs a validated job file (or resumes a stored job) across the generator and
persistence, as a stream of JobEvents. Per job: project and sites → job record → one article
stream for its tiers (only the articles without a terminal record; re-sent to a generator that
answers again when one is lost), on which each tier's titles feed its articles and the next
tier's follow the last tier's → per tier, once its articles are terminal: its stats; then
(every article terminal) post-processing; then the run's summary, from the database.

A run holds the job's lease under an epoch its claim raised, and writes everything under it.
Once persistence refuses the epoch (another orchestrator claimed the job while this one was
paused or cut off), the run is fenced: it stops at once and writes nothing more — no model
call started for it, no file shown, no event, no final status."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import grpc

from orchestrator_service import publish, run_folder
from orchestrator_service.auth import Principal
from orchestrator_service.config import Settings
from orchestrator_service.dispatch import GeneratorPool
from orchestrator_service.events import JobEventLog
from orchestrator_service.jobfile import JobFile, JobFileError, JobSpec, parse_job_file
from orchestrator_service.postprocess import JobPublisher, LeaseLostError, lease_lost
from orchestrator_service.tier_group import Cancellation, FailureStreak, TierGroup, TierRun
from persistence_service.client import PersistenceClient
from tierwriter.article.v1 import article_event_pb2 as article_pb
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


@dataclass
class JobRun:
    """One run of a job on this orchestrator: its lease epoch, its thread, how it is stopped,
    its events."""

    epoch: int
    cancellation: Cancellation
    log: JobEventLog = field(init=False)  # made once the run exists: it may fence the run
    thread: threading.Thread = field(init=False)  # made once the run exists: it runs it


class JobRunner:
    """Runs the jobs this orchestrator claimed, each on a thread of its own that emits its
    events into the job's JobEventLog. The runs belong to the server, not to any client."""

    def __init__(
        self,
        settings: Settings,
        persistence: PersistenceClient,
        generators: GeneratorPool,
        owner: str,
        on_finished: Callable[[], None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._persistence = persistence  # retries while persistence or the database is down
        self._generators = generators
        self.owner = owner  # this orchestrator's id on the jobs' leases
        self._on_finished = on_finished
        self._templates = publish.template_environment(settings.templates_dir)
        self.publisher = JobPublisher(
            persistence, self._templates, settings.output_dir, settings.shown_output_dir()
        )
        self._lock = threading.Lock()  # guards _runs
        self._runs: dict[int, JobRun] = {}  # by job id: running here, or winding down

    def validate(self, text: str, caller: Principal) -> JobFile:
        """The job file, checked completely before anything is written: schema, that every
        project_id names a project the caller owns, and that no site is someone else's.
        JobFileError names the field and the problem (the same for someone else's project as
        for none)."""
        job_file = parse_job_file(text)
        others = self._others_sites(job_file, caller)
        for n, spec in enumerate(job_file.jobs):
            for site in spec.all_sites():
                if site.hostname in others:
                    raise JobFileError(
                        f"jobs[{n}].deployment_targets: {site.hostname}: this site belongs to "
                        "another user; use a hostname of your own (an admin can transfer it: "
                        "`tierwriter sites transfer`)"
                    )
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

    def _others_sites(self, job_file: JobFile, caller: Principal) -> set[str]:
        """The file's hostnames that are stored as another user's sites (none for an admin,
        who may use every site)."""
        if caller.is_admin:
            return set()
        hostnames = {s.hostname for spec in job_file.jobs for s in spec.all_sites()}
        return self._sites_not_of(hostnames, caller.username)

    def _sites_not_of(self, hostnames: set[str], username: str) -> set[str]:
        """Of these hostnames, those stored as a site of another user than `username`."""
        if not hostnames:
            return set()
        stored = self._persistence.list_sites(hostnames=sorted(hostnames))
        return {s.hostname for s in stored if s.owner != username}

    def check_sites_still_owned(self, job: db_pb.Job) -> None:
        """ValueError naming a site of the job that belongs to another user than the job's
        owner by now (given away since the job was stored, or before sites had owners): the
        job must not take URLs or write pages there. An admin's job may use every site."""
        if not job.owner:
            return  # a job from before jobs had owners: the admin's, as migration 0003 has it
        try:
            owner_is_admin = self._persistence.get_user(job.owner).role == "admin"
        except ServiceCallError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            owner_is_admin = False
        if owner_is_admin:
            return
        hostnames = {s.hostname for s in JobSpec.from_proto(job.spec).all_sites()}
        if taken := sorted(self._sites_not_of(hostnames, job.owner)):
            raise ValueError(
                f"site {taken[0]} of job {job.id} belongs to another user now; an admin can "
                f"give it back (`tierwriter sites transfer {taken[0]} {job.owner}`)"
            )

    def effective_workers(self, spec: JobSpec) -> int:
        """The job's max_workers, else CONCURRENT_WORKERS (default 5)."""
        return spec.max_workers or self._settings.concurrent_workers

    def submit(self, job_file: JobFile, caller: Principal, request_id: str = "") -> list[int]:
        """Store every job of a validated file, queued, in its order, with its sites and inline
        projects, in one step: all of it or — another user took a site meanwhile, the file
        would pass the caller's quota (RESOURCE_EXHAUSTED naming it) — nothing. Their ids.
        With the caller's `request_id`, a retry returns the first call's jobs."""
        sites: dict[str, str] = {}
        for site in (s for spec in job_file.jobs for s in spec.all_sites()):
            if site.template or site.hostname not in sites:  # a bare mention keeps a template
                sites[site.hostname] = site.template
        request = db_pb.SubmitJobsRequest(
            owner=caller.username,
            sites=[db_pb.Site(hostname=h, template=t) for h, t in sites.items()],
            any_owner=caller.is_admin,
            # Per user, and of a size the store keeps: another user's id is another request.
            request_id=hashlib.sha256(
                f"submit\0{caller.username}\0{request_id}".encode()
            ).hexdigest()[:48]
            if request_id
            else "",
        )
        for spec in job_file.jobs:
            job = request.jobs.add(
                spec=spec.to_proto(),
                max_workers=self.effective_workers(spec),
                requested_articles=spec.requested_articles(),
            )
            if spec.project_id is not None:
                job.project_id = spec.project_id
            else:
                assert spec.project is not None
                job.inline_project.CopyFrom(db_pb.Project(**spec.project.model_dump()))
        return [job.id for job in self._persistence.submit_jobs(request)]

    def running_ids(self) -> list[int]:
        """The jobs this orchestrator runs (and holds the lease of)."""
        return list(self.running_leases())

    def running_leases(self) -> dict[int, int]:
        """The jobs this orchestrator runs, each with the lease epoch it runs it under."""
        with self._lock:
            return {
                job_id: run.epoch
                for job_id, run in self._runs.items()
                if not run.cancellation.handoff
            }

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
            run = JobRun(job.lease_epoch, Cancellation())
            run.log = JobEventLog(
                job.id,
                first_seq,
                lambda job_id, events: self._persistence.append_events(job_id, events, run.epoch),
                on_fenced=run.cancellation.fence,
            )
            run.thread = threading.Thread(
                target=self._run,
                args=(job, previous_owner, run, previous.thread if previous else None),
                name=f"job{job.id}",
            )
            self._runs[job.id] = run
        run.thread.start()

    def cancel(self, job_id: int, reason: str) -> bool:
        """Cancel a job running here; False if it does not run here."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is None or run.cancellation.handoff:
            return False
        run.cancellation.cancel(reason)
        return True

    def fence(self, job_id: int, reason: str) -> None:
        """Another orchestrator holds the job's lease now: stop this run at once and write
        nothing more for it (in-flight articles are not waited for; their saves are refused)."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            log.warning("job %d: fenced: %s", job_id, reason)
            run.cancellation.fence(reason)

    def hand_off(self, job_id: int, reason: str) -> None:
        """Stop running a job without ending it (its lease is gone, or this orchestrator
        stops): nothing new starts, in-flight articles finish and are recorded, no final status
        is written; whoever holds the lease next carries it on."""
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            log.warning("job %d: handed off: %s", job_id, reason)
            run.cancellation.hand_off(reason)

    def close(self, timeout: float = 60.0) -> dict[int, int]:
        """Hand off every job running here and wait (up to `timeout` each) for its in-flight
        articles; returns their leases ({job id: epoch}), for the caller to release them."""
        with self._lock:
            runs = dict(self._runs)
        for job_id in runs:
            self.hand_off(job_id, SERVER_STOPPING)
        for run in runs.values():
            run.thread.join(timeout)
        return {job_id: run.epoch for job_id, run in runs.items() if not run.cancellation.fenced}

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
            self.check_sites_still_owned(job)
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
        except LeaseLostError as e:
            cancellation.fence(str(e))
        except ServiceCallError as e:
            if lease_lost(e):
                cancellation.fence(str(e))
            error = f"cannot run: {e}"
        except ValueError as e:
            error = f"cannot run: {e}"
        except Exception as e:  # a bug must still end the job with a status and a reason
            log.exception("job %d: unexpected error", job.id)
            error = f"internal error: {type(e).__name__}: {e}"
        try:
            if cancellation.fenced:
                run.log.close()  # refused already, or stored before the refusal: no more
                run_folder.discard_run(self._settings.output_dir, job.id, run.epoch)
                log.warning(
                    "job %d: this run (lease epoch %d) ended without writing more: %s",
                    job.id, run.epoch, cancellation.reason,
                )  # fmt: skip
                return
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
                self._persistence.finish_job(job.id, status, error, run.epoch)
            except ServiceCallError as e:
                if lease_lost(e):
                    cancellation.fence(str(e))
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
                    long_articles=t.long,
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
            streak = FailureStreak(self._settings.stop_after_same_failures, job.id)
            for group in [tiers] if shared else [[t] for t in tiers]:
                if cancellation.is_set():
                    error = cancellation.message
                    break
                first = group[0]
                if (
                    first.stored_titles is None
                    and spec.max_cost_usd
                    and not self._can_pay(job.id, spec.max_cost_usd)
                ):
                    # Titles cost too: a tier that cannot pay for one article asks for none.
                    yield pb.JobEvent(
                        notice=pb.Notice(
                            job_id=job.id,
                            tier=first.name,
                            message="not started: the job's max_cost_usd "
                            f"${spec.max_cost_usd:g} is spent",
                        )
                    )
                    continue
                outcome = yield from TierGroup(
                    group,
                    used,
                    self._persistence,
                    self._generators,
                    self._settings.output_dir,
                    self._settings.shown_output_dir(),
                    self._settings.generator_reconnect_attempts,
                    self._settings.cancel_grace_seconds,
                    lambda: self._budget_usd(job.id, spec.max_cost_usd or 0.0),
                    streak,
                ).run()
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
                    pb.JobEvent(post_processing=step)
                    for step in self.publisher.publish(job.id, job.lease_epoch)
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
            if lease_lost(e):
                raise  # the run is over; _run fences it
            error = str(e)
        return status, error

    def _budget_left(self, job_id: int, max_cost_usd: float) -> tuple[float, float]:
        """USD the job may still spend, and what its written articles cost on average (0
        before any was written)."""
        stats = self._persistence.job_stats([job_id])
        t = stats.totals
        written = t.generated + t.augmented + t.short + t.long + t.failed
        average = t.cost_usd / written if written else 0.0
        return max_cost_usd - t.cost_usd - stats.title_cost_usd, average

    def _budget_usd(self, job_id: int, max_cost_usd: float) -> float:
        """What the job may still spend (0: no limit); read again for every stream, since a lost
        generator spent some. Nothing left still needs a positive limit, which then skips every
        article."""
        if not max_cost_usd:
            return 0.0
        return max(self._budget_left(job_id, max_cost_usd)[0], 1e-9)

    def _can_pay(self, job_id: int, max_cost_usd: float) -> bool:
        """Whether what is left of the budget pays for an article as the job's cost so far."""
        left, average = self._budget_left(job_id, max_cost_usd)
        return left >= max(average, 1e-9)

    def _budget_message(self, job_id: int, max_cost_usd: float) -> str:
        """Why the job did not complete, when its budget kept articles from being written
        (skipped ones, and those of tiers it did not start); else ""."""
        stats = self._persistence.job_stats([job_id])
        t = stats.totals
        recorded = t.generated + t.augmented + t.short + t.long + t.failed + t.skipped
        unwritten = t.skipped + max(0, t.requested - recorded - stats.title_shortfall)
        if not unwritten:
            return ""
        spent = t.cost_usd + stats.title_cost_usd
        return (
            f"budget: {unwritten} articles not written to stay within max_cost_usd "
            f"${max_cost_usd:g} (spent ${spent:.4f}); `tierwriter jobs resume {job_id} "
            "--max-cost-usd N` with a higher N writes them"
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
