"""ArticleBatch: exact concurrency, sequential mode, failure isolation, continue_on_error."""

import threading
from dataclasses import replace

from generator_service.batch import ArticleBatch
from generator_service.calibration import WordTargets
from generator_service.domain import ArticleEvent, EventKind
from generator_service.pipeline import ArticlePipeline
from tests.fakes import EventLog, FakeLlm, MemorySaver, batch_context, tasks


def test_exactly_max_workers_articles_are_in_flight() -> None:
    # Each call waits until 5 are in flight, so a peak below 5 would show as a timeout-made 4.
    llm = FakeLlm(gather=5, gather_timeout=10)
    ArticleBatch(
        ArticlePipeline(llm, MemorySaver(), WordTargets(200)), batch_context(10, max_workers=5)
    ).run(tasks(10), EventLog())
    assert llm.peak == 5


def test_sequential_fallback_max_workers_1() -> None:
    llm, log = FakeLlm(delay=0.01, gather=2, gather_timeout=0.05), EventLog()
    ArticleBatch(
        ArticlePipeline(llm, MemorySaver(), WordTargets(200)), batch_context(6, max_workers=1)
    ).run(tasks(6), log)
    assert llm.peak == 1
    # Strictly one after the other: each article's events end before the next one's start.
    order = [e.index for e in log.events]
    assert order == sorted(order)


def test_one_article_exception_does_not_disturb_the_others() -> None:
    llm = FakeLlm(fail_when=lambda p: '"Title 4"' in p)
    saver, log = MemorySaver(), EventLog()
    ArticleBatch(ArticlePipeline(llm, saver, WordTargets(200)), batch_context(10)).run(
        tasks(10), log
    )
    terminal = {e.index: e for e in log.terminal()}
    assert len(terminal) == 10 and len(log.terminal()) == 10
    assert terminal[4].kind is EventKind.FAILED
    assert all(terminal[i].kind is EventKind.SAVED for i in range(10) if i != 4)
    assert len(saver.records) == 10


def test_without_continue_on_error_no_article_starts_after_a_failure() -> None:
    llm = FakeLlm(fail_when=lambda p: '"Title 0"' in p)
    saver, log = MemorySaver(), EventLog()
    ArticleBatch(
        ArticlePipeline(llm, saver, WordTargets(200)),
        batch_context(10, max_workers=1, continue_on_error=False),
    ).run(tasks(10), log)
    kinds = [e.kind for e in log.terminal()]
    assert kinds == [EventKind.FAILED] + [EventKind.SKIPPED] * 9
    assert len(saver.records) == 1  # skipped articles have no record; a resume can pick them up
    assert "continue_on_error is false" in log.terminal()[1].error


def test_in_flight_articles_finish_after_a_failure() -> None:
    # Article 0 fails while 1-4 are in flight: those four still finish and are recorded, and
    # nothing new starts. The others' calls wait until the failure is out, so the test does not
    # depend on which thread the scheduler runs first.
    failure_seen = threading.Event()

    def fail_first_hold_others(prompt: str) -> bool:
        if '"Title 0"' in prompt:
            return True
        return not failure_seen.wait(10) and False

    llm = FakeLlm(gather=5, gather_timeout=10, fail_when=fail_first_hold_others)
    saver, log = MemorySaver(), EventLog()

    def emit(event: ArticleEvent) -> None:
        log(event)
        if event.kind is EventKind.FAILED:
            failure_seen.set()

    ArticleBatch(
        ArticlePipeline(llm, saver, WordTargets(200)),
        batch_context(10, max_workers=5, continue_on_error=False),
    ).run(tasks(10), emit)
    by_index = {e.index: e.kind for e in log.terminal()}
    assert by_index[0] is EventKind.FAILED
    assert all(by_index[i] is EventKind.SAVED for i in range(1, 5))
    assert all(by_index[i] is EventKind.SKIPPED for i in range(5, 10))
    assert len(saver.records) == 5


def test_stop_starts_no_new_article() -> None:
    release = threading.Event()
    llm = FakeLlm(fail_when=lambda p: not release.wait(10) and False)
    batch = ArticleBatch(
        ArticlePipeline(llm, MemorySaver(), WordTargets(200)), batch_context(10, max_workers=2)
    )
    log = EventLog()
    runner = threading.Thread(target=batch.run, args=(tasks(10), log))
    runner.start()
    batch.stop("not started: cancelled by the test")
    release.set()
    runner.join(10)
    kinds = [e.kind for e in log.terminal()]
    assert len(kinds) == 10
    assert kinds.count(EventKind.SAVED) <= 2 and kinds.count(EventKind.SKIPPED) >= 8


def test_tiers_of_one_batch_share_its_workers_each_article_with_its_own_tier() -> None:
    # Five of each tier, gathered five at a time: the peak stays at max_workers across both.
    llm = FakeLlm(gather=5, gather_timeout=10)
    saver, log = MemorySaver(), EventLog()
    first = batch_context(5, max_workers=5)
    second = replace(first, tier=replace(first.tier, name="tier2", min_h2=1, max_h2=1))
    both = tasks(5) + [replace(t, tier="tier2") for t in tasks(5)]
    ArticleBatch(ArticlePipeline(llm, saver, WordTargets(200)), first, [second]).run(both, log)
    assert llm.peak == 5
    assert sorted((e.tier, e.index) for e in log.terminal()) == sorted(
        (tier, i) for tier in ("tier1", "tier2") for i in range(5)
    )
    # Each article was written to its own tier's shape: tier 2's outlines have one H2.
    h2s = {(tier, i): len(r.outline or []) for (_, tier, i), r in saver.records.items()}
    assert len(h2s) == 10
    assert all(2 <= h2s["tier1", i] <= 4 and h2s["tier2", i] == 1 for i in range(5))
