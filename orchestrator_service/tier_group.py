"""TierGroup: a job's tiers on the generators' article streams, sharing its max_workers.

The first tier begins at once; each next one begins (its titles asked for) once the titles of
the one before are in, and its articles go out after that one's, so they start on the workers its
last articles leave free. A tier's tier_started comes before its articles' events, its
titles_ready once its titles are kept, its tier_finished once each of its articles is terminal.
The articles are spread over every generator replica (ArticleDispatch); those in flight on a
replica that is lost are sent again, if they have no record, to the others.

Two threads: the job's thread runs TierGroup.run() (it reads the streams' events and reports),
and the dispatcher, which pulls articles from the feed (_requests) and begins the next tiers.

Everything the group writes carries the job's lease epoch; once persistence refuses it (another
orchestrator took the job over), the run is fenced and the group ends at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator_service import publish, run_folder
from orchestrator_service.dispatch import (
    GENERATOR_LOST,
    RECONNECT_MAX_DELAY,
    ArticleDispatch,
    GeneratorPool,
    Reconnecting,
    StreamLost,
)
from orchestrator_service.jobfile import JobSpec, TierSpec
from orchestrator_service.run_folder import OutputWriteError, write_atomically
from orchestrator_service.title_feed import TitleFeed
from persistence_service.client import PersistenceClient
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.job.v1 import job_pb2
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError


@dataclass
class Cancellation:
    """How a run is stopped: the event its generator streams watch, and the first reason. A
    hand-off stops the run too, but the job goes on elsewhere: no grace period (in-flight
    articles finish and are recorded) and no final status. A fence is a hand-off forced on the
    run: its lease epoch was refused (another orchestrator holds the job), so nothing of it may
    be written any more — its streams are cancelled, no file, no event, no status."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    handoff: bool = False
    fenced: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fence(self, reason: str) -> None:
        with self._lock:
            self.handoff = self.fenced = True
            self.reason = self.reason or reason
        self.event.set()

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
        long=c.long,
        skipped=c.skipped,
        cost_usd=c.cost_usd,
    )


class RunningTier:
    """One tier of a group. The job's thread begins the first and reads every tier's records
    before the streams open; the feeder begins each later one (asks for its titles), once.
    Fields say which thread writes them."""

    def __init__(self, run: TierRun, records: dict[int, db_pb.Article]) -> None:
        self.run = run
        self.records = records  # read before the group runs: its articles are all terminal
        self.want = run.titles_wanted(records)
        self.feed = TitleFeed(run.stored_titles or [])  # its titles start in begin()
        self._begin_lock = threading.Lock()
        self._closed = False  # under _begin_lock: the group ended, nothing may begin
        self.began = threading.Event()
        self.fed = threading.Event()  # the feeder sent every article of the tier it will
        # The job's thread only: what has been reported.
        self.announced = False  # tier_started
        self.titles_failure: str | None = None  # None until titles_ready; then why they stop it
        # Titles the model did not give: articles the tier will not have (a resumed tier's, from
        # the titles it kept, unless it asks for more).
        stored = run.stored_titles
        self.shortfall = run.tier.count - len(stored) if stored and not self.want else 0
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


