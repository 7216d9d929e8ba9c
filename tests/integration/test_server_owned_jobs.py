"""Jobs belong to the server: a client that leaves cancels nothing, a watcher attaching late or
again sees every event from where it asks, one user's jobs beyond the limit wait queued in
order, and open watch streams never starve the short calls."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from tests.helpers import TIER, job_file, rows_by_status, sql_rows
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.runtime import ServiceCallError


def tier(count: int) -> dict[str, Any]:
    return {**TIER, "count": count, "min_word_count": 300, "max_word_count": 400}


def _utc(value: str | datetime) -> datetime:
    """A time as SQLite (text) or PostgreSQL (datetime) returns it, comparable."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _saved(events: list[pb.JobEvent]) -> list[int]:
    return [
        e.article.article_index
        for e in events
        if e.WhichOneof("event") == "article"
        and e.article.kind == article_pb.ARTICLE_EVENT_KIND_SAVED
    ]


def test_a_client_that_leaves_cancels_nothing_and_a_late_watcher_sees_every_event(
    start_stack,
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.1))
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        [job_id] = client.submit_job(job_file({"tier1": tier(12)}, max_workers=2))
        with client.watch_job(job_id) as stream:
            for event in stream:
                if _saved([event]):
                    break  # the client goes away after the first saved article
        # A watcher that attaches now gets the whole job from its first event to its end.
        events = list(client.watch_job(job_id))
        status = client.get_job(job_id).job.status
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.job_id for e in events} == {job_id}
    assert events[0].WhichOneof("event") == "job_started"
    assert events[-1].WhichOneof("event") == "run_finished" and events[-1].run_finished.ok
    assert sorted(_saved(events)) == list(range(12))
    assert status == JobStatus.JOB_STATUS_COMPLETED
    assert sum(rows_by_status(handle.database_url, job_id).values()) == 12


