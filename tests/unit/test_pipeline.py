"""ArticlePipeline: compensation in the prompt, the augmentation threshold, failure records."""

import json
import re

import pytest

from generator_service import prompts
from generator_service.calibration import WordTargets
from generator_service.domain import ArticleTask, EventKind, ProjectInfo, TierShape
from generator_service.outline import (
    OutlineError,
    clean_outline,
    fit_outline,
    outline_shortfall,
    parse_outline,
    section_budgets,
)
from generator_service.pipeline import ArticlePipeline
from tests.fakes import EventLog, FakeLlm, MemorySaver, batch_context


def _content_bounds(prompt_log: list[str]) -> tuple[int, int]:
    prompt = next(p for p in prompt_log if p.startswith("Write the article titled"))
    match = re.search(r"between (\d+) and (\d+) words", prompt)
    assert match, prompt
    return int(match.group(1)), int(match.group(2))


def test_word_count_compensation_reaches_the_prompt() -> None:
    llm = FakeLlm()
    ArticlePipeline(llm, MemorySaver(), WordTargets(200)).run(
        batch_context(min_words=1000, max_words=1500), ArticleTask(0, "T"), EventLog()
    )
    assert _content_bounds(llm.prompts) == (1200, 1700)


def test_compensation_is_configurable() -> None:
    llm = FakeLlm()
    ArticlePipeline(llm, MemorySaver(), WordTargets(0)).run(
        batch_context(min_words=1000, max_words=1500), ArticleTask(0, "T"), EventLog()
    )
    assert _content_bounds(llm.prompts) == (1000, 1500)


def test_augmentation_threshold_is_the_original_minimum() -> None:
    # 1,100 words is below the compensated 1,200 but above the user's 1,000: no augmentation.
    llm, saver = FakeLlm(content_words=1100), MemorySaver()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.SAVED and outcome.status == "generated"
    assert not any("<article>" in p for p in llm.prompts)
    assert saver.records[(1, "tier1", 0)].api_calls == 2


def test_content_below_the_minimum_is_augmented_once() -> None:
    llm, saver, log = FakeLlm(content_words=850, augmented_words=1050), MemorySaver(), EventLog()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), log
    )
    record = saver.records[(1, "tier1", 0)]
    assert outcome.status == "augmented" and record.status == "augmented"
    assert record.word_count == 1050 and record.api_calls == 3
    assert [e.kind for e in log.events] == [
        EventKind.STARTED,
        EventKind.OUTLINE_STARTED,
        EventKind.OUTLINE_DONE,
        EventKind.CONTENT_STARTED,
        EventKind.CONTENT_DONE,
        EventKind.AUGMENTING,
        EventKind.AUGMENTED,
        EventKind.SAVED,
    ]
    augmenting = next(e for e in log.events if e.kind is EventKind.AUGMENTING)
    assert augmenting.min_word_count == 1000


def test_fences_are_removed_before_saving() -> None:
    saver = MemorySaver()
    ArticlePipeline(FakeLlm(), saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert not saver.records[(1, "tier1", 0)].content.startswith("```")


def test_an_exception_becomes_a_failed_record_and_event() -> None:
    llm = FakeLlm(fail_when=lambda p: p.startswith("Write the article titled"))
    saver, log = MemorySaver(), EventLog()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(3, "T"), log
    )
    record = saver.records[(1, "tier1", 3)]
    assert outcome.kind is EventKind.FAILED and outcome.stage == "content"
    assert record.status == "failed" and record.error_stage == "content"
    assert record.error == "ConnectionError: simulated connection reset"
    # The outline call and the content request that failed: both were sent, so both count.
    assert record.api_calls == 2 and record.outline is not None
    assert "Traceback" in record.error_traceback and outcome.article_id > 0


