"""The batch pipeline through the three real services, on SQLite and on PostgreSQL."""

from __future__ import annotations

import copy
import json
from typing import Any

import grpc
import pytest

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.console import event_lines
from tests.helpers import (
    TIER,
    article_pages,
    article_rows,
    articles_of,
    count_rows,
    job_file,
    job_ids_of,
    rows_by_status,
    run_job,
)
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.runtime import ServiceCallError

FAST = SimulatorConfig(latency=0.02)


def tier(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = copy.deepcopy(TIER)
    spec.update(overrides)
    return spec


def terminal_steps(events: list[pb.JobEvent]) -> dict[tuple[str, int], int]:
    terminal = {
        article_pb.ARTICLE_EVENT_KIND_SAVED,
        article_pb.ARTICLE_EVENT_KIND_FAILED,
        article_pb.ARTICLE_EVENT_KIND_SKIPPED,
    }
    found: dict[tuple[str, int], int] = {}
    for a in articles_of(events):
        if a.kind in terminal:
            assert (a.tier, a.article_index) not in found, "two terminal events for one article"
            found[(a.tier, a.article_index)] = a.kind
    return found


def test_concurrent_tier_processing_10_articles(start_stack) -> None:
    # The latency makes the five first calls overlap however slow the machine is.
    handle = start_stack(simulator=SimulatorConfig(latency=0.3))
    events, finished = run_job(handle, job_file(max_workers=5))
    assert finished.ok, finished.error
    assert handle.stack.simulator.stats().peak_in_flight == 5
    s = finished.summary
    assert s.generated_articles + s.augmented_articles == 10 and s.failed_articles == 0
    assert len(terminal_steps(events)) == 10
    assert [
        e.tier_started.max_workers for e in events if e.WhichOneof("event") == "tier_started"
    ] == [5]


def test_max_workers_1_is_strictly_sequential(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.05))
    _, finished = run_job(handle, job_file({"tier1": tier(count=4)}, max_workers=1))
    assert finished.ok
    assert handle.stack.simulator.stats().peak_in_flight == 1


def test_concurrent_workers_setting_applies_when_the_job_sets_none(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.3), concurrent_workers=3)
    events, finished = run_job(handle, job_file({"tier1": tier(count=6)}))
    assert finished.ok
    assert events[0].job_started.max_workers == 3
    assert handle.stack.simulator.stats().peak_in_flight == 3


def test_concurrent_with_continue_on_error(start_stack) -> None:
    # Every 3rd outline reply is not JSON: articles 3, 6 and 9 (in request order) fail.
    handle = start_stack(simulator=SimulatorConfig(latency=0.02, garbage_outline_every=3))
    events, finished = run_job(handle, job_file(max_workers=4, continue_on_error=True))
    assert finished.ok, finished.error
    job_id = job_ids_of(events)[0]
    rows = rows_by_status(handle.database_url, job_id)
    assert rows.get("failed") == 3 and sum(rows.values()) == 10
    failed = [a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_FAILED]
    assert len(failed) == 3
    assert all(a.stage == "outline" and "OutlineError" in a.error and a.article_id for a in failed)
    assert finished.summary.failed_articles == 3 and finished.summary.processed_jobs == 1
    # One console line each; the traceback is for the job's owner, never in the events.
    lines = [line for e in events for line in event_lines(e) if "FAILED" in line]
    assert len(lines) == 3 and all(" (error record ID " in line for line in lines)
    assert not any("Traceback" in e.SerializeToString().decode(errors="replace") for e in events)
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        failures = c.get_job(job_id, errors=True).failures
    assert sorted(f.article_id for f in failures) == sorted(a.article_id for a in failed)
    assert all(f.stage == "outline" and "OutlineError" in f.error for f in failures)
    assert all(
        f.traceback.startswith("Traceback") and "OutlineError" in f.traceback for f in failures
    )


