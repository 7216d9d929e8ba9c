"""Nothing lost: a batch under a failing API, through the real services and the simulator."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.console import event_lines
from tests.helpers import TIER, articles_of, job_file, job_ids_of, rows_by_status, run_job
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

# Each way of failing on at least 10% of the calls; a stall outlives the client's timeout.
CHAOS = SimulatorConfig(
    latency=0.005,
    rate_limit_share=0.1,
    server_error_share=0.1,
    stall_share=0.1,
    stall_seconds=1.0,
    truncate_share=0.1,
    garbage_outline_share=0.1,
    rate_limit_retry_after_ms=10,
)


def tier(count: int) -> dict[str, Any]:
    return {**TIER, "count": count, "min_word_count": 300, "max_word_count": 450}


def duplicate_keys(database_url: str, job_id: int) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return len(
                connection.execute(
                    text(
                        "SELECT tier, article_index FROM generated_content WHERE job_id = :j"
                        " GROUP BY tier, article_index HAVING COUNT(*) > 1"
                    ),
                    {"j": job_id},
                ).all()
            )
    finally:
        engine.dispose()


def test_a_batch_of_200_under_a_failing_api_ends_with_one_record_each(
    start_stack, monkeypatch
) -> None:
    monkeypatch.setenv("LLM_TIMEOUT_SECONDS", "0.4")
    monkeypatch.setenv("LLM_MAX_RETRIES", "6")
    monkeypatch.setenv("LLM_BACKOFF_SECONDS", "0.01")
    monkeypatch.setenv("LLM_BACKOFF_MAX_SECONDS", "0.1")
    handle = start_stack(simulator=CHAOS)
    job = job_file({"tier1": tier(50), "tier2": tier(150)}, max_workers=20)
    events, finished = run_job(handle, job)
    job_id = job_ids_of(events)[0]

    # The API really failed, in every way, on at least 10% of the calls each.
    stats = handle.stack.simulator.stats()
    arrivals = stats.requests + stats.rate_limited + stats.faults["server_error"]
    arrivals += stats.faults["stall"]
    for kind in ("rate_limit", "server_error", "stall", "truncated"):
        assert stats.faults[kind] >= 0.1 * arrivals - 2, (kind, stats.faults, arrivals)
    outline_calls = stats.by_kind["outline"] + stats.by_kind.get("outline_repair", 0)
    assert stats.faults["garbage_outline"] >= 0.1 * outline_calls - 2

    # Every request ended as exactly one record, and the summary is the records.
    rows = rows_by_status(handle.database_url, job_id)
    assert sum(rows.values()) == 200 and duplicate_keys(handle.database_url, job_id) == 0
    s = finished.summary
    assert (s.generated_articles, s.augmented_articles, s.failed_articles) == (
        rows.get("generated", 0),
        rows.get("augmented", 0),
        rows.get("failed", 0),
    )
    # Retries, continuations and repairs saved most; what failed says why.
    assert s.title_shortfall == 0 and rows.get("failed", 0) <= 20
    failures = [a for a in articles_of(events) if a.step == pb.ARTICLE_STEP_FAILED]
    assert len(failures) == rows.get("failed", 0)
    assert all(
        ("after one repair request" in a.error or "cut off by the token limit" in a.error)
        for a in failures
    ), {a.error for a in failures}

    # The retries show, with their reasons, and so do their successes.
    progress = articles_of(events)
    reasons = {a.error for a in progress if a.step == pb.ARTICLE_STEP_RETRYING}
    assert {"Rate limit exceeded", "Server error 500", "Timed out"} <= reasons
    assert any(a.step == pb.ARTICLE_STEP_RETRY_SUCCEEDED for a in progress)
    lines = [line for event in events for line in event_lines(event)]
    assert any("API Error: Timed out, retrying in" in line for line in lines)
    assert any("Outline unusable" in line for line in lines)
