"""ArticlePipeline: one article, outline → content → augmentation if short, shortening if long →
saved record.

Every call asks for a token budget that fits it (budget.py); outlines ask for JSON of a schema;
the content prompt's word bounds come from WordTargets (learned per model). A content reply must
pass the quality gates (gates.py: prose in HTML that follows its outline) or is asked for once
more with the reason; failing again, the article fails naming the gate. An augmentation must
lengthen the text or is asked once more; the longest text is kept, and one that stays below the
minimum is recorded as `short`. A draft over the maximum is cut at a section boundary, else asked
once to shorten; still over, it is recorded as `long`. A FatalApiError (rejected key, unknown
model, no endpoint) fails the article as `fatal`, which stops the batch. A LeaseLostError (the
job is run by another orchestrator now) is not a failure of the article: nothing is recorded,
and it goes to the caller.

No gRPC here: the servicer feeds tasks in and turns events into messages."""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from generator_service import gates, prompts
from generator_service.calibration import WordTargets
from generator_service.domain import (
    ArticleEvent,
    ArticleRecord,
    ArticleSaver,
    ArticleTask,
    BatchContext,
    EventKind,
    InvalidRequestError,
    TierShape,
)
from generator_service.gates import ContentGateError
from generator_service.lease import LeaseLostError
from generator_service.llm import Completion, LlmClient
from generator_service.llm.budget import (
    TOKENS_PER_HEADING,
    TOKENS_PER_WORD,
    content_tokens,
    outline_tokens,
)
from generator_service.llm.client import FatalApiError, RetryNotice, failure_reason
from generator_service.llm.limits import ConcurrencyChange
from generator_service.llm.pricing import PriceTable
from generator_service.outline import (
    HEADING_MAX_CHARS,
    FittedOutline,
    Outline,
    OutlineError,
    fit_outline,
    outline_shortfall,
    parse_outline,
    section_budgets,
)
from generator_service.text import count_words, strip_fences

log = logging.getLogger(__name__)

Emit = Callable[[ArticleEvent], None]

# A reply cut off by the token limit is continued at most this often before the article fails.
MAX_CONTINUATIONS = 2
# Augmentation requests per article: the second only when the first did not reach the minimum.
MAX_AUGMENTATIONS = 2
_TYPICAL_PROMPT_TOKENS = 400  # the system message, the project context and the instructions
MAX_TRACEBACK_CHARS = 16_000  # kept with a failed record


class ArticleCancelledError(Exception):
    """The job was cancelled and the in-flight article's grace period ran out."""


class TruncatedReplyError(ValueError):
    """The model's reply stayed cut off by the token limit after the bounded continuations."""


def _parse(reply: Completion, max_heading_chars: int) -> Outline:
    """parse_outline, saying so when the reply was cut off by the token limit."""
    try:
        return parse_outline(reply.text, max_heading_chars)
    except OutlineError as e:
        if reply.finish_reason == "length":
            raise OutlineError(f"outline reply was cut off by the token limit: {e}") from e
        raise


@dataclass
class _Usage:
    """What one article cost; owned by the one thread that writes the article."""

    calls: int = 0  # every request sent: retries, refused formats and failures included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0  # 429 answers, each retried

    def request_sent(self) -> None:
        self.calls += 1

    def add(self, completion: Completion, cost_usd: float) -> None:
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.cost_usd += cost_usd


@dataclass
class _Gates:
    """The quality gates of one article: its outline, the heading length, how to report a
    rejection, and every gate that fired (the record keeps them). Owned by the article's
    thread."""

    outline: Outline
    max_heading_chars: int
    event: Callable[..., ArticleEvent]
    fired: list[str] = field(default_factory=list)

    def check(
        self, reply: str, request: prompts.Prompt, stage: str
    ) -> tuple[str, gates.GateFailure | None]:
        """The reply mended, and the gate it fails (None: it passes). What was mended is
        recorded only for a reply that passes; a failure is recorded and reported."""
        mended, mends = gates.mend(reply)
        instructions = prompts.instructions_of(request.user)
        failure = gates.check_reply(mended, self.outline, instructions, self.max_heading_chars)
        if failure is None:
            self.fired += [m for m in mends if m not in self.fired]
        else:
            self.fired.append(failure.gate)
            self.event(EventKind.CONTENT_REJECTED, stage=stage, gate=failure.gate,
                       error=str(failure))  # fmt: skip
        return mended, failure

    def rewrite(
        self,
        ask: Callable[[prompts.Prompt, int], str],
        request: prompts.Prompt,
        max_tokens: int,
        stage: str,
    ) -> tuple[str | None, str]:
        """One augmentation or shortening call: its reply, mended, when it passes the gates
        (None when it fails one: it is not kept), and why the call itself failed ("" when it
        did not). A stop of the article or the job is raised."""
        try:
            reply = strip_fences(ask(request, max_tokens))
        except (ArticleCancelledError, LeaseLostError, FatalApiError):
            raise
        except Exception as e:
            return None, failure_reason(e)
        kept, failure = self.check(reply, request, stage)
        return (kept if failure is None else None), ""

    def passes(self, html: str) -> bool:
        """Whether text made here (a trimmed draft) still passes the gates."""
        return gates.check_reply(html, self.outline, "", self.max_heading_chars) is None


