"""RetryingLlm: what is retried, how long it waits, and what the pipeline reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import httpx2 as httpx  # the openai SDK's HTTP client
import openai
import pytest

from generator_service.calibration import WordTargets
from generator_service.domain import ArticleTask, EventKind
from generator_service.llm import Completion
from generator_service.llm.client import OnRetry, RetryNotice, failure_reason
from generator_service.llm.retry import RetryingLlm, RetryPolicy, is_retryable, server_delay
from generator_service.pipeline import MAX_CONTINUATIONS, ArticlePipeline
from tests.fakes import EventLog, FakeLlm, MemorySaver, batch_context

REQUEST = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    response = httpx.Response(status, headers=headers or {}, request=REQUEST)
    classes: dict[int, type[openai.APIStatusError]] = {
        400: openai.BadRequestError,
        401: openai.AuthenticationError,
        429: openai.RateLimitError,
    }
    cls = classes.get(
        status, openai.InternalServerError if status >= 500 else openai.APIStatusError
    )
    return cls(f"status {status}", response=response, body=None)


@dataclass
class ScriptedLlm:
    """Raises the scripted errors in order, then answers."""

    errors: list[BaseException]
    calls: int = 0

    def complete(self, **_: Any) -> Completion:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return Completion("ok", 1, 1, "stop")


@dataclass
class Sleeps:
    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def call(llm: RetryingLlm, on_retry: OnRetry | None = None) -> Completion:
    return llm.complete(
        model="m", system="s", prompt="p", max_tokens=10, temperature=0, on_retry=on_retry
    )


@pytest.mark.parametrize(
    "error, retryable",
    [
        (status_error(429), True),
        (status_error(500), True),
        (status_error(503), True),
        (status_error(408), True),
        (openai.APITimeoutError(request=REQUEST), True),
        (openai.APIConnectionError(request=REQUEST), True),
        (status_error(400), False),
        (status_error(401), False),
        (status_error(404), False),
        (ValueError("x"), False),
    ],
)
def test_what_is_retried(error: BaseException, retryable: bool) -> None:
    assert is_retryable(error) is retryable


def test_retries_wait_at_least_what_the_server_asks_and_are_reported() -> None:
    inner = ScriptedLlm(
        [
            status_error(429, {"retry-after-ms": "1500"}),
            status_error(503, {"retry-after": "2"}),
            openai.APITimeoutError(request=REQUEST),
        ]
    )
    sleeps, notices = Sleeps(), list[RetryNotice]()
    llm = RetryingLlm(inner, RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05), sleeps)
    assert call(llm, notices.append).text == "ok"
    assert inner.calls == 4
    assert sleeps.waits[0] >= 1.5 and sleeps.waits[1] >= 2.0 and sleeps.waits[2] <= 0.05
    assert [(n.attempt, n.reason) for n in notices] == [
        (1, "Rate limit exceeded"),
        (2, "Server error 503"),
        (3, "Timed out"),
    ]
    assert [n.delay for n in notices] == sleeps.waits


def test_backoff_grows_and_stays_under_the_maximum() -> None:
    inner = ScriptedLlm([status_error(500) for _ in range(6)])
    sleeps = Sleeps()
    llm = RetryingLlm(inner, RetryPolicy(attempts=7, base_delay=1.0, max_delay=4.0), sleeps)
    call(llm)
    assert len(sleeps.waits) == 6 and all(0 <= w <= 4.0 for w in sleeps.waits)


def test_the_last_error_is_raised_when_the_tries_run_out() -> None:
    inner = ScriptedLlm([status_error(429) for _ in range(5)])
    llm = RetryingLlm(inner, RetryPolicy(attempts=3, base_delay=0.0001), Sleeps())
    with pytest.raises(openai.RateLimitError):
        call(llm)
    assert inner.calls == 3


def test_an_error_another_try_cannot_fix_fails_at_once() -> None:
    inner = ScriptedLlm([status_error(401)])
    llm = RetryingLlm(inner, RetryPolicy(attempts=5), Sleeps())
    with pytest.raises(openai.AuthenticationError):
        call(llm)
    assert inner.calls == 1


def test_retry_after_as_an_http_date() -> None:
    in_three = formatdate(__import__("time").time() + 3, usegmt=True)
    assert 1.5 <= server_delay(status_error(429, {"retry-after": in_three})) <= 3.5
    assert server_delay(status_error(429, {"retry-after": "soon"})) == 0.0
    assert server_delay(ValueError()) == 0.0


def test_the_pipeline_reports_each_retry_and_the_success() -> None:
    llm, log = FakeLlm(content_retries=2), EventLog()
    ArticlePipeline(llm, MemorySaver(), WordTargets(200)).run(
        batch_context(), ArticleTask(2, "T"), log
    )
    retries = [e for e in log.events if e.kind is EventKind.RETRYING]
    assert [(e.attempt, e.error, e.stage, e.retry_delay) for e in retries] == [
        (1, "Rate limit exceeded", "content", 2.0),
        (2, "Rate limit exceeded", "content", 2.0),
    ]
    kinds = [e.kind for e in log.events]
    assert kinds.index(EventKind.RETRY_SUCCEEDED) == kinds.index(EventKind.RETRYING) + 2


def test_a_reply_cut_off_by_the_token_limit_is_continued() -> None:
    llm, saver = FakeLlm(content_words=980, truncated_replies=1), MemorySaver()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.SAVED
    record = saver.records[(1, "tier1", 0)]
    assert sum(p.startswith("Continue the text") for p in llm.prompts) == 1
    assert record.api_calls == 3 and record.word_count == 980 + 50  # 50 words continued
    assert record.status == "generated"


def test_a_reply_that_stays_cut_off_fails_the_article_with_that_reason() -> None:
    llm, saver = FakeLlm(truncated_replies=1 + MAX_CONTINUATIONS), MemorySaver()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.FAILED and outcome.stage == "content"
    assert "TruncatedReplyError: the reply was cut off by the token limit" in outcome.error
    assert saver.records[(1, "tier1", 0)].status == "failed"


def test_notices_are_plain_data() -> None:
    assert RetryNotice(1, "x", 0.5) == RetryNotice(1, "x", 0.5)


@dataclass
class FormatServer:
    """Refuses the response_format types in `refused` with (status, message), answers the rest;
    records the format of every call."""

    refused: dict[str | None, tuple[int, str]]
    asked: list[str | None] = field(default_factory=list)

    def complete(self, **kwargs: Any) -> Completion:
        kind = (kwargs.get("response_format") or {}).get("type")
        self.asked.append(kind)
        if kind in self.refused:
            status, message = self.refused[kind]
            error = status_error(status)
            error.message = message
            raise error
        return Completion("{}", 1, 1, "stop")


SCHEMA = {"type": "json_schema", "json_schema": {"name": "outline", "schema": {}}}
LLAMA_CPP_PYTHON = "response_format.type: Input should be 'text' or 'json_object'"


def ask_outline(llm: RetryingLlm) -> Completion:
    return llm.complete(
        model="m", system="s", prompt="p", max_tokens=10, temperature=0, response_format=SCHEMA
    )


@pytest.mark.parametrize(
    "refused, then_asked",
    [
        # llama-cpp-python's server: 500 for a schema, JSON mode served.
        ({"json_schema": (500, LLAMA_CPP_PYTHON)}, "json_object"),
        ({"json_schema": (422, "response_format json_schema is not supported")}, "json_object"),
        # No structured output at all: 400 for both, the plain prompt served.
        ({"json_schema": (400, "bad"), "json_object": (400, "bad")}, None),
    ],
)
def test_a_refused_response_format_steps_down_at_once_and_is_remembered(
    refused: dict[str | None, tuple[int, str]], then_asked: str | None
) -> None:
    server, sleeps = FormatServer(refused), Sleeps()
    llm = RetryingLlm(server, RetryPolicy(attempts=4), sleep=sleeps)
    ask_outline(llm)
    assert server.asked[-1] == then_asked and sleeps.waits == []  # no retry spent on it
    refusals = len(server.asked) - 1
    ask_outline(llm)
    assert server.asked[refusals + 1 :] == [then_asked]  # the next call starts where it worked


def test_a_500_that_says_nothing_of_the_format_is_retried_as_a_server_error() -> None:
    server, sleeps = FormatServer({"json_schema": (500, "CUDA out of memory")}), Sleeps()
    llm = RetryingLlm(server, RetryPolicy(attempts=3), sleep=sleeps)
    with pytest.raises(openai.InternalServerError):
        ask_outline(llm)
    assert server.asked == ["json_schema"] * 3 and len(sleeps.waits) == 2


def test_a_failure_reason_is_one_line_without_the_servers_internals() -> None:
    server_said = (
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3/dist-packages/llama_cpp/server/app.py", line 312, in handler\n'
        "    raise ValueError(x)\n"
        "ValueError: Input should be 'text' or 'json_object'"
    )
    response = httpx.Response(500, request=REQUEST)
    error = openai.InternalServerError(
        "Error code: 500", response=response, body={"error": {"message": server_said}}
    )
    reason = failure_reason(error)
    assert "\n" not in reason and "app.py" not in reason and "line 312" not in reason
    assert reason == "InternalServerError: 500 ValueError: Input should be 'text' or 'json_object'"
    assert len(failure_reason(ValueError("x" * 1000))) == 300