def test_a_watcher_that_reconnects_gets_exactly_the_events_after_its_last(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        [job_id] = client.submit_job(job_file({"tier1": tier(4)}))
        everything = list(client.watch_job(job_id))
        middle = len(everything) // 2
        rest = list(client.watch_job(job_id, after_seq=everything[middle].seq))
        with pytest.raises(ServiceCallError) as error:
            list(client.watch_job(job_id, after_seq=-1))
    assert rest == everything[middle + 1 :]
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    stored = sql_rows(
        handle.database_url, "SELECT COUNT(*) AS n FROM job_events WHERE job_id = :j", j=job_id
    )
    assert stored[0]["n"] == len(everything)


def test_one_users_jobs_beyond_the_limit_wait_queued_and_run_in_order(start_stack) -> None:
    handle = start_stack(
        simulator=SimulatorConfig(latency=0.05), orchestrator_settings={"jobs_per_user": 1}
    )
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        job_ids = [client.submit_job(job_file({"tier1": tier(3)}))[0] for _ in range(3)]
        statuses = [j.status for j in client.list_jobs() if j.job_id in job_ids[1:]]
        # The third is queued behind the first two whatever the timing: one runs at a time.
        assert JobStatus.JOB_STATUS_QUEUED in statuses
        runs = [list(client.watch_job(job_id)) for job_id in job_ids]
        assert all(run[-1].run_finished.ok for run in runs)
    rows = sql_rows(
        handle.database_url,
        "SELECT j.id, j.finished_at, MIN(e.created_at) AS first_event FROM jobs j "
        "JOIN job_events e ON e.job_id = j.id GROUP BY j.id, j.finished_at ORDER BY j.id",
    )
    # Each job's first event was stored after the job before it had ended: one at a time, in
    # the order submitted.
    for before, after in itertools.pairwise(rows):
        assert _utc(after["first_event"]) >= _utc(before["finished_at"])


def test_cancelling_a_queued_job_ends_it_without_running_it(start_stack) -> None:
    handle = start_stack(
        simulator=SimulatorConfig(latency=0.2), orchestrator_settings={"jobs_per_user": 1}
    )
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        first, second = (client.submit_job(job_file({"tier1": tier(4)}))[0] for _ in range(2))
        assert client.get_job(second).job.status == JobStatus.JOB_STATUS_QUEUED
        assert "was queued: cancelled" in client.cancel_job(second)
        assert list(client.watch_job(second)) == []  # it never ran: nothing happened to it
        list(client.watch_job(first))
        assert client.get_job(second).job.status == JobStatus.JOB_STATUS_CANCELLED
    assert rows_by_status(handle.database_url, second) == {}


WATCHERS = 200
JOBS = 20


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # heavy: once
def test_two_hundred_watch_streams_and_twenty_jobs_leave_every_short_call_answered(
    start_stack,
) -> None:
    """Counts, not timings: every short call made while the watch streams are open answers
    within its normal deadline, and the watch beyond the limit is refused, not queued."""
    handle = start_stack(
        # Jobs that outlast the test by far (100 model calls of 1 s each); it cancels them.
        simulator=SimulatorConfig(latency=1.0),
        orchestrator_settings={"jobs_per_user": 0, "orchestrator_max_watches": WATCHERS},
    )
    address, password = handle.stack.orchestrator_address, handle.password
    with OrchestratorClient(address, "admin", password) as admin:
        token = admin.login("admin", password).token
    # A session token, as a script with many streams would use (no password check per call).
    with OrchestratorClient(address, token=token) as client:
        job_ids = [
            client.submit_job(job_file({"tier1": tier(50)}, max_workers=1))[0] for _ in range(JOBS)
        ]
        opened = threading.Semaphore(0)
        ended: list[int] = []
        lock = threading.Lock()

        def watch(job_id: int) -> None:
            stream = client.watch_job(job_id)
            first = True
            for _ in stream:
                if first:
                    opened.release()
                    first = False
            with lock:
                ended.append(job_id)

        watchers = [
            threading.Thread(target=watch, args=(job_ids[n % JOBS],), daemon=True)
            for n in range(WATCHERS)
        ]
        for thread in watchers:
            thread.start()
        for _ in range(WATCHERS):
            assert opened.acquire(timeout=120), "a watch stream never opened"

        with pytest.raises(ServiceCallError) as refused:
            next(iter(client.watch_job(job_ids[0])))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        answered = 0
        for job_id in job_ids:
            assert client.login("admin", password).token
            assert client.get_job(job_id).job.status in (
                JobStatus.JOB_STATUS_QUEUED,
                JobStatus.JOB_STATUS_RUNNING,
            )
            assert job_id in {j.job_id for j in client.list_jobs()}
            assert "cancel" in client.cancel_job(job_id)
            answered += 4
        assert answered == 4 * JOBS
        for thread in watchers:
            thread.join(120)
        assert len(ended) == WATCHERS
        assert {client.get_job(j).job.status for j in job_ids} == {JobStatus.JOB_STATUS_CANCELLED}


def test_a_submit_retried_with_its_request_id_stores_one_job_and_pays_once(start_stack) -> None:
    # The answer to the first submit was lost; the client sends the same request again.
    handle = start_stack(simulator=SimulatorConfig())
    text = job_file({"tier1": tier(3)})
    address = handle.stack.orchestrator_address
    with OrchestratorClient(address, "admin", handle.password) as client:
        first = client.submit_job(text, request_id="7f1c-retry")
        list(client.watch_jobs(first))  # ran to its end
        calls = handle.stack.simulator.stats().received
        again = client.submit_job(text, request_id="7f1c-retry")
        events = list(client.watch_jobs(again))
        assert again == first and events[-1].run_finished.ok
        assert handle.stack.simulator.stats().received == calls  # no model call was made twice
        assert sql_rows(handle.database_url, "SELECT COUNT(*) AS n FROM jobs") == [{"n": 1}]
        # Without an id, a submit stores new jobs (a file of another project: names are unique).
        assert client.submit_job(job_file({"tier1": tier(1)})) != first
        with pytest.raises(ServiceCallError) as too_long:
            client.submit_job(text, request_id="x" * 101)
        assert too_long.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id: at most 100 characters" in too_long.value.details

    # Another user's request with the same id is theirs, not the admin's.
    with OrchestratorClient(address, "admin", handle.password) as client:
        client.create_user("bob", "bob-password-123", "user")
    with OrchestratorClient(address, "bob", "bob-password-123") as bob:
        assert bob.submit_job(job_file({"tier1": tier(1)}), request_id="7f1c-retry") != first
