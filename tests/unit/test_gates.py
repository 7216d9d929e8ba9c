"""The content gates on the replies real small models gave, and the pipeline around them: one
more request with the reason, a failure naming the gate, trimming, shortening, `long`."""

from __future__ import annotations

import json
from dataclasses import replace

from generator_service import gates, prompts
from generator_service.calibration import WordTargets
from generator_service.domain import ArticleTask, EventKind
from generator_service.pipeline import ArticlePipeline
from tests.fakes import OUTLINE, EventLog, FakeLlm, MemorySaver, batch_context

SECTIONS = json.loads(OUTLINE)["outline"]  # One (a, b), Two (c), Three
SENTENCE = "<p>Milling removes material with a rotating cutter, one pass at a time.</p>"
ARTICLE = (
    f"<h2>One</h2>{SENTENCE}<h3>a</h3><p>First point about it, told plainly.</p><h3>b</h3>"
    f"<p>Second point about it, told plainly.</p><h2>Two</h2><h3>c</h3>"
    f"<p>Third point, with an example.</p><h2>Three</h2><p>The last words on the subject.</p>"
)
INSTRUCTIONS = prompts.instructions_of(
    prompts.content_prompt("CNC", "cnc", [], [], SECTIONS, [100, 100, 100], 300, 400).user
)


def gate_of(html: str) -> str:
    failure = gates.check_reply(html, SECTIONS, INSTRUCTIONS)
    return failure.gate if failure else ""


def test_an_article_that_follows_its_outline_passes() -> None:
    assert gate_of(ARTICLE) == ""


def test_paragraphs_a_model_never_closed_are_still_paragraphs() -> None:
    assert gate_of(ARTICLE.replace("</p>", "")) == ""


def test_the_outline_echoed_as_json_is_no_article() -> None:
    assert gate_of(json.dumps({"outline": SECTIONS}, indent=2)) == gates.JSON_REPLY
    # …also inside a paragraph, as a 0.5B model wrapped it
    assert gate_of('<p>{ "outline": [ { "h2": "One", "h3": ["a"] } ] }</p>') == gates.JSON_REPLY


def test_markdown_is_made_html_without_a_call_and_a_fence_left_in_is_no_article() -> None:
    markdown = "## One\n\nMilling removes **material**.\n\n### a\n\n- first\n- second\n\n## Two"
    html, mends = gates.mend(markdown)
    assert mends == [gates.MARKUP_MENDED]
    assert "<h2>One</h2>" in html and "<p>Milling removes <strong>material</strong>.</p>" in html
    assert "<li>first</li>" in html and "<h3>a</h3>" in html
    assert gate_of(ARTICLE + "\n```") == gates.MARKDOWN


def test_text_loose_under_headings_is_wrapped_in_paragraphs() -> None:
    # As Qwen2.5 0.5B wrote it: headings as HTML, the prose after them bare.
    reply = "<h2>One</h2>\nMilling removes material.\nIt is precise.\n<h3>a</h3>\nFirst point."
    html, mends = gates.mend(reply)
    assert mends == [gates.MARKUP_MENDED]
    assert html == (
        "<h2>One</h2>\n<p>Milling removes material.\nIt is precise.</p>\n<h3>a</h3>\n"
        "<p>First point.</p>"
    )
    assert gates.mend(ARTICLE) == (ARTICLE, [])  # HTML as it should be is left alone


def test_the_outlines_word_counts_copied_after_its_headings_are_dropped() -> None:
    copied = ARTICLE.replace("<h2>One</h2>", "<h2>One</h2> (about 120 words)")
    assert gates.mend(copied) == (ARTICLE, [gates.WORD_COUNTS_DROPPED])


def test_a_reply_without_paragraphs_is_no_article() -> None:
    assert gate_of("Milling removes material with a rotating cutter.") == gates.NO_PARAGRAPHS
    assert gate_of("") == gates.NO_PARAGRAPHS


def test_the_prompt_said_back_is_no_article() -> None:
    said_back = INSTRUCTIONS.splitlines()[0]
    assert gate_of(ARTICLE + f"<p>{said_back}</p>") == gates.ECHO


