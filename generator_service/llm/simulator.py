"""An OpenAI-compatible model simulator over real HTTP, for the demo, the tests and the benchmark.

It understands tierwriter's prompts (generator_service.prompts): titles come back one per line,
outlines as JSON within the asked ranges, articles as HTML about the keyword and entities that
fall short of the asked lower bound by about `undershoot_mean` words, as real models do, and
augmentations reach the asked minimum. It counts requests by kind and the peak in flight, so
tests can check concurrency from the outside.

Each off by default, it can also imitate what real providers and weak models do:

- providers: API keys (401), a fixed model list (404), no JSON mode (400 on `response_format`),
  no schemas (`json_schema` refused with a status of its own, as llama-cpp-python's 500),
  RPM/TPM token buckets (429 with the real wait), `max_tokens` cutting replies off ("length");
- faults: shares or every n-th request refused (429), failed (500), stalled or cut off;
- weak models: prose outlines without JSON mode, chatty numbered markdown titles, outlines that
  are not JSON or a section short, repeated titles, augmentations that shrink or overshoot,
  articles that overshoot (a negative `undershoot_mean`), hostile markup, runaway replies.

    python -m generator_service.llm.simulator --port 8900 --latency 0.25 --rpm 500 --tpm 200000
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from generator_service import prompts
from generator_service.similar_titles import TitleIndex
from generator_service.text import count_words

# --- what the simulator writes --------------------------------------------------------------

_TITLE_PATTERNS = [
    "The Complete Guide to {k}",
    "{K}: What Every Beginner Should Know",
    "How {e} Changes the Way You Approach {k}",
    "{N} Mistakes to Avoid With {k}",
    "Choosing the Right {e} for {k}",
    "{K} Explained: {e}, {e2} and Beyond",
    "Why {r} Matters More Than You Think",
    "A Practical Look at {k} for {a}",
    "{K} vs. Traditional Methods: An Honest Comparison",
    "Getting Started With {k}: A {a} Checklist",
    "{N} Expert Tips for Better {k}",
    "Understanding {e} in Modern {k}",
    "What {r} Really Means for Your Budget",
    "The Hidden Costs of {k} and How to Control Them",
    "{K} in {y}: Trends, Tools and Techniques",
    "From {e} to {e2}: Building a {k} Workflow",
    "Is {k} Worth It? A Look at {r}",
    "Troubleshooting {e} Problems in {k}",
    "{N} Questions to Ask Before Investing in {k}",
    "Safety First: Working With {e} in {k}",
    "{N} Ways {e} Improves {k} Results",
    "What Nobody Tells {a} About {k}",
    "{K} on a Budget: Practical Advice for {a}",
    "The {a} Guide to {e} and {e2}",
    "How to Plan a {k} Project From Start to Finish",
    "{N} Signs Your {e} Needs Attention",
    "Everything {a} Should Know About {r}",
    "Comparing {e} Options for {k} in {y}",
    "Lessons Learned From {N} Years of {k}",
    "A Beginner's Roadmap to {k} and {e}",
    "{K} Myths That Cost {a} Money",
    "The Real Difference Between {e} and {e2}",
    "{N} Questions About {r}, Answered",
    "How {a} Can Cut {k} Lead Times",
    "Inside a Modern {k} Workshop: {e} at Work",
]
# Half the titles get one of these: with the patterns above they allow tens of thousands of
# distinct titles, as a real model would write for a tier of thousands.
_SUBTITLES = [
    ": A Guide for {a}",
    " in {y}",
    ": {N} Things to Check",
    " ({N} Expert Tips)",
    ": What {a} Get Wrong",
    ": The {y} Edition",
    " for {a}",
    ": Costs, Tools and Tips",
    ": A Practical Checklist",
    ": Lessons From {N} Projects",
    " Without the Guesswork",
    ": {e} Edition",
    ": Questions {a} Ask",
    ": From Basics to Best Practice",
]
_AUDIENCES = [
    "Small Shops",
    "Engineers",
    "Hobbyists",
    "Manufacturers",
    "Startups",
    "Buyers",
    "Students",
    "Plant Managers",
    "Designers",
    "Procurement Teams",
    "Machinists",
    "Product Teams",
    "Makers",
    "Inspectors",
    "Job Shops",
    "Contractors",
]
_H2_PATTERNS = [
    "What Is {k}?",
    "How {e} Works",
    "Key Benefits of {k}",
    "Choosing {e}",
    "Common Challenges With {e}",
    "Costs and Budgeting",
    "{r}",
    "Best Practices",
    "Maintenance and Care of {e}",
    "The Future of {k}",
    "Getting Started",
    "Comparing {e} and {e2}",
]
_H3_PATTERNS = [
    "Core Principles",
    "Tools You Need",
    "Step-by-Step Process",
    "Real-World Example",
    "Quality Checks",
    "Cost Factors",
    "Safety Considerations",
    "Common Mistakes",
    "Expert Advice",
    "Materials Matter",
    "Measuring Results",
    "When to Upgrade",
]
_SENTENCES = [
    "When people talk about {k}, they usually mean a process that rewards careful planning "
    "and steady execution.",
    "A well-chosen {e} can make the difference between a job that runs smoothly and one that "
    "stalls halfway through.",
    "Many readers first arrive here after searching for {r}, and the short answer is that it "
    "depends on scale, materials and tolerances.",
    "In practice, {e} and {e2} work together, so a change to one usually shows up in the other.",
    "Experienced operators check the {e} before every run because small problems grow quickly "
    "under load.",
    "The most common mistake is treating {k} as a one-time purchase rather than an ongoing "
    "practice that needs attention.",
    "Documenting each step keeps results repeatable, which matters when several people share "
    "the same equipment.",
    "Costs fall when setup time falls, and setup time falls when the workflow around {e} is "
    "standardised.",
    "It helps to compare quotes side by side, since two providers of {k} can price the same "
    "part very differently.",
    "Precision is not only about the machine; the operator's habits and the quality of the "
    "{e} play an equal part.",
    "For smaller teams, starting with a modest {e} and upgrading later is often the most "
    "sensible path.",
    "Questions about {r} come up often, and the honest answer always starts with the "
    "requirements of the part.",
    "Good suppliers explain their process openly, including how they inspect work that "
    "involves the {e}.",
    "Over time, the data collected from each job shows where {k} can be made faster and more "
    "reliable.",
    "Training pays for itself quickly, because a confident operator gets more out of every "
    "{e} on the floor.",
    "Safety procedures are not optional: guards, clear floors and regular checks of the {e} "
    "protect people and parts alike.",
]


def _headline(text: str) -> str:
    """Capitalise each word's first letter, leaving the rest alone ("G-code" stays "G-code")."""
    return " ".join(w[:1].upper() + w[1:] for w in text.split())