def test_a_failure_whose_record_cannot_be_saved_is_still_reported() -> None:
    outcome = ArticlePipeline(FakeLlm(), MemorySaver(fail=True), WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.FAILED and outcome.stage == "save"
    assert "failure record could not be saved" in outcome.error and outcome.article_id == 0


def test_outline_parsing_accepts_fences_and_prose() -> None:
    outline = parse_outline('Sure! ```json\n{"outline": [{"h2": " A ", "h3": ["x"]}]}\n``` Enjoy.')
    assert outline == [{"h2": "A", "h3": ["x"]}]


def test_outline_headings_are_cleaned_and_sentences_repeats_and_echoes_dropped() -> None:
    sentence = "This subsection explains in great detail why " + "tolerances matter " * 10
    outline = clean_outline(
        [
            {"h2": "1. **Introduction to CNC**", "h3": ["1.1 What it is", "Introduction to CNC"]},
            {
                "h2": "## Costs",
                "h3": [sentence, "- What drives the price", "what drives the PRICE?"],
            },
            {"h2": "Introduction to CNC.", "h3": ["Lathes"]},  # the first H2 again: dropped
            {"h2": sentence, "h3": ["Spindles"]},  # a sentence as an H2: its section goes
        ],
        max_chars=100,
    )
    assert outline == [
        {"h2": "Introduction to CNC", "h3": ["What it is"]},
        {"h2": "Costs", "h3": ["What drives the price"]},
    ]
    with pytest.raises(OutlineError, match="no usable H2"):
        clean_outline([{"h2": sentence, "h3": []}], max_chars=100)


@pytest.mark.parametrize(
    "reply, problem",
    [
        ("no json here", "not JSON"),
        ('{"outline": [', "not JSON"),
        ('{"outline": [{"h2": "x",}]}', "not valid JSON"),
        ('{"sections": []}', '"outline" list'),
        ('{"outline": [{"title": "x"}]}', 'section 0 has no "h2"'),
        ('{"outline": [{"h2": "x", "h3": "y"}]}', '"h3" must be a list'),
    ],
)
def test_unusable_outlines_are_rejected_with_a_reason(reply: str, problem: str) -> None:
    with pytest.raises(OutlineError, match=re.escape(problem)):
        parse_outline(reply)


def _shape(min_h2: int, max_h2: int, min_h3: int, max_h3: int) -> TierShape:
    return TierShape("tier1", 1, 100, 200, min_h2, max_h2, min_h3, max_h3)


PROJECT = ProjectInfo(1, "cnc machining", ["lathe", "spindle"], ["cnc cost", "cnc near me"])


def _outline_json(h3_per_section: list[int]) -> str:
    sections = [
        {"h2": f"S{i}", "h3": [f"S{i}.{j}" for j in range(n)]} for i, n in enumerate(h3_per_section)
    ]
    return json.dumps({"outline": sections})


def test_an_outline_over_the_maxima_is_trimmed_from_the_end() -> None:
    outline = [{"h2": f"S{i}", "h3": [f"S{i}.{j}" for j in range(3)]} for i in range(6)]
    fitted = fit_outline(outline, _shape(2, 4, 0, 7), PROJECT)
    assert [s["h2"] for s in fitted.sections] == ["S0", "S1", "S2", "S3"]
    assert fitted.h3_count == 7 and fitted.fix == "2 H2s cut, 5 H3s cut"
    assert fitted.sections[0]["h3"] == ["S0.0", "S0.1", "S0.2"] and fitted.sections[3]["h3"] == []
    assert len(outline[0]["h3"]) == 3  # the model's outline itself is not changed


def test_an_outline_within_the_ranges_is_unchanged() -> None:
    outline = [{"h2": "A", "h3": ["a"]}, {"h2": "B", "h3": ["b", "c"]}]
    fitted = fit_outline(outline, _shape(2, 4, 1, 5), PROJECT)
    assert fitted.sections == outline and fitted.fix == ""
    assert outline_shortfall(outline, _shape(2, 4, 1, 5)) == ""


def test_missing_headings_are_padded_from_related_searches_and_entities() -> None:
    outline = [{"h2": "A", "h3": ["a"]}, {"h2": "B", "h3": []}]
    fitted = fit_outline(outline, _shape(3, 4, 4, 6), PROJECT)
    assert [s["h2"] for s in fitted.sections] == ["A", "B", "Cnc cost"]
    assert (fitted.h2_count, fitted.h3_count) == (3, 4)
    padded = sorted(h for s in fitted.sections for h in s["h3"] if h != "a")
    assert padded == ["Cnc near me", "Working With Lathe", "Working With Spindle"]
    assert [len(s["h3"]) for s in fitted.sections] == [2, 1, 1]  # the thinnest sections first
    assert fitted.fix == "1 H2s padded, 3 H3s padded"


def test_an_outline_that_cannot_be_padded_fails_with_the_reason() -> None:
    outline = [{"h2": "A", "h3": []}]
    with pytest.raises(OutlineError, match="H2 sections: 1, the tier needs at least 4"):
        fit_outline(outline, _shape(4, 5, 0, 5), PROJECT)
    with pytest.raises(OutlineError, match="H3 subsections: 0, the tier needs at least 9"):
        fit_outline(outline, _shape(1, 2, 9, 9), PROJECT)


@pytest.mark.parametrize(
    "h3s, tier, problem",
    [
        ([1, 1], _shape(3, 5, 0, 9), "H2 sections: 2, the tier needs at least 3"),
        ([0, 0, 0], _shape(3, 5, 1, 9), "H3 subsections: 0, the tier needs at least 1"),
        (
            [0],
            _shape(3, 5, 1, 9),
            "H2 sections: 1, the tier needs at least 3; "
            "H3 subsections: 0, the tier needs at least 1",
        ),
        # Too many costs no call: fit_outline trims it. H3s of cut H2s do not count.
        ([4, 4, 4], _shape(3, 5, 0, 9), ""),
        ([0] * 6 + [5], _shape(3, 6, 1, 9), "H3 subsections: 0, the tier needs at least 1"),
    ],
)
def test_outlines_with_too_few_headings_are_named(
    h3s: list[int], tier: TierShape, problem: str
) -> None:
    assert outline_shortfall(parse_outline(_outline_json(h3s)), tier) == problem


def test_an_out_of_range_outline_gets_one_repair_request() -> None:
    # The tier needs 2-4 H2s; the first reply has 1, the repair has 3.
    llm, saver, log = FakeLlm(outlines=[_outline_json([2])]), MemorySaver(), EventLog()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), log
    )
    assert outcome.kind is EventKind.SAVED
    repairs = [p for p in llm.prompts if p.startswith("Repair the outline")]
    assert len(repairs) == 1 and "H2 sections: 1, the tier needs at least 2" in repairs[0]
    repairing = next(e for e in log.events if e.kind is EventKind.OUTLINE_REPAIRING)
    assert "H2 sections: 1" in repairing.error
    record = saver.records[(1, "tier1", 0)]
    assert record.outline is not None and len(record.outline) == 3 and record.api_calls == 3


