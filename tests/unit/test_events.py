"""A job's event log: numbered, stored in batches, and in memory only as far as watchers need."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from orchestrator_service import events
from orchestrator_service.events import JobEventLog, watch
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb


@dataclass
class _Database:
    """The job_events table of one job, as persistence answers for it."""

    rows: dict[int, bytes] = field(default_factory=dict)
    status: JobStatus.ValueType = JobStatus.JOB_STATUS_RUNNING
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, _job_id: int, batch: Sequence[tuple[int, bytes]]) -> None:
        with self.lock:
            self.rows.update(batch)

    def list_events(self, _job_id: int, after_seq: int) -> db_pb.ListJobEventsResponse:
        with self.lock:
            stored = sorted((seq, payload) for seq, payload in self.rows.items() if seq > after_seq)
        return db_pb.ListJobEventsResponse(
            events=[db_pb.JobEventRecord(seq=s, payload=p) for s, p in stored[:5]],
            status=self.status,
        )


def _notice(number: int) -> pb.JobEvent:
    return pb.JobEvent(notice=pb.Notice(message=f"event {number}"))


def test_a_long_job_keeps_only_recent_events_in_memory_and_watchers_miss_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "KEPT_STORED_EVENTS", 3)
    monkeypatch.setattr(events, "FLUSH_SECONDS", 0.0)
    database = _Database()
    log = JobEventLog(7, first_seq=0, store=database.store)
    for number in range(1, 21):
        log.emit(_notice(number))
    log.end()  # every event stored

    assert sorted(database.rows) == list(range(1, 21))
    assert log.read(0, timeout=0) is None  # dropped from memory: the database has them
    recent = log.read(18, timeout=0)
    assert recent is not None and [e.seq for e in recent[0]] == [19, 20]

    database.status = JobStatus.JOB_STATUS_COMPLETED
    log.close()
    seen = list(watch(7, 0, database, lambda _job_id: log, lambda: True))  # type: ignore[arg-type]
    assert [e.seq for e in seen] == list(range(1, 21))
    assert [e.notice.message for e in seen] == [f"event {n}" for n in range(1, 21)]