def test_prose_inside_headings_is_no_article() -> None:
    sentence = "Milling removes material with a rotating cutter, one careful pass at a time."
    in_headings = ARTICLE.replace("<p>", "<h3>").replace("</p>", "</h3>")
    in_headings = in_headings.replace("First point about it, told plainly.", sentence)
    in_headings += f"<h3>{sentence}</h3><p>One line.</p>"
    assert gate_of(in_headings) == gates.PROSE_IN_HEADINGS
    # A short draft's headings are many of its words, and no sentences: no fault.
    short = "<h2>One</h2><h3>a b c d e</h3><h3>f g h i j</h3><h2>Two</h2><p>Words of prose.</p>"
    assert gates.check_reply(short, [{"h2": "One", "h3": []}], "") is None


def test_a_draft_that_uses_none_of_its_outlines_h3s_does_not_follow_it() -> None:
    own_h3s = ARTICLE.replace("<h3>a</h3>", "").replace("<h3>b</h3>", "").replace("<h3>c</h3>", "")
    failure = gates.check_reply(own_h3s, SECTIONS, INSTRUCTIONS)
    assert failure and failure.gate == gates.OUTLINE_NOT_FOLLOWED
    assert "0 of the outline's 3 H3 headings" in failure.reason
    other_h2s = ARTICLE.replace("<h2>One</h2>", "<h2>Intro</h2>").replace("Two</h2>", "X</h2>")
    assert gate_of(other_h2s) == gates.OUTLINE_NOT_FOLLOWED  # 1 of 3 H2s


def test_a_heading_reworded_a_little_still_follows_the_outline() -> None:
    sections = [{"h2": "Costs of CNC Machining", "h3": []}, {"h2": "Tolerances", "h3": []}]
    html = "<h2>1. The Costs of CNC Machining</h2>" + SENTENCE + "<h2>Tolerances</h2>" + SENTENCE
    assert gates.check_reply(html, sections, "") is None


def test_repeated_paragraphs_are_dropped_short_ones_may_repeat() -> None:
    html = SENTENCE + "<p>Read more.</p>" + SENTENCE.upper() + "<p>Read more.</p>"
    mended, dropped = gates.drop_repeated_paragraphs(html)
    assert dropped == 1 and mended.count("Milling") == 1 and mended.count("Read more.") == 2


def test_a_long_draft_is_trimmed_at_a_section_boundary_within_the_range() -> None:
    html = "".join(f"<h2>S{i}</h2><p>{' '.join(['word'] * 99)}</p>" for i in range(5))  # 500
    trimmed = gates.trim_to_max(html, max_words=320, min_words=250, min_sections=2)
    assert trimmed is not None and trimmed.count("<h2>") == 3 and trimmed.endswith("</p>")
    assert gates.trim_to_max(html, max_words=320, min_words=301, min_sections=2) is None
    assert gates.trim_to_max(html, max_words=320, min_words=250, min_sections=5) is None


def _run(llm: FakeLlm, **tier: int) -> tuple[EventLog, MemorySaver]:
    log, saver = EventLog(), MemorySaver()
    batch = batch_context()
    batch = replace(batch, tier=replace(batch.tier, **tier))
    ArticlePipeline(llm, saver, WordTargets(0)).run(batch, ArticleTask(0, "T"), log)
    return log, saver


def test_a_reply_that_fails_a_gate_is_asked_for_once_more_with_the_reason() -> None:
    llm = FakeLlm(content_replies=[json.dumps({"outline": SECTIONS})])
    log, saver = _run(llm)
    record = saver.records[(1, "tier1", 0)]
    assert record.status == "generated" and record.quality_gates == gates.JSON_REPLY
    again = [p for p in llm.prompts if p.startswith("Your previous reply could not be used")]
    assert len(again) == 1 and "the reply is JSON, not an article in HTML" in again[0]
    rejected = [e for e in log.events if e.kind is EventKind.CONTENT_REJECTED]
    assert [e.gate for e in rejected] == [gates.JSON_REPLY]


def test_a_second_reply_that_fails_fails_the_article_naming_the_gate() -> None:
    echo = json.dumps({"outline": SECTIONS})
    fenced = "<h2>One</h2>\n```\n<p>a code block in the article</p>\n```\n<h2>Two</h2>"
    llm = FakeLlm(content_replies=[echo, fenced])
    log, saver = _run(llm)
    record = saver.records[(1, "tier1", 0)]
    assert record.status == "failed" and record.content == "" and record.error_stage == "content"
    assert record.error.startswith("ContentGateError: quality gate markdown:")
    assert record.quality_gates == "json,markdown"
    assert log.events[-1].kind is EventKind.FAILED and log.events[-1].gate == gates.MARKDOWN