def _fill(pattern: str, rng: random.Random, ctx: dict[str, Any], headline: bool = False) -> str:
    entities = ctx["entities"] or [ctx["keyword"]]
    case = _headline if headline else str
    e, e2 = rng.sample(entities, 2) if len(entities) > 1 else (entities[0], entities[0])
    return pattern.format(
        k=case(ctx["keyword"]),
        K=_headline(ctx["keyword"]),
        e=case(e),
        e2=case(e2),
        r=case(rng.choice(ctx["related"] or [ctx["keyword"]])),
        a=rng.choice(_AUDIENCES),
        N=rng.randint(3, 15),
        y=rng.choice([2025, 2026, 2027]),
    )


def _paragraph(rng: random.Random, ctx: dict[str, Any], words_left: int) -> str:
    sentences: list[str] = []
    while words_left > 0 and len(sentences) < 5:
        sentence = _fill(rng.choice(_SENTENCES), rng, ctx)
        words = sentence.split()
        if len(words) > words_left:
            sentence = " ".join(words[:words_left]).rstrip(",;") + "."
        sentences.append(sentence)
        words_left -= len(sentence.split())
    return "<p>" + " ".join(sentences) + "</p>"


def write_article(
    rng: random.Random, ctx: dict[str, Any], outline: list[dict[str, Any]], words: int
) -> str:
    """HTML following `outline`'s headings with close to `words` visible words, spread over the
    sections by their "words" budgets when the outline has them (never fewer than 1 section)."""
    if not outline:
        outline = [{"h2": _fill(rng.choice(_H2_PATTERNS), rng, ctx), "h3": []}]
    weights = [max(1, int(section.get("words") or 1)) for section in outline]
    sections: list[str] = []
    written = 0
    for n, section in enumerate(outline):
        blocks = [f"<h2>{section.get('h2', '')}</h2>"]
        blocks += [f"<h3>{h3}</h3>" for h3 in section.get("h3", [])]
        # This section's share of the words, and paragraphs spread over its blocks to reach it.
        target = round(words * sum(weights[: n + 1]) / sum(weights)) - written
        slots: list[list[str]] = [[] for _ in blocks]
        total, slot = count_words("".join(blocks)), 0
        while total < target:
            paragraph = _paragraph(rng, ctx, min(60, target - total))
            slots[slot % len(slots)].append(paragraph)
            total += count_words(paragraph)
            slot += 1
        written += total
        sections.append(
            "\n".join(block + "".join("\n" + p for p in slots[i]) for i, block in enumerate(blocks))
        )
    return "\n".join(sections)


def inject(html: str, payloads: list[str]) -> str:
    """`html` with every payload placed in it: inside paragraphs, between blocks, at the end."""
    if not payloads:
        return html
    parts = html.split("</p>")
    for i, payload in enumerate(payloads):
        at = i % len(parts)
        parts[at] = parts[at] + (" " + payload if i % 2 else "\n" + payload + "\n")
    return "</p>".join(parts)


_TITLE_DRESSINGS: list[Callable[[str], str]] = [
    lambda t: f"**{t}**",
    lambda t: f'"{t}".',
    lambda t: f"*{t}*",
    str,
]
_RAMBLE = (
    "Each of these titles balances search intent with curiosity, mixing practical guides, honest "
    "comparisons and question-led headlines, so that readers looking into {k} at every stage, "
    "from first research to the final decision, find something that speaks to them directly."
)


def chatty_titles(rng: random.Random, ctx: dict[str, Any], titles: list[str]) -> str:
    """`titles` as a chatty model lists them: a preamble, a numbered markdown list with emphasis
    and quotes, and a blank line, a heading, a ramble and a template line mixed in."""
    lines = [f"{n}. {rng.choice(_TITLE_DRESSINGS)(t)}" for n, t in enumerate(titles, 1)]
    for junk in (
        "",
        f"For our {max(1, len(titles) - 1)} distinct article titles in a narrative format:",
        _RAMBLE.format(k=ctx["keyword"]),
        "{{ title }} for {{ audience }}",
    ):
        lines.insert(rng.randint(0, len(lines)), junk)
    return f"Here are {len(titles)} distinct article titles for you:\n\n" + "\n".join(lines)


def prose_outline(sections: list[dict[str, Any]]) -> str:
    """An outline as a weak model writes it without JSON mode: markdown headings, not JSON."""
    blocks = [
        f"## {section['h2']}" + "".join(f"\n- {h3}" for h3 in section["h3"]) for section in sections
    ]
    return "Sure! Here is an outline:\n\n" + "\n\n".join(blocks)


