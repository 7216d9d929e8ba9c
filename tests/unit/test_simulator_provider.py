"""The simulator as a real provider and a weak model, through the openai SDK over HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion

from generator_service import prompts
from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from generator_service.text import count_words, strip_fences
from generator_service.titles import DEFAULT_LENGTH

KEY = "sk-test-right"
CONTEXT = ("cnc machining", ["spindle", "lathe"], ["cnc cost"])
OUTLINE = prompts.outline_prompt("Lathe Basics", *CONTEXT, (3, 5), (2, 6)).user
JSON_SCHEMA: Any = {"type": "json_schema", "json_schema": {"name": "outline", "strict": True}}


@contextmanager
def served(**config: Any) -> Iterator[tuple[LlmSimulator, OpenAI]]:
    """A simulator on 127.0.0.1 with `config`, and an SDK client for it that never retries."""
    with LlmSimulator(SimulatorConfig(**config)) as simulator:
        client = OpenAI(base_url=simulator.base_url, api_key=KEY, max_retries=0, timeout=10)
        try:
            yield simulator, client
        finally:
            client.close()


def ask(client: OpenAI, prompt: str, model: str = "m", **options: Any) -> ChatCompletion:
    """One chat completion with `prompt` as the user message."""
    messages: Any = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model=model, messages=messages, **options)


def text_of(reply: ChatCompletion) -> str:
    """The reply's text."""
    return reply.choices[0].message.content or ""


def test_a_wrong_api_key_gets_401_that_never_echoes_the_key() -> None:
    with served(api_key=KEY) as (simulator, client):
        ask(client, "hello")
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(client.with_options(api_key="sk-stolen-secret"), "hello")
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        assert "sk-stolen-secret" not in caught.value.response.text
        assert simulator.stats().faults == {"unauthorized": 1}
        assert simulator.stats().requests == 1


def test_an_unknown_model_gets_404_and_the_model_list_names_the_served_ones() -> None:
    with served(models=["gpt-a", "gpt-b"]) as (simulator, client):
        assert text_of(ask(client, "hello", model="gpt-b"))
        with pytest.raises(openai.NotFoundError) as caught:
            ask(client, "hello", model="gpt-x")
        assert caught.value.code == "model_not_found"
        assert caught.value.message.endswith(
            "The model `gpt-x` does not exist or you do not have access to it."
        )
        assert [model.id for model in client.models.list()] == ["gpt-a", "gpt-b"]
        assert simulator.stats().faults == {"model_not_found": 1}


def test_a_server_without_json_mode_refuses_response_format_with_400() -> None:
    with served(refuse_response_format=True) as (simulator, client):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, OUTLINE, response_format=JSON_SCHEMA)
        assert caught.value.param == "response_format" and caught.value.code is None
        assert caught.value.type == "invalid_request_error"
        assert json.loads(strip_fences(text_of(ask(client, OUTLINE))))["outline"]
        assert simulator.stats().faults == {"response_format_refused": 1}


def test_a_server_without_schemas_refuses_json_schema_as_llama_cpp_python_does() -> None:
    with served(refuse_json_schema_status=500) as (simulator, client):
        with pytest.raises(openai.InternalServerError) as caught:
            ask(client, OUTLINE, response_format=JSON_SCHEMA)
        assert "Input should be 'text' or 'json_object'" in caught.value.message
        plain_json = {"type": "json_object"}
        assert json.loads(text_of(ask(client, OUTLINE, response_format=plain_json)))["outline"]
        assert simulator.stats().faults == {"json_schema_refused": 1}


def test_requests_past_the_rpm_limit_get_429_with_the_real_wait() -> None:
    with served(rpm_limit=3) as (simulator, client):
        for _ in range(3):
            ask(client, "hello")
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client, "hello")
        error, headers = caught.value, caught.value.response.headers
        # 3 a minute: the bucket is empty and one request refills in 20 s, less the time passed
        # since the first request (well under 5 s even on a loaded machine).
        assert 15_000 < int(headers["retry-after-ms"]) <= 20_000
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert error.type == "requests" and error.code == "rate_limit_exceeded"
        assert error.message.endswith(
            "Rate limit reached for requests per minute (RPM): limit 3 (simulated)"
        )
        stats = simulator.stats()
        assert (stats.requests, stats.rate_limited, stats.faults) == (3, 1, {"rpm": 1})


def test_requests_past_the_tpm_limit_get_429_with_the_wait_for_their_tokens() -> None:
    with served(tpm_limit=1000) as (simulator, client):
        ask(client, "hello", max_tokens=600)  # body bytes // 4 + 600 of the 1000 tokens
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client, "hello", max_tokens=600)
        error, headers = caught.value, caught.value.response.headers
        asked = int(re.findall(r"limit 1000, requested (\d+) \(simulated\)", error.message)[0])
        left = int(headers["x-ratelimit-remaining-tokens"])
        assert 600 < asked < 700 and error.type == "tokens"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        # 1000 a minute refill one token per 60 ms; `left` is the level rounded down.
        assert (asked - left - 1) * 60 < int(headers["retry-after-ms"]) <= (asked - left) * 60
        assert simulator.stats().faults == {"tpm": 1}


def test_a_request_larger_than_the_tpm_limit_gets_429_without_a_wait() -> None:
    with served(tpm_limit=1000) as (simulator, client):
        with pytest.raises(openai.RateLimitError) as caught:
            ask(client, "hello", max_tokens=5000)
        assert "Request too large for tokens per minute (TPM): limit 1000" in caught.value.message
        assert "retry-after-ms" not in caught.value.response.headers
        ask(client, "hello", max_tokens=500)  # it took nothing from the bucket
        assert simulator.stats().faults == {"tpm": 1}