class ArticlePipeline:
    """Writes one article and stores its terminal record. Thread-safe: the only state shared
    between calls is in WordTargets, which locks its own."""

    def __init__(
        self,
        llm: LlmClient,
        saver: ArticleSaver,
        targets: WordTargets,
        prices: PriceTable | None = None,
        endpoint: str = "",
        max_heading_chars: int = HEADING_MAX_CHARS,
    ) -> None:
        self._llm = llm
        self._saver = saver
        self._targets = targets
        self._prices = prices or PriceTable()
        self._endpoint = endpoint  # the model API's address, named in failures
        self._max_heading_chars = max_heading_chars  # longer: a sentence, not a heading

    def check_budget(self, batch: BatchContext) -> None:
        """InvalidRequestError when a budget is set but a model of the batch has no price:
        every call would count as $0 and the budget would never stop anything."""
        if not batch.budget_usd:
            return
        for model in (batch.models.outline, batch.models.content):
            if self._prices.price(model) is None:
                raise InvalidRequestError(
                    f"settings.budget_usd: model {model!r} has no price, so max_cost_usd cannot "
                    "be kept; add it to LLM_PRICES_FILE"
                )

    def estimate_cost(self, batch: BatchContext) -> float:
        """One article's expected cost before any has finished: an outline and a content reply
        of the sizes asked for, with prompts of typical size (augmentation, which few need,
        left out). Finished articles replace it with what they really cost."""
        tier = batch.tier
        headings = tier.max_h2 + tier.max_h3
        outline = self._prices.cost(
            batch.models.outline, _TYPICAL_PROMPT_TOKENS, headings * TOKENS_PER_HEADING
        )
        asked = self._targets.request(
            batch.models.content, tier.min_word_count, tier.max_word_count
        )
        content = self._prices.cost(
            batch.models.content,
            _TYPICAL_PROMPT_TOKENS + headings * TOKENS_PER_HEADING,  # the prompt has the outline
            round((asked.low + asked.high) / 2 * TOKENS_PER_WORD),
        )
        return outline + content

    def skip(self, batch: BatchContext, task: ArticleTask, reason: str, emit: Emit) -> None:
        """Record an article that will not be written (over budget) as `skipped`: a resume
        with room in the budget writes it."""
        record = ArticleRecord(
            job_id=batch.job_id,
            project_id=batch.project.project_id,
            tier=batch.tier.name,
            article_index=task.index,
            keyword=batch.project.keyword,
            title=task.title,
            status="skipped",
            site=task.site,
            error_stage="budget",
            error=reason,
        )
        article_id = 0
        try:
            article_id, _created = self._saver.save(record, batch.replace_failed, batch.lease_epoch)
        except LeaseLostError:
            raise
        except Exception as e:  # still reported, like a failure whose record was lost
            reason += f" (and the skipped record could not be saved: {type(e).__name__}: {e})"
            log.error(
                "job %d %s article %d: skipped record not saved: %s",
                batch.job_id,
                batch.tier.name,
                task.index + 1,
                e,
            )
        emit(
            ArticleEvent(
                EventKind.SKIPPED,
                batch.tier.name,
                task.index,
                title=task.title,
                article_id=article_id,
                status="skipped",
                error=reason,
            )
        )

    def run(
        self,
        batch: BatchContext,
        task: ArticleTask,
        emit: Emit,
        checkpoint: Callable[[], None] = lambda: None,
    ) -> ArticleEvent:
        """Write, store and report one article. `checkpoint()` runs before each model call and
        raises when the article must stop there (ArticleCancelledError: cancelled and out of
        grace; LeaseLostError). Raises only LeaseLostError: any other failure becomes a failed
        record and a FAILED event, which is also returned."""
        tier, project = batch.tier, batch.project
        usage = _Usage()
        stage = "outline"

        def event(kind: EventKind, **fields: Any) -> ArticleEvent:
            e = ArticleEvent(kind=kind, tier=tier.name, index=task.index, **fields)
            emit(e)
            return e

        def ask(model: str, prompt: prompts.Prompt, max_tokens: int) -> str:
            """One model reply; a reply cut off by the token limit is continued, at most
            MAX_CONTINUATIONS times, or the article fails with that reason."""
            reply = call(model, prompt, max_tokens)
            text = reply.text
            for _ in range(MAX_CONTINUATIONS):
                if reply.finish_reason != "length":
                    break
                text = strip_fences(text)  # a cut-off reply has half a fence at most
                reply = call(model, prompts.continuation_prompt(prompt, text), max_tokens)
                text += "\n" + strip_fences(reply.text)
            if reply.finish_reason == "length":
                raise TruncatedReplyError(
                    f"the reply was cut off by the token limit ({max_tokens} tokens) and "
                    f"{MAX_CONTINUATIONS} continuations did not finish it"
                )
            return text

        def call(
            model: str,
            prompt: prompts.Prompt,
            max_tokens: int,
            response_format: dict[str, Any] | None = None,
        ) -> Completion:
            checkpoint()  # cancelled and out of grace, or the lease lost: no further model call
            retried = False

            def on_retry(notice: RetryNotice) -> None:
                nonlocal retried
                retried = True
                if notice.rate_limited:
                    usage.rate_limited += 1
                event(
                    EventKind.RETRYING,
                    stage=stage,
                    error=notice.reason,
                    attempt=notice.attempt,
                    retry_delay=notice.delay,
                )

            def on_throttle(change: ConcurrencyChange) -> None:
                event(
                    EventKind.THROTTLED,
                    stage=stage,
                    model=change.model,
                    concurrency_before=change.before,
                    concurrency_after=change.after,
                    restored=change.restored,
                )

            reply = self._llm.complete(
                model=model,
                system=prompt.system,
                prompt=prompt.user,
                max_tokens=max_tokens,
                temperature=0.7,
                response_format=response_format,
                on_retry=on_retry,
                on_throttle=on_throttle,
                on_request=usage.request_sent,  # the worker's own thread: no lock needed
            )
            if retried:
                event(EventKind.RETRY_SUCCEEDED, stage=stage)
            cost = self._prices.cost(model, reply.prompt_tokens, reply.completion_tokens)
            usage.add(reply, cost)
            return reply

        record = ArticleRecord(
            job_id=batch.job_id,
            project_id=project.project_id,
            tier=tier.name,
            article_index=task.index,
            keyword=project.keyword,
            title=task.title,
            status="generated",
            site=task.site,
        )
        fired: list[str] = []  # the quality gates that fired, in order (gates.py)
        event(EventKind.STARTED, title=task.title, site=task.site)
        try:
            event(EventKind.OUTLINE_STARTED)
            outline_request = prompts.outline_prompt(
                task.title,
                project.keyword,
                project.entities,
                project.related_searches,
                (tier.min_h2, tier.max_h2),
                (tier.min_h3, tier.max_h3),
            )

            # Outlines are not continued when cut off: half a JSON document gets a repair instead.
            def ask_outline(prompt: prompts.Prompt) -> Completion:
                return call(
                    batch.models.outline,
                    prompt,
                    outline_tokens(tier.max_h2, tier.max_h3),
                    prompts.outline_response_format(),
                )

            fitted = self._usable_outline(
                batch, task, ask_outline(outline_request), ask_outline, event,
                self._max_heading_chars,
            )  # fmt: skip
            outline = record.outline = fitted.sections
            event(
                EventKind.OUTLINE_DONE,
                h2_count=fitted.h2_count,
                h3_count=fitted.h3_count,
                outline_fix=fitted.fix,
            )

            stage = "content"
            event(EventKind.CONTENT_STARTED)
            model = record.content_model = batch.models.content
            asked = self._targets.request(model, tier.min_word_count, tier.max_word_count)
            content_request = prompts.content_prompt(
                task.title,
                project.keyword,
                project.entities,
                project.related_searches,
                outline,
                section_budgets(outline, (asked.low + asked.high) // 2),
                asked.low,
                asked.high,
            )

            def ask_content(request: prompts.Prompt) -> str:
                return strip_fences(ask(model, request, content_tokens(asked.high)))

            def ask_rewrite(request: prompts.Prompt, max_tokens: int) -> str:
                return ask(model, request, max_tokens)

            checks = _Gates(outline, self._max_heading_chars, event, fired)
            content = self._article_reply(ask_content, content_request, checks)
            words = count_words(content)
            record.asked_words, record.draft_words = asked.low, words
            self._targets.observe(model, asked.low, words)
            event(EventKind.CONTENT_DONE, word_count=words)

            # The threshold is the user's minimum, not the compensated one (invariant 4).
            if words < tier.min_word_count:
                stage = "augmentation"
                event(EventKind.AUGMENTING, min_word_count=tier.min_word_count)
                content, words, problem = self._augmented(content, words, tier, ask_rewrite, checks)
                record.status = "augmented" if words >= tier.min_word_count else "short"
                if problem:  # the record says why it is short
                    record.error_stage, record.error = stage, problem
                event(EventKind.AUGMENTED, word_count=words, status=record.status, error=problem)
            if words > tier.max_word_count:
                stage = "shortening"
                content, words, problem = self._within_max(
                    content, words, tier, ask_rewrite, checks
                )
                if problem:  # kept, and the record says why it is long
                    record.status = "long"
                    record.error_stage, record.error = stage, problem

            stage = "save"
            record.content, record.word_count = content, words
            record.quality_gates = ",".join(fired)
            self._fill_usage(record, usage)
            article_id, _created = self._saver.save(record, batch.replace_failed, batch.lease_epoch)
            return event(
                EventKind.SAVED,
                article_id=article_id,
                status=record.status,
                word_count=words,
                error=record.error,
                quality_gates=record.quality_gates,
                cost_usd=record.cost_usd,
                tokens=record.prompt_tokens + record.completion_tokens,
            )
        except LeaseLostError:
            raise  # not the article's failure: nothing of it may be recorded under this lease
        except Exception as e:  # one article's failure must never reach the other workers
            record.quality_gates = ",".join(fired)
            return self._fail(batch, task, record, usage, stage, e, event)

    @staticmethod
    def _usable_outline(
        batch: BatchContext,
        task: ArticleTask,
        reply: Completion,
        ask_outline: Callable[[prompts.Prompt], Completion],
        event: Callable[..., ArticleEvent],
        max_heading_chars: int,
    ) -> FittedOutline:
        """The outline from `reply`; when it is not JSON (cut off included) or has too few
        headings, one repair request, and then whatever parsed is fitted to the tier (extra
        headings cut). OutlineError says what could not be fixed."""
        tier = batch.tier
        outline: Outline | None = None
        try:
            outline = _parse(reply, max_heading_chars)
            # Too many headings are trimmed locally; only too few are worth a call.
            problem = outline_shortfall(outline, tier)
        except OutlineError as e:
            problem = str(e)
        if problem:
            event(EventKind.OUTLINE_REPAIRING, error=problem)
            repair = prompts.outline_repair_prompt(
                task.title,
                (tier.min_h2, tier.max_h2),
                (tier.min_h3, tier.max_h3),
                problem,
                reply.text,
            )
            try:
                outline = _parse(ask_outline(repair), max_heading_chars)
            except OutlineError as e:
                if outline is None:  # neither reply parsed: nothing to fit
                    raise OutlineError(f"{e} (also after one repair request)") from e
        assert outline is not None
        return fit_outline(outline, tier, batch.project)

    @staticmethod
    def _article_reply(
        ask_content: Callable[[prompts.Prompt], str], request: prompts.Prompt, checks: _Gates
    ) -> str:
        """The content reply once it passes the quality gates (gates.py), mended first. A reply
        that fails a gate is asked for once more with the reason; ContentGateError when that
        one fails too."""
        content, failure = checks.check(ask_content(request), request, "content")
        if failure is None:
            return content
        again = prompts.content_retry_prompt(request, failure.reason)
        content, failure = checks.check(ask_content(again), again, "content")
        if failure is None:
            return content
        raise ContentGateError(failure)

    @staticmethod
    def _augmented(
        content: str,
        words: int,
        tier: TierShape,
        ask: Callable[[prompts.Prompt, int], str],
        checks: _Gates,
    ) -> tuple[str, int, str]:
        """The longest of `content` and up to MAX_AUGMENTATIONS lengthened versions, asking for
        the gap up to the tier's range (never past its maximum); stops at the minimum. A reply
        no longer than what it was to lengthen, or failing a quality gate, is never kept. A call
        that fails (cut off past its continuations, an API error after its retries) ends the
        augmenting but loses no draft: (text, words, why it stopped short or ""). A stop of the
        article or the job (cancelled, the lease lost, a fatal API error) is raised."""
        best, best_words = content, words
        for _ in range(MAX_AUGMENTATIONS):
            request = prompts.augment_prompt(
                best, best_words, tier.min_word_count, tier.max_word_count
            )
            budget = content_tokens(tier.max_word_count)
            kept, error = checks.rewrite(ask, request, budget, "augmentation")
            if error:
                return best, best_words, f"augmentation failed ({error})"
            kept_words = count_words(kept) if kept is not None else 0
            if kept is not None and kept_words > best_words:
                best, best_words = kept, kept_words
            if best_words >= tier.min_word_count:
                break
        return best, best_words, ""

    @staticmethod
    def _within_max(
        content: str,
        words: int,
        tier: TierShape,
        ask: Callable[[prompts.Prompt, int], str],
        checks: _Gates,
    ) -> tuple[str, int, str]:
        """A draft over the tier's maximum brought into its range: cut at a section boundary
        when one does it and the cut still follows the outline (no call), else asked once to
        shorten. (text, words, why it is still over the maximum or ""); the shortest text
        within the minimum is kept. A failed call keeps the draft; a stop of the article or the
        job is raised."""
        low, high = tier.min_word_count, tier.max_word_count
        # Keep as many sections as the outline gate asks for, and the tier's minimum.
        sections = max(tier.min_h2, math.ceil(gates.OUTLINE_SHARE * len(checks.outline)))
        trimmed = gates.trim_to_max(content, high, low, sections)
        if trimmed is not None and checks.passes(trimmed):
            checks.fired.append(gates.TRIMMED)
            return trimmed, count_words(trimmed), ""
        checks.fired.append(gates.SHORTENED)
        checks.event(EventKind.SHORTENING, word_count=words, max_word_count=high)
        request = prompts.shorten_prompt(content, words, low, high)
        kept, error = checks.rewrite(ask, request, content_tokens(high), "shortening")
        why = f"; shortening failed ({error})" if error else ""
        kept_words = count_words(kept) if kept is not None else 0
        if kept is not None and low <= kept_words < words:
            content, words = kept, kept_words
        if words <= high:
            return content, words, ""
        checks.fired.append(gates.LONG)
        return (
            content,
            words,
            (f"{words} words, over the maximum of {high} after one request to shorten{why}"),
        )

    def _fail(
        self,
        batch: BatchContext,
        task: ArticleTask,
        record: ArticleRecord,
        usage: _Usage,
        stage: str,
        error: Exception,
        event: Callable[..., ArticleEvent],
    ) -> ArticleEvent:
        message = failure_reason(error)
        # Its end says where it was raised; a chain of retries can make the rest long.
        trace = traceback.format_exc()[-MAX_TRACEBACK_CHARS:]
        log.warning(
            "job %d %s article %d/%d failed at %s: %s",
            batch.job_id,
            batch.tier.name,
            task.index + 1,
            batch.tier.count,
            stage,
            message,
            exc_info=error,  # the traceback goes to the log and the record, not the events
        )
        # The same record, minus any content written before the failure.
        failed = replace(
            record,
            status="failed",
            content="",
            word_count=0,
            error_stage=stage,
            error=message,
            error_traceback=trace,
        )
        self._fill_usage(failed, usage)
        article_id = 0
        try:
            article_id, _created = self._saver.save(failed, batch.replace_failed, batch.lease_epoch)
        except LeaseLostError:
            raise
        except Exception as save_error:  # the failure is reported either way
            message += (
                " (and the failure record could not be saved: "
                f"{type(save_error).__name__}: {save_error})"
            )
            log.error(
                "job %d %s article %d/%d: failure record not saved: %s",
                batch.job_id,
                batch.tier.name,
                task.index + 1,
                batch.tier.count,
                save_error,
            )
        return event(
            EventKind.FAILED,
            article_id=article_id,
            status="failed",
            stage=stage,
            error=message,
            error_type=type(error).__name__,
            endpoint=self._endpoint,
            gate=error.failure.gate if isinstance(error, ContentGateError) else "",
            quality_gates=failed.quality_gates,
            fatal=isinstance(error, FatalApiError),
            cost_usd=failed.cost_usd,
            tokens=failed.prompt_tokens + failed.completion_tokens,
        )

    @staticmethod
    def _fill_usage(record: ArticleRecord, usage: _Usage) -> None:
        record.api_calls = usage.calls
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.cost_usd = usage.cost_usd
        record.rate_limited = usage.rate_limited
