"""PersistenceSaver: group commit without losing a save's own answer (a fake persistence client)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from generator_service.domain import ArticleRecord
from generator_service.lease import LeaseLostError
from generator_service.saver import ArticleNotSavedError, PersistenceSaver
from tierwriter.persistence.v1 import persistence_service_pb2 as pb
from tierwriter.runtime import CallFailure, ServiceCallError


class FakePersistence:
    """save_articles that records each call's titles; the first call can be held open."""

    def __init__(self, hold_first: bool = False, refuse: str = "", epoch: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.first_call_started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self._refuse = refuse
        self._epoch = epoch  # the job's lease epoch: saves under another are refused
        self._ids = iter(range(1, 1000))

    def save_articles(self, saves: Sequence[pb.SaveArticleRequest]) -> list[pb.SaveArticleResult]:
        self.calls.append([save.article.title for save in saves])
        self.first_call_started.set()
        self.release.wait()
        return [self._result(save) for save in saves]

    def _result(self, save: pb.SaveArticleRequest) -> pb.SaveArticleResult:
        if save.lease_epoch != self._epoch:
            return pb.SaveArticleResult(error="lease epoch is stale", lease_lost=True)
        if save.article.title == self._refuse:
            return pb.SaveArticleResult(error="article.status: bad")
        return pb.SaveArticleResult(article_id=next(self._ids), created=True)


def _record(index: int) -> ArticleRecord:
    return ArticleRecord(
        job_id=1,
        project_id=1,
        tier="tier1",
        article_index=index,
        keyword="k",
        title=f"t{index}",
        status="generated",
    )


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as workers:
        yield workers


def test_saves_that_arrive_during_a_call_go_together_in_the_next(
    pool: ThreadPoolExecutor,
) -> None:
    persistence = FakePersistence(hold_first=True)
    saver = PersistenceSaver(persistence)  # type: ignore[arg-type]
    try:
        first = pool.submit(saver.save, _record(0))
        assert persistence.first_call_started.wait(10)
        rest = [pool.submit(saver.save, _record(i)) for i in range(1, 6)]
        while saver._pending.qsize() < 5:  # all five are queued behind the open call
            threading.Event().wait(0.01)
        persistence.release.set()
        ids = [first.result(10)] + [f.result(10) for f in rest]
    finally:
        saver.close()
    assert persistence.calls[0] == ["t0"]
    assert sorted(persistence.calls[1]) == ["t1", "t2", "t3", "t4", "t5"]
    assert len(persistence.calls) == 2
    assert len({article_id for article_id, _ in ids}) == 6 and all(c for _, c in ids)


def test_a_refused_record_fails_its_own_save_only(pool: ThreadPoolExecutor) -> None:
    saver = PersistenceSaver(FakePersistence(refuse="t2"))  # type: ignore[arg-type]
    try:
        futures = {i: pool.submit(saver.save, _record(i)) for i in range(4)}
        with pytest.raises(ArticleNotSavedError, match=r"article\.status: bad"):
            futures[2].result(10)
        assert all(futures[i].result(10)[1] for i in (0, 1, 3))
    finally:
        saver.close()


def test_when_persistence_fails_every_waiting_save_hears_it(pool: ThreadPoolExecutor) -> None:
    class Broken(FakePersistence):
        def save_articles(
            self, saves: Sequence[tuple[pb.Article, bool]]
        ) -> list[pb.SaveArticleResult]:
            raise RuntimeError("persistence refused the call")

    saver = PersistenceSaver(Broken())  # type: ignore[arg-type]
    try:
        futures = [pool.submit(saver.save, _record(i)) for i in range(3)]
        for future in futures:
            with pytest.raises(RuntimeError, match="refused the call"):
                future.result(10)
    finally:
        saver.close()


def test_a_save_cut_off_by_a_persistence_restart_is_tried_again() -> None:
    # A server that stops cancels the calls it serves: the saver sees CANCELLED, once.
    class Restarting(FakePersistence):
        def save_articles(
            self, saves: Sequence[pb.SaveArticleRequest]
        ) -> list[pb.SaveArticleResult]:
            if not self.calls:
                self.calls.append([])
                stopped = CallFailure(grpc.StatusCode.CANCELLED, "CANCELLED")
                raise ServiceCallError("persistence_service", "persistence:50053", stopped)
            return super().save_articles(saves)

    persistence = Restarting()
    saver = PersistenceSaver(persistence)  # type: ignore[arg-type]
    try:
        assert saver.save(_record(0)) == (1, True)
    finally:
        saver.close()
    assert persistence.calls == [[], ["t0"]]


def test_close_finishes_queued_saves_and_refuses_new_ones() -> None:
    persistence = FakePersistence()
    saver = PersistenceSaver(persistence)  # type: ignore[arg-type]
    assert saver.save(_record(0)) == (1, True)
    saver.close()
    saver.close()  # twice is fine
    with pytest.raises(ArticleNotSavedError, match="shutting down"):
        saver.save(_record(1))
    assert persistence.calls == [["t0"]]


def test_a_save_under_a_stale_lease_epoch_raises_lease_lost_and_the_others_are_stored() -> None:
    saver = PersistenceSaver(FakePersistence(epoch=4))  # type: ignore[arg-type]
    try:
        with pytest.raises(LeaseLostError, match="stale"):
            saver.save(_record(0), lease_epoch=3)
        assert saver.save(_record(1), lease_epoch=4) == (1, True)
    finally:
        saver.close()
