"""RetryingLlm: model calls that survive the API. 429, 5xx, timeouts and dropped connections are
retried with exponential backoff and full jitter, never sooner than the server's Retry-After /
retry-after-ms; every retry is reported to the caller (the pipeline turns it into an event).
Errors that another try cannot fix (400, 401, 403, 404, 422) fail at once.

Every try first passes the ProviderGate (the model's rate buckets and adaptive concurrency);
its max_tokens is capped at the model's max_output_tokens. A request whose response_format the
endpoint refuses — 400, or 422 or 500 whose message is about the format (llama-cpp-python's
server answers a `json_schema` with 500) — steps down at once, outside the retry budget:
`json_schema` → `json_object` → no response_format. The step that then goes through is
remembered for the model, so later calls start there.

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
    OnRequest,
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
# How servers that cannot do a response_format say so: OpenAI and vLLM with 400; others with 422
# or 500 and a message naming what they cannot do (then only with such a message).
_FORMAT_REFUSAL_STATUS = {400, 422, 500}
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "'text'", "schema", "grammar")
JSON_OBJECT: ResponseFormat = {"type": "json_object"}


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


def refuses_response_format(error: BaseException) -> bool:
    """Whether an API error may be the endpoint refusing the response_format it was sent: any
    400, or a 422 or 500 whose message is about the format."""
    if not isinstance(error, openai.APIStatusError):
        return False
    if error.status_code not in _FORMAT_REFUSAL_STATUS:
        return False
    if error.status_code == 400:
        return True  # a 400 for another reason fails again one step down, and is not remembered
    said = f"{error.message} {error.body}".lower()
    return any(word in said for word in _FORMAT_WORDS)


def format_steps(asked: ResponseFormat | None) -> list[ResponseFormat | None]:
    """The formats to try for `asked`, each a step down from the one before: a JSON schema, then
    plain JSON mode, then none."""
    if asked is None:
        return [None]
    if asked.get("type") == "json_schema":
        return [asked, JSON_OBJECT, None]
    return [asked, None]


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
        # Per model, how many steps down its endpoint's response_format went (format_steps).
        self._format_step: dict[str, int] = {}
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
        on_request: OnRequest | None = None,
    ) -> Completion:
        steps = format_steps(response_format)
        with self._lock:
            step = min(self._format_step.get(model, 0), len(steps) - 1)
        max_tokens = self._fitted_budget(model, system, prompt, steps[step], max_tokens)

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
            nonlocal step
            tried = step
            while True:
                try:
                    reply = self._try(
                        model, system, prompt, max_tokens, temperature, steps[tried],
                        on_throttle, on_request,
                    )  # fmt: skip
                except openai.APIStatusError as e:
                    if tried + 1 >= len(steps) or not refuses_response_format(e):
                        raise
                    tried += 1  # the same try one step down: no retry is spent on it
                    continue
                break
            if tried > step:  # what went through is where this model's calls start now
                step = tried
                self._remember_step(model, tried, steps[tried])
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

    def _remember_step(self, model: str, step: int, now: ResponseFormat | None) -> None:
        with self._lock:
            if self._format_step.get(model, 0) >= step:
                return
            self._format_step[model] = step
        asked = now["type"] if now else "no response_format"
        log.warning("model %s: the endpoint refused the structured format; asking with %s", model,
                    asked)  # fmt: skip

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
        on_request: OnRequest | None,
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
                on_request=on_request,
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