def cut_to_tokens(text: str, max_tokens: int) -> str:
    """The leading words of `text` that fit in `max_tokens`, counted as replies are (4 per 3)."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    fit = min(len(ends), (3 * max_tokens + 2) // 4)  # the most n with n * 4 // 3 <= max_tokens
    return text[: ends[fit - 1]] if fit else ""


_Answer = tuple[int, dict[str, Any], dict[str, str]]  # HTTP status, JSON body, extra headers
_GOLDEN = (5**0.5 - 1) / 2  # drives the fault schedule: see LlmSimulator._draw_fault

# --- the HTTP side ---------------------------------------------------------------------------


@dataclass
class SimulatorConfig:
    """How the simulated model behaves."""

    latency: float = 0.0  # seconds per request
    undershoot_mean: float = 175.0  # words short of the asked lower bound
    undershoot_jitter: float = 20.0  # standard deviation of the shortfall
    seed: int = 7
    # Test hook: every n-th outline request gets a reply that is not JSON, and so does the repair
    # request for that title (0: never): the article fails at its outline.
    garbage_outline_every: int = 0
    # Test hook: every n-th outline request has one H2 section too few (0: never): the repair
    # request gets a good outline.
    short_outline_every: int = 0
    # A small model's outlines: numbered, markdown H2s ("1. **…**"), and in every section an H3
    # that repeats its H2 and one that is a whole sentence of 200+ characters, besides the rest.
    sloppy_outlines: bool = False
    # A model fond of lists: every other paragraph ends in a lead-in ("… include:") followed by
    # a bulleted list.
    list_lead_ins: bool = False
    # Test hook: every titles reply is the same few titles, as a model stuck in a loop.
    repeat_titles: bool = False
    # A weak model's titles: after each title a near-duplicate of it (plurals, case and little
    # words changed), and first of all the related searches pasted together as a "title".
    near_duplicate_titles: bool = False
    # Test hook: hostile markup (XSS payloads) placed in every article and title the model writes.
    payloads: list[str] = field(default_factory=list)
    # Test hook: every n-th chat request is refused with 429 and `retry-after-ms` (0: never).
    rate_limit_every: int = 0
    rate_limit_retry_after_ms: int = 20
    # Fault injection: the share of chat requests (0.0-1.0 each, spread evenly over the
    # arrivals) refused with 429 + retry-after-ms, failing with 500, stalling `stall_seconds`
    # before answering (past a client's timeout), or answered cut off (finish_reason "length").
    rate_limit_share: float = 0.0
    server_error_share: float = 0.0
    stall_share: float = 0.0
    stall_seconds: float = 2.0
    truncate_share: float = 0.0
    # The share of outline (and repair) requests answered with text that is not JSON.
    garbage_outline_share: float = 0.0
    # Test hook: this many characters appended to every reply (a runaway model).
    reply_padding: int = 0
    # A provider's requests and tokens per minute (0: unlimited), each a token bucket that
    # refills continuously and starts full; a request costs body bytes // 4 + max_tokens tokens.
    rpm_limit: int = 0
    tpm_limit: int = 0
    # A server without JSON mode: requests with `response_format` get 400.
    refuse_response_format: bool = False
    # A server that knows `json_object` but not `json_schema`: requests asking for a schema get
    # this status with a validation message (llama-cpp-python's server: 500, "Input should be
    # 'text' or 'json_object'"); 0: schemas are served.
    refuse_json_schema_status: int = 0
    # A weak model: outlines asked for without `response_format` come back as markdown headings.
    prose_outlines: bool = False
    # A chatty model: titles as a numbered markdown list with a preamble and non-title lines.
    markdown_titles: bool = False
    # Augmentations: "reach" the asked minimum, "shrink" (drop the last paragraph),
    # "overshoot" (twice the missing words past the asked maximum) or "truncate" (every
    # augmentation, and every continuation of one, cut off at the token limit).
    augment_mode: str = "reach"
    # A weak model's content replies (""): "echo_outline" (the prompt's outline JSON said back,
    # as a 0.5B model did), "markdown" (a markdown article in a fence), "headings_prose" (every
    # paragraph an <h3>), "ignore_outline" (headings of its own), "repeat_paragraphs" (each
    # paragraph twice). Every `bad_content_every`-th content request; the request that asks
    # again with the reason gets a good article, unless `bad_content_stubborn`.
    bad_content: str = ""
    bad_content_every: int = 1
    bad_content_stubborn: bool = False
    # Requests to shorten: "reach" (every paragraph tightened to the asked length) or "ignore"
    # (the article back as it was).
    shorten_mode: str = "reach"
    # A provider's key: requests without `Authorization: Bearer <api_key>` get 401 (None: any).
    api_key: str | None = None
    # The models served: a request for another gets 404 (None: any name).
    models: list[str] | None = None


_AUGMENT_MODES = ("reach", "shrink", "overshoot", "truncate")
_BAD_CONTENT = ("", "echo_outline", "markdown", "headings_prose", "ignore_outline",
                "repeat_paragraphs")  # fmt: skip
_SHORTEN_MODES = ("reach", "ignore")


@dataclass
class SimulatorStats:
    """What the simulator has seen since it started or was last reset."""

    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    peak_in_flight: int = 0
    rate_limited: int = 0  # requests refused with 429 (not counted in `requests`)
    # Injected faults by kind: rate_limit, rpm, tpm, server_error, stall, unauthorized,
    # model_not_found, response_format_refused, json_schema_refused (not counted in `requests`),
    # truncated, garbage_outline (answered, so counted in `requests` too).
    faults: dict[str, int] = field(default_factory=dict)
    # The largest max_tokens (or max_completion_tokens) answered, by request kind.
    max_tokens_by_kind: dict[str, int] = field(default_factory=dict)
    response_format_requests: int = 0  # answered requests that carried a `response_format`
    # Tokens the admitted requests were charged against the TPM bucket (prompt bytes / 4 +
    # max_tokens), when rpm_limit or tpm_limit is set.
    tokens_charged: int = 0
    # Chat completion requests received, whatever the answer (refused, failed or served): what
    # a provider counts and bills.
    received: int = 0


@dataclass
class _Bucket:
    """A token bucket holding up to `capacity`, refilled at `capacity` per minute."""

    capacity: int
    level: float
    at: float  # the monotonic time `level` was measured

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / 60)
        self.at = now

    def wait_ms(self, cost: int) -> int:
        """Milliseconds until the bucket holds `cost` (at least 1)."""
        return max(1, math.ceil((cost - self.level) * 60_000 / self.capacity))


class LlmSimulator:
    """The simulator as an object: start(), .base_url, stats(), reset(), stop()."""

    def __init__(
        self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ):
        self.config = config or SimulatorConfig()
        if self.config.augment_mode not in _AUGMENT_MODES:
            raise ValueError(f"augment_mode must be one of {_AUGMENT_MODES}")
        if self.config.bad_content not in _BAD_CONTENT:
            raise ValueError(f"bad_content must be one of {_BAD_CONTENT}")
        if self.config.shorten_mode not in _SHORTEN_MODES:
            raise ValueError(f"shorten_mode must be one of {_SHORTEN_MODES}")
        self._lock = threading.Lock()
        self._stats = SimulatorStats()
        self._kinds: Counter[str] = Counter()
        self._outline_requests = 0
        self._arrivals = 0  # chat requests received, refused ones included
        self._faults: Counter[str] = Counter()
        self._fault_draws = 0  # requests that could get a fault
        self._outline_draws = 0  # outline requests that could be answered with garbage
        self._titles_written: dict[str, TitleIndex] = {}  # per keyword
        self._broken_titles: set[str] = set()  # garbage outlines, repair included
        self._bad_content_titles: set[str] = set()  # bad content replies, stubborn repeats too
        now = time.monotonic()
        self._buckets = {
            name: _Bucket(limit, limit, now)
            for name, limit in (
                ("requests", self.config.rpm_limit),
                ("tokens", self.config.tpm_limit),
            )
            if limit
        }
        # Requests of the held kinds wait in flight until release(): tests order events by it.
        self._held: frozenset[str] = frozenset()
        self._hold_after = 0
        self._released = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL to point a client at."""
        host, port = self._server.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}/v1"

    def start(self) -> LlmSimulator:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="llm-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join()

    def __enter__(self) -> LlmSimulator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stats(self) -> SimulatorStats:
        """A copy of the counters."""
        with self._lock:
            return SimulatorStats(
                self._stats.requests,
                dict(self._kinds),
                self._stats.in_flight,
                self._stats.peak_in_flight,
                self._stats.rate_limited,
                dict(self._faults),
                dict(self._stats.max_tokens_by_kind),
                self._stats.response_format_requests,
                self._stats.tokens_charged,
                self._stats.received,
            )

    def hold(self, *kinds: str, after: int = 0) -> None:
        """Keep requests of these kinds ("outline", "content", …) in flight, unanswered, until
        release(): a test can then act while they are known to be running. With `after`, the
        first `after` requests of each kind (since the last reset) are answered as usual."""
        with self._lock:
            self._held = frozenset(kinds)
            self._hold_after = after

    def release(self) -> None:
        """Answer the held requests, and hold none from now on."""
        with self._lock:
            self._held = frozenset()
            self._released.notify_all()

    def _wait_while_held(self, kind: str, number: int) -> None:
        """Wait while requests of `kind` are held; `number` is this one's count in its kind."""
        with self._lock:
            while kind in self._held and number > self._hold_after:
                self._released.wait()

    def reset(self) -> None:
        """Zero the counters (the peak too); the rate-limit buckets keep their level."""
        with self._lock:
            self._stats = SimulatorStats(in_flight=self._stats.in_flight)
            self._kinds.clear()
            self._faults.clear()

    # Called by the handler threads.

    def _enter(self, kind: str, max_tokens: int = 0, structured: bool = False) -> tuple[int, int]:
        """Count the request in; returns its number in its kind and how many outline requests
        there have been."""
        with self._lock:
            self._stats.requests += 1
            self._kinds[kind] += 1
            if max_tokens:
                peaks = self._stats.max_tokens_by_kind
                peaks[kind] = max(peaks.get(kind, 0), max_tokens)
            self._stats.response_format_requests += int(structured)
            self._stats.in_flight += 1
            self._stats.peak_in_flight = max(self._stats.peak_in_flight, self._stats.in_flight)
            if kind == "outline":
                self._outline_requests += 1
            return self._kinds[kind], self._outline_requests

    def _leave(self) -> None:
        with self._lock:
            self._stats.in_flight -= 1

    def _refuse(self, fault: str, status: int, payload: dict[str, Any]) -> _Answer:
        with self._lock:
            self._faults[fault] += 1
        return status, payload, {}

    def _refusal(self, body: dict[str, Any], headers: Mapping[str, str]) -> _Answer | None:
        """What a provider says before looking at the request: bad key, unknown model, no JSON
        mode; None when it would go on."""
        config = self.config
        if config.api_key is not None:
            given = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                # Never echo the key that came: it may be a real one sent to the wrong place.
                message = (
                    "Incorrect API key provided (simulated). You can find your API key at "
                    "https://platform.openai.com/account/api-keys."
                )
                refusal = _error(message, code="invalid_api_key")
                return self._refuse("unauthorized", HTTPStatus.UNAUTHORIZED, refusal)
        if config.models is not None and body.get("model") not in config.models:
            message = (
                f"The model `{body.get('model')}` does not exist or you do not have access to it."
            )
            refusal = _error(message, code="model_not_found")
            return self._refuse("model_not_found", HTTPStatus.NOT_FOUND, refusal)
        if config.refuse_response_format and "response_format" in body:
            message = "response_format is not supported by this server (simulated)"
            refusal = _error(message, param="response_format", code=None)
            return self._refuse("response_format_refused", HTTPStatus.BAD_REQUEST, refusal)
        asked = body.get("response_format")
        if (
            config.refuse_json_schema_status
            and isinstance(asked, dict)
            and asked.get("type") == "json_schema"
        ):
            message = (
                "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  "
                "Input should be 'text' or 'json_object' [type=literal_error, input_value="
                "'json_schema'] (simulated)"
            )
            refusal = _error(message, param=None, code=None)
            return self._refuse("json_schema_refused", config.refuse_json_schema_status, refusal)
        return None

    def _charge(self, tokens: int) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """Take one request and `tokens` from the buckets if both hold enough, else take nothing:
        (the 429 body or None, the x-ratelimit and retry-after-ms headers)."""
        if not self._buckets:
            return None, {}
        costs = {"requests": 1, "tokens": tokens}
        with self._lock:
            now = time.monotonic()
            for bucket in self._buckets.values():
                bucket.refill(now)
            short = [n for n, b in self._buckets.items() if b.level < costs[n]]
            if not short:
                for name, bucket in self._buckets.items():
                    bucket.level -= costs[name]
                self._stats.tokens_charged += tokens
            headers = {}
            for name, bucket in self._buckets.items():
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.capacity)
                headers[f"x-ratelimit-remaining-{name}"] = str(math.floor(bucket.level))
            if not short:
                return None, headers
            # More tokens than the bucket holds: no wait admits it, so a provider calls it too
            # large and names no wait.
            too_large = "tokens" in short and tokens > self._buckets["tokens"].capacity
            waits = {name: self._buckets[name].wait_ms(costs[name]) for name in short}
            name = "tokens" if too_large else max(waits, key=lambda n: waits[n])
            limit = self._buckets[name].capacity
            if name == "requests":
                message = f"Rate limit reached for requests per minute (RPM): limit {limit}"
            else:
                what = "Request too large" if too_large else "Rate limit reached"
                message = f"{what} for tokens per minute (TPM): limit {limit}, requested {tokens}"
            if not too_large:
                headers["retry-after-ms"] = str(max(waits.values()))
            self._stats.rate_limited += 1
            self._faults["rpm" if name == "requests" else "tpm"] += 1
        refusal = _error(f"{message} (simulated)", name, code="rate_limit_exceeded")
        return refusal, headers

    def _rate_limited(self) -> bool:
        with self._lock:
            self._arrivals += 1
            every = self.config.rate_limit_every
            if every and self._arrivals % every == 0:
                self._stats.rate_limited += 1
                return True
            return False

    def _draw_fault(self) -> str:
        """The fault this request gets, if any: "", rate_limit, server_error, stall, truncate.

        Arrival k draws u = frac(k * golden ratio): a low-discrepancy sequence, so after any
        number of requests each fault has hit its share of them to within a request or two,
        which lets tests assert the shares exactly rather than statistically."""
        config = self.config
        with self._lock:
            self._fault_draws += 1
            u = (self._fault_draws * _GOLDEN + self.config.seed * _GOLDEN**2) % 1.0
            for name, share in (
                ("rate_limit", config.rate_limit_share),
                ("server_error", config.server_error_share),
                ("stall", config.stall_share),
                ("truncate", config.truncate_share),
            ):
                if u < share:
                    if name != "truncate":  # counted when the cut-off reply goes out
                        self._faults[name] += 1
                    if name == "rate_limit":
                        self._stats.rate_limited += 1
                    return name
                u -= share
            return ""

    def _bad_content(self, kind: str, prompt: str, number: int) -> bool:
        """Whether this content request (the `number`-th of its kind) gets a spoiled reply: every
        bad_content_every-th first request, and with bad_content_stubborn its repeat too."""
        title = _search(r'article titled "(.*?)"', prompt, "")
        with self._lock:
            if kind == "content" and _nth(number, self.config.bad_content_every):
                self._bad_content_titles.add(title)
                self._faults["bad_content"] += 1
                return True
            if self.config.bad_content_stubborn and title in self._bad_content_titles:
                self._faults["bad_content"] += 1
                return True
            return False

    def _garbage_outline(self) -> bool:
        with self._lock:
            self._outline_draws += 1
            if (self._outline_draws * _GOLDEN) % 1.0 < self.config.garbage_outline_share:
                self._faults["garbage_outline"] += 1
                return True
            return False

    def complete(
        self, body: dict[str, Any], headers: Mapping[str, str] | None = None, raw_size: int = 0
    ) -> _Answer:
        """Answer one chat completion request (its JSON body, HTTP headers and body size in
        bytes): (HTTP status, JSON body, extra headers)."""
        with self._lock:
            self._stats.received += 1
        refused = self._refusal(body, headers or {})
        if refused:
            return refused
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not messages:
            return (
                HTTPStatus.BAD_REQUEST,
                _error("messages: at least one message is required"),
                {},
            )
        max_tokens = _max_tokens(body)
        limited, limit_headers = self._charge(raw_size // 4 + max_tokens)
        if limited:
            return HTTPStatus.TOO_MANY_REQUESTS, limited, limit_headers
        fault = "rate_limit" if self._rate_limited() else self._draw_fault()
        if fault == "rate_limit":
            retry_after = {"retry-after-ms": str(self.config.rate_limit_retry_after_ms)}
            refusal = _error("Rate limit exceeded (simulated)", "rate_limit_error")
            return HTTPStatus.TOO_MANY_REQUESTS, refusal, retry_after
        if fault == "server_error":
            failure = _error("Internal error (simulated)", "server_error")
            return HTTPStatus.INTERNAL_SERVER_ERROR, failure, {}
        if fault == "stall":
            time.sleep(self.config.stall_seconds)  # the client has given up by now
            return HTTPStatus.GATEWAY_TIMEOUT, _error("Stalled (simulated)", "server_error"), {}
        prompt = str(messages[-1].get("content", ""))
        kind = _kind_of(prompt)
        # Seeded by the prompt, not by arrival order: the same job gets the same replies however
        # its requests interleave, so runs at different concurrency are comparable.
        rng = random.Random(f"{self.config.seed}:{prompt}")
        number, outline_number = self._enter(kind, max_tokens, "response_format" in body)
        try:
            self._wait_while_held(kind, number)
            time.sleep(self.config.latency)
            if kind in ("outline", "outline_repair") and self._garbage_outline():
                text = "Here is an outline: {'outline': [ oops"
            else:
                text = self._reply(kind, prompt, rng, outline_number, _json_mode(body), number)
        finally:
            self._leave()
        text += " " * self.config.reply_padding
        finish_reason = "stop"
        truncated_augment = self.config.augment_mode == "truncate" and kind in (
            "augment",
            "continue",
        )
        if fault == "truncate" or truncated_augment:
            with self._lock:
                self._faults["truncated"] += 1
            text, finish_reason = text[: len(text) // 2], "length"
        if max_tokens and len(text.split()) * 4 // 3 > max_tokens:
            text, finish_reason = cut_to_tokens(text, max_tokens), "length"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages) * 4 // 3
        completion_tokens = len(text.split()) * 4 // 3
        reply = {
            "id": f"chatcmpl-sim-{rng.getrandbits(48):x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "simulator"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish_reason,
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return HTTPStatus.OK, reply, limit_headers

    def _reply(
        self,
        kind: str,
        prompt: str,
        rng: random.Random,
        outline_number: int,
        json_mode: bool = False,
        number: int = 0,
    ) -> str:
        ctx = _context_of(prompt)
        config = self.config
        if kind == "titles":
            count = int(_search(r"Write (\d+) distinct article titles", prompt, "5"))
            if config.repeat_titles:  # the same three, dressed differently each time
                dressings: list[Callable[[str], str]] = [
                    str,
                    str.upper,
                    str.lower,
                    lambda t: f"  {t}!",
                    lambda t: f'"{t}?"',
                ]
                fixed = random.Random(ctx["keyword"])
                titles = [
                    rng.choice(dressings)(_fill(p, fixed, ctx, headline=True))
                    for p in _TITLE_PATTERNS[:3]
                ]
            else:
                listed = {
                    line[2:].strip().lower()
                    for line in prompt.splitlines()
                    if line.startswith("- ")
                }
                titles = self._new_titles(rng, ctx, count, listed)
                if config.near_duplicate_titles:
                    titles = near_duplicates(titles, ctx)
                if config.payloads:
                    titles = [
                        f"{t} {config.payloads[i % len(config.payloads)]}"
                        for i, t in enumerate(titles)
                    ]
            return chatty_titles(rng, ctx, titles) if config.markdown_titles else "\n".join(titles)
        if kind in ("outline", "outline_repair"):
            title = _search(r'article titled "(.*?)"\.(?:\s|$)', prompt, "")
            with self._lock:
                if kind == "outline" and _nth(outline_number, config.garbage_outline_every):
                    self._broken_titles.add(title)
                broken = title in self._broken_titles
            if broken:
                return "I'm sorry, but I can't produce an outline for that right now."
            h2 = _range(r"between (\d+) and (\d+) H2", prompt, (3, 5))
            h3 = _range(r"between (\d+) and (\d+) H3", prompt, (3, 8))
            if kind == "outline" and _nth(outline_number, config.short_outline_every):
                h2 = (max(1, h2[0] - 1), max(1, h2[0] - 1))
            n2 = rng.randint(*h2)
            n3 = rng.randint(max(h3[0], 0), max(h3[1], h3[0]))
            h3s: list[list[str]] = [[] for _ in range(n2)]
            # Distinct headings, as a good model writes them (repeats only past the patterns).
            for i, pattern in enumerate(_draw(rng, _H3_PATTERNS, n3)):
                h3s[i % n2].append(_fill(pattern, rng, ctx))
            sections = [
                {"h2": _fill(pattern, rng, ctx, headline=True), "h3": h3}
                for pattern, h3 in zip(_draw(rng, _H2_PATTERNS, n2), h3s, strict=True)
            ]
            if config.sloppy_outlines:
                sections = sloppy(sections, ctx)
            if json_mode:  # JSON mode answers bare JSON, no fence
                return json.dumps({"outline": sections})
            if config.prose_outlines:
                return prose_outline(sections)
            return "```json\n" + json.dumps({"outline": sections}) + "\n```"
        if kind in ("content", "content_repair"):
            low, _high = _range(r"Length: between (\d+) and (\d+) words", prompt, (800, 1200))
            # Negative when the model overshoots: it writes past the lower bound.
            shortfall = rng.gauss(self.config.undershoot_mean, self.config.undershoot_jitter)
            outline = prompts.outline_in_prompt(prompt)
            article = write_article(rng, ctx, outline, max(50, round(low - shortfall)))
            if config.list_lead_ins:
                article = with_list_lead_ins(article)
            if config.bad_content and self._bad_content(kind, prompt, number):
                article = bad_article(config.bad_content, article, outline, rng, ctx)
            return inject(article, config.payloads)
        if kind == "shorten":
            original = _search(r"<article>\n(.*)\n</article>", prompt, "", flags=re.DOTALL)
            if config.shorten_mode == "ignore":
                return original
            target = int(_search(r"Shorten it to about (\d+) words", prompt, "0"))
            return tightened(original, target)
        if kind == "continue":  # the rest of a reply that was cut off: a few more paragraphs
            return "\n".join(_paragraph(rng, ctx, 60) for _ in range(rng.randint(1, 3)))
        if kind == "augment":
            original = _search(r"<article>\n(.*)\n</article>", prompt, "", flags=re.DOTALL)
            if config.augment_mode == "shrink":  # a bad model: shorter than it was given
                start = original.rfind("<p>")
                start = start if start >= 0 else len(original) // 2
                end = original.find("</p>", start)
                rest = original[end + len("</p>") :] if end >= 0 else ""
                return (original[:start] + rest).rstrip()
            low = int(_search(r"at least (\d+) words", prompt, "1000"))
            low, high = _range(r"needs between (\d+) and (\d+) words", prompt, (low, low))
            have = count_words(original)
            if config.augment_mode == "overshoot":
                missing = high - have + 2 * max(0, low - have)
            else:
                missing = low - have + rng.randint(20, 120)
            ctx["keyword"] = ctx["keyword"] if ctx["keyword"] != "the topic" else "this subject"
            extra = "".join(
                _paragraph(rng, ctx, min(60, missing - i)) for i in range(0, missing, 60)
            )
            return original + "\n" + extra
        return "This is the simulator. It answers tierwriter's prompts."

    def _new_titles(
        self, rng: random.Random, ctx: dict[str, Any], count: int, listed: set[str]
    ) -> list[str]:
        """Titles this simulator never wrote before for the keyword, nor one like them, and the
        prompt does not list: a good model does not repeat itself. Past its phrase space it
        numbers the parts."""
        titles: list[str] = []
        with self._lock:
            written = self._titles_written.setdefault(ctx["keyword"].lower(), TitleIndex())
            for _ in range(count):
                for attempt in range(50):
                    pattern = rng.choice(_TITLE_PATTERNS)
                    if rng.random() < 0.5:
                        pattern += rng.choice(_SUBTITLES)
                    title = _fill(pattern, rng, ctx, headline=True)
                    if attempt == 49:
                        title = f"Part {rng.randint(1, 10**6)} of {title}"
                    if not written.same_as(title) and title.lower() not in listed:
                        break
                written.add(title)
                titles.append(title)
        return titles


def _plural_turned(match: re.Match[str]) -> str:
    word = match.group(1)
    return word[:-1] if word.endswith("s") else word + "s"


def near_duplicates(titles: list[str], ctx: dict[str, Any]) -> list[str]:
    """`titles`, each followed by a variant that is the same title to a reader, the related
    searches pasted together first (SimulatorConfig.near_duplicate_titles)."""
    pasted = ", ".join(_headline(r) for r in ctx["related"])
    varied = []
    for title in titles:
        variant = re.sub(r"\b([A-Za-z]{4,})\b", _plural_turned, title, count=1)
        variant = variant.replace(" and ", " vs ").replace(" for ", " For ").upper()
        varied += [title, variant]
    return ([pasted] if len(ctx["related"]) > 1 else []) + varied


def bad_article(
    mode: str,
    article: str,
    outline: list[dict[str, Any]],
    rng: random.Random,
    ctx: dict[str, Any],
) -> str:
    """`article` as a weak model spoils it (SimulatorConfig.bad_content)."""
    if mode == "echo_outline":
        return json.dumps({"outline": outline}, indent=2)
    if mode == "markdown":
        text = re.sub(r"<h2>(.*?)</h2>", r"## \1\n", article)
        text = re.sub(r"<h3>(.*?)</h3>", r"### \1\n", text)
        text = re.sub(r"<p>(.*?)</p>", r"\1\n", text, flags=re.DOTALL)
        return "```markdown\n" + text + "\n```"
    if mode == "headings_prose":
        return re.sub(r"<p>(.*?)</p>", r"<h3>\1</h3>", article, flags=re.DOTALL)
    if mode == "ignore_outline":
        own = [{"h2": f"Part {n} of the story", "h3": []} for n in range(1, len(outline) + 1)]
        return write_article(rng, ctx, own, count_words(article))
    # repeat_paragraphs
    return re.sub(r"(<p>.*?</p>)", r"\1\n\1", article, flags=re.DOTALL)


def tightened(html: str, target: int) -> str:
    """`html` near `target` words: paragraphs left out evenly spaced, the headings all kept."""
    have = count_words(html)
    if not target or have <= target:
        return html
    ratio = target / have
    number = 0

    def keep_some(match: re.Match[str]) -> str:
        nonlocal number
        number += 1  # kept when the running share of kept paragraphs steps up
        return (
            match.group(0) if math.floor(number * ratio) > math.floor((number - 1) * ratio) else ""
        )

    return re.sub(r"<p>.*?</p>\n?", keep_some, html, flags=re.DOTALL)


def _nth(number: int, every: int) -> bool:
    return bool(every) and number % every == 0


def _kind_of(prompt: str) -> str:
    if prompt.startswith("Continue the text"):
        return "continue"
    if "distinct article titles" in prompt:
        return "titles"
    if prompt.startswith("Create an outline"):
        return "outline"
    if prompt.startswith("Repair the outline"):
        return "outline_repair"
    if prompt.startswith("Write the article titled"):
        return "content"
    if prompt.startswith("Your previous reply could not be used"):
        return "content_repair"
    if "Shorten it to about" in prompt and "<article>" in prompt:
        return "shorten"
    if "<article>" in prompt:
        return "augment"
    return "other"


def _search(pattern: str, text: str, default: str, flags: int = 0) -> str:
    match = re.search(pattern, text, flags)
    return match.group(1) if match else default


def _range(pattern: str, text: str, default: tuple[int, int]) -> tuple[int, int]:
    match = re.search(pattern, text)
    return (int(match.group(1)), int(match.group(2))) if match else default


def _context_of(prompt: str) -> dict[str, Any]:
    def items(label: str) -> list[str]:
        value = _search(rf"^{label}: (.*)$", prompt, "", flags=re.MULTILINE)
        return [] if value in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]

    keyword = _search(r"^Main keyword: (.*)$", prompt, "the topic", flags=re.MULTILINE)
    return {"keyword": keyword, "entities": items("Entities"), "related": items("Related searches")}


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return value if isinstance(value, int) and value > 0 else 0


def _json_mode(body: dict[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") != "text"


def with_list_lead_ins(html: str) -> str:
    """`html` with every other paragraph ending in a list's lead-in, the list after it."""
    count = 0

    def lead_in(match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        if count % 2:
            return match.group(0)
        return (
            f"<p>{match.group(1).rstrip()} The basic concepts include:</p>\n"
            "<ul><li>planning the job</li><li>setting up the machine</li></ul>"
        )

    return re.sub(r"<p>(.*?)</p>", lead_in, html, flags=re.DOTALL)


def _draw(rng: random.Random, patterns: list[str], n: int) -> list[str]:
    """n of the patterns, each once while there are enough, in random order."""
    drawn = rng.sample(patterns, min(n, len(patterns)))
    return drawn + [rng.choice(patterns) for _ in range(n - len(drawn))]


def sloppy(sections: list[dict[str, Any]], ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """An outline as a small model writes one: numbered markdown H2s, each section with an H3
    that repeats its H2 and an H3 that is a whole sentence."""
    sentence = (
        f"In this part of the article we will explain in considerable detail how {ctx['keyword']} "
        "works in practice, why it matters to every reader who wants to understand it, and what "
        "the most common mistakes are that people make when they first try it out themselves"
    )
    return [
        {
            "h2": f"{n}. **{section['h2']}**",
            "h3": [section["h2"], *section["h3"], sentence],
        }
        for n, section in enumerate(sections, 1)
    ]


def _error(message: str, kind: str = "invalid_request_error", **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, **extra}}


def _make_handler(simulator: LlmSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
        # Headers and body go out in separate writes; with Nagle on, the body waits for the
        # client's delayed ACK (~40 ms a call), which the benchmark showed as lost efficiency.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    HTTPStatus.OK,
                    {
                        "object": "list",
                        "data": [
                            {"id": name, "object": "model", "owned_by": "tierwriter"}
                            for name in simulator.config.models or ["simulator"]
                        ],
                    },
                )
            elif self.path.rstrip("/") == "/_simulator/stats":
                self._send(HTTPStatus.OK, asdict(simulator.stats()))
            else:
                self._send(HTTPStatus.NOT_FOUND, _error(f"no route {self.path}"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") == "/_simulator/reset":
                simulator.reset()
                self._send(HTTPStatus.OK, {"reset": True})
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(HTTPStatus.NOT_FOUND, _error(f"no route {self.path}"))
                return
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError as e:
                self._send(HTTPStatus.BAD_REQUEST, _error(f"request body is not JSON: {e.msg}"))
                return
            self._send(*simulator.complete(body, dict(self.headers.items()), len(raw)))

        def _send(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (a stall outlived its timeout)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the console

    return Handler


def main() -> None:
    """Run the simulator in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible LLM simulator for tierwriter")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--undershoot", type=float, default=175.0, help="mean words short")
    parser.add_argument("--jitter", type=float, default=20.0, help="std dev of the shortfall")
    parser.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    parser.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
    parser.add_argument(
        "--refuse-response-format", action="store_true", help="400 on response_format"
    )
    parser.add_argument(
        "--refuse-json-schema",
        type=int,
        default=0,
        metavar="STATUS",
        help="answer a json_schema response_format with this status (500: llama-cpp-python)",
    )
    parser.add_argument(
        "--prose-outlines", action="store_true", help="markdown outlines without JSON mode"
    )
    parser.add_argument(
        "--markdown-titles", action="store_true", help="chatty numbered markdown titles"
    )
    parser.add_argument("--augment-mode", choices=_AUGMENT_MODES, default="reach")
    parser.add_argument("--api-key", help="require this bearer key (default: any)")
    parser.add_argument(
        "--model", action="append", dest="models", help="serve only this model (repeatable)"
    )
    args = parser.parse_args()
    config = SimulatorConfig(
        latency=args.latency,
        undershoot_mean=args.undershoot,
        undershoot_jitter=args.jitter,
        rpm_limit=args.rpm,
        tpm_limit=args.tpm,
        refuse_response_format=args.refuse_response_format,
        refuse_json_schema_status=args.refuse_json_schema,
        prose_outlines=args.prose_outlines,
        markdown_titles=args.markdown_titles,
        augment_mode=args.augment_mode,
        api_key=args.api_key,
        models=args.models,
    )
    # As PID 1 in a container, SIGTERM without a handler is ignored and `docker stop` waits out
    # its timeout. Raising (not setting an Event) cannot deadlock inside Event.wait's own lock.
    signal.signal(signal.SIGTERM, _end_wait)
    simulator = LlmSimulator(config, args.host, args.port).start()
    print(f"LLM simulator serving at {simulator.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        simulator.stop()


def _end_wait(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