def test_a_repair_that_is_still_out_of_range_is_fitted() -> None:
    # Both replies have 1 H2 where 2-4 are needed: padded from a related search, not failed.
    llm, saver = FakeLlm(outlines=[_outline_json([2]), _outline_json([3])]), MemorySaver()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.SAVED
    outline = saver.records[(1, "tier1", 0)].outline
    assert outline is not None and [s["h2"] for s in outline] == ["S0", "Cnc cost"]


def test_garbage_twice_fails_the_article_at_its_outline_with_the_reason() -> None:
    llm, saver = FakeLlm(outlines=["no idea", "still no idea"]), MemorySaver()
    outcome = ArticlePipeline(llm, saver, WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.FAILED and outcome.stage == "outline"
    assert "not JSON" in outcome.error and "after one repair request" in outcome.error
    assert saver.records[(1, "tier1", 0)].api_calls == 2


def test_the_content_prompt_gives_each_section_its_word_budget() -> None:
    llm = FakeLlm()
    ArticlePipeline(llm, MemorySaver(), WordTargets(200)).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    prompt = next(p for p in llm.prompts if p.startswith("Write the article titled"))
    assert "<h2>One</h2> (about " in prompt and "<h3>a</h3>\n<h3>b</h3>\n<h2>Two</h2>" in prompt
    sections = prompts.outline_in_prompt(prompt)
    assert [(s["h2"], s["h3"]) for s in sections] == [
        ("One", ["a", "b"]),
        ("Two", ["c"]),
        ("Three", []),
    ]
    budgets = [s["words"] for s in sections]
    assert sum(budgets) == (1200 + 1700) // 2 and budgets[0] > budgets[1] > budgets[2]


def test_section_budgets_sum_to_the_target() -> None:
    outline = [{"h2": "a", "h3": ["x"] * n} for n in (0, 1, 5)]
    for total in (1, 7, 999, 1450):
        assert sum(section_budgets(outline, total)) == total
