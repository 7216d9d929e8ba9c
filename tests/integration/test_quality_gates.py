"""Quality gates through the real services: what a weak model writes instead of an article (its
outline echoed as JSON, markdown, prose in headings, headings of its own, paragraphs twice, too
many words) never becomes a page, and every article that is not one says why."""

from __future__ import annotations

import re
import uuid
from typing import Any

from generator_service.llm.simulator import SimulatorConfig
from generator_service.similar_titles import TitleIndex
from orchestrator_service.console import event_lines
from tests.helpers import (
    TIER,
    article_pages,
    article_rows,
    job_file,
    job_ids_of,
    rows_by_status,
    run_job,
)


def tier(count: int, **shape: int) -> dict[str, Any]:
    return {**TIER, "count": count, "min_word_count": 300, "max_word_count": 450, **shape}


def project(related: list[str]) -> dict[str, Any]:
    return {
        "name": f"gates-{uuid.uuid4().hex[:10]}",
        "main_keyword": "cnc machining",
        "entities": ["lathe", "spindle"],
        "related_searches": related,
        "money_site_url": "https://example.com/cnc",
    }


def console(events: list[Any]) -> str:
    return "\n".join(line for event in events for line in event_lines(event))


def test_an_outline_echoed_as_the_article_is_asked_for_again_and_never_published(
    start_stack,
) -> None:
    # Every other content reply is the outline's JSON, as Qwen2.5-Coder-0.5B answered; the
    # request that repeats it with the reason gets an article.
    handle = start_stack(
        simulator=SimulatorConfig(undershoot_mean=-50, bad_content="echo_outline",
                                  bad_content_every=2)
    )  # fmt: skip
    events, finished = run_job(handle, job_file({"tier1": tier(6, max_word_count=2000)}))
    assert finished.ok, finished.error
    [job_id] = job_ids_of(events)
    rows = article_rows(handle.database_url, job_id)
    assert {row["status"] for row in rows} <= {"generated", "augmented"}
    echoed = [row for row in rows if row["quality_gates"]]
    assert len(echoed) == 3 and {row["quality_gates"] for row in echoed} == {"json"}
    assert handle.stack.simulator.stats().by_kind["content_repair"] == 3
    for row in rows:
        assert '"h2"' not in row["content"] and "<p>" in row["content"]
    pages = article_pages(handle.output_dir / str(job_id))
    assert len(pages) == 6
    assert not any('"outline"' in page.read_text() for page in pages)
    assert "Content rejected (quality gate json: the reply is JSON" in console(events)


def test_a_model_that_never_writes_an_article_fails_each_one_naming_the_gate(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(bad_content_stubborn=True))
    expected = {
        "echo_outline": "json",
        "headings_prose": "prose_in_headings",
        "ignore_outline": "outline_not_followed",
    }
    for mode, gate in expected.items():
        handle.stack.simulator.config.bad_content = mode  # the same stack, another weak model
        events, finished = run_job(handle, job_file({"tier1": tier(2)}))
        [job_id] = job_ids_of(events)
        assert rows_by_status(handle.database_url, job_id) == {"failed": 2}, mode
        for row in article_rows(handle.database_url, job_id):
            assert row["error_stage"] == "content" and row["content"] == ""
            assert row["error"].startswith(f"ContentGateError: quality gate {gate}:"), row["error"]
            assert row["quality_gates"].split(",").count(gate) == 2  # the reply and its repeat
        assert article_pages(handle.output_dir / str(job_id)) == []  # no page, no index entry
        assert finished.summary.failed_articles == 2
        assert f"FAILED at content: ContentGateError: quality gate {gate}:" in console(events)


def test_markdown_is_made_html_and_published_as_an_article(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(undershoot_mean=-50, bad_content="markdown",
                                                   bad_content_stubborn=True))  # fmt: skip
    events, finished = run_job(handle, job_file({"tier1": tier(2, max_word_count=2000)}))
    assert finished.ok, finished.error
    [job_id] = job_ids_of(events)
    assert rows_by_status(handle.database_url, job_id) == {"generated": 2}
    for row in article_rows(handle.database_url, job_id):
        assert row["quality_gates"].startswith("markup_mended")
        assert "## " not in row["content"] and row["content"].count("<h2>") >= 2
        assert "<p>" in row["content"]
    assert handle.stack.simulator.stats().by_kind.get("content_repair", 0) == 0  # no call