@pytest.mark.parametrize("workers", [1, 2, 50])
def test_without_continue_on_error_the_run_stops_with_a_clear_error(start_stack, workers) -> None:
    # The same behaviour with one worker or fifty: the 3rd outline fails, nothing new starts.
    handle = start_stack(simulator=SimulatorConfig(latency=0.05, garbage_outline_every=3))
    events, finished = run_job(
        handle,
        job_file(
            {"tier1": tier(count=60), "tier2": tier(count=4)},
            max_workers=workers,
            continue_on_error=False,
        ),
    )
    assert not finished.ok
    assert "continue_on_error is false" in finished.error and "OutlineError" in finished.error
    job_id = job_ids_of(events)[0]
    rows = rows_by_status(handle.database_url, job_id)
    steps = terminal_steps(events)
    skipped = [key for key, step in steps.items() if step == article_pb.ARTICLE_EVENT_KIND_SKIPPED]
    # Started articles all have a record; the skipped ones none; tier2 never started.
    assert skipped and sum(rows.values()) == len(steps) - len(skipped)
    assert rows.get("failed", 0) >= 1
    assert not any(t == "tier2" for t, _ in steps)
    started = [a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_STARTED]
    assert len(started) == sum(rows.values())
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        job = client.get_job(job_id).job
    assert job.status == JobStatus.JOB_STATUS_FAILED and "continue_on_error is false" in job.error


def test_stats_accuracy_concurrent(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.01, garbage_outline_every=5))
    events, finished = run_job(
        handle,
        job_file(
            {"tier1": tier(count=6), "tier2": tier(count=9, min_word_count=700)}, max_workers=6
        ),
    )
    job_id = job_ids_of(events)[0]
    rows = rows_by_status(handle.database_url, job_id)
    s = finished.summary
    assert (s.generated_articles, s.augmented_articles, s.failed_articles) == (
        rows.get("generated", 0),
        rows.get("augmented", 0),
        rows.get("failed", 0),
    )
    assert sum(rows.values()) == s.requested_articles == 15
    # The per-tier counts in the events and in GetJob agree with the rows too.
    tier_events = [e.tier_finished for e in events if e.WhichOneof("event") == "tier_finished"]
    assert sum(t.generated + t.augmented + t.failed for t in tier_events) == 15
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        info = client.get_job(job_id).job
    assert (info.generated_articles, info.augmented_articles, info.failed_articles) == (
        s.generated_articles,
        s.augmented_articles,
        s.failed_articles,
    )
    # API calls in the summary are what the simulator answered.
    assert s.api_calls == handle.stack.simulator.stats().requests


def test_word_count_augmentation_reduction(start_stack) -> None:
    # One worker, so the order is fixed: a model's first 5 drafts use the fixed compensation,
    # the rest the shortfall learned from them.
    # The two runs share a database, so each names its own content model: what one learned
    # would start the other.
    def job(model: str) -> str:
        return job_file({"tier1": tier(count=20)}, max_workers=1, models={"content": model})

    with_compensation = start_stack(simulator=SimulatorConfig(latency=0.0, seed=11))
    _, on = run_job(with_compensation, job("model-a"))
    without = start_stack(
        simulator=SimulatorConfig(latency=0.0, seed=11), word_count_compensation=0
    )
    _, off = run_job(without, job("model-b"))
    rate_on = on.summary.augmented_articles / 20
    print(
        f"augmented: {on.summary.augmented_articles} with compensation, "
        f"{off.summary.augmented_articles} without"
    )
    assert rate_on < 0.2, rate_on
    # Without it, the 5 drafts before learning all fall short; after learning, none does.
    assert off.summary.augmented_articles == 5
    assert on.summary.api_calls < off.summary.api_calls


def test_database_sessions_isolated_under_load(start_stack) -> None:
    # 40 articles at 20 workers: every save is its own unit of work; none is lost or doubled.
    handle = start_stack(simulator=SimulatorConfig(latency=0.01))
    events, finished = run_job(handle, job_file({"tier1": tier(count=40)}, max_workers=20))
    assert finished.ok, finished.error
    rows = rows_by_status(handle.database_url, job_ids_of(events)[0])
    assert sum(rows.values()) == 40 and "failed" not in rows


def test_pages_are_written_for_every_stored_article(start_stack) -> None:
    handle = start_stack(simulator=FAST)
    events, finished = run_job(
        handle,
        job_file(
            {"tier1": tier(count=4)}, deployment_targets=["one.example.net", "two.example.net"]
        ),
    )
    job_id = job_ids_of(events)[0]
    pages = article_pages(handle.output_dir / str(job_id))
    assert len(pages) == 4
    assert {p.parent.name for p in pages} == {"one.example.net", "two.example.net"}
    assert all("<script" not in p.read_text() for p in pages)
    assert finished.summary.output_dirs == [str(handle.output_dir / str(job_id))]