class FailureStreak:
    """A run's first articles, watched for a systemic failure: `limit` of them FAILED in a row
    at one stage with one kind of error, before any article was written, say the endpoint
    cannot serve the job as asked (a refused format, a broken model), and the run stops as at a
    fatal API error rather than paying for every article to fail the same way. Once an article
    is written it watches no more. Owned by the job's thread."""

    def __init__(self, limit: int, job_id: int) -> None:
        self._limit = limit
        self._job_id = job_id
        self._kind: tuple[str, str] | None = None  # (stage, error type) of the streak
        self._count = 0
        self._written = False

    def saw(self, event: article_pb.ArticleEvent) -> str:
        """After a terminal event: why the run must stop, or ""."""
        if not self._limit or self._written:
            return ""
        if event.kind == article_pb.ARTICLE_EVENT_KIND_SAVED:
            self._written = True
            return ""
        if event.kind != article_pb.ARTICLE_EVENT_KIND_FAILED or event.fatal:
            return ""
        kind = (event.stage, event.error_type)
        self._count = self._count + 1 if kind == self._kind else 1
        self._kind = kind
        if self._count < self._limit:
            return ""
        at = f" at {event.endpoint}" if event.endpoint else ""
        return (
            f"stopped: the first {self._count} articles all failed at {event.stage} the same "
            f"way ({event.error}): the model{at} cannot serve this job as it is asked; fix the "
            f"cause, then `tierwriter jobs resume {self._job_id} --retry-failed`"
        )


