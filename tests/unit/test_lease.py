"""The generator's side of fencing: JobLease's shared checks, and a batch whose lease is lost
writes nothing more (no model call started for it, no record)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from generator_service.batch import ArticleBatch
from generator_service.calibration import WordTargets
from generator_service.domain import ArticleEvent, EventKind
from generator_service.lease import JobLease
from generator_service.pipeline import ArticlePipeline
from tests.fakes import EventLog, FakeLlm, MemorySaver, batch_context, tasks


class Persistence:
    """CheckLease over one job whose epoch the test raises, counting the checks; a check can be
    held open to let callers pile up behind it."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.checks = 0
        self.release = threading.Event()
        self.release.set()
        self.checking = threading.Event()
        self._lock = threading.Lock()

    def check(self, job_id: int, epoch: int) -> bool:
        with self._lock:
            self.checks += 1
            answer = epoch == self.epoch  # read when the check reaches the database
        self.checking.set()
        self.release.wait(10)
        return answer


def test_callers_waiting_together_share_one_check_made_after_they_asked() -> None:
    persistence = Persistence(epoch=3)
    lease = JobLease(7, 3, persistence.check)
    persistence.release.clear()
    with ThreadPoolExecutor(max_workers=9) as pool:
        first = pool.submit(lease.held)
        assert persistence.checking.wait(10)  # the first check is on its way
        # These ask while it is out: its answer is older than their question, so one more
        # check (made after all of them asked) answers all eight.
        later = [pool.submit(lease.held) for _ in range(8)]
        persistence.epoch = 4  # another orchestrator claims the job meanwhile
        persistence.release.set()
        assert first.result() is True  # the first check began before the claim
        assert [f.result() for f in later] == [False] * 8
    assert persistence.checks == 2
    assert "lease epoch 3 is stale" in lease.lost
    assert lease.held() is False and persistence.checks == 2  # lost stays lost, unasked


def test_a_check_that_cannot_reach_persistence_counts_as_held() -> None:
    def down(job_id: int, epoch: int) -> bool:
        raise ConnectionError("persistence is down")

    assert JobLease(7, 3, down).held() is True


def test_a_batch_whose_lease_is_lost_starts_nothing_more_and_records_nothing() -> None:
    persistence = Persistence(epoch=1)
    llm = FakeLlm()
    saver = MemorySaver(epoch=1)
    log = EventLog()
    context = batch_context(6, max_workers=1)
    context = replace(context, lease_epoch=1)
    written = threading.Event()

    def emit(event: ArticleEvent) -> None:
        log(event)
        if event.kind is EventKind.SAVED and event.index == 1:
            # The orchestrator is frozen past its lease, and another one claims the job.
            persistence.epoch = saver.epoch = 2
            written.set()

    ArticleBatch(
        ArticlePipeline(llm, saver, WordTargets(200)),
        context,
        lease=JobLease(context.job_id, 1, persistence.check),
    ).run(tasks(6), emit)
    assert written.is_set()
    kinds = [e.kind for e in log.terminal()]
    assert kinds == [EventKind.SAVED] * 2 + [EventKind.SKIPPED] * 4
    assert all("another orchestrator holds the job" in e.error for e in log.terminal()[2:])
    assert len(saver.records) == 2
    assert sum(p.startswith("Create an outline") for p in llm.prompts) == 2  # none after


def test_an_article_whose_save_is_refused_as_stale_is_skipped_and_stops_the_batch() -> None:
    # The claim came while article 0 was being written: its save is refused, and nothing
    # starts after it, even though the check before it said the lease was held.
    llm = FakeLlm()
    saver = MemorySaver(epoch=2)
    log = EventLog()
    context = batch_context(4, max_workers=1)
    context = replace(context, lease_epoch=1)
    ArticleBatch(
        ArticlePipeline(llm, saver, WordTargets(200)),
        context,
        lease=JobLease(context.job_id, 1, lambda job_id, epoch: True),
    ).run(tasks(4), log)
    assert [e.kind for e in log.terminal()] == [EventKind.SKIPPED] * 4
    assert saver.records == {}
    assert sum(p.startswith("Create an outline") for p in llm.prompts) == 1