def test_a_reply_longer_than_max_tokens_is_cut_with_finish_reason_length() -> None:
    titles = prompts.titles_prompt(*CONTEXT, 12, [], DEFAULT_LENGTH).user
    with served() as (_simulator, client):
        reply = ask(client, titles, max_tokens=10)
        assert reply.choices[0].finish_reason == "length"
        # 8 words are 8 * 4 // 3 = 10 tokens as the simulator counts; a 9th would make 12.
        assert len(text_of(reply).split()) == 8
        assert reply.usage is not None and reply.usage.completion_tokens == 10
        assert ask(client, titles, max_tokens=4000).choices[0].finish_reason == "stop"


def test_stats_keep_the_largest_max_tokens_per_kind_and_count_response_format() -> None:
    titles = prompts.titles_prompt(*CONTEXT, 3, [], DEFAULT_LENGTH).user
    with served() as (simulator, client):
        ask(client, titles, max_tokens=300)
        ask(client, titles, max_completion_tokens=500)
        ask(client, titles, max_tokens=200)
        ask(client, OUTLINE, max_tokens=900, response_format=JSON_SCHEMA)
        ask(client, "hello")
        stats = simulator.stats()
        assert stats.max_tokens_by_kind == {"titles": 500, "outline": 900}
        assert stats.response_format_requests == 1


def test_outlines_asked_with_response_format_come_back_as_bare_json() -> None:
    with served() as (_simulator, client):
        outline = json.loads(text_of(ask(client, OUTLINE, response_format=JSON_SCHEMA)))
        assert 3 <= len(outline["outline"]) <= 5
        assert text_of(ask(client, OUTLINE)).startswith("```json\n")


def test_a_prose_model_writes_markdown_outlines_unless_json_mode_is_asked() -> None:
    repair = prompts.outline_repair_prompt("Lathe Basics", (3, 5), (2, 6), "not JSON", "x").user
    with served(prose_outlines=True) as (_simulator, client):
        for prompt in (OUTLINE, repair):
            prose = text_of(ask(client, prompt))
            assert prose.startswith("Sure! Here is an outline:\n\n## ")
            assert 3 <= prose.count("\n## ") <= 5 and "{" not in prose
            structured = text_of(ask(client, prompt, response_format=JSON_SCHEMA))
            assert 3 <= len(json.loads(structured)["outline"]) <= 5


def test_chatty_titles_hold_the_asked_titles_among_lines_that_are_not_titles() -> None:
    titles = prompts.titles_prompt(*CONTEXT, 5, [], DEFAULT_LENGTH).user
    with served(markdown_titles=True) as (_one, first), served(markdown_titles=True) as (_, again):
        reply = text_of(ask(first, titles))
        assert reply == text_of(ask(again, titles))  # the same prompt, the same reply
    lines = reply.splitlines()
    assert lines[0] == "Here are 5 distinct article titles for you:"
    numbered = [line for line in lines if re.match(r"\d+\. ", line)]
    assert [line.split(".")[0] for line in numbered] == ["1", "2", "3", "4", "5"]
    assert any(re.match(r'\d+\. (\*\*|\*|")', line) for line in numbered)
    assert lines.count("") >= 2 and sum(line.endswith(":") for line in lines) == 2
    assert any(len(line) >= 200 for line in lines)
    assert "{{ title }} for {{ audience }}" in lines
    cleaned = {re.sub(r'^\d+\. |[*"]|\.$', "", line) for line in numbered}
    assert len(cleaned) == 5 and all(len(t) < 120 for t in cleaned)


ARTICLE = "<h2>Basics</h2>\n" + "\n".join(
    f"<p>{' '.join(['word'] * 20)} paragraph {n}.</p>" for n in range(5)
)


@pytest.mark.parametrize(
    ("mode", "low", "high"),
    [("reach", 320, 420), ("shrink", 0, count_words(ARTICLE) - 1), ("overshoot", 770, 790)],
)
def test_augment_modes_reach_shrink_or_overshoot_the_asked_range(
    mode: str, low: int, high: int
) -> None:
    have = count_words(ARTICLE)  # 111 of 300-400: overshoot writes 400 + 2 * 189
    prompt = (
        f"The article below has {have} words; it needs between 300 and 400 words. "
        f"Expand it to at least 300 words.\n<article>\n{ARTICLE}\n</article>"
    )
    with served(augment_mode=mode) as (_simulator, client):
        assert low <= count_words(text_of(ask(client, prompt))) <= high


def test_a_negative_undershoot_mean_writes_past_the_lower_bound() -> None:
    outline = [{"h2": "One", "h3": []}, {"h2": "Two", "h3": []}]
    content = prompts.content_prompt("T", *CONTEXT, outline, [500, 500], 1000, 1400).user
    with served(undershoot_mean=-200.0, undershoot_jitter=0.0) as (_simulator, client):
        assert abs(count_words(text_of(ask(client, content))) - 1200) <= 5


def test_the_command_line_takes_the_provider_flags_and_stops_on_sigterm() -> None:
    command = [sys.executable, "-m", "generator_service.llm.simulator", "--port", "0"]
    command += ["--model", "gpt-a", "--model", "gpt-b", "--rpm", "60", "--tpm", "9000"]
    command += ["--augment-mode", "shrink", "--markdown-titles", "--prose-outlines"]
    command += ["--refuse-response-format", "--api-key", KEY]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().split()[-1]  # waits for the banner
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
                listed = [model["id"] for model in json.load(response)["data"]]
            assert listed == ["gpt-a", "gpt-b"]
            process.terminate()
            assert process.wait(timeout=5) == 0
        finally:
            process.kill()