def test_repeated_paragraphs_are_dropped_before_the_article_is_saved(start_stack) -> None:
    handle = start_stack(
        simulator=SimulatorConfig(undershoot_mean=-50, bad_content="repeat_paragraphs")
    )
    events, finished = run_job(handle, job_file({"tier1": tier(3, max_word_count=2000)}))
    assert finished.ok, finished.error
    for row in article_rows(handle.database_url, job_ids_of(events)[0]):
        paragraphs = re.findall(r"<p>(.*?)</p>", row["content"], re.DOTALL)
        long_ones = [p for p in paragraphs if len(p.split()) >= 6]  # "It helps to compare." may
        assert len(long_ones) == len(set(long_ones)) > 2
        assert row["quality_gates"].startswith("repeated_paragraphs")


def test_drafts_over_the_maximum_are_brought_into_the_range(start_stack) -> None:
    # The model writes ~400 words past what it is asked for: each draft is cut at a section
    # boundary where one does it, else asked once to shorten.
    handle = start_stack(simulator=SimulatorConfig(undershoot_mean=-400, undershoot_jitter=0))
    events, finished = run_job(handle, job_file({"tier1": tier(4)}))
    assert finished.ok, finished.error
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    for row in rows:
        assert row["status"] == "generated" and 300 <= row["word_count"] <= 450, row["error"]
        assert row["draft_words"] > 450 and row["quality_gates"] in ("trimmed", "shortened")
    assert finished.summary.long_articles == 0


def test_a_draft_that_stays_over_the_maximum_is_kept_as_long_and_said_so(start_stack) -> None:
    # Two H2s and no fewer: no section can go; the model ignores the request to shorten.
    handle = start_stack(
        simulator=SimulatorConfig(undershoot_mean=-400, undershoot_jitter=0,
                                  shorten_mode="ignore")
    )  # fmt: skip
    events, finished = run_job(handle, job_file({"tier1": tier(3, min_h2_tags=2, max_h2_tags=2)}))
    assert finished.ok, finished.error
    [job_id] = job_ids_of(events)
    assert rows_by_status(handle.database_url, job_id) == {"long": 3}
    for row in article_rows(handle.database_url, job_id):
        assert row["word_count"] > 450 and row["quality_gates"] == "shortened,long"
        assert row["error"] == (
            f"{row['word_count']} words, over the maximum of 450 after one request to shorten"
        )
    assert handle.stack.simulator.stats().by_kind["shorten"] == 3
    assert finished.summary.long_articles == 3
    text = console(events)
    assert "Long:               3 (over the maximum after shortening)" in text
    assert "Status: long): " in text and "shortening..." in text
    assert len(article_pages(handle.output_dir / str(job_id))) == 3  # kept, as short ones are


def test_near_duplicate_titles_and_keyword_lists_never_become_articles(start_stack) -> None:
    # Each title the model writes comes with a variant that is the same title, and each reply
    # starts with the related searches pasted together.
    handle = start_stack(simulator=SimulatorConfig(near_duplicate_titles=True))
    related = ["cnc machining cost", "cnc tolerances", "cnc vs 3d printing"]
    events, finished = run_job(
        handle, job_file({"tier1": tier(4), "tier2": tier(6)}, project=project(related))
    )
    assert finished.ok, finished.error
    titles = [row["title"] for row in article_rows(handle.database_url, job_ids_of(events)[0])]
    assert len(titles) == 10 and finished.summary.title_shortfall == 0
    index = TitleIndex()
    for title in titles:
        assert not index.same_as(title), (title, index.same_as(title))
        index.add(title)
        assert "Cnc Machining Cost, Cnc Tolerances" not in title
    assert "Dropped 1 reply lines that were not titles" in console(events)
