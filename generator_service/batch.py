"""ArticleBatch: the articles of one stream, of one tier or several, on a pool of exactly
`max_workers` threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from generator_service.domain import (
    ArticleEvent,
    ArticleTask,
    BatchContext,
    EventKind,
    TierShape,
)
from generator_service.lease import JobLease, LeaseLostError
from generator_service.pipeline import ArticleCancelledError, ArticlePipeline, Emit


class ArticleBatch:
    """Runs tasks as they arrive, at most `max_workers` at once and exactly that many while work
    is waiting (a ThreadPoolExecutor of that size). With continue_on_error false, the first
    failure stops new articles from starting: those in flight finish and are recorded, the rest
    are reported SKIPPED. A fatal API error (key, model, endpoint) does the same whatever
    continue_on_error says, and so does `stop()` from outside (the caller went away).

    Several tiers share the one pool: an article runs with its task's tier's context, so the
    next tier's first articles start as soon as the last tier's leave workers free.

    With a budget, an article starts only while what the batch spent, plus the estimate of
    those in flight, plus its own estimate stays within it; from the first that does not, every
    article left is recorded as skipped (a resume with a higher budget writes them).

    Every article first asks whether the job's lease epoch is still the one the batch works
    under (JobLease). Once it is not — or persistence refused a save as stale — the batch writes
    nothing more: no article starts, those in flight stop before their next model call, and
    each is reported SKIPPED without a record (the orchestrator now holding the job writes it)."""

    def __init__(
        self,
        pipeline: ArticlePipeline,
        context: BatchContext,
        more_tiers: Sequence[BatchContext] = (),
        lease: JobLease | None = None,
    ) -> None:
        """`context` holds what the whole batch shares (job, workers, continue_on_error,
        budget, lease epoch) and its first tier; `more_tiers` differ from it only in their
        tier. `lease` checks the epoch (None: never checked)."""
        self._pipeline = pipeline
        self._context = context
        self._lease = lease or JobLease.unchecked()
        self._tiers = {c.tier.name: c for c in (context, *more_tiers)}
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # guards the stop state: workers and the feed may race
        self._stop_reason = ""
        self._abandon_at: float | None = None  # monotonic time after which in-flight ones stop
        # The budget's books, under _lock: spent by finished articles, estimated for running ones.
        self._spent = 0.0
        self._finished = 0
        self._estimates: dict[int, float] = {}
        self._over_budget = ""

    @property
    def tier_names(self) -> list[str]:
        """The stream's tiers, the first one first."""
        return list(self._tiers)

    def tier(self, name: str) -> TierShape | None:
        """The shape of the stream's tier `name` ("": the first); None if it has no such tier."""
        context = self._tiers.get(name) if name else self._context
        return context.tier if context else None

    def stop(self, reason: str, grace_seconds: float = 0.0) -> None:
        """Start no further article; in-flight ones finish. With `grace_seconds`, those still
        running after it stop before their next model call and are recorded as failed. The
        first reason given is kept."""
        with self._lock:
            self._stop_reason = self._stop_reason or reason
            if grace_seconds > 0 and self._abandon_at is None:
                self._abandon_at = time.monotonic() + grace_seconds
        self._stopped.set()

    def _checkpoint(self) -> None:
        """Before an in-flight article's next model call: LeaseLostError once the lease is
        lost, ArticleCancelledError once a stop's grace period has run out."""
        if lost := self._lease.lost:
            raise LeaseLostError(lost)
        with self._lock:
            if self._abandon_at is not None and time.monotonic() >= self._abandon_at:
                reason = self._stop_reason.removeprefix("not started: ")
                raise ArticleCancelledError(f"cancelled: {reason}")

    def _lease_lost(
        self, context: BatchContext, task: ArticleTask, reason: str, emit: Emit
    ) -> None:
        """The article is not written under this lease: nothing starts any more, and it is
        reported SKIPPED without a record."""
        self._lease.lose(reason)
        self.stop(f"not started: {reason}")
        emit(ArticleEvent(EventKind.SKIPPED, context.tier.name, task.index, title=task.title,
                          error=f"not written here: {reason}"))  # fmt: skip

    def run(self, tasks: Iterable[ArticleTask], emit: Emit) -> None:
        """Run every task; returns when each has had its terminal event."""
        with ThreadPoolExecutor(
            max_workers=self._context.max_workers,
            thread_name_prefix=f"job{self._context.job_id}",
        ) as pool:
            for task in tasks:
                pool.submit(self._one, task, emit)

    def _reason(self) -> str:
        with self._lock:
            return self._stop_reason

    def _tier_of(self, task: ArticleTask) -> BatchContext:
        return self._tiers[task.tier] if task.tier else self._context

    def _admit(self, task: ArticleTask) -> str:
        """Book the article's estimated cost and return "", or say why the budget stops it."""
        budget = self._context.budget_usd
        if not budget:
            return ""
        with self._lock:
            if not self._over_budget:
                # Finished articles are the best estimate; before any, the token budgets' bound.
                if self._finished:
                    estimate = self._spent / self._finished
                else:
                    estimate = self._pipeline.estimate_cost(self._tier_of(task))
                committed = self._spent + sum(self._estimates.values())
                if committed + estimate > budget:
                    self._over_budget = (
                        f"budget: ${committed:.4f} spent or running in this tier plus "
                        f"~${estimate:.4f} for this article would pass the ${budget:.4f} left "
                        "of max_cost_usd"
                    )
                else:
                    self._estimates[task.index] = estimate
            return self._over_budget

    def _settle(self, event: ArticleEvent) -> None:
        """An article ended: its real cost replaces its estimate."""
        with self._lock:
            self._estimates.pop(event.index, None)
            if event.kind is not EventKind.SKIPPED:
                self._spent += event.cost_usd
                self._finished += 1

    def _one(self, task: ArticleTask, emit: Emit) -> None:
        context = self._tier_of(task)
        if self._stopped.is_set():
            emit(
                ArticleEvent(
                    EventKind.SKIPPED,
                    context.tier.name,
                    task.index,
                    title=task.title,
                    error=self._reason(),
                )
            )
            return

        if not self._lease.held():
            self._lease_lost(context, task, self._lease.lost, emit)
            return
        try:
            self._write(context, task, emit)
        except LeaseLostError as e:  # a save refused as stale, or lost while it ran
            self._lease_lost(context, task, str(e), emit)

    def _write(self, context: BatchContext, task: ArticleTask, emit: Emit) -> None:
        if over_budget := self._admit(task):
            self._pipeline.skip(context, task, over_budget, emit)
            return

        def emit_and_stop(event: ArticleEvent) -> None:
            # Stop before the FAILED event goes out: whoever sees it can count on no new start.
            if event.kind is EventKind.FAILED and event.fatal:
                self.stop(f"not started: {event.error}")
            elif event.kind is EventKind.FAILED and not context.continue_on_error:
                self.stop(
                    f"not started: article {task.index + 1} failed and continue_on_error is false"
                )
            if event.terminal:
                self._settle(event)
            emit(event)

        self._pipeline.run(context, task, emit_and_stop, self._checkpoint)
