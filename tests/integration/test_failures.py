"""Nothing lost: a batch under a failing API, through the real services and the simulator."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.console import event_lines
from tests.helpers import (
    TIER,
    article_rows,
    articles_of,
    job_file,
    job_ids_of,
    rows_by_status,
    run_job,
)
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.runtime import ServiceCallError

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
    monkeypatch.setenv("LLM_MAX_RETRIES", "10")
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
    # Every request sent is in the counts: refused, failed and timed out ones too. The endpoint
    # saw all but those that timed out before it read them.
    timed_out = sum(
        a.kind == article_pb.ARTICLE_EVENT_KIND_RETRYING and a.error == "Timed out"
        for a in articles_of(events)
    )
    assert stats.received <= s.api_calls <= stats.received + timed_out
    # Retries, continuations and repairs saved most; what failed says why.
    assert s.title_shortfall == 0 and rows.get("failed", 0) <= 20
    failures = [a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_FAILED]
    assert len(failures) == rows.get("failed", 0)
    assert all(
        ("after one repair request" in a.error or "cut off by the token limit" in a.error)
        # a reply cut off and continued without its last headings fails the outline gate
        or "quality gate outline_not_followed" in a.error
        for a in failures
    ), {a.error for a in failures}

    # The retries show, with their reasons, and so do their successes.
    progress = articles_of(events)
    reasons = {a.error for a in progress if a.kind == article_pb.ARTICLE_EVENT_KIND_RETRYING}
    assert {"Rate limit exceeded", "Server error 500", "Timed out"} <= reasons
    assert any(a.kind == article_pb.ARTICLE_EVENT_KIND_RETRY_SUCCEEDED for a in progress)
    lines = [line for event in events for line in event_lines(event)]
    assert any("API Error: Timed out, retrying in" in line for line in lines)
    assert any("Outline unusable" in line for line in lines)


def _consume_until(stream: Any, predicate: Any) -> list[pb.JobEvent]:
    events = []
    for event in stream:
        events.append(event)
        if predicate(event, events):
            break
    return events


def _saved(events: list[pb.JobEvent]) -> int:
    return sum(
        e.WhichOneof("event") == "article" and e.article.kind == article_pb.ARTICLE_EVENT_KIND_SAVED
        for e in events
    )


def test_cancel_mid_job_then_resume_finishes_it_paying_once(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.05))
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        stream = c.run_job(job_file({"tier1": tier(12), "tier2": tier(8)}, max_workers=2))
        events = _consume_until(stream, lambda _e, seen: _saved(seen) >= 3)
        job_id = job_ids_of(events)[0]
        with pytest.raises(ServiceCallError) as running:
            list(c.resume_and_watch(job_id))
        assert running.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "is running" in running.value.details
        assert "is being cancelled" in c.cancel_job(job_id)
        events += list(stream)
        finished = events[-1].run_finished
        assert not finished.ok and "cancelled by admin" in finished.error
        job = c.get_job(job_id).job
        assert job.status == JobStatus.JOB_STATUS_CANCELLED
        before = rows_by_status(handle.database_url, job_id)
        assert 3 <= sum(before.values()) < 20
        # Finished articles stay; nothing new started after the cancel except those in flight.
        assert sum(before.values()) <= _saved(events) + 2

        resumed = list(c.resume_and_watch(job_id))
    done = resumed[-1].run_finished
    assert done.ok, done.error
    assert resumed[0].job_started.resumed
    rows = rows_by_status(handle.database_url, job_id)
    assert sum(rows.values()) == 20 and duplicate_keys(handle.database_url, job_id) == 0
    assert (done.summary.generated_articles + done.summary.augmented_articles) == 20
    # Each article's outline was asked for exactly once over the two runs: nothing paid twice.
    assert handle.stack.simulator.stats().by_kind["outline"] == 20
    restarted = [a for a in articles_of(resumed) if a.kind == article_pb.ARTICLE_EVENT_KIND_STARTED]
    assert len(restarted) == 20 - sum(before.values())


def _outlines_started(events: list[pb.JobEvent]) -> set[int]:
    return {
        e.article.article_index
        for e in events
        if e.WhichOneof("event") == "article"
        and e.article.kind == article_pb.ARTICLE_EVENT_KIND_OUTLINE_STARTED
    }


class _LogSeen(logging.Handler):
    """Sets `seen` when a record whose message contains `text` is logged (kept as `record`)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()
        self.record: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.record = record
            self.seen.set()


