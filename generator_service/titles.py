"""TitleWriter: a tier's titles in batches of up to 25 per call, calls in parallel, cleaned,
checked and deduplicated.

Models dress titles up (list numbers, markdown emphasis, quotes, a full stop) and wrap them in
talk ("Here are 5 titles:"); cleaning strips the dressing, and lines that are not titles (a
preamble, a line ending in ':', template braces, too short or too long) are dropped and asked
for again like duplicates."""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from generator_service import prompts
from generator_service.domain import ProjectInfo
from generator_service.lease import JobLease
from generator_service.llm import Completion, LlmClient
from generator_service.llm.budget import titles_tokens
from generator_service.llm.client import FatalApiError, RetryNotice, failure_reason
from generator_service.llm.pricing import PriceTable
from generator_service.similar_titles import (
    TITLE_SIMILARITY,
    TitleIndex,
    keyword_list,
    title_words,
)

TITLES_PER_CALL = 25
# Rounds after the first that ask only for what is still missing; then the shortfall is reported.
TOP_UP_ROUNDS = 3
_END = object()  # closes a stream()
DEFAULT_LENGTH = (20, 120)  # characters: TITLE_MIN_CHARS, TITLE_MAX_CHARS
# List markers and numbering: "- ", "3. ", "2) ", "1.2 " (an outline's), "## ", "Title 4:".
NUMBERING = re.compile(
    r"^\s*(?:[-*•]|\d+(?:\.\d+)+\.?|\d+\s*[.):]|#+|title\s*\d*\s*:)\s*", re.IGNORECASE
)
_EMPHASIS = re.compile(r"\*\*|__|\*|`")
_QUOTES = "\"'\u201c\u201d\u2018\u2019"
_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here (?:are|is)|here's|below (?:are|is))\b",
    re.IGNORECASE,
)


def clean_title(line: str) -> str:
    """A reply line as a title: no list marker, markdown emphasis, quotes, trailing full stop
    or surrounding space ("3. **How to Dial In a Grinder**." → "How to Dial In a Grinder")."""
    text = line
    for _ in range(2):  # "**1. Title**" has its number inside the emphasis
        text = NUMBERING.sub("", text)
        text = _EMPHASIS.sub("", text).strip().strip(_QUOTES).strip()
        text = text.rstrip(".,;").strip().strip(_QUOTES).strip()
    return text


def title_problem(title: str, length: tuple[int, int] = DEFAULT_LENGTH) -> str:
    """Why a cleaned line is not a title, or "" when it is one."""
    if not title:
        return "empty"
    if title.endswith(":"):
        return "ends with ':' (a preamble, not a title)"
    if _PREAMBLE.match(title):
        return "a preamble, not a title"
    if "{" in title or "}" in title:
        return "template braces"
    if not length[0] <= len(title) <= length[1]:
        return f"{len(title)} characters, titles need {length[0]} to {length[1]}"
    return ""


@dataclass
class TitlesResult:
    """Titles in order, what is missing, and what they cost."""

    titles: list[str] = field(default_factory=list)
    shortfall: int = 0  # the model ran out of new titles
    error: str = ""  # a call failed after its retries: the missing titles could not be made
    fatal: bool = False  # that failure ends the job (key, model, endpoint)
    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rejected: int = 0  # reply lines that were not titles
    retries: list[RetryNotice] = field(default_factory=list)  # in the order they happened


