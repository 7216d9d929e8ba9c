"""RetryingLlm: model calls that survive the API. 429, 5xx, timeouts and dropped connections are
retried with exponential backoff and full jitter, never sooner than the server's Retry-After /
retry-after-ms; every retry is reported to the caller (the pipeline turns it into an event).
Errors that another try cannot fix (400, 401, 403, 404, 422) fail at once.

Every try first passes the ProviderGate (the model's rate buckets and adaptive concurrency);
its max_tokens is capped at the model's max_output_tokens. A request with a response_format
that the endpoint refuses (400) is sent once more without it, and the model is remembered as
having no JSON mode, so later calls skip the refused try.

tenacity does the loop (stop, wait, before-sleep hook); this module decides what is retryable,
how long to wait, and how a retry reads on a console."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from generator_service.llm.client import (
    Completion,
    EndpointUnreachableError,
    FatalApiError,
    LlmClient,
    OnRetry,
    OnThrottle,
    ResponseFormat,
    RetryNotice,
)
from generator_service.llm.limits import PACING, ProviderGate, estimate_prompt_tokens

log = logging.getLogger(__name__)

# A server asking for longer than this is not waited for in one go; the retry budget decides.
MAX_SERVER_DELAY = 120.0
# The smallest reply budget worth a call under a tokens-per-minute limit.
MIN_REPLY_TOKENS = 64
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
    # A lost connection (a timeout included), or an endpoint not reached yet
    return isinstance(error, openai.APIConnectionError | EndpointUnreachableError)


def reason_of(error: BaseException) -> str:
    """A short reason for a console line."""
    if isinstance(error, openai.RateLimitError):
        return "Rate limit exceeded"
    if isinstance(error, openai.APIStatusError):
        return f"Server error {error.status_code}"
    if isinstance(error, openai.APITimeoutError):
        return "Timed out"
    if isinstance(error, openai.APIConnectionError | EndpointUnreachableError):
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
    """An LlmClient whose calls pass `gate` and are retried by `policy`. Thread-safe when
    `inner` is."""

    def __init__(
        self,
        inner: LlmClient,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
        gate: ProviderGate | None = None,
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._sleep = sleep
        self._gate = gate or ProviderGate(sleep=sleep)
        self._backoff = wait_random_exponential(multiplier=policy.base_delay, max=policy.max_delay)
        self._no_json_mode: set[str] = set()  # models whose endpoint refused response_format
        self._lock = threading.Lock()

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
        response_format: ResponseFormat | None = None,
        on_retry: OnRetry | None = None,
        on_throttle: OnThrottle | None = None,
    ) -> Completion:
        with self._lock:
            schema = None if model in self._no_json_mode else response_format
        max_tokens = self._fitted_budget(model, system, prompt, schema, max_tokens)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            notice = RetryNotice(
                state.attempt_number,
                reason_of(error) if error else "",
                delay,
                rate_limited=isinstance(error, openai.RateLimitError),
            )
            log.info("model call failed (%s), retrying in %.1fs", notice.reason, delay)
            if on_retry:
                on_retry(notice)

        def attempt() -> Completion:
            nonlocal schema
            try:
                return self._try(
                    model, system, prompt, max_tokens, temperature, schema, on_throttle
                )
            except openai.BadRequestError:
                if schema is None:
                    raise
            # Asked again without response_format: when that goes through, the endpoint has no
            # JSON mode (a 400 for another reason fails again and is not remembered).
            reply = self._try(model, system, prompt, max_tokens, temperature, None, on_throttle)
            schema = None
            with self._lock:
                if model not in self._no_json_mode:
                    self._no_json_mode.add(model)
                    log.warning("model %s refused response_format: asking without it", model)
            return reply

        retrying = Retrying(
            stop=stop_after_attempt(self._policy.attempts),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(attempt)

    def _fitted_budget(
        self,
        model: str,
        system: str,
        prompt: str,
        response_format: ResponseFormat | None,
        max_tokens: int,
    ) -> int:
        """`max_tokens` within the model's max_output_tokens and, with a tokens-per-minute
        limit, within what one call may charge (a reply that runs out is continued). A prompt
        that alone passes that limit can never go: FatalApiError."""
        limits = self._gate.limits(model)
        max_tokens = min(max_tokens, limits.max_output_tokens)
        if not limits.tpm:
            return max_tokens
        schema_text = json.dumps(response_format) if response_format else ""
        prompt_tokens = estimate_prompt_tokens(system, prompt, schema_text)
        room = int(limits.tpm * PACING) - prompt_tokens  # what one call may charge at once
        if room < MIN_REPLY_TOKENS:
            raise FatalApiError(
                f"model {model}: a prompt of ~{prompt_tokens:,} tokens leaves no room for a "
                f"reply within its limit of {limits.tpm:,} tokens a minute (LLM_TPM_LIMIT, or "
                "its entry in LLM_MODEL_LIMITS)"
            )
        return min(max_tokens, room)

    def _try(
        self,
        model: str,
        system: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        response_format: ResponseFormat | None,
        on_throttle: OnThrottle | None,
    ) -> Completion:
        """One call through the gate: charged as providers charge it (prompt + max_tokens)."""
        schema_text = json.dumps(response_format) if response_format else ""
        cost = estimate_prompt_tokens(system, prompt, schema_text) + max_tokens
        ticket = self._gate.enter(model, cost)
        rate_limited = False
        try:
            return self._inner.complete(
                model=model,
                system=system,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                response_format=response_format,
            )
        except openai.RateLimitError:
            rate_limited = True
            raise
        finally:
            change = self._gate.leave(ticket, rate_limited)
            if change:
                log.warning(
                    "model %s: %s concurrency %d → %d",
                    change.model,
                    "restored" if change.restored else "rate limited:",
                    change.before,
                    change.after,
                )
                if on_throttle:
                    on_throttle(change)