def test_in_flight_articles_past_the_grace_period_are_recorded_cancelled_and_retried(
    start_stack, monkeypatch
) -> None:
    """Ordered by events, not time: the three outlines in flight are held by the simulator
    until the generator has the stop, so the grace period has passed before their next call."""
    grace = 0.01
    monkeypatch.setenv("CANCEL_GRACE_SECONDS", str(grace))
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    simulator = handle.stack.simulator
    simulator.hold("outline")
    stop_received = _LogSeen("stop: cancelled by admin")
    generator_log = logging.getLogger("generator_service.servicer")
    generator_log.addHandler(stop_received)
    level = generator_log.level
    generator_log.setLevel(logging.INFO)
    try:
        with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
            stream = c.run_job(job_file({"tier1": tier(6)}, max_workers=3))
            events = _consume_until(
                stream,
                lambda _e, seen: len(_outlines_started(seen)) == 3,
            )
            started = _outlines_started(events)
            job_id = job_ids_of(events)[0]
            c.cancel_job(job_id)
            assert stop_received.seen.wait(60), "the generator never got the stop"
            assert stop_received.record is not None
            # The grace period runs from the stop: the held outlines come back after it.
            while time.time() <= stop_received.record.created + grace:
                time.sleep(grace)
            simulator.release()
            events += list(stream)
            rows = article_rows(handle.database_url, job_id)
            # Exactly the three in flight have records, each failed as cancelled; the rest
            # never started.
            assert sorted(r["article_index"] for r in rows) == sorted(started)
            assert all(r["status"] == "failed" for r in rows)
            assert all(
                "ArticleCancelledError: cancelled: cancelled by admin" in r["error"] for r in rows
            )
            resumed = list(c.resume_and_watch(job_id, retry_failed=True))
    finally:
        generator_log.removeHandler(stop_received)
        generator_log.setLevel(level)
        simulator.release()
    assert resumed[-1].run_finished.ok, resumed[-1].run_finished.error
    rows = article_rows(handle.database_url, job_id)
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"generated", "augmented"}
    assert duplicate_keys(handle.database_url, job_id) == 0


def test_a_job_left_running_by_a_dead_orchestrator_is_taken_over_when_one_starts(
    start_stack,
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    events, _ = run_job(handle, job_file({"tier1": tier(4)}))
    job_id = job_ids_of(events)[0]
    handle.stack.stop()
    # What a killed orchestrator leaves behind: a job still running under a lease nobody
    # renews, records missing.
    engine = create_engine(handle.database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "UPDATE jobs SET status = 'running', lease_owner = 'orchestrator-dead', "
                "lease_expires_at = NULL WHERE id = :j"
            ),
            {"j": job_id},
        )
        connection.execute(
            text("DELETE FROM generated_content WHERE job_id = :j AND article_index >= 2"),
            {"j": job_id},
        )
    engine.dispose()
    again = start_stack(simulator=SimulatorConfig(latency=0.0))  # same database
    with OrchestratorClient(again.stack.orchestrator_address, "admin", again.password) as c:
        # Nobody resumes it: the new orchestrator takes it over by itself.
        taken_over = list(c.watch_job(job_id, after_seq=events[-1].seq))
        assert c.get_job(job_id).job.status == JobStatus.JOB_STATUS_COMPLETED
    assert taken_over[0].notice.message.startswith("taken over")
    assert taken_over[-1].run_finished.ok
    started = [
        a.article_index
        for a in articles_of(taken_over)
        if a.kind == article_pb.ARTICLE_EVENT_KIND_STARTED
    ]
    assert sorted(started) == [2, 3]
    assert sum(rows_by_status(again.database_url, job_id).values()) == 4