class TitleWriter:
    """Asks the model for titles until `count` distinct ones exist or the top-ups run out."""

    def __init__(
        self,
        llm: LlmClient,
        prices: PriceTable | None = None,
        length: tuple[int, int] = DEFAULT_LENGTH,
        similarity: float = TITLE_SIMILARITY,
    ) -> None:
        self._llm = llm
        self._prices = prices or PriceTable()
        self._length = length
        self._similarity = similarity  # token Jaccard at which two titles are the same

    def write(
        self,
        project: ProjectInfo,
        count: int,
        model: str,
        max_parallel: int,
        existing: list[str],
        on_titles: Callable[[list[str]], None] = lambda titles: None,
        stopped: Callable[[], bool] = lambda: False,
        lease: JobLease | None = None,
    ) -> TitlesResult:
        """`count` titles distinct from each other and from `existing` (after normalisation).
        `on_titles` gets each reply's new titles as soon as they are taken, in their final
        order, so a caller can start on the first ones while the rest are asked for. Once
        `stopped()` is true (the caller went away), no further round of calls starts; nor once
        the job's `lease` is found lost, which each round checks first."""
        lease = lease or JobLease.unchecked()
        result = TitlesResult()
        lock = threading.Lock()  # the pool's threads report retries and requests

        def on_retry(notice: RetryNotice) -> None:
            with lock:
                result.retries.append(notice)

        def on_request() -> None:  # from the pool's threads
            with lock:
                result.api_calls += 1

        common = title_words(project.keyword).union(*map(title_words, project.entities))
        seen = TitleIndex(self._similarity, common)  # near-duplicates of these are asked again
        for title in existing:
            seen.add(title)
        with ThreadPoolExecutor(
            max_workers=max(1, max_parallel), thread_name_prefix="titles"
        ) as pool:
            for _round in range(1 + TOP_UP_ROUNDS):
                missing = count - len(result.titles)
                if missing <= 0 or result.error:
                    break
                if stopped():
                    result.error = "stopped: the caller went away"
                    break
                if not lease.held():
                    result.error = f"stopped: {lease.lost}"
                    break
                batches = [
                    min(TITLES_PER_CALL, missing - i) for i in range(0, missing, TITLES_PER_CALL)
                ]
                avoid = [*existing, *result.titles]
                futures = [
                    pool.submit(self._ask, project, n, model, avoid, on_retry, on_request)
                    for n in batches
                ]
                for future in futures:  # in submission order, so the result is deterministic
                    try:
                        reply = future.result()
                    except Exception as e:  # retries are spent: the missing titles fail
                        if not result.error:
                            result.fatal = isinstance(e, FatalApiError)
                            result.error = failure_reason(e)
                        continue
                    result.prompt_tokens += reply.prompt_tokens
                    result.completion_tokens += reply.completion_tokens
                    result.cost_usd += self._prices.cost(
                        model, reply.prompt_tokens, reply.completion_tokens
                    )
                    lines = reply.text.splitlines()
                    if reply.finish_reason == "length":  # cut off: the last line may be half
                        lines = lines[:-1]
                    taken = len(result.titles)
                    for line in lines:
                        title = clean_title(line)
                        if not title:
                            continue
                        if title_problem(title, self._length) or keyword_list(title, project):
                            result.rejected += 1
                            continue
                        if len(result.titles) < count and not seen.same_as(title):
                            seen.add(title)
                            result.titles.append(title)
                    if len(result.titles) > taken:
                        on_titles(result.titles[taken:])
        missing = count - len(result.titles)
        # Titles the model could not be asked for (an error) are failures, not a shortfall.
        result.shortfall = 0 if result.error else missing
        return result

    def stream(
        self,
        project: ProjectInfo,
        count: int,
        model: str,
        max_parallel: int,
        existing: list[str],
        stopped: Callable[[], bool] = lambda: False,
        lease: JobLease | None = None,
    ) -> Iterator[list[str] | TitlesResult]:
        """write() as an iterator: each reply's new titles as they are taken, then the
        TitlesResult. The calls run on a thread of their own, joined before this returns."""
        items: queue.Queue[object] = queue.Queue()

        def run() -> None:
            try:
                items.put(
                    self.write(
                        project, count, model, max_parallel, existing, items.put, stopped, lease
                    )
                )
            except BaseException as e:  # ends the iteration with the error, not a hang
                items.put(e)
            finally:
                items.put(_END)

        writer = threading.Thread(target=run, name="titles-stream", daemon=True)
        writer.start()
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, list | TitlesResult)
                yield item
        finally:
            writer.join()  # also when the caller left: the calls in flight end first

    def _ask(
        self,
        project: ProjectInfo,
        n: int,
        model: str,
        avoid: list[str],
        on_retry: Callable[[RetryNotice], None],
        on_request: Callable[[], None],
    ) -> Completion:
        prompt = prompts.titles_prompt(
            project.keyword, project.entities, project.related_searches, n, avoid, self._length
        )
        return self._llm.complete(
            model=model,
            system=prompt.system,
            prompt=prompt.user,
            max_tokens=titles_tokens(n),
            temperature=0.9,
            on_retry=on_retry,
            on_request=on_request,
        )
