"""RetryingLlm: model calls that survive the API. 429, 5xx, timeouts and dropped connections are
retried with exponential backoff and full jitter, never sooner than the server's Retry-After /
retry-after-ms; every retry is reported to the caller (the pipeline turns it into an event).
Errors that another try cannot fix (400, 401, 403, 404, 422) fail at once.

tenacity does the loop (stop, wait, before-sleep hook); this module decides what is retryable,
how long to wait, and how a retry reads on a console."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from generator_service.llm.client import Completion, LlmClient, OnRetry, RetryNotice

log = logging.getLogger(__name__)

# A server asking for longer than this is not waited for in one go; the retry budget decides.
MAX_SERVER_DELAY = 120.0
_RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a model call is retried."""

    attempts: int = 4  # tries in all: the first and up to three retries
    base_delay: float = 1.0  # seconds; the backoff window doubles with every retry
    max_delay: float = 30.0  # the backoff window never exceeds this


def is_retryable(error: BaseException) -> bool:
    """Whether another try can succeed: rate limits, server errors, timeouts, lost connections."""
    if isinstance(error, openai.APIStatusError):
        return error.status_code in _RETRYABLE_STATUS or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)  # includes APITimeoutError


def reason_of(error: BaseException) -> str:
    """A short reason for a console line."""
    if isinstance(error, openai.RateLimitError):
        return "Rate limit exceeded"
    if isinstance(error, openai.APIStatusError):
        return f"Server error {error.status_code}"
    if isinstance(error, openai.APITimeoutError):
        return "Timed out"
    if isinstance(error, openai.APIConnectionError):
        return "Connection error"
    return type(error).__name__


def server_delay(error: BaseException) -> float:
    """Seconds the server asked us to wait (retry-after-ms, else Retry-After), 0 if it did not."""
    response = getattr(error, "response", None)  # the SDK's HTTP response, on status errors
    headers = getattr(response, "headers", None)
    if headers is None:
        return 0.0
    try:
        if "retry-after-ms" in headers:
            return min(MAX_SERVER_DELAY, float(headers["retry-after-ms"]) / 1000)
        if "retry-after" in headers:
            value = headers["retry-after"]
            try:
                return min(MAX_SERVER_DELAY, float(value))
            except ValueError:  # an HTTP date
                wait = parsedate_to_datetime(value).timestamp() - time.time()
                return min(MAX_SERVER_DELAY, max(0.0, wait))
    except (ValueError, TypeError, OverflowError):
        return 0.0
    return 0.0


class RetryingLlm:
    """An LlmClient whose calls are retried by `policy`. Thread-safe when `inner` is."""

    def __init__(
        self,
        inner: LlmClient,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._sleep = sleep
        self._backoff = wait_random_exponential(multiplier=policy.base_delay, max=policy.max_delay)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        backoff = float(self._backoff(state))
        return max(backoff, server_delay(error)) if error else backoff

    def complete(
        self,
        *,
        model: str,
        system: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        on_retry: OnRetry | None = None,
    ) -> Completion:
        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            notice = RetryNotice(state.attempt_number, reason_of(error) if error else "", delay)
            log.info("model call failed (%s), retrying in %.1fs", notice.reason, delay)
            if on_retry:
                on_retry(notice)

        retrying = Retrying(
            stop=stop_after_attempt(self._policy.attempts),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        call: Any = self._inner.complete  # tenacity's call signature is untyped
        return retrying(
            call,
            model=model,
            system=system,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
        )