def test_a_bad_job_file_is_rejected_and_writes_nothing(start_stack) -> None:
    handle = start_stack(simulator=FAST)
    bad = json.loads(job_file())
    bad["jobs"][0]["tiers"]["tier1"]["max_word_count"] = 10
    with pytest.raises(ServiceCallError) as error:
        run_job(handle, json.dumps(bad))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[0].tiers.tier1.max_word_count" in error.value.details
    assert count_rows(handle.database_url, "jobs") == 0
    assert count_rows(handle.database_url, "projects") == 0
    assert handle.stack.simulator.stats().requests == 0


def test_an_unknown_project_id_is_rejected_and_writes_nothing(start_stack) -> None:
    handle = start_stack(simulator=FAST)
    spec = json.loads(job_file())
    del spec["jobs"][0]["project"]
    spec["jobs"][0]["project_id"] = 999
    with pytest.raises(ServiceCallError) as error:
        run_job(handle, json.dumps(spec))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[0].project_id: you have no project 999" in error.value.details
    assert count_rows(handle.database_url, "jobs") == 0


@pytest.mark.parametrize("password", [None, "wrong"])
def test_calls_without_valid_credentials_are_unauthenticated(start_stack, password) -> None:
    handle = start_stack(simulator=FAST)
    if password is None:
        channel = grpc.insecure_channel(handle.stack.orchestrator_address)
        from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

        with channel, pytest.raises(grpc.RpcError) as raw:
            pb_grpc.OrchestratorServiceStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10)
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
        return
    with (
        OrchestratorClient(handle.stack.orchestrator_address, "admin", password) as client,
        pytest.raises(ServiceCallError) as error,
    ):
        list(client.run_job(job_file()))
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid username or password" in error.value.details
    assert password not in str(error.value)
    assert count_rows(handle.database_url, "jobs") == 0


def test_a_file_with_two_jobs_runs_both_each_with_its_own_summary(start_stack) -> None:
    handle = start_stack(simulator=FAST)
    first = json.loads(job_file({"tier1": tier(count=3)}))["jobs"][0]
    second = json.loads(job_file({"tier1": tier(count=2), "tier2": tier(count=4)}, max_workers=2))
    events, last = run_job(handle, json.dumps({"jobs": [first, second["jobs"][0]]}))
    started = [e.job_started for e in events if e.WhichOneof("event") == "job_started"]
    assert [j.max_workers for j in started] == [5, 2]
    # Each job's watch ends with its own summary, from its own records.
    finished = [e for e in events if e.WhichOneof("event") == "run_finished"]
    assert [e.job_id for e in finished] == [j.job_id for j in started]
    for event, requested in zip(finished, (3, 6), strict=True):
        s = event.run_finished.summary
        assert event.run_finished.ok, event.run_finished.error
        assert (s.total_jobs, s.processed_jobs, s.requested_articles) == (1, 1, requested)
        assert s.generated_articles + s.augmented_articles == requested
        assert sum(rows_by_status(handle.database_url, event.job_id).values()) == requested
    assert last.summary.output_dirs[0].endswith(str(started[1].job_id))


def test_rate_limits_are_retried_honouring_retry_after_and_shown(start_stack) -> None:
    # Sequential, so the refused arrivals (every 3rd) are deterministic: a retry never is one.
    handle = start_stack(simulator=SimulatorConfig(rate_limit_every=3))
    events, finished = run_job(handle, job_file({"tier1": tier(count=4)}, max_workers=1))
    stats = handle.stack.simulator.stats()
    assert finished.ok and finished.summary.failed_articles == 0
    assert stats.rate_limited >= 3
    # Refused attempts were sent, and are counted as the endpoint counts them.
    assert finished.summary.api_calls == stats.received == stats.requests + stats.rate_limited
    retries = [a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_RETRYING]
    succeeded = [
        a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_RETRY_SUCCEEDED
    ]
    assert retries and len(succeeded) == len(retries)  # each refusal retried once, then fine
    assert all(a.error == "Rate limit exceeded" and a.retry_delay >= 0.02 for a in retries)
    lines = [line for event in events for line in event_lines(event)]
    assert any("API Error: Rate limit exceeded, retrying in" in line for line in lines)
    assert any(line.endswith("Retry successful") for line in lines)


