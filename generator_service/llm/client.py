"""LlmClient: what the pipeline needs from a model; OpenAiLlm: that, through the openai SDK."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import openai
from openai import OpenAI

from generator_service.llm.limits import ConcurrencyChange


@dataclass(frozen=True)
class Completion:
    """One model reply and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class RetryNotice:
    """One failed try of a model call that will be retried."""

    attempt: int  # the try that failed, from 1
    reason: str  # e.g. "Rate limit exceeded", "Server error 503", "Timed out"
    delay: float  # seconds until the next try
    rate_limited: bool = False  # the answer was a 429


OnRetry = Callable[[RetryNotice], None]
OnThrottle = Callable[[ConcurrencyChange], None]
# Called once for every request sent to the endpoint: a retry, a refused response_format and a
# failure are requests too, and the endpoint counts (and may bill) each.
OnRequest = Callable[[], None]
# A JSON schema for the reply, as the API's `response_format` takes it.
ResponseFormat = dict[str, Any]


class LlmClient(Protocol):
    """One chat completion; must be safe to call from many threads at once. A client that
    retries tells `on_retry` about each retry before it waits, and `on_throttle` about every
    change of the model's concurrency; `on_request` hears of every request sent, however it
    ends. `response_format` asks for JSON of a schema where the
    endpoint supports it (a client may drop it for endpoints that do not)."""

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
    ) -> Completion: ...


class FatalApiError(Exception):
    """The API refused in a way that no retry and no other article can fix (a rejected key, an
    unknown model, an endpoint that is not there): the job must stop. The message names the
    cause and the endpoint, never the key."""


class EndpointUnreachableError(FatalApiError):
    """The endpoint was never reached (connection refused, unknown host). Retried like any lost
    connection; fatal once the retries are spent."""


class EmptyReplyError(Exception):
    """The API answered without any text."""


class ReplyTooLargeError(Exception):
    """The API answered with more text than any tierwriter prompt asks for."""


# Far beyond the longest reply tierwriter asks for (8,000 tokens of content, ~32,000 characters);
# anything larger is refused before it is parsed, stored or rendered.
MAX_REPLY_CHARS = 400_000


def public_url(url: str) -> str:
    """The URL as messages may show it: no user, password or query (they may hold a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


class OpenAiLlm:
    """Any OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM, the simulator).

    The SDK client is thread-safe and pools connections, so one instance serves every worker.
    It makes one try per call (the SDK's own retries are off): RetryingLlm retries, so that
    every retry can be reported. Errors that end the job become FatalApiError here, where the
    endpoint is known."""

    def __init__(self, base_url: str | None, api_key: str, timeout: float) -> None:
        self._client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.endpoint = public_url(str(self._client.base_url))
        # Once the endpoint has answered, a lost connection is a blip, not a wrong address.
        self._reached = threading.Event()

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
        extra: dict[str, Any] = {"response_format": response_format} if response_format else {}
        if on_request:
            on_request()
        try:
            response = self._client.chat.completions.create(
                model=model,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": prompt},
                ],
                max_tokens=max_tokens,
                temperature=temperature,
                **extra,
            )
        except openai.APIStatusError as e:
            self._reached.set()
            fatal = self._fatal(e, model)
            if fatal:
                raise fatal from e
            raise
        except openai.APITimeoutError:
            raise
        except openai.APIConnectionError as e:
            if self._reached.is_set():
                raise
            cause = e.__cause__ or e
            raise EndpointUnreachableError(
                f"cannot reach the API at {self.endpoint} ({cause}): check OPENAI_BASE_URL"
            ) from e
        self._reached.set()
        if not response.choices or response.choices[0].message.content is None:
            raise EmptyReplyError(f"model {model!r} returned no text")
        if len(response.choices[0].message.content) > MAX_REPLY_CHARS:
            raise ReplyTooLargeError(
                f"model {model!r} returned {len(response.choices[0].message.content):,} "
                f"characters; at most {MAX_REPLY_CHARS:,} are accepted"
            )
        usage = response.usage
        return Completion(
            text=response.choices[0].message.content,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=response.choices[0].finish_reason or "",
        )

    def _fatal(self, error: openai.APIStatusError, model: str) -> FatalApiError | None:
        """The job-ending form of a status error, or None for one that concerns this call only.
        The provider's own message is left out for key errors: some quote part of the key."""
        status = error.status_code
        if status == 401:
            return FatalApiError(
                f"the API at {self.endpoint} rejected the API key (401): check OPENAI_API_KEY"
            )
        if status == 403:
            return FatalApiError(
                f"the API at {self.endpoint} refused access to model {model!r} (403): check "
                "OPENAI_API_KEY and what the key may use"
            )
        if status == 404:
            return FatalApiError(
                f"model {model!r} was not found at {self.endpoint} (404): check the job's "
                "models (or DEFAULT_MODEL) and OPENAI_BASE_URL"
            )
        return None

    def close(self) -> None:
        """Close the SDK's connection pool."""
        self._client.close()


# A failure's reason is one console line; its traceback is in the record and the log.
MAX_REASON_CHARS = 300
# A server's own traceback frames, which some put into their error messages.
_SERVER_FRAME = re.compile(r'File "[^"]*", line \d+(?:, in [\w<>.]+)?')


def failure_reason(error: Exception) -> str:
    """Why a model call failed (an article's, or a tier's titles), on one line of at most
    MAX_REASON_CHARS: the error's class and message — for an API error its status and the
    server's own message, for a FatalApiError the message alone (it says what to fix) —
    without the server's file names and line numbers."""
    if isinstance(error, FatalApiError):
        text = str(error)
    elif isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        inner = body.get("error", body)
        said = str(inner.get("message") or "") if isinstance(inner, dict) else ""
        if "Traceback (most recent call last)" in said:  # a server's own: its last line says it
            said = [line for line in said.splitlines() if line.strip()][-1]
        text = f"{type(error).__name__}: {error.status_code} {said or error.message}"
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(_SERVER_FRAME.sub("", text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
