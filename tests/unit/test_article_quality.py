"""The pipeline against what real models do: too many headings, augmentations that do not help,
fatal API errors, a budget, and titles dressed in markdown."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from generator_service.batch import ArticleBatch
from generator_service.calibration import WordTargets
from generator_service.domain import ArticleTask, EventKind, InvalidRequestError
from generator_service.llm.client import FatalApiError
from generator_service.llm.pricing import Price, PriceTable
from generator_service.pipeline import MAX_AUGMENTATIONS, ArticlePipeline
from generator_service.titles import TitleWriter, clean_title, title_problem
from tests.fakes import EventLog, FakeLlm, MemorySaver, batch_context, tasks
from tests.unit.test_titles import PROJECT, ScriptedTitles


def _run(llm: FakeLlm, saver: MemorySaver | None = None) -> EventLog:
    """One article of the default batch (a tier of 1,000-1,500 words)."""
    log = EventLog()
    pipeline = ArticlePipeline(llm, saver or MemorySaver(), WordTargets(200))
    pipeline.run(batch_context(), ArticleTask(0, "T"), log)
    return log


def test_outlines_are_asked_for_as_json_of_a_schema() -> None:
    llm = FakeLlm()
    _run(llm)
    outline_format = llm.formats[0]
    assert outline_format is not None and outline_format["type"] == "json_schema"
    assert outline_format["json_schema"]["schema"]["required"] == ["outline"]
    assert llm.formats[1] is None  # the content is HTML, not JSON


def test_an_outline_with_too_many_headings_is_trimmed_without_a_repair_call() -> None:
    # The tier wants 2-4 H2s and 2-6 H3s; the model gives 6 H2s with 3 H3s each.
    sections = [{"h2": f"S{i}", "h3": [f"S{i}.{j}" for j in range(3)]} for i in range(6)]
    llm, saver = FakeLlm(outlines=[json.dumps({"outline": sections})]), MemorySaver()
    log = _run(llm, saver)
    assert not any(p.startswith("Repair the outline") for p in llm.prompts)
    done = next(e for e in log.events if e.kind is EventKind.OUTLINE_DONE)
    assert (done.h2_count, done.h3_count) == (4, 6) and "cut" in done.outline_fix
    assert saver.records[(1, "tier1", 0)].api_calls == 2


def test_an_augmentation_that_shrinks_the_text_is_not_kept_and_the_article_is_short() -> None:
    llm, saver = FakeLlm(content_words=700, augmented_words=650), MemorySaver()
    log = _run(llm, saver)
    record = saver.records[(1, "tier1", 0)]
    assert record.status == "short" and record.word_count == 700
    assert sum("<article>" in p for p in llm.prompts) == MAX_AUGMENTATIONS
    assert log.events[-1].kind is EventKind.SAVED and log.events[-1].status == "short"


def test_a_second_augmentation_is_asked_when_the_first_stays_below_the_minimum() -> None:
    llm, saver = FakeLlm(content_words=700, augmentations=[900, 1100]), MemorySaver()
    _run(llm, saver)
    record = saver.records[(1, "tier1", 0)]
    assert record.status == "augmented" and record.word_count == 1100
    second = [p for p in llm.prompts if "<article>" in p][1]
    assert second.startswith("The article below has 900 words")  # it lengthens the longer one


def test_augmentation_asks_for_the_gap_into_the_tiers_range_not_past_it() -> None:
    llm = FakeLlm(content_words=700, augmented_words=1200)
    _run(llm)
    prompt = next(p for p in llm.prompts if "<article>" in p)
    assert "needs between 1000 and 1500 words" in prompt and "Add about 550 words" in prompt


def test_a_draft_is_recorded_with_what_was_asked_for_learning() -> None:
    saver = MemorySaver()
    _run(FakeLlm(content_words=1100), saver)
    record = saver.records[(1, "tier1", 0)]
    assert (record.content_model, record.asked_words, record.draft_words) == (
        "m-content",
        1200,
        1100,
    )


def test_a_fatal_api_error_stops_the_batch_whatever_continue_on_error_says() -> None:
    llm = FakeLlm(
        fail_when=lambda p: '"Title 0"' in p,
        failure=lambda: FatalApiError("the API at http://x/v1 rejected the API key (401)"),
    )
    saver, log = MemorySaver(), EventLog()
    ArticleBatch(
        ArticlePipeline(llm, saver, WordTargets(200)),
        batch_context(6, max_workers=1, continue_on_error=True),
    ).run(tasks(6), log)
    terminal = log.terminal()
    assert terminal[0].kind is EventKind.FAILED and terminal[0].fatal
    assert terminal[0].error == "the API at http://x/v1 rejected the API key (401)"
    assert [e.kind for e in terminal[1:]] == [EventKind.SKIPPED] * 5
    assert "rejected the API key" in terminal[1].error
    assert len(saver.records) == 1  # skipped ones have no record: a resume writes them


def test_a_budget_stops_new_articles_and_records_the_rest_as_skipped() -> None:
    # Every call reports 1,000 + 2,000 tokens at $1 per million: an article (2 calls) costs
    # $0.006. The budget holds 3.5 articles, so the fourth would pass it.
    prices = PriceTable({"m-outline": Price(1, 1), "m-content": Price(1, 1)})
    llm, saver, log = FakeLlm(usage=(1000, 2000)), MemorySaver(), EventLog()
    pipeline = ArticlePipeline(llm, saver, WordTargets(200), prices)
    context = batch_context(10, max_workers=1)
    assert pipeline.estimate_cost(context) < 0.006 * 3.5
    ArticleBatch(pipeline, replace(context, budget_usd=0.021)).run(tasks(10), log)
    statuses = [saver.records[(1, "tier1", i)].status for i in range(10)]
    assert statuses == ["generated"] * 3 + ["skipped"] * 7
    skipped = saver.records[(1, "tier1", 3)]
    assert skipped.error_stage == "budget" and "max_cost_usd" in skipped.error
    spent = sum(e.cost_usd for e in log.terminal())
    assert abs(spent - 0.018) < 1e-9


def test_titles_lose_their_markdown_and_non_titles_are_dropped() -> None:
    assert clean_title("3. **How to Dial In a Grinder**") == "How to Dial In a Grinder"
    assert clean_title('"Lathe Basics for Small Makers".') == "Lathe Basics for Small Makers"
    assert clean_title("**1. Choosing a Spindle Motor**") == "Choosing a Spindle Motor"
    assert clean_title("Is CNC Worth It?") == "Is CNC Worth It?"
    assert title_problem("For our 4 distinct article titles in a narrative format:")
    assert title_problem("Here are 5 titles about CNC machining for you")
    assert title_problem("{{ title }} for {{ audience }} and their shops")
    assert title_problem("Too short")
    assert title_problem("x" * 121)
    assert title_problem("A Practical Guide to CNC Spindles") == ""


def test_rejected_lines_count_as_missing_and_are_asked_for_again() -> None:
    chatty = "\n".join(
        [
            "Here are 3 distinct article titles:",
            "1. **The Complete Guide to CNC Spindles**",
            "",
            "2. " + "a rambling line " * 20,
        ]
    )
    llm = ScriptedTitles(chatty, "Choosing a Lathe for a Small Shop\nCNC Costs Explained in Full")
    result = TitleWriter(llm).write(PROJECT, 3, "m", 1, existing=[])
    assert result.titles == [
        "The Complete Guide to CNC Spindles",
        "Choosing a Lathe for a Small Shop",
        "CNC Costs Explained in Full",
    ]
    assert result.rejected == 2 and llm.calls == 2


def test_a_budget_with_a_model_that_has_no_price_is_refused() -> None:
    pipeline = ArticlePipeline(FakeLlm(), MemorySaver(), WordTargets(200), PriceTable({}))
    with pytest.raises(InvalidRequestError, match=r"model 'm-outline' has no price.*LLM_PRICES"):
        pipeline.check_budget(replace(batch_context(), budget_usd=1.0))
    pipeline.check_budget(batch_context())  # no budget: prices do not matter