def test_with_retries_off_a_rate_limit_is_a_recorded_failure(start_stack, monkeypatch) -> None:
    monkeypatch.setenv("LLM_MAX_RETRIES", "0")
    handle = start_stack(simulator=SimulatorConfig(rate_limit_every=3))
    events, finished = run_job(handle, job_file({"tier1": tier(count=4)}, max_workers=1))
    failed = [a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_FAILED]
    assert failed and all(a.error.startswith("RateLimitError:") for a in failed)
    rows = rows_by_status(handle.database_url, job_ids_of(events)[0])
    assert rows.get("failed") == len(failed) and sum(rows.values()) == 4
    assert finished.ok and finished.summary.failed_articles == len(failed)  # the batch went on


def test_articles_start_on_the_first_titles_while_the_rest_are_asked_for(start_stack) -> None:
    """Ordered by events: the simulator answers the first titles call and holds the second
    until released, so an outline request can only come first if titles stream into the pool."""
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    simulator = handle.stack.simulator
    simulator.hold("titles", after=1)  # 30 titles, one call at a time: 25, then 5 held
    try:
        with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
            stream = c.run_job(job_file({"tier1": tier(count=30)}, max_workers=1))
            before_release = []
            for event in stream:
                before_release.append(event)
                kind = event.WhichOneof("event")
                assert kind != "titles_ready", "the titles ended before any article started"
                if kind == "article" and event.article.kind == article_pb.ARTICLE_EVENT_KIND_SAVED:
                    break  # an article was written while the last titles call was held
            assert simulator.stats().by_kind["titles"] == 2
            simulator.release()
            events = before_release + list(stream)
    finally:
        simulator.release()
    finished = events[-1].run_finished
    assert finished.ok, finished.error
    assert finished.summary.generated_articles + finished.summary.augmented_articles == 30
    ready = [e.titles_ready for e in events if e.WhichOneof("event") == "titles_ready"]
    assert [r.count for r in ready] == [30]
    saved = {
        e.article_index
        for e in articles_of(events)
        if e.kind == article_pb.ARTICLE_EVENT_KIND_SAVED
    }
    assert saved == set(range(30))
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    assert len(rows) == 30 and len({r["title"] for r in rows}) == 30


def test_the_next_tier_starts_on_workers_the_tier_before_leaves_free(start_stack) -> None:
    """Ordered by events: the simulator answers the first content call and holds the rest, so a
    tier-2 article can only start while a tier-1 article is still running if the tiers share
    the workers (before, each tier drained to zero before the next one's first article)."""
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    simulator = handle.stack.simulator
    simulator.hold("content", after=1)
    try:
        with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
            stream = c.run_job(
                job_file({"tier1": tier(count=2), "tier2": tier(count=3)}, max_workers=2)
            )
            before_release = []
            for event in stream:
                before_release.append(event)
                kind = event.WhichOneof("event")
                assert kind != "tier_finished", "tier 1 ended before tier 2 started"
                if kind == "article" and event.article.tier == "tier2":
                    break  # a tier-2 article started while a tier-1 article is held
            simulator.release()
            events = before_release + list(stream)
    finally:
        simulator.release()
    finished = events[-1].run_finished
    assert finished.ok, finished.error
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("tier_started") == 2 and kinds.count("tier_finished") == 2
    tier_events = [
        (kind, getattr(e, kind).tier)
        for e, kind in zip(events, kinds, strict=True)
        if kind in ("tier_started", "titles_ready", "tier_finished")
    ]
    assert tier_events.index(("tier_started", "tier2")) > tier_events.index(
        ("titles_ready", "tier1")
    )
    # Each tier's events sit between its tier_started and its tier_finished.
    for name in ("tier1", "tier2"):
        start = events.index(next(e for e in events if e.tier_started.tier == name))
        end = events.index(next(e for e in events if e.tier_finished.tier == name))
        positions = [n for n, e in enumerate(events) if e.article.tier == name]
        assert start < min(positions) and max(positions) < end
        counts = next(e.tier_finished for e in events if e.tier_finished.tier == name)
        assert counts.generated + counts.augmented + counts.short == {"tier1": 2, "tier2": 3}[name]
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    assert len(rows) == 5 and len({r["title"] for r in rows}) == 5  # titles differ across tiers
    assert simulator.stats().peak_in_flight <= 2 + 1  # two articles, and tier 2's titles call
