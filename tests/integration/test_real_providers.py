"""Real providers, through the real services: the simulator taught to enforce rate limits the way
providers count them, to refuse JSON mode, to answer like a weak model (prose outlines,
markdown titles, shrinking augmentations), to reject a key or not know a model."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import openai
from pydantic import SecretStr

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.cli import watch_and_print
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
    sql_rows,
)
from tierwriter.article.v1 import article_event_pb2 as article_pb


def tier(count: int, **shape: int) -> dict[str, Any]:
    return {**TIER, "count": count, "min_word_count": 300, "max_word_count": 450, **shape}


def console(events: list[Any]) -> str:
    return "\n".join(line for event in events for line in event_lines(event))


def test_a_tokens_per_minute_limit_is_respected_by_us_with_budgets_that_fit(start_stack) -> None:
    # The simulator refuses past 30,000 tokens a minute, counting prompt + max_tokens as
    # OpenAI and llmock do; 8,000 tokens a call, as before, would pass it by the fourth call.
    handle = start_stack(
        simulator=SimulatorConfig(tpm_limit=30_000),
        concurrent_workers=5,
        generator_settings={"llm_tpm_limit": 30_000},
    )
    _events, finished = run_job(handle, job_file({"tier1": tier(10)}))
    assert finished.ok, finished.error
    assert finished.summary.generated_articles + finished.summary.augmented_articles == 10
    stats = handle.stack.simulator.stats()
    assert stats.rate_limited == 0  # never refused: we waited instead
    assert 0 < stats.max_tokens_by_kind["content"] < 1_500  # 450 words + 200, with headroom
    assert stats.max_tokens_by_kind["outline"] <= 1_000


def test_a_requests_per_minute_limit_is_respected_by_us(start_stack) -> None:
    # 60 articles are ~121 requests: the first 100 go at once, the rest wait for the bucket.
    handle = start_stack(
        simulator=SimulatorConfig(rpm_limit=100),
        concurrent_workers=10,
        generator_settings={"llm_rpm_limit": 100},
    )
    _events, finished = run_job(handle, job_file({"tier1": tier(60)}))
    assert finished.ok, finished.error
    assert finished.summary.failed_articles == 0
    stats = handle.stack.simulator.stats()
    assert stats.rate_limited == 0 and stats.requests > 100


def test_429s_halve_the_models_concurrency_and_no_article_fails(start_stack) -> None:
    handle = start_stack(
        simulator=SimulatorConfig(latency=0.02, rate_limit_every=7, rate_limit_retry_after_ms=5),
        concurrent_workers=8,
    )
    events, finished = run_job(handle, job_file({"tier1": tier(24)}))
    assert finished.ok, finished.error
    assert finished.summary.failed_articles == 0
    throttled = [
        a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_THROTTLED
    ]
    cuts = [a for a in throttled if not a.restored]
    assert all(a.model == "gpt-4o-mini" for a in throttled)
    assert cuts and all(1 <= a.concurrency_after < a.concurrency_before for a in cuts)
    assert cuts[0].concurrency_after == cuts[0].concurrency_before // 2
    summary = finished.summary
    [job_id] = job_ids_of(events)
    recorded = sql_rows(
        handle.database_url,
        "SELECT SUM(rate_limited) AS n FROM generated_content WHERE job_id = :j",
        j=job_id,
    )[0]["n"]
    assert summary.rate_limited == recorded >= 1
    assert summary.lowest_concurrency == min(a.concurrency_after for a in cuts)
    text = console(events)
    assert "Rate limited: concurrency of gpt-4o-mini" in text
    assert f"Rate limited:       {summary.rate_limited} times (429)" in text


def test_a_weak_model_gets_parseable_outlines_through_json_mode(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(prose_outlines=True))
    _events, finished = run_job(handle, job_file({"tier1": tier(6)}))
    assert finished.ok and finished.summary.failed_articles == 0
    stats = handle.stack.simulator.stats()
    assert stats.by_kind.get("outline_repair", 0) == 0
    assert stats.response_format_requests == stats.by_kind["outline"] == 6


def test_an_endpoint_that_refuses_json_mode_is_asked_without_it_and_remembered(
    start_stack,
) -> None:
    handle = start_stack(simulator=SimulatorConfig(refuse_response_format=True))
    _events, finished = run_job(handle, job_file({"tier1": tier(8)}, max_workers=1))
    assert finished.ok and finished.summary.failed_articles == 0
    stats = handle.stack.simulator.stats()
    # Once a step (a schema, then JSON mode), then the plain prompt is remembered.
    assert stats.faults["response_format_refused"] == 2
    assert stats.by_kind["outline"] == 8


def test_an_endpoint_that_answers_a_schema_with_500_gets_json_mode_without_a_retry(
    start_stack,
) -> None:
    # llama-cpp-python's server: 500 "Input should be 'text' or 'json_object'" for a schema.
    handle = start_stack(simulator=SimulatorConfig(refuse_json_schema_status=500))
    events, finished = run_job(handle, job_file({"tier1": tier(8)}, max_workers=1))
    assert finished.ok and finished.summary.failed_articles == 0
    stats = handle.stack.simulator.stats()
    assert stats.faults == {"json_schema_refused": 1}  # once, then remembered
    assert stats.response_format_requests == stats.by_kind["outline"] == 8  # JSON mode
    assert stats.by_kind.get("outline_repair", 0) == 0
    retried = [e for e in events if e.article.kind == article_pb.ARTICLE_EVENT_KIND_RETRYING]
    assert retried == []  # no retry was spent on it
    # …but the refused request was sent, and is counted as the endpoint counts it.
    assert finished.summary.api_calls == stats.received == stats.requests + 1
    assert "API calls:          " + f"{stats.received:,}" in console(events)


def test_markdown_titles_and_preambles_never_become_articles(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(markdown_titles=True))
    events, finished = run_job(handle, job_file({"tier1": tier(8)}))
    assert finished.ok
    [job_id] = job_ids_of(events)
    titles = [row["title"] for row in article_rows(handle.database_url, job_id)]
    assert len(titles) == 8
    for title in titles:
        assert 20 <= len(title) <= 120, title
        assert not any(c in title for c in '*{}"') and not title.endswith((":", ".")), title
        assert not title.lower().startswith(("here are", "for our")), title
    ready = next(e.titles_ready for e in events if e.WhichOneof("event") == "titles_ready")
    assert ready.rejected >= 3  # the preamble, the ':' line, the ramble, the braces
    assert "Dropped" in console(events)


def test_augmentations_that_do_not_help_leave_the_article_short_not_augmented(
    start_stack,
) -> None:
    handle = start_stack(simulator=SimulatorConfig(undershoot_mean=500, augment_mode="shrink"))
    events, finished = run_job(handle, job_file({"tier1": tier(4)}))
    [job_id] = job_ids_of(events)
    assert rows_by_status(handle.database_url, job_id) == {"short": 4}
    for row in article_rows(handle.database_url, job_id):
        assert row["word_count"] == row["draft_words"] < 300  # the longest text was kept
    assert finished.summary.short_articles == 4 and finished.summary.augmented_articles == 0
    assert handle.stack.simulator.stats().by_kind["augment"] == 8  # asked twice each
    text = console(events)
    assert "Short:              4" in text and "still below the minimum (short)" in text


def test_an_augmentation_cut_off_every_time_keeps_the_draft_as_short(start_stack) -> None:
    # Every augmentation, and every continuation of it, is cut off at the token limit.
    handle = start_stack(simulator=SimulatorConfig(undershoot_mean=500, augment_mode="truncate"))
    events, finished = run_job(handle, job_file({"tier1": tier(3)}))
    [job_id] = job_ids_of(events)
    assert rows_by_status(handle.database_url, job_id) == {"short": 3}  # never failed
    for row in article_rows(handle.database_url, job_id):
        assert row["word_count"] == row["draft_words"] > 0  # the draft, kept
        assert row["error"].startswith("augmentation failed (TruncatedReplyError: the reply")
    assert finished.summary.short_articles == 3 and finished.summary.failed_articles == 0
    assert "still below the minimum (short): augmentation failed" in console(events)


def test_a_job_whose_first_articles_all_fail_the_same_way_stops_naming_the_cause(
    start_stack,
) -> None:
    # A model that never writes an outline that parses: every article would fail at `outline`.
    handle = start_stack(simulator=SimulatorConfig(garbage_outline_every=1))
    events, finished = run_job(handle, job_file({"tier1": tier(12)}, max_workers=1))
    assert not finished.ok
    assert "the first 5 articles all failed at outline the same way (OutlineError:" in (
        finished.error
    )
    assert handle.stack.simulator.base_url in finished.error  # the endpoint, named
    [job_id] = job_ids_of(events)
    assert rows_by_status(handle.database_url, job_id) == {"failed": 5}  # no more were paid for
    assert handle.stack.simulator.stats().by_kind["outline"] == 5
    job = sql_rows(handle.database_url, "SELECT status FROM jobs WHERE id = :j", j=job_id)
    assert job == [{"status": "failed"}]


def test_a_small_models_outlines_are_cleaned_before_the_article_is_written(start_stack) -> None:
    # Numbered markdown H2s, an H3 repeating its H2 and a sentence as an H3 in every section.
    handle = start_stack(simulator=SimulatorConfig(sloppy_outlines=True))
    events, finished = run_job(handle, job_file({"tier1": tier(4)}))
    assert finished.ok, finished.error
    for row in article_rows(handle.database_url, job_ids_of(events)[0]):
        outline = row["outline"] if isinstance(row["outline"], list) else json.loads(row["outline"])
        headings = [s["h2"] for s in outline] + [h for s in outline for h in s["h3"]]
        assert not any(re.match(r"\d+\.|\*|#", h) or "**" in h for h in headings), headings
        assert all(len(h) <= 100 for h in headings), headings  # no sentence
        assert all(s["h2"].casefold() not in {h.casefold() for h in s["h3"]} for s in outline)
        assert re.findall(r"<h2>(.*?)</h2>", row["content"]) == [s["h2"] for s in outline]


def test_a_rejected_api_key_stops_the_job_at_once_with_a_clear_message(start_stack) -> None:
    handle = start_stack(
        simulator=SimulatorConfig(api_key="sk-the-right-key"),
        generator_settings={"openai_api_key": SecretStr("sk-a-wrong-key-123")},
    )
    events, finished = run_job(handle, job_file({"tier1": tier(10), "tier2": tier(10)}))
    assert not finished.ok
    assert "rejected the API key (401)" in finished.error
    assert handle.stack.simulator.base_url in finished.error
    assert "sk-a-wrong" not in console(events)
    stats = handle.stack.simulator.stats()
    assert stats.faults["unauthorized"] == 1 and stats.requests == 0  # one call, no retry
    [job_id] = job_ids_of(events)
    job = sql_rows(handle.database_url, "SELECT status FROM jobs WHERE id = :j", j=job_id)
    assert job == [{"status": "failed"}]
    assert not any(e.WhichOneof("event") == "article" for e in events)  # tier2 never started
    # The command line says so and exits 1.
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        out = io.StringIO()
        assert watch_and_print(client, client.run_job(job_file({"tier1": tier(2)})), out) == 1
    assert "Error: job " in out.getvalue() and "rejected the API key (401)" in out.getvalue()


def test_a_base_url_nothing_answers_at_stops_the_job(start_stack) -> None:
    handle = start_stack(
        generator_settings={"openai_base_url": "http://127.0.0.1:9/v1", "llm_backoff_seconds": 0.01}
    )
    _events, finished = run_job(handle, job_file({"tier1": tier(5)}))
    assert not finished.ok
    assert "cannot reach the API at http://127.0.0.1:9/v1" in finished.error
    assert "check OPENAI_BASE_URL" in finished.error


def test_an_unknown_model_stops_the_job_and_a_resume_finishes_it(start_stack) -> None:
    simulator = SimulatorConfig(models=["gpt-4o-mini"])
    handle = start_stack(simulator=simulator, concurrent_workers=2)
    models = {"content": "no-such-model"}
    events, finished = run_job(handle, job_file({"tier1": tier(10)}, models=models))
    assert not finished.ok
    assert "model 'no-such-model' was not found" in finished.error
    failed = [a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_FAILED]
    assert 1 <= len(failed) <= 2 and all(a.fatal for a in failed)  # those in flight, no more
    assert any(a.kind == article_pb.ARTICLE_EVENT_KIND_SKIPPED for a in articles_of(events))
    assert handle.stack.simulator.stats().faults["model_not_found"] == len(failed)
    assert "the API cannot serve this job" in console(events)


def test_title_retries_are_shown_on_the_console(start_stack) -> None:
    # Every second request gets a 429. One request of our own goes first, so the job's first,
    # its first titles call, is the second: articles start on the first titles and their calls
    # would otherwise race the second titles call for the 429.
    handle = start_stack(
        simulator=SimulatorConfig(rate_limit_every=2, rate_limit_retry_after_ms=5),
        concurrent_workers=2,
    )
    with openai.OpenAI(base_url=handle.stack.simulator.base_url, api_key="unused") as llm:
        llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    events, _finished = run_job(handle, job_file({"tier1": tier(30)}))
    notices = [e.notice.message for e in events if e.WhichOneof("event") == "notice"]
    assert any(n.startswith("titles: API Error: Rate limit exceeded, retried") for n in notices)
    assert "[tier1] titles: API Error: Rate limit exceeded" in console(events)


def test_a_budget_skips_the_rest_and_a_resume_with_a_higher_one_writes_them(start_stack) -> None:
    handle = start_stack(concurrent_workers=1)
    # gpt-4o-mini prices: an article of ~1,300 tokens in and ~1,100 out costs ~$0.0009.
    job = job_file({"tier1": tier(10), "tier2": tier(5)}, max_cost_usd=0.003)
    events, finished = run_job(handle, job)
    [job_id] = job_ids_of(events)
    assert not finished.ok and "budget" in finished.error
    assert f"tierwriter jobs resume {job_id} --max-cost-usd" in finished.error
    by_status = rows_by_status(handle.database_url, job_id)
    written = by_status.get("generated", 0) + by_status.get("augmented", 0)
    assert 1 <= written < 10 and by_status["skipped"] == 10 - written
    assert f"budget: {by_status['skipped'] + 5} articles not written" in finished.error
    # Articles start on an estimate (the average so far): the last may pass it by its own cost.
    costs = [row["cost_usd"] for row in article_rows(handle.database_url, job_id)]
    assert finished.summary.cost_usd <= 0.003 + max(costs)
    assert finished.summary.skipped_articles == by_status["skipped"]
    # tier2 was not started: its titles would have cost money too.
    assert handle.stack.simulator.stats().by_kind["titles"] == 1
    text = console(events)
    assert "Skipped (budget):" in text and "[tier2] not started: the job's max_cost_usd" in text

    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        resumed = list(client.resume_and_watch(job_id, max_cost_usd=1.0))
        shown = client.get_job(job_id).job
    done = resumed[-1].run_finished
    assert done.ok, done.error
    after = rows_by_status(handle.database_url, job_id)
    assert sum(after.values()) == 15 and "skipped" not in after
    assert done.summary.cost_usd > finished.summary.cost_usd
    assert shown.cost_usd == done.summary.cost_usd and shown.max_cost_usd == 1.0  # kept


def test_word_targets_learned_by_one_job_start_the_next_jobs_of_the_model(start_stack) -> None:
    # This model writes 350 words short of what it is asked: +200 is not enough.
    simulator = SimulatorConfig(undershoot_mean=350, undershoot_jitter=20)
    first = start_stack(simulator=simulator, concurrent_workers=2)
    events, _ = run_job(first, job_file({"tier1": tier(10)}))
    [first_job] = job_ids_of(events)
    asked = [row["asked_words"] for row in article_rows(first.database_url, first_job)]
    assert asked.count(300 + 200) >= 5  # the fixed compensation until 5 drafts came in
    first.stack.stop()

    # A new generator on the same database starts from what the first one learned.
    second = start_stack(simulator=simulator, concurrent_workers=2)
    events, finished = run_job(second, job_file({"tier1": tier(10)}))
    [job_id] = job_ids_of(events)
    rows = article_rows(second.database_url, job_id)
    assert all(row["asked_words"] > 600 for row in rows)  # ~375 wanted + ~350 short
    assert all(300 <= row["draft_words"] <= 450 for row in rows)
    assert finished.summary.augmented_articles == 0
