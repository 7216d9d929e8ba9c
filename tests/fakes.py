"""Fakes for unit tests: a scripted LLM that tracks concurrency, and an in-memory saver."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from generator_service import prompts
from generator_service.domain import (
    ArticleEvent,
    ArticleRecord,
    ArticleTask,
    BatchContext,
    ProjectInfo,
    StageModels,
    TierShape,
)
from generator_service.lease import LeaseLostError
from generator_service.llm import Completion
from generator_service.llm.client import (
    OnRequest,
    OnRetry,
    OnThrottle,
    ResponseFormat,
    RetryNotice,
)
from generator_service.text import count_words

OUTLINE = json.dumps(
    {
        "outline": [
            {"h2": "One", "h3": ["a", "b"]},
            {"h2": "Two", "h3": ["c"]},
            {"h2": "Three", "h3": []},
        ]
    }
)


def html_with_words(n: int, headings: list[tuple[str, str]] | None = None) -> str:
    """An HTML fragment with exactly n visible words: the headings ((tag, text): an outline's,
    so that the article follows it; one H2 of 2 words when none are given), each followed by a
    paragraph of its own words, the words shared evenly."""
    headings = headings or [("h2", "Heading here")]
    left = n - sum(count_words(text) for _tag, text in headings)
    blocks = []
    for i, (tag, text) in enumerate(headings):
        words = left // (len(headings) - i)
        left -= words
        blocks.append(f"<{tag}>{text}</{tag}><p>" + " ".join([f"w{i}"] * words) + "</p>")
    return "".join(blocks)


def headings_of(prompt: str) -> list[tuple[str, str]]:
    """The headings a content prompt's outline JSON asks for, or an augmentation prompt's article
    has, in order."""
    sections = prompts.outline_in_prompt(prompt)
    if sections:
        return [
            heading
            for s in sections
            for heading in [("h2", s["h2"]), *(("h3", h) for h in s["h3"])]
        ]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"<(h[23])>(.*?)</\1>", prompt)]


# A content request, and its repeat after a reply failed a quality gate.
_CONTENT_PROMPTS = ("Write the article titled", "Your previous reply could not be used")


@dataclass
class FakeLlm:
    """Answers by prompt kind; `content_words` sets the content reply's length; `fail_when`
    raises for prompts it matches. Records every prompt and the peak of concurrent calls."""

    content_words: int = 1100
    augmented_words: int = 1300
    # Words of each augmentation reply in turn; augmented_words once they run out.
    augmentations: list[int] = field(default_factory=list)
    delay: float = 0.0
    fail_when: Callable[[str], bool] = lambda _prompt: False
    # Replies to outline and outline-repair prompts, in order; OUTLINE once they run out.
    outlines: list[str] = field(default_factory=list)
    # Replies to content prompts (and their repeats after a quality gate), in order; an article
    # of `content_words` following the outline once they run out.
    content_replies: list[str] = field(default_factory=list)
    # Words of each reply to a request to shorten, in turn; the article unchanged once they run
    # out.
    shortened: list[int] = field(default_factory=list)
    # Replies to augmentation prompts, in order, before `augmentations` and `augmented_words`.
    augmented_replies: list[str] = field(default_factory=list)
    # Content calls report this many retries to on_retry first, as a retrying client would.
    content_retries: int = 0
    # The first this-many content replies (continuations included) end with finish_reason
    # "length", as a reply cut off by the token limit.
    truncated_replies: int = 0
    # Hold calls until this many have been in flight at once (or the timeout passes): makes a
    # concurrency peak independent of machine speed. Once reached, nobody waits again.
    gather: int = 0
    gather_timeout: float = 5.0
    # (prompt, completion) tokens every reply reports.
    usage: tuple[int, int] = (10, 20)
    # Raised for prompts `fail_when` matches.
    failure: Callable[[], Exception] = lambda: ConnectionError("simulated connection reset")
    prompts: list[str] = field(default_factory=list)
    formats: list[ResponseFormat | None] = field(default_factory=list)
    peak: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    def complete(
        self,
        *,
        model: str,
        system: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        response_format: ResponseFormat | None = None,
        on_retry: OnRetry | None = None,
        on_throttle: OnThrottle | None = None,
        on_request: OnRequest | None = None,
    ) -> Completion:
        if on_request:
            on_request()
        with self._changed:
            self.prompts.append(prompt)
            self.formats.append(response_format)
            self._in_flight += 1
            self.peak = max(self.peak, self._in_flight)
            self._changed.notify_all()
            if self.gather:
                self._changed.wait_for(lambda: self.peak >= self.gather, self.gather_timeout)
        try:
            time.sleep(self.delay)
            if self.fail_when(prompt):
                raise self.failure()
            finish = "stop"
            if prompt.startswith((*_CONTENT_PROMPTS, "Continue the text")):
                for attempt in range(1, self.content_retries + 1):
                    if on_retry:
                        on_retry(RetryNotice(attempt, "Rate limit exceeded", 2.0))
                with self._lock:
                    if self.truncated_replies > 0:
                        self.truncated_replies -= 1
                        finish = "length"
            return Completion(self._reply(prompt), *self.usage, finish)
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def _reply(self, prompt: str) -> str:
        if prompt.startswith(("Create an outline", "Repair the outline")):
            with self._lock:
                scripted = self.outlines.pop(0) if self.outlines else None
            return scripted if scripted is not None else "```json\n" + OUTLINE + "\n```"
        if prompt.startswith(_CONTENT_PROMPTS):
            with self._lock:
                scripted = self.content_replies.pop(0) if self.content_replies else None
            if scripted is not None:
                return scripted
            return "```html\n" + html_with_words(self.content_words, headings_of(prompt)) + "\n```"
        if "Shorten it to about" in prompt:
            with self._lock:
                words = self.shortened.pop(0) if self.shortened else None
            article = prompt.split("<article>\n", 1)[1].rsplit("\n</article>", 1)[0]
            return article if words is None else html_with_words(words, headings_of(prompt))
        if prompt.startswith("Continue the text"):
            return "<p>" + " ".join(["more"] * 50) + "</p>"
        if "<article>" in prompt:
            with self._lock:
                if self.augmented_replies:
                    return self.augmented_replies.pop(0)
                words = self.augmentations.pop(0) if self.augmentations else self.augmented_words
            return html_with_words(words, headings_of(prompt))
        return "Title"


@dataclass
class MemorySaver:
    """Stores records in a dict keyed like the database: (job, tier, index)."""

    records: dict[tuple[int, str, int], ArticleRecord] = field(default_factory=dict)
    fail: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # The job's lease epoch, as persistence holds it: a save under another is refused.
    epoch: int = 0

    def save(
        self, record: ArticleRecord, replace_failed: bool = False, lease_epoch: int = 0
    ) -> tuple[int, bool]:
        if self.fail:
            raise ConnectionError("persistence is down")
        if lease_epoch != self.epoch:
            raise LeaseLostError(f"lease epoch {lease_epoch} is stale (now {self.epoch})")
        key = (record.job_id, record.tier, record.article_index)
        with self._lock:
            created = key not in self.records
            self.records.setdefault(key, record)
            return list(self.records).index(key) + 1, created


@dataclass
class EventLog:
    """A thread-safe emit target."""

    events: list[ArticleEvent] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: ArticleEvent) -> None:
        with self._lock:
            self.events.append(event)

    def terminal(self) -> list[ArticleEvent]:
        return [e for e in self.events if e.terminal]


def batch_context(
    count: int = 10,
    max_workers: int = 5,
    continue_on_error: bool = True,
    min_words: int = 1000,
    max_words: int = 1500,
) -> BatchContext:
    """A batch with one tier of `count` articles."""
    return BatchContext(
        job_id=1,
        project=ProjectInfo(1, "cnc machining", ["lathe"], ["cnc cost"]),
        tier=TierShape("tier1", count, min_words, max_words, 2, 4, 2, 6),
        models=StageModels("m-title", "m-outline", "m-content"),
        max_workers=max_workers,
        continue_on_error=continue_on_error,
    )


def tasks(count: int) -> list[ArticleTask]:
    """`count` article tasks with distinct titles."""
    return [ArticleTask(i, f"Title {i}") for i in range(count)]