class TierGroup:
    """Tiers of one job on the generators' streams (see the module's docstring). `used`: the
    titles new ones must differ from; the tiers' kept titles are added to it (the job's
    thread)."""

    def __init__(
        self,
        runs: list[TierRun],
        used: list[str],
        persistence: PersistenceClient,
        generators: GeneratorPool,
        output_dir: Path,
        shown_output_dir: Path,
        reconnect_attempts: int,
        cancel_grace_seconds: float,
        budget: Callable[[], float],
        streak: FailureStreak,
    ) -> None:
        first = runs[0]
        self._job, self._spec, self._cancellation = first.job, first.spec, first.cancellation
        self._epoch = first.job.lease_epoch  # every write of the group carries it
        self._persistence = persistence
        self._generators = generators
        self._output_dir = output_dir
        self._shown_output_dir = shown_output_dir  # where the user finds it, for messages
        self._reconnect_attempts = reconnect_attempts
        self._cancel_grace_seconds = cancel_grace_seconds
        self._budget = budget  # USD the job may still spend, read for every stream; 0: no limit
        self._streak = streak  # the run's, over its groups of tiers
        self._used = used
        self._before = list(used)  # the feeder's copy: `used` belongs to the job's thread
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
        self._stop = threading.Event()  # titles failed, or the group ended: start nothing more
        self._failure = ""  # the first failure that stops the job (an article's)
        self._dispatch: ArticleDispatch | None = None  # while the streams run

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
            if not self._stopped():
                yield from self._articles()
            for tier in self._tiers:
                if self._stopped():
                    tier.feed.stop()  # cancelled, or titles failed: no more titles are wanted
                tier.feed.wait()
            if not self._cancellation.fenced:
                yield from self._report_titles()
        finally:
            self._stop.set()  # a feed still waiting for titles ends
            for tier in self._tiers:
                tier.close()
        failure = self._failure
        if self._cancellation.is_set() and not failure:
            failure = self._cancellation.message
        if not self._cancellation.fenced:
            for tier in self._tiers:
                if tier.began.is_set() and not tier.finished:
                    tier.finished = True
                    yield self._tier_finished(tier.run.name)
        titles_failure = next((t.titles_failure for t in self._tiers if t.titles_failure), "")
        return TierOutcome(failure or titles_failure)

    def _articles(self) -> Generator[pb.JobEvent, None, None]:
        """Every tier's articles, over the generators' streams, to their terminal events."""
        spec, cancellation = self._spec, self._cancellation
        # A job that stops at its first failure, or keeps a budget, stays on one generator at a
        # time: the generator decides those (no article starts after the failure; the books).
        strict = not spec.continue_on_error or bool(spec.max_cost_usd)
        dispatch = ArticleDispatch(
            self._generators,
            self._batch_settings,
            self._requests(),
            max_workers=self._job.max_workers,
            max_replicas=1 if strict else None,
            stopped=self._stopped,
            # A cancel becomes a stop: nothing new starts, in-flight articles finish (or stop
            # after the grace period) and are recorded.
            stop_reason=lambda: (
                cancellation.reason
                or next((t.titles_failure for t in self._tiers if t.titles_failure), "")
                or self._failure
                or "the job was cancelled"
            ),
            # A hand-off lets in-flight articles finish: they are paid for already.
            grace_seconds=lambda: (
                self._cancel_grace_seconds
                if cancellation.is_set() and not cancellation.handoff
                else 0.0
            ),
            fenced=lambda: cancellation.fenced,
            reconnect_attempts=self._reconnect_attempts,
        )
        self._dispatch = dispatch
        try:
            with dispatch:
                try:
                    for item in dispatch.items():
                        if isinstance(item, StreamLost):
                            yield from self._lost(item)
                        elif isinstance(item, Reconnecting):
                            yield self._notice(
                                f"lost the generator ({item.error}); trying again in "
                                f"{item.delay:g}s ({item.attempt}/{item.attempts})"
                            )
                        else:
                            yield from self._article_event(item)
                finally:
                    self._stop.set()  # the feeder may be waiting for titles: let it end
        finally:
            self._dispatch = None

    def _batch_settings(self) -> gen_pb.BatchSettings:
        """What a new stream starts with (the budget read again: a lost generator spent some)."""
        first, *more = (tier.run for tier in self._tiers)
        return gen_pb.BatchSettings(
            job_id=self._job.id,
            project=self._context,
            tier=_tier_spec(first),
            more_tiers=[_tier_spec(run) for run in more],
            models=job_pb2.ModelsSpec(**self._spec.models.model_dump()),
            max_workers=self._job.max_workers,
            continue_on_error=self._spec.continue_on_error,
            replace_failed=first.retry_failed,
            budget_usd=self._budget(),
            lease_epoch=self._epoch,
        )

    def _article_event(self, event: article_pb.ArticleEvent) -> Generator[pb.JobEvent, None, None]:
        yield from self._report_titles()  # "titles ready" before what follows
        # The generator counts the tier as asked; after a title shortfall, "[3/4]" not "[3/6]".
        shortfall = next(t.shortfall for t in self._tiers if t.run.name == event.tier)
        if shortfall:
            counted = article_pb.ArticleEvent()
            counted.CopyFrom(event)
            counted.tier_count -= shortfall
            event = counted
        yield pb.JobEvent(article=event)  # the generator's event, otherwise as it is
        # After a cancel, articles fail as cancelled: that says nothing of the endpoint.
        systemic = "" if self._cancellation.is_set() else self._streak.saw(event)
        if event.kind == article_pb.ARTICLE_EVENT_KIND_FAILED and not self._failure:
            if event.fatal:
                self._failure = f"stopped: {event.error}"
            elif not self._spec.continue_on_error:
                self._failure = (
                    f"{event.tier} article {event.article_index + 1}/{event.tier_count} "
                    f"failed and continue_on_error is false: {event.error}"
                )
            elif systemic:  # the generators stop themselves only on their own errors
                self._failure = systemic
                self._stop.set()  # nothing new starts on any of them; in-flight ones finish
        yield from self._report_finished()

    def _lost(self, lost: StreamLost) -> Generator[pb.JobEvent, None, None]:
        """A generator was lost with articles in flight: those it saved before it went are
        done; the others go to the generators that answer (each paid at most once more)."""
        assert self._dispatch is not None
        by_tier: dict[str, dict[int, db_pb.Article]] = {}
        for article in lost.returned:
            if article.tier not in by_tier:
                tier = next(t for t in self._tiers if t.run.name == article.tier)
                by_tier[article.tier] = self._stored(tier.run)
        again = [
            a
            for a in lost.returned
            if next(t for t in self._tiers if t.run.name == a.tier).run.needed(
                a.article_index, by_tier[a.tier]
            )
        ]
        self._dispatch.settle([(a.tier, a.article_index) for a in lost.returned if a not in again])
        self._dispatch.resend(again)
        where = f"the {lost.others} other generators" if lost.others else "a generator that answers"
        yield self._notice(
            f"lost the generator at {lost.address} ({lost.error.details}); its "
            f"{len(again)} articles in flight without a record are sent again to {where}"
        )
        yield from self._report_finished()

    def _notice(self, message: str) -> pb.JobEvent:
        unfinished = [t for t in self._tiers if not t.finished]
        tier = unfinished[0].run.name if unfinished else self._tiers[-1].run.name
        return pb.JobEvent(notice=pb.Notice(job_id=self._job.id, tier=tier, message=message))

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
                # Read again: articles of the tier may have been saved since it began.
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
            done = tier.fed.is_set() and (
                self._dispatch is None or not self._dispatch.in_flight(tier.run.name)
            )
            if not reported or not done:
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
        tier.shortfall = made.shortfall
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
                lease_epoch=self._epoch,
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
            # Into this run's own folder, which becomes the job's when the run publishes it.
            write_atomically(
                run_folder.run_dir(self._output_dir, job.id, self._epoch)
                / publish.titles_name(run.name),
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
                lease_epoch=self._epoch,
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
                job_id=self._job.id,
                lease_epoch=self._epoch,
            )
            tier.feed.start(lambda on_titles: self._titles(request, on_titles))

        self._tiers[n].begin(start_titles)

    def _titles(
        self, request: gen_pb.GenerateTitlesRequest, on_titles: Callable[[list[str]], None]
    ) -> gen_pb.GenerateTitlesResponse:
        """A tier's titles call (on the feed's thread), on whichever generator answers; when
        that one is lost midway, the titles still missing are asked of another (the titles it
        streamed are kept; what its calls cost is not known, as it reports that last)."""
        got: list[str] = []
        merged = gen_pb.GenerateTitlesResponse()

        def taken(titles: list[str]) -> None:
            got.extend(titles)
            on_titles(titles)

        for attempt in range(self._reconnect_attempts + 1):
            asked = gen_pb.GenerateTitlesRequest()
            asked.CopyFrom(request)
            asked.count = request.count - len(got)
            asked.existing_titles.extend(got)
            try:
                result = self._generators.titles.generate_titles(asked, taken)
            except ServiceCallError as e:
                lost = e.code in GENERATOR_LOST and not self._stopped()
                if not lost or attempt == self._reconnect_attempts:
                    raise
                self._cancellation.event.wait(min(RECONNECT_MAX_DELAY, 2.0**attempt))
                if self._stopped():
                    raise
                continue
            merged.MergeFrom(result)  # the totals add up over the attempts
            del merged.titles[:]
            merged.titles.extend(got)
            return merged
        raise AssertionError("unreachable: the last attempt returns or raises")

    # The feeder (the dispatcher's thread) -----------------------------------------------------

    def _requests(self) -> Iterator[gen_pb.ArticleRequest]:
        """Each needed article of the tiers as soon as its title is there (it blocks while
        titles come); the next tier begins once this one's titles are in."""
        for n, tier in enumerate(self._tiers):
            if not tier.began.is_set():
                if self._stopped() or not self._tiers[n - 1].titles_allow_next():
                    return
                self._begin(n)
            following = n + 1 if n + 1 < len(self._tiers) else None
            try:
                index = 0
                while (title := tier.feed.wait_for(index, self._stopped)) is not None:
                    if tier.run.needed(index, tier.records):
                        yield gen_pb.ArticleRequest(
                            article_index=index,
                            title=title,
                            site=tier.run.site(index),
                            tier=tier.run.name,
                        )
                    index += 1
                    if following is not None and tier.titles_allow_next() and not self._stopped():
                        self._begin(following)  # its titles come while these articles run
            finally:
                tier.fed.set()


def _tier_spec(run: TierRun) -> job_pb2.TierSpec:
    return job_pb2.TierSpec(name=run.name, **run.tier.model_dump(exclude={"deployment_targets"}))
