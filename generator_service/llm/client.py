"""LlmClient: what the pipeline needs from a model; OpenAiLlm: that, through the openai SDK."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from openai import OpenAI


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


OnRetry = Callable[[RetryNotice], None]


class LlmClient(Protocol):
    """One chat completion; must be safe to call from many threads at once. A client that
    retries tells `on_retry` about each retry before it waits."""

    def complete(
        self,
        *,
        model: str,
        system: str,
        prompt: str,
        max_tokens: int,
        temperature: float,
        on_retry: OnRetry | None = None,
    ) -> Completion: ...


class EmptyReplyError(Exception):
    """The API answered without any text."""


class ReplyTooLargeError(Exception):
    """The API answered with more text than any tierwriter prompt asks for."""


# Far beyond the longest reply tierwriter asks for (8,000 tokens of content, ~32,000 characters);
# anything larger is refused before it is parsed, stored or rendered.
MAX_REPLY_CHARS = 400_000


class OpenAiLlm:
    """Any OpenAI-compatible endpoint (OpenAI, OpenRouter, vLLM, the simulator).

    The SDK client is thread-safe and pools connections, so one instance serves every worker.
    It makes one try per call (the SDK's own retries are off): RetryingLlm retries, so that
    every retry can be reported."""

    def __init__(self, base_url: str | None, api_key: str, timeout: float) -> None:
        self._client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

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
        response = self._client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=temperature,
        )
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

    def close(self) -> None:
        """Close the SDK's connection pool."""
        self._client.close()
