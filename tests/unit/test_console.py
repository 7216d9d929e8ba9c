"""The console layout of the story."""

from typing import Any

from orchestrator_service.console import augmentation_rate, event_lines
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb


def article(**fields: Any) -> pb.JobEvent:
    return pb.JobEvent(
        article=article_pb.ArticleEvent(tier="tier2", tier_count=10, article_index=0, **fields)
    )


def test_concurrency_is_shown_at_tier_start() -> None:
    lines = event_lines(
        pb.JobEvent(tier_started=pb.TierStarted(tier="tier1", count=10, max_workers=5))
    )
    assert lines[0] == "  tier1: Generating 10 articles (concurrency: 5)"


def test_article_steps_read_like_the_story() -> None:
    assert event_lines(
        article(kind=article_pb.ARTICLE_EVENT_KIND_CONTENT_DONE, word_count=1020)
    ) == ["[tier2][1/10] Generated content: 1,020 words"]
    assert event_lines(
        article(kind=article_pb.ARTICLE_EVENT_KIND_AUGMENTING, min_word_count=1000)
    ) == ["[tier2][1/10] Below minimum (1,000), augmenting..."]
    assert event_lines(
        article(
            kind=article_pb.ARTICLE_EVENT_KIND_SAVED,
            article_id=45,
            status=article_pb.ARTICLE_STATUS_GENERATED,
        )
    ) == ["[tier2][1/10] Saved (ID: 45, Status: generated)"]


def test_a_failure_is_one_line_with_its_stage_error_and_record() -> None:
    failed = article(
        kind=article_pb.ARTICLE_EVENT_KIND_FAILED,
        stage="content",
        article_id=7,
        error="TimeoutError: slow",
    )
    assert event_lines(failed) == [
        "[tier2][1/10] FAILED at content: TimeoutError: slow (error record ID 7)"
    ]
    failed.article.article_id, failed.article.fatal = 0, True
    assert event_lines(failed) == [
        "[tier2][1/10] FAILED at content: TimeoutError: slow (error record NOT saved); the API "
        "cannot serve this job: no further article starts"
    ]


def test_summary_shows_totals_rate_calls_and_time() -> None:
    summary = pb.Summary(
        total_jobs=1,
        processed_jobs=1,
        requested_articles=10,
        generated_articles=8,
        augmented_articles=1,
        failed_articles=1,
        api_calls=21,
        prompt_tokens=100,
        completion_tokens=900,
        execution_seconds=12.34,
        output_dirs=["output/3"],
        pages_written=9,
    )
    text = "\n".join(
        event_lines(pb.JobEvent(run_finished=pb.RunFinished(ok=True, summary=summary)))
    )
    for expected in (
        "Jobs:               1/1 processed",
        "Failed:             1",
        "Augmentation rate:  11.1%",
        "API calls:          21",
        "Tokens:             1,000",
        "Execution time:     12.3s",
        "output/3/",
    ):
        assert expected in text


def test_augmentation_rate_counts_only_articles_with_content() -> None:
    assert augmentation_rate(8, 2) == 0.2
    assert augmentation_rate(0, 0) == 0.0
    assert augmentation_rate(6, 2, 2) == 0.4  # short articles needed augmenting too
