"""Near-duplicate titles and keyword lists, on the titles a small model really wrote."""

from __future__ import annotations

import random

from generator_service.domain import ProjectInfo
from generator_service.similar_titles import TitleIndex, keyword_list, title_words
from generator_service.titles import TitleWriter
from tests.unit.test_titles import SHORT_OK, ScriptedTitles

PROJECT = ProjectInfo(
    1, "cnc machining", ["lathe", "spindle"], ["cnc machining cost", "cnc tolerances",
                                               "cnc vs 3d printing"]
)  # fmt: skip
SAME = [  # Qwen2.5-Coder-0.5B's three titles for one tier
    "CNC Machining: Cost, tolerances, vs 3D Printing",
    "CNC Machining: Costs, Tolerances, 3D Printing",
    "CNC Machining: Costs vs Tolerances, 3D Printing",
]


def test_titles_that_differ_in_case_plurals_and_little_words_are_the_same_title() -> None:
    assert title_words(SAME[0]) == title_words(SAME[1]) == title_words(SAME[2])
    index = TitleIndex()
    index.add(SAME[0])
    assert index.same_as(SAME[1]) == index.same_as(SAME[2]) == SAME[0]
    assert index.same_as("cnc machining: cost, tolerances, vs 3d printing") == SAME[0]


def test_titles_on_other_angles_are_new() -> None:
    index = TitleIndex()
    for title in ("7 Expert Tips for Better CNC Machining", "Choosing the Right Lathe for CNC"):
        index.add(title)
    assert index.same_as("9 Expert Tips for Better CNC Machining") == ""  # 5 of 7 words
    assert index.same_as("Choosing the Right Spindle for CNC") == ""
    assert index.same_as("7 Expert Tips for Better CNC Machining in 2026") != ""  # 6 of 7


def test_the_index_finds_what_comparing_every_pair_finds() -> None:
    # Prefix filtering must miss nothing: against the brute force, on titles of few words drawn
    # from a small vocabulary, so that near-duplicates are many.
    rng = random.Random(5)
    words = ["guide", "tips", "costs", "cnc", "lathe", "spindle", "work", "jobs", "shop", "2026"]
    titles = [" ".join(rng.sample(words, rng.randint(2, 6))) for _ in range(400)]
    index, kept = TitleIndex(), []
    for title in titles:
        new = title_words(title)
        brute = any(len(new & title_words(k)) / len(new | title_words(k)) >= 0.8 for k in kept)
        assert bool(index.same_as(title)) == brute, title
        if not brute:
            index.add(title)
            kept.append(title)
    assert 20 < len(kept) < 380  # both cases were met


def test_a_title_that_is_the_keyword_list_pasted_together_is_no_title() -> None:
    assert keyword_list("CNC Machining Cost, CNC Tolerances, CNC vs 3D Printing", PROJECT)
    assert keyword_list(SAME[0], PROJECT)
    assert not keyword_list("CNC Machining Cost", PROJECT)  # one search: a title's subject
    assert not keyword_list("What CNC Machining Costs a Small Shop", PROJECT)


def test_the_writer_asks_again_for_near_duplicates_and_drops_keyword_lists() -> None:
    project = ProjectInfo(1, "cnc machining", ["lathe", "spindle"], [])
    first = "\n".join([*SAME, "Lathe and Spindle"])  # one title twice more, and the entities
    llm = ScriptedTitles(first, "Tolerances Explained for Buyers")
    result = TitleWriter(llm, length=SHORT_OK).write(project, 2, "m", 1, existing=[])
    assert result.titles == [SAME[0], "Tolerances Explained for Buyers"]
    assert result.rejected == 1 and llm.calls == 2  # the near-duplicates were asked again
