"""How a watched job reads on a terminal: a bar per tier and one for the job (done/total,
failed, articles per minute, ETA, tokens and cost so far), with each finished article, retry,
rate limit and the job's other lines scrolling above them. Off a terminal the CLI prints the
plain lines of console.py instead; this module (and rich) is only imported for a terminal."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from orchestrator_service.console import event_lines, format_cost
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.statuses import TERMINAL_ARTICLE_EVENTS

# Steps shown as lines above the bars as they happen; the other steps only move the bars.
_SHOWN_STEPS = TERMINAL_ARTICLE_EVENTS | {
    article_pb.ARTICLE_EVENT_KIND_RETRYING,
    article_pb.ARTICLE_EVENT_KIND_THROTTLED,
    article_pb.ARTICLE_EVENT_KIND_OUTLINE_REPAIRING,
}


class _RateColumn(ProgressColumn):
    """Articles finished per minute since the bar started."""

    def render(self, task: Task) -> Text:
        if not task.elapsed or not task.completed:
            return Text("  -/min", style="progress.data.speed")
        return Text(f"{task.completed / task.elapsed * 60:>3.0f}/min", style="progress.data.speed")


class _SpendColumn(ProgressColumn):
    """Failed articles, tokens and cost so far."""

    def render(self, task: Task) -> Text:
        f = task.fields
        failed = Text(f"{f['failed']} failed", style="red" if f["failed"] else "dim")
        return Text.assemble(failed, f"  {f['tokens']:,} tokens  {format_cost(f['cost'])}")


@dataclass
class _Done:
    """What one bar has counted."""

    articles: int = 0
    failed: int = 0
    tokens: int = 0
    cost: float = 0.0


class LiveProgress:
    """Shows JobEvents on a terminal as bars with lines above them. Use it as a context manager:
    the bars start and stop with it (they stay on the screen when it ends)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            _SpendColumn(),
            console=console,
            redirect_stderr=False,  # `Error:` lines stay on stderr, for a 2> to catch
        )
        self._jobs: dict[int, TaskID] = {}
        self._tiers: dict[tuple[int, str], TaskID] = {}
        self._done: dict[TaskID, _Done] = {}

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def show(self, event: pb.JobEvent) -> None:
        """Move the bars by one event, and print what it has to say above them."""
        kind = event.WhichOneof("event")
        if kind == "job_started":
            started = event.job_started
            self._jobs[event.job_id] = self._task(f"job {event.job_id}", started.requested_articles)
        elif kind == "tier_started":
            tier = event.tier_started
            self._tiers[event.job_id, tier.tier] = self._task(tier.tier, tier.count)
        elif kind == "article":
            article = event.article
            if article.kind in TERMINAL_ARTICLE_EVENTS:
                self._finished(event.job_id, article)
            if article.kind not in _SHOWN_STEPS:
                return
        elif kind == "tier_finished":
            finished = self._tiers.get((event.job_id, event.tier_finished.tier))
            if finished is not None:
                self._progress.stop_task(finished)  # its rate stops counting time
        elif kind == "run_finished":
            job = self._jobs.get(event.job_id)
            if job is not None:  # what was not written (failed titles, budget) is not waited for
                self._progress.update(job, total=self._done[job].articles)
                self._progress.stop_task(job)
        self._print(event_lines(event))

    def _task(self, name: str, total: int) -> TaskID:
        task = self._progress.add_task(name, total=total or None, failed=0, tokens=0, cost=0.0)
        self._done[task] = _Done()
        return task

    def _finished(self, job_id: int, article: article_pb.ArticleEvent) -> None:
        for task in (self._jobs.get(job_id), self._tiers.get((job_id, article.tier))):
            if task is None:
                continue
            done = self._done[task]
            done.articles += 1
            done.failed += article.kind == article_pb.ARTICLE_EVENT_KIND_FAILED
            done.tokens += article.tokens
            done.cost += article.cost_usd
            self._progress.update(
                task,
                completed=done.articles,
                failed=done.failed,
                tokens=done.tokens,
                cost=done.cost,
            )

    def _print(self, lines: list[str]) -> None:
        for line in lines:
            # As text: "[tier1]" is a tier's name, not rich markup.
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
