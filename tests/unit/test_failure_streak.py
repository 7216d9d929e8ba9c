"""FailureStreak: when a run's first articles all fail the same way, the run stops."""

from __future__ import annotations

from orchestrator_service.tier_group import FailureStreak
from tierwriter.article.v1 import article_event_pb2 as article_pb

FAILED, SAVED = article_pb.ARTICLE_EVENT_KIND_FAILED, article_pb.ARTICLE_EVENT_KIND_SAVED


def failed(stage: str = "outline", error_type: str = "OutlineError") -> article_pb.ArticleEvent:
    return article_pb.ArticleEvent(
        kind=FAILED,
        stage=stage,
        error_type=error_type,
        error=f"{error_type}: no JSON",
        endpoint="http://127.0.0.1:8900/v1",
    )


def test_the_first_articles_failing_the_same_way_stop_the_run_naming_cause_and_endpoint() -> None:
    streak = FailureStreak(3, job_id=7)
    assert [streak.saw(failed()) for _ in range(2)] == ["", ""]
    why = streak.saw(failed())
    assert why.startswith("stopped: the first 3 articles all failed at outline the same way")
    assert "(OutlineError: no JSON)" in why and "http://127.0.0.1:8900/v1" in why
    assert "tierwriter jobs resume 7 --retry-failed" in why


def test_a_different_failure_starts_the_count_again() -> None:
    streak = FailureStreak(3, job_id=7)
    events = [failed(), failed(), failed("content", "TimeoutError"), failed(), failed()]
    assert [streak.saw(e) for e in events] == [""] * 5
    assert streak.saw(failed()) != ""


def test_once_an_article_is_written_failures_never_stop_the_run() -> None:
    streak = FailureStreak(3, job_id=7)
    streak.saw(failed())
    streak.saw(article_pb.ArticleEvent(kind=SAVED))
    assert all(streak.saw(failed()) == "" for _ in range(10))


def test_zero_turns_it_off_and_fatal_failures_are_not_counted() -> None:
    off = FailureStreak(0, job_id=7)
    assert all(off.saw(failed()) == "" for _ in range(10))
    streak = FailureStreak(2, job_id=7)
    fatal = article_pb.ArticleEvent(kind=FAILED, stage="outline", error_type="X", fatal=True)
    assert streak.saw(fatal) == "" and streak.saw(fatal) == ""  # they stop the job themselves
