"""TitleWriter: normalised deduplication, top-ups, and a bounded shortfall."""

import threading
from typing import Any

from generator_service.domain import ProjectInfo
from generator_service.llm import Completion
from generator_service.text import normalise_title
from generator_service.titles import (
    TOP_UP_ROUNDS,
    TitlesResult,
    TitleWriter,
    clean_title,
)

PROJECT = ProjectInfo(1, "cnc machining")
SHORT_OK = (1, 120)  # the scripts' titles are shorter than the default 20 characters


class ScriptedTitles:
    """Replies with the next batch of lines from a script, then repeats the last one."""

    def __init__(self, *replies: str) -> None:
        self.replies, self.calls = list(replies), 0
        self._lock = threading.Lock()

    def complete(self, **kwargs: Any) -> Completion:
        if kwargs.get("on_request"):
            kwargs["on_request"]()  # a request sent, as the real client reports it
        with self._lock:
            reply = self.replies[min(self.calls, len(self.replies) - 1)]
            self.calls += 1
        return Completion(reply, 5, 5, "stop")


def test_normalisation_ignores_case_punctuation_and_spacing() -> None:
    assert normalise_title("CNC Machining: A Guide!") == normalise_title("cnc machining  a guide")


def test_list_markers_and_quotes_are_removed() -> None:
    assert clean_title('  3. "The Guide"') == "The Guide"
    assert clean_title("- Another one") == "Another one"


def test_duplicates_are_dropped_and_topped_up() -> None:
    llm = ScriptedTitles("Alpha\nalpha!\nBeta", "Gamma\nDelta")
    result = TitleWriter(llm, length=SHORT_OK).write(PROJECT, 3, "m", 1, existing=[])
    assert result.titles == ["Alpha", "Beta", "Gamma"] and result.shortfall == 0
    assert result.api_calls == 2


def test_titles_used_earlier_in_the_job_are_not_repeated() -> None:
    result = TitleWriter(ScriptedTitles("Alpha\nBeta\nGamma"), length=SHORT_OK).write(
        PROJECT, 2, "m", 1, existing=["ALPHA"]
    )
    assert result.titles == ["Beta", "Gamma"]


def test_a_model_that_repeats_itself_ends_in_a_reported_shortfall() -> None:
    llm = ScriptedTitles("Same title\nSame title")
    result = TitleWriter(llm, length=SHORT_OK).write(PROJECT, 5, "m", 2, existing=[])
    assert result.titles == ["Same title"] and result.shortfall == 4
    assert llm.calls == 1 + TOP_UP_ROUNDS  # bounded: no hang


def test_large_counts_are_asked_in_batches_of_25() -> None:
    llm = ScriptedTitles("\n".join(f"Title {i}" for i in range(60)))
    result = TitleWriter(llm, length=SHORT_OK).write(PROJECT, 60, "m", 3, existing=[])
    assert len(result.titles) == 60 and llm.calls == 3


def test_each_replys_new_titles_are_handed_on_as_they_are_taken() -> None:
    llm = ScriptedTitles("Alpha\nalpha!\nBeta", "Beta\nGamma\nDelta")
    batches: list[list[str]] = []
    result = TitleWriter(llm, length=SHORT_OK).write(
        PROJECT, 3, "m", 1, existing=[], on_titles=batches.append
    )
    assert batches == [["Alpha", "Beta"], ["Gamma"]]  # a duplicate or an extra is not handed on
    assert [t for batch in batches for t in batch] == result.titles


def test_no_further_round_starts_once_the_caller_is_gone() -> None:
    llm = ScriptedTitles("Same title\nSame title")
    result = TitleWriter(llm, length=SHORT_OK).write(
        PROJECT, 5, "m", 1, existing=[], stopped=lambda: llm.calls > 0
    )
    assert llm.calls == 1 and result.titles == ["Same title"]
    assert result.error.startswith("stopped") and result.shortfall == 0


def test_a_stream_gives_each_replys_titles_then_the_result() -> None:
    llm = ScriptedTitles("Alpha\nBeta", "Gamma")
    items = list(TitleWriter(llm, length=SHORT_OK).stream(PROJECT, 3, "m", 1, existing=[]))
    assert items[:-1] == [["Alpha", "Beta"], ["Gamma"]]
    assert isinstance(items[-1], TitlesResult) and items[-1].titles == ["Alpha", "Beta", "Gamma"]