def test_a_draft_over_the_maximum_is_trimmed_without_a_call() -> None:
    # Sections One (H3s a, b), Two (c) and Three, their words shared evenly by heading; the tier
    # takes 2-4 H2s and 1,000-1,500 words: the last section goes.
    llm = FakeLlm(content_words=1700)
    _log, saver = _run(llm)
    record = saver.records[(1, "tier1", 0)]
    assert (record.status, record.quality_gates) == ("generated", "trimmed")
    assert 1000 <= record.word_count <= 1500 and "<h2>Three</h2>" not in record.content
    assert record.content.count("<h2>") == 2
    assert not any("Shorten it" in p for p in llm.prompts)


def test_a_draft_no_boundary_cuts_is_shortened_once_and_kept_as_long_if_it_stays_over() -> None:
    llm = FakeLlm(content_words=1700, shortened=[1650])
    log, saver = _run(llm, min_h2=3)  # every section must stay: no cut helps
    record = saver.records[(1, "tier1", 0)]
    assert record.status == "long" and record.word_count == 1650  # the shorter text, kept
    assert record.quality_gates == "shortened,long" and record.error_stage == "shortening"
    assert record.error == "1650 words, over the maximum of 1500 after one request to shorten"
    assert sum("Shorten it" in p for p in llm.prompts) == 1
    assert any(e.kind is EventKind.SHORTENING for e in log.events)


def test_a_shortened_draft_within_the_range_is_saved_as_generated() -> None:
    llm = FakeLlm(content_words=1700, shortened=[1300])
    _log, saver = _run(llm, min_h2=3)
    record = saver.records[(1, "tier1", 0)]
    assert (record.status, record.word_count, record.quality_gates) == (
        "generated",
        1300,
        "shortened",
    )


def test_html_as_it_should_be_is_never_rewritten_by_the_mend() -> None:
    multi_line = "<h2>One</h2>\nLoose intro.\n<p>Sentence one.\nSentence two.</p>"
    assert gates.mend(multi_line)[0] == (
        "<h2>One</h2>\n<p>Loose intro.</p>\n<p>Sentence one.\nSentence two.</p>"
    )
    assert gates.mend("<p>a line<br>and the next</p>") == ("<p>a line<br>and the next</p>", [])


def test_repeated_paragraphs_a_model_never_closed_are_dropped_too() -> None:
    same = "<p>Milling removes material with a rotating cutter"
    assert gates.drop_repeated_paragraphs(f"<h2>One</h2>{same}{same}<h2>Two</h2>") == (
        f"<h2>One</h2>{same}\n<h2>Two</h2>",
        1,
    )


def test_a_trim_that_would_no_longer_follow_the_outline_is_not_made() -> None:
    # Six H2s of ~667 words, 1,000-1,500 wanted: only a cut to two sections lands in the range,
    # and two are a third of the outline (the tier would take them: min_h2 is 2).
    sections = [{"h2": f"Part {n}", "h3": []} for n in "ABCDEF"]
    outline = json.dumps({"outline": sections})
    llm = FakeLlm(outlines=[outline], content_words=4000, shortened=[1400])
    _log, saver = _run(llm, max_h2=6, min_h3=0)
    record = saver.records[(1, "tier1", 0)]
    assert record.quality_gates == "shortened" and record.content.count("<h2>") == 6


def test_an_augmentation_that_fails_a_gate_is_not_kept() -> None:
    echo = json.dumps({"outline": SECTIONS})
    llm = FakeLlm(content_words=700, augmentations=[], augmented_words=1200)
    llm.augmented_replies = [echo, echo]
    log, saver = _run(llm)
    record = saver.records[(1, "tier1", 0)]
    assert (record.status, record.word_count, record.quality_gates) == ("short", 700, "json,json")
    rejected = [e for e in log.events if e.kind is EventKind.CONTENT_REJECTED]
    assert [e.stage for e in rejected] == ["augmentation", "augmentation"]
