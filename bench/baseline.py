"""The peer tierwriter is measured against: the seed story's in-process design, small and honest.

One process, the openai SDK, a `ThreadPoolExecutor(max_workers=W)` over the articles. It sends the
same prompts tierwriter sends (generator_service/prompts.py), asks for the same word bounds
(`WordTargets`: the fixed compensation until a model's drafts are learned), fits outlines the same
local way, lengthens a short draft once, and commits every article to SQLite as it finishes. It
has none of tierwriter's guarantees: no retries, no resume, no events, no services.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai

from generator_service import prompts
from generator_service.calibration import WordTargets
from generator_service.domain import ProjectInfo, TierShape
from generator_service.llm.budget import content_tokens, outline_tokens, titles_tokens
from generator_service.outline import fit_outline, parse_outline, section_budgets
from generator_service.text import count_words, strip_fences
from generator_service.titles import clean_title

MODEL = "simulated"
TITLES_PER_CALL = 50
COMPENSATION = 200  # WORD_COUNT_COMPENSATION's default


@dataclass
class BaselineRun:
    """What one baseline run measured."""

    wall: float  # from the first titles request to the last article committed
    article_phase: float  # from the first article's start to the last article's end
    first_outline_after: float  # from the start to the first outline request
    articles: int
    failed: int


class _Articles:
    """The articles table; one connection, its commits serialized."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute(
            "CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT, content TEXT, "
            "word_count INTEGER, status TEXT, error TEXT)"
        )
        self._lock = threading.Lock()

    def save(self, title: str, content: str, words: int, status: str, error: str = "") -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO articles (title, content, word_count, status, error) "
                "VALUES (?, ?, ?, ?, ?)",
                (title, content, words, status, error),
            )
            self._db.commit()

    def close(self) -> None:
        self._db.close()


def _complete(
    client: openai.OpenAI,
    prompt: prompts.Prompt,
    max_tokens: int,
    json_mode: bool = False,
) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ],
        max_tokens=max_tokens,
        temperature=0.7,
        response_format=prompts.outline_response_format() if json_mode else openai.omit,  # type: ignore[arg-type]
    )
    return reply.choices[0].message.content or ""


def _titles(client: openai.OpenAI, project: ProjectInfo, count: int) -> list[str]:
    titles: list[str] = []
    while len(titles) < count:
        want = min(TITLES_PER_CALL, count - len(titles))
        prompt = prompts.titles_prompt(
            project.keyword, project.entities, project.related_searches, want, titles, (30, 120)
        )
        lines = _complete(client, prompt, titles_tokens(want)).splitlines()
        fresh = [t for t in (clean_title(line) for line in lines) if t and t not in titles]
        if not fresh:
            break
        titles.extend(fresh[:want])
    return titles


def run_baseline(
    base_url: str, workers: int, count: int, tier: TierShape, project: ProjectInfo, db: Path
) -> BaselineRun:
    """Titles, then every article on W threads; each article committed as it finishes."""
    targets = WordTargets(COMPENSATION)
    articles = _Articles(db)
    # One client for every thread, as the seed's design shares one (the SDK's default pool).
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120)
    marks: dict[str, float] = {}
    marks_lock = threading.Lock()
    failed = 0

    def mark(name: str, first: bool) -> None:
        now = time.perf_counter()
        with marks_lock:
            if first:
                marks.setdefault(name, now)
            else:
                marks[name] = now

    def write(title: str) -> bool:
        mark("first_outline", first=True)
        try:
            outline_prompt = prompts.outline_prompt(
                title,
                project.keyword,
                project.entities,
                project.related_searches,
                (tier.min_h2, tier.max_h2),
                (tier.min_h3, tier.max_h3),
            )
            reply = _complete(
                client, outline_prompt, outline_tokens(tier.max_h2, tier.max_h3), json_mode=True
            )
            outline = fit_outline(parse_outline(reply), tier, project).sections
            asked = targets.request(MODEL, tier.min_word_count, tier.max_word_count)
            content_prompt = prompts.content_prompt(
                title,
                project.keyword,
                project.entities,
                project.related_searches,
                outline,
                section_budgets(outline, (asked.low + asked.high) // 2),
                asked.low,
                asked.high,
            )
            content = strip_fences(_complete(client, content_prompt, content_tokens(asked.high)))
            words = count_words(content)
            targets.observe(MODEL, asked.low, words)
            status = "generated"
            if words < tier.min_word_count:
                augment = prompts.augment_prompt(
                    content, words, tier.min_word_count, tier.max_word_count
                )
                longer = strip_fences(
                    _complete(client, augment, content_tokens(tier.max_word_count))
                )
                if count_words(longer) > words:
                    content, words = longer, count_words(longer)
                status = "augmented" if words >= tier.min_word_count else "short"
            articles.save(title, content, words, status)
            return True
        except Exception as e:  # one article's failure never reaches the others
            articles.save(title, "", 0, "failed", f"{type(e).__name__}: {e}")
            return False
        finally:
            mark("last_end", first=False)

    try:
        started = time.perf_counter()
        titles = _titles(client, project, count)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            mark("first_start", first=True)
            failed = sum(not ok for ok in pool.map(write, titles))
        wall = time.perf_counter() - started
    finally:
        articles.close()
        client.close()
    return BaselineRun(
        wall=wall,
        article_phase=marks["last_end"] - marks["first_start"],
        first_outline_after=marks["first_outline"] - started,
        articles=len(titles),
        failed=failed,
    )
