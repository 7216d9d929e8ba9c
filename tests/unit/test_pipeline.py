"""ArticlePipeline: compensation in the prompt, the augmentation threshold, failure records."""

import re

import pytest

from generator_service.domain import ArticleTask, EventKind, TierShape
from generator_service.pipeline import ArticlePipeline, OutlineError, fit_outline, parse_outline
from tests.fakes import EventLog, FakeLlm, MemorySaver, batch_context


def _content_bounds(prompt_log: list[str]) -> tuple[int, int]:
    prompt = next(p for p in prompt_log if p.startswith("Write the article titled"))
    match = re.search(r"between (\d+) and (\d+) words", prompt)
    assert match, prompt
    return int(match.group(1)), int(match.group(2))


def test_word_count_compensation_reaches_the_prompt() -> None:
    llm = FakeLlm()
    ArticlePipeline(llm, MemorySaver(), 200).run(
        batch_context(min_words=1000, max_words=1500), ArticleTask(0, "T"), EventLog()
    )
    assert _content_bounds(llm.prompts) == (1200, 1700)


def test_compensation_is_configurable() -> None:
    llm = FakeLlm()
    ArticlePipeline(llm, MemorySaver(), 0).run(
        batch_context(min_words=1000, max_words=1500), ArticleTask(0, "T"), EventLog()
    )
    assert _content_bounds(llm.prompts) == (1000, 1500)


def test_augmentation_threshold_is_the_original_minimum() -> None:
    # 1,100 words is below the compensated 1,200 but above the user's 1,000: no augmentation.
    llm, saver = FakeLlm(content_words=1100), MemorySaver()
    outcome = ArticlePipeline(llm, saver, 200).run(batch_context(), ArticleTask(0, "T"), EventLog())
    assert outcome.kind is EventKind.SAVED and outcome.status == "generated"
    assert not any("<article>" in p for p in llm.prompts)
    assert saver.records[(1, "tier1", 0)].api_calls == 2


def test_content_below_the_minimum_is_augmented_once() -> None:
    llm, saver, log = FakeLlm(content_words=850, augmented_words=1050), MemorySaver(), EventLog()
    outcome = ArticlePipeline(llm, saver, 200).run(batch_context(), ArticleTask(0, "T"), log)
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
    ArticlePipeline(FakeLlm(), saver, 200).run(batch_context(), ArticleTask(0, "T"), EventLog())
    assert not saver.records[(1, "tier1", 0)].content.startswith("```")


def test_an_exception_becomes_a_failed_record_and_event() -> None:
    llm = FakeLlm(fail_when=lambda p: p.startswith("Write the article titled"))
    saver, log = MemorySaver(), EventLog()
    outcome = ArticlePipeline(llm, saver, 200).run(batch_context(), ArticleTask(3, "T"), log)
    record = saver.records[(1, "tier1", 3)]
    assert outcome.kind is EventKind.FAILED and outcome.stage == "content"
    assert record.status == "failed" and record.error_stage == "content"
    assert record.error == "ConnectionError: simulated connection reset"
    assert record.api_calls == 1 and record.outline is not None  # the outline call was paid for
    assert "Traceback" in outcome.traceback and outcome.article_id > 0


def test_a_failure_whose_record_cannot_be_saved_is_still_reported() -> None:
    outcome = ArticlePipeline(FakeLlm(), MemorySaver(fail=True), 200).run(
        batch_context(), ArticleTask(0, "T"), EventLog()
    )
    assert outcome.kind is EventKind.FAILED and outcome.stage == "save"
    assert "failure record could not be saved" in outcome.error and outcome.article_id == 0


def test_outline_parsing_accepts_fences_and_prose() -> None:
    outline = parse_outline('Sure! ```json\n{"outline": [{"h2": " A ", "h3": ["x"]}]}\n``` Enjoy.')
    assert outline == [{"h2": "A", "h3": ["x"]}]


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


def test_an_outline_over_the_maxima_is_trimmed_from_the_end() -> None:
    outline = [{"h2": f"S{i}", "h3": [f"S{i}.{j}" for j in range(3)]} for i in range(6)]
    fitted = fit_outline(outline, _shape(2, 4, 0, 7))
    assert [s["h2"] for s in fitted] == ["S0", "S1", "S2", "S3"]
    assert sum(len(s["h3"]) for s in fitted) == 7
    assert fitted[0]["h3"] == ["S0.0", "S0.1", "S0.2"] and fitted[3]["h3"] == []
    assert len(outline[0]["h3"]) == 3  # the model's outline itself is not changed


def test_an_outline_within_the_ranges_is_unchanged() -> None:
    outline = [{"h2": "A", "h3": ["a"]}, {"h2": "B", "h3": ["b", "c"]}]
    assert fit_outline(outline, _shape(2, 4, 1, 5)) == outline


def test_the_stored_outline_respects_the_tier_maxima() -> None:
    saver = MemorySaver()
    context = batch_context()  # 2-4 H2s, 2-6 H3s; the fake answers 3 H2s with 3 H3s
    tight = type(context)(**{**vars(context), "tier": _shape(1, 2, 0, 1)})
    ArticlePipeline(FakeLlm(), saver, 200).run(tight, ArticleTask(0, "T"), EventLog())
    outline = saver.records[(1, "tier1", 0)].outline
    assert outline is not None and len(outline) == 2 and sum(len(s["h3"]) for s in outline) == 1
