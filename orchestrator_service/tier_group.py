"""TierGroup: a job's tiers on one article stream to the generator, sharing its max_workers.

The first tier begins at once; each next one begins (its titles asked for) once the titles of
the one before are in, and its articles go out after that one's, so they start on the workers its
last articles leave free. A tier's tier_started comes before its articles' events, its
titles_ready once its titles are kept, its tier_finished once each of its articles is terminal.
A lost generator gets the articles without a record again, on a new stream.

Two threads: the job's thread runs TierGroup.run() (it reads the stream and reports), and the
stream's feeder, which gRPC runs in its own thread, sends articles and begins the next tiers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from generator_service.client import GeneratorClient
from orchestrator_service import publish
from orchestrator_service.jobfile import JobSpec, TierSpec
from orchestrator_service.postprocess import OutputWriteError, write_atomically
from orchestrator_service.title_feed import TitleFeed
from persistence_service.client import PersistenceClient
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.job.v1 import job_pb2
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError
from tierwriter.statuses import TERMINAL_ARTICLE_EVENTS

# A lost generator shows as one of these on the article stream; anything else is not retried.
GENERATOR_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
RECONNECT_MAX_DELAY = 30.0


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

    def titles_wanted(self, records: dict[int, db_pb.Article]) -> int:
        """How many titles to ask for: all of a tier that never kept its titles (new, or cut
        off by a crash); for a resumed one, only those of articles that failed for want of a
        title, when failures are retried."""
        if self.stored_titles is None:
            return self.tier.count
        if not self.retry_failed:
            return 0
        return sum(
            1
            for index, record in records.items()
            if index >= len(self.stored_titles) and record.error_stage == "titles"
        )


@dataclass(frozen=True)
class TierOutcome:
    """What a group of tiers ended with."""

    failure: str  # the first failure that stops the job, else ""


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
    """One tier of a group. The job's thread begins the first and reads every tier's records
    before the stream opens; a feeder begins each later one (asks for its titles), once. Fields
    say which thread writes them."""

    def __init__(self, run: TierRun, records: dict[int, db_pb.Article]) -> None:
        self.run = run
        self.records = records  # the job's thread: read again after a lost generator
        self.want = run.titles_wanted(records)
        self.feed = TitleFeed(run.stored_titles or [])  # its titles start in begin()
        self._begin_lock = threading.Lock()
        self._closed = False  # under _begin_lock: the group ended, nothing may begin
        self.began = threading.Event()
        # The job's thread only: what has been reported.
        self.announced = False  # tier_started
        self.titles_failure: str | None = None  # None until titles_ready; then why they stop it
        self.finished = False  # tier_finished

    def begin(self, start_titles: Callable[[RunningTier], None]) -> None:
        """Ask for its titles (`start_titles(self)`, when it wants any) exactly once, unless the
        group has ended."""
        with self._begin_lock:
            if self._closed or self.began.is_set():
                return
            if self.want:
                start_titles(self)
            self.began.set()

    def close(self) -> None:
        """The group ended: a feeder that outlived it begins nothing; the titles call, if any,
        is given up and waited for."""
        with self._begin_lock:
            self._closed = True
        self.feed.stop()
        self.feed.wait()

    def titles_failure_now(self) -> str:
        """Why its titles (the feed is done) stop the job, or "": the call failed, the API
        cannot serve the job, or titles are missing and continue_on_error is false."""
        if self.feed.error is not None:  # the call itself failed (e.g. the generator went away)
            return f"{self.run.name}: titles: {self.feed.error}"
        made = self.feed.result
        if made is None:  # no titles call: a resumed tier that has its titles
            return ""
        if made.fatal:
            return f"stopped: {made.error}"
        untitled = made.error and len(made.titles) < self.want - made.shortfall
        if untitled and not self.run.spec.continue_on_error:
            return f"{self.run.name}: titles failed and continue_on_error is false: {made.error}"
        return ""

    def titles_allow_next(self) -> bool:
        """Its titles are in and stop nothing: the next tier's may be asked for (they must
        differ from these)."""
        return self.began.is_set() and self.feed.done and not self.titles_failure_now()


class TierGroup:
    """Tiers of one job on one article stream (see the module's docstring). `used`: the titles
    new ones must differ from; the tiers' kept titles are added to it (the job's thread)."""

    def __init__(
        self,
        runs: list[TierRun],
        used: list[str],
        persistence: PersistenceClient,
        generator: GeneratorClient,
        output_dir: Path,
        shown_output_dir: Path,
        reconnect_attempts: int,
        cancel_grace_seconds: float,
        budget: Callable[[], float],
    ) -> None:
        first = runs[0]
        self._job, self._spec, self._cancellation = first.job, first.spec, first.cancellation
        self._persistence = persistence
        self._generator = generator
        self._output_dir = output_dir
        self._shown_output_dir = shown_output_dir  # where the user finds it, for messages
        self._reconnect_attempts = reconnect_attempts
        self._cancel_grace_seconds = cancel_grace_seconds
        self._budget = budget  # USD the job may still spend, read for every stream; 0: no limit
        self._used = used
        self._before = list(used)  # the feeders' copy: `used` belongs to the job's thread
        self._context = gen_pb.ProjectContext(
            project_id=first.project.id,
            main_keyword=first.project.main_keyword,
            entities=first.project.entities,
            related_searches=first.project.related_searches,
        )
        # Read here, on the job's thread: a tier that has not begun has no article running, so
        # its records cannot change before it begins.
        self._tiers = [RunningTier(run, self._stored(run)) for run in runs]
        # A resumed job's articles keep their titles, which new ones must differ from too (a
        # crash may have kept a later tier's articles but not an earlier tier's titles).
        self._before += [r.title for t in self._tiers for r in t.records.values() if r.title]
        self._stop = threading.Event()  # titles failed: start no further article of the group
        self._progress = StreamProgress()  # the current stream's
        self._failure = ""  # the first failure that stops the job (an article's)

    # The job's thread -----------------------------------------------------------------------

    def run(self) -> Generator[pb.JobEvent, None, TierOutcome]:
        """Every tier of the group to its end; the events to emit, and why the job stops."""
        try:
            self._begin(0)
            yield from self._report_titles()  # tier_started before the titles come
            if self._spec.max_cost_usd:
                # With a budget, the titles come first: what they cost counts before any article.
                self._tiers[0].feed.wait()
                yield from self._report_titles()
            pending = list(range(len(self._tiers)))
            for attempt in range(self._reconnect_attempts + 1):
                if self._stopped():
                    break
                self._progress = StreamProgress()
                try:
                    yield from self._stream(pending)
                    break
                except ServiceCallError as e:
                    self._progress.over.set()  # its feeder begins no further tier
                    lost = e.service == "generator_service" and e.code in GENERATOR_LOST
                    if not lost or self._cancellation.is_set() or self._failure:
                        raise
                    if attempt == self._reconnect_attempts:
                        raise
                    pending = yield from self._reconnect(e, attempt)
                    if self._stopped():
                        break  # titles were lost with it: the tiers end (a resume goes on)
            self._progress.over.set()
            for tier in self._tiers:
                if self._stopped():
                    tier.feed.stop()  # cancelled, or titles failed: no more titles are wanted
                tier.feed.wait()
            yield from self._report_titles()
        finally:
            self._stop.set()  # a feed still waiting for titles ends
            for tier in self._tiers:
                tier.close()
        failure = self._failure
        if self._cancellation.is_set() and not failure:
            failure = self._cancellation.message
        for tier in self._tiers:
            if tier.began.is_set() and not tier.finished:
                tier.finished = True
                yield self._tier_finished(tier.run.name)
        titles_failure = next((t.titles_failure for t in self._tiers if t.titles_failure), "")
        return TierOutcome(failure or titles_failure)

    def _stream(self, pending: list[int]) -> Generator[pb.JobEvent, None, None]:
        """One article stream for the pending tiers, read to its end."""
        job_id, spec, cancellation = self._job.id, self._spec, self._cancellation
        first, *more = (tier.run for tier in self._tiers)
        settings = gen_pb.BatchSettings(
            job_id=job_id,
            project=self._context,
            tier=_tier_spec(first),
            more_tiers=[_tier_spec(run) for run in more],
            models=job_pb2.ModelsSpec(**spec.models.model_dump()),
            max_workers=self._job.max_workers,
            continue_on_error=spec.continue_on_error,
            replace_failed=first.retry_failed,
            budget_usd=self._budget(),
        )
        # A cancel becomes a stop message: nothing new starts, in-flight articles finish (or
        # stop after the grace period) and are recorded; the stream still ends only when every
        # article is terminal.
        with closing(
            self._generator.generate_articles(
                settings,
                self._requests(pending, self._progress),
                stop=self._stopped,
                stop_reason=lambda: (
                    cancellation.reason
                    or next((t.titles_failure for t in self._tiers if t.titles_failure), "")
                    or "the job was cancelled"
                ),
                # A hand-off lets in-flight articles finish: they are paid for already.
                grace_seconds=lambda: (
                    self._cancel_grace_seconds
                    if cancellation.is_set() and not cancellation.handoff
                    else 0.0
                ),
            )
        ) as events:
            for event in events:
                yield from self._report_titles()  # "titles ready" before what follows
                yield pb.JobEvent(article=event)  # the generator's event, as it is
                if event.kind in TERMINAL_ARTICLE_EVENTS:
                    self._progress.terminal(event.tier)
                if event.kind == article_pb.ARTICLE_EVENT_KIND_FAILED and not self._failure:
                    if event.fatal:
                        self._failure = f"stopped: {event.error}"
                    elif not spec.continue_on_error:
                        self._failure = (
                            f"{event.tier} article {event.article_index + 1}/{event.tier_count} "
                            f"failed and continue_on_error is false: {event.error}"
                        )
                yield from self._report_finished()

    def _reconnect(
        self, error: ServiceCallError, attempt: int
    ) -> Generator[pb.JobEvent, None, list[int]]:
        """After a lost generator: wait, take in what the titles calls made, read the records
        again (what the lost generator saved is not redone); the tiers still pending."""
        delay = min(RECONNECT_MAX_DELAY, 2.0**attempt)
        unfinished = [t for t in self._tiers if not t.finished]
        yield pb.JobEvent(
            notice=pb.Notice(
                job_id=self._job.id,
                tier=unfinished[0].run.name if unfinished else self._tiers[-1].run.name,
                message=f"lost the generator ({error.details}); trying again in {delay:g}s "
                f"({attempt + 1}/{self._reconnect_attempts})",
            )
        )
        self._cancellation.event.wait(delay)
        begun = [t for t in unfinished if t.began.is_set()]
        for tier in begun:
            tier.feed.wait()  # its titles ended too (or went on elsewhere)
        yield from self._report_titles()
        if self._stopped():
            return []
        for tier in begun:
            tier.records = self._stored(tier.run)
            titles = tier.feed.titles()
            missing = sum(1 for i in range(len(titles)) if tier.run.needed(i, tier.records))
            yield pb.JobEvent(
                notice=pb.Notice(
                    job_id=self._job.id,
                    tier=tier.run.name,
                    message=f"sending the {missing} articles without a record again",
                )
            )
        return [n for n, t in enumerate(self._tiers) if not t.finished]

    def _report_titles(self) -> Generator[pb.JobEvent, None, None]:
        """Before an article's event: tier_started of the tiers that began, and titles_ready
        (once) of those whose titles are in; in tier order."""
        for tier in self._tiers:
            if not tier.began.is_set():
                break
            if not tier.announced:
                tier.announced = True
                yield self._tier_started(tier.run)
            if tier.titles_failure is None and not tier.want:
                tier.titles_failure = ""  # it asked for none
            elif tier.titles_failure is None and tier.feed.done:
                # Read again: a lost generator may have saved records since it began.
                yield from self._titles_done(tier, self._stored(tier.run))
                tier.titles_failure = tier.titles_failure_now()
                if tier.titles_failure:
                    self._stop.set()

    def _report_finished(self) -> Generator[pb.JobEvent, None, None]:
        """After an article's event: tier_finished of the tiers whose articles are all terminal,
        in tier order."""
        for tier in self._tiers:
            if tier.finished:
                continue
            reported = tier.began.is_set() and tier.titles_failure is not None
            if not reported or not self._progress.all_terminal(tier.run.name):
                return
            tier.finished = True
            yield self._tier_finished(tier.run.name)

    def _titles_done(
        self, tier: RunningTier, records: dict[int, db_pb.Article]
    ) -> Generator[pb.JobEvent, None, None]:
        """The tier's titles are in: keep them with the job and beside the output, give
        articles whose title could not be made (the model failed) failed records at stage
        `titles`, so every requested article still ends as exactly one record, and report."""
        run, feed = tier.run, tier.feed
        made = feed.result
        if made is None:  # the call failed: titles_failure_now() says why
            return
        job, project = run.job, run.project
        titles = feed.titles()
        first_new = len(titles) - len(made.titles)
        # An article recorded before a crash cut its tier's titles off keeps the title it has.
        for index, record in records.items():
            if index < len(titles) and not run.needed(index, records):
                titles[index] = record.title
        self._used.extend(titles[first_new:])  # later tiers must differ from these too
        self._persistence.record_titles(
            db_pb.RecordTitlesRequest(
                job_id=job.id,
                tier=run.name,
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
                    tier=run.name,
                    message=f"titles: API Error: {retry.reason}, retried after "
                    f"{round(retry.delay, 1):g}s (attempt {retry.attempt})",
                )
            )
        try:
            write_atomically(
                publish.titles_path(self._output_dir, job.id, run.name),
                "".join(f"{title}\n" for title in titles),
            )
        except OutputWriteError as e:
            # The titles are recorded; the file is a copy that publishing writes again. The
            # tier goes on: its articles are what the disk must not cost.
            yield pb.JobEvent(
                notice=pb.Notice(
                    job_id=job.id,
                    tier=run.name,
                    message=f"titles file not written "
                    f"({e.seen_from(self._output_dir, self._shown_output_dir)}); the titles are "
                    "stored and the articles go on: publishing writes the file",
                )
            )
        untitled = range(len(titles), first_new + tier.want - made.shortfall) if made.error else []
        for index in untitled:
            self._persistence.save_article(
                db_pb.Article(
                    job_id=job.id,
                    project_id=project.id,
                    tier=run.name,
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
                tier=run.name,
                count=len(made.titles),
                shortfall=made.shortfall,
                error=made.error,
                failed=len(untitled),
                rejected=made.rejected,
            )
        )

    def _stored(self, run: TierRun) -> dict[int, db_pb.Article]:
        """The tier's records so far, by article index."""
        return {
            a.article_index: a
            for a in self._persistence.list_articles(run.job.id, run.name, metadata_only=True)
        }

    def _tier_started(self, run: TierRun) -> pb.JobEvent:
        return pb.JobEvent(
            tier_started=pb.TierStarted(
                job_id=self._job.id,
                tier=run.name,
                count=run.tier.count,
                max_workers=self._job.max_workers,
            )
        )

    def _tier_finished(self, tier: str) -> pb.JobEvent:
        """The tier's counts, from its records."""
        stats = self._persistence.job_stats([self._job.id]).tiers
        return pb.JobEvent(
            tier_finished=tier_finished(self._job.id, next(s for s in stats if s.tier == tier))
        )

    # Both threads ---------------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._cancellation.is_set() or self._stop.is_set()

    def _begin(self, n: int) -> None:
        """Begin tier n: ask for the titles it lacks. They must differ from the job's and
        project's others, from the tiers' before it, and from its own records'."""

        def start_titles(tier: RunningTier) -> None:
            earlier = [
                title
                for t in self._tiers[:n]
                for title in [*t.feed.titles(), *(r.title for r in t.records.values())]
            ]
            recorded = [r.title for r in tier.records.values()]
            request = gen_pb.GenerateTitlesRequest(
                project=self._context,
                tier=tier.run.name,
                count=tier.want,
                model=self._spec.models.title,
                max_parallel_calls=self._job.max_workers,
                existing_titles=[*self._before, *earlier, *recorded, *tier.feed.titles()],
            )
            tier.feed.start(lambda on_titles: self._generator.generate_titles(request, on_titles))

        self._tiers[n].begin(start_titles)

    # The feeder (gRPC's request thread) -----------------------------------------------------

    def _requests(
        self, pending: list[int], stream: StreamProgress
    ) -> Iterator[gen_pb.ArticleRequest]:
        """Each needed article of the pending tiers as soon as its title is there (it blocks
        while titles come); the next tier begins once this one's titles are in."""
        for position, n in enumerate(pending):
            tier = self._tiers[n]
            if not tier.began.is_set():
                if self._stopped() or stream.over.is_set():
                    return
                if not self._tiers[n - 1].titles_allow_next():
                    return
                self._begin(n)
            following = pending[position + 1] if position + 1 < len(pending) else None
            try:
                index = 0
                while (title := tier.feed.wait_for(index, self._stopped)) is not None:
                    if tier.run.needed(index, tier.records):
                        stream.sent(tier.run.name)
                        yield gen_pb.ArticleRequest(
                            article_index=index,
                            title=title,
                            site=tier.run.site(index),
                            tier=tier.run.name,
                        )
                    index += 1
                    if (
                        following is not None
                        and tier.titles_allow_next()
                        and not self._stopped()
                        and not stream.over.is_set()
                    ):
                        self._begin(following)  # its titles come while these articles run
            finally:
                stream.fed(tier.run.name)


def _tier_spec(run: TierRun) -> job_pb2.TierSpec:
    return job_pb2.TierSpec(name=run.name, **run.tier.model_dump(exclude={"deployment_targets"}))
