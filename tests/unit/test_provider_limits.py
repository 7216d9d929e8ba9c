"""Real providers, in units: token budgets, rate buckets, AIMD concurrency, prices, learned word
targets, JSON-mode fallback and the fatal API errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from generator_service.calibration import MIN_SAMPLES, WordTargets
from generator_service.llm import Completion
from generator_service.llm.budget import content_tokens, outline_tokens, titles_tokens
from generator_service.llm.client import EndpointUnreachableError, FatalApiError, OpenAiLlm
from generator_service.llm.limits import (
    PACING,
    AdaptiveConcurrency,
    ModelLimits,
    ProviderGate,
    RequestTooLargeError,
    SharedBucket,
    TokenBucket,
)
from generator_service.llm.pricing import PricesFileError, PriceTable
from generator_service.llm.retry import RetryingLlm, RetryPolicy
from tests.unit.test_retry import Sleeps, status_error


class FakeClock:
    """Time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budgets_fit_what_the_call_asks_for() -> None:
    # A 1,700-word article needs ~3,000 tokens, far below the 8,000 every call used to ask.
    assert 2_500 <= content_tokens(1_700) <= 3_200
    assert content_tokens(1_700) > 1_700 * 4 // 3  # the simulator's and GPT's tokens per word
    assert outline_tokens(5, 10) <= 1_000 and titles_tokens(25) <= 1_200


def test_a_bucket_lets_a_minutes_limit_out_then_paces_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock)  # holds 98, refills 98 a minute
    assert [bucket.reserve(1) for _ in range(98)] == [0.0] * 98
    assert bucket.reserve(1) == pytest.approx(60 / 98)
    assert bucket.reserve(1) == pytest.approx(2 * 60 / 98)  # reservations queue in order
    clock.now += 10
    assert bucket.reserve(1) == 0.0  # ten seconds refilled ~16, two were owed


def test_a_call_larger_than_the_whole_limit_is_refused_at_once() -> None:
    with pytest.raises(RequestTooLargeError, match="more than the limit of 1,000 a minute"):
        TokenBucket(1000, FakeClock()).reserve(981)


def test_the_gate_waits_as_long_as_the_fuller_bucket_needs() -> None:
    clock, sleeps = FakeClock(), Sleeps()
    gate = ProviderGate(ModelLimits(rpm=600, tpm=6_000), clock=clock, sleep=sleeps)
    for _ in range(4):  # 1,960 tokens each: the bucket holds 5,880; the fourth waits for 1,960
        gate.leave(gate.enter("m", 1_960), rate_limited=False)
    assert sleeps.waits == [pytest.approx(1_960 / (6_000 * PACING / 60))]


def test_a_429_halves_concurrency_once_per_round_and_successes_restore_it() -> None:
    aimd = AdaptiveConcurrency("m")
    tickets = [aimd.enter() for _ in range(8)]
    first = aimd.leave(tickets[0], rate_limited=True)
    assert first is not None and (first.before, first.after) == (8, 4)
    # The other 429s of the same round started before the cut: they say nothing new.
    assert aimd.leave(tickets[1], rate_limited=True) is None
    for ticket in tickets[2:]:
        assert aimd.leave(ticket, rate_limited=False) is None
    assert aimd.limit == 5  # four successes at limit 4 grew it by one
    changes = []
    for _ in range(40):
        change = aimd.leave(aimd.enter(), rate_limited=False)
        if change:
            changes.append(change)
    assert [(c.before, c.after, c.restored) for c in changes] == [(7, 8, True)]
    assert aimd.limit is None


def test_a_throttled_model_never_has_more_calls_in_flight_than_its_limit() -> None:
    aimd = AdaptiveConcurrency("m")
    held = [aimd.enter() for _ in range(4)]
    aimd.leave(held.pop(), rate_limited=True)  # 4 → 2, with 3 still in flight
    assert aimd.try_enter() is None
    aimd.leave(held.pop(), rate_limited=False)
    assert aimd.try_enter() is None  # 2 in flight: still full
    aimd.leave(held.pop(), rate_limited=False)
    assert aimd.try_enter() is not None  # 1 in flight: room


def test_a_call_waiting_for_the_bucket_holds_its_concurrency_slot() -> None:
    # Calls a throttle held back go out at the buckets' pace, not all at once when it lifts.
    clock, sleeps = FakeClock(), Sleeps()
    gate = ProviderGate(ModelLimits(rpm=100), clock=clock, sleep=sleeps)
    for _ in range(98):
        gate.leave(gate.enter("m", 1), rate_limited=False)
    ticket = gate.enter("m", 1)  # waits for the bucket
    assert sleeps.waits == [pytest.approx(60 / 98)]
    assert gate._gate("m").concurrency.try_enter() is not None  # unthrottled: room
    gate.leave(ticket, rate_limited=False)


def test_prices_by_name_provider_prefix_and_dated_variant(tmp_path: Any) -> None:
    table = PriceTable()
    assert table.cost("gpt-4o", 1_000_000, 0) == pytest.approx(2.50)
    assert table.price("openai/gpt-4o-mini") == table.price("gpt-4o-mini")
    assert table.price("gpt-4o-mini-2024-07-18") == table.price("gpt-4o-mini")
    assert table.cost("my-local-model", 10**6, 10**6) == 0.0
    prices = tmp_path / "prices.json"
    prices.write_text('{"my-local-model": {"input": 1, "output": 2}}')
    assert PriceTable.with_file(str(prices)).cost("my-local-model", 10**6, 10**6) == 3.0
    prices.write_text('{"m": {"input": -1, "output": 2}}')
    with pytest.raises(PricesFileError, match=r"m\.input"):
        PriceTable.with_file(str(prices))


def test_word_targets_start_from_the_compensation_then_learn_the_model() -> None:
    targets = WordTargets(200)
    first = targets.request("m", 1000, 1500)
    assert (first.low, first.high, first.learned_shortfall) == (1200, 1700, None)
    for _ in range(MIN_SAMPLES):  # this model writes 350 words short of the lower bound
        targets.observe("m", 1200, 850)
    learned = targets.request("m", 1000, 1500)
    assert learned.learned_shortfall == 350
    # Asked so that 350 short lands in the middle of the range: 1,250 + 350.
    assert (learned.low, learned.high) == (1600, 2100)
    assert targets.request("other", 1000, 1500).learned_shortfall is None  # per model


def test_a_model_that_writes_a_share_of_what_it_is_asked_is_closed_in_on_per_tier() -> None:
    # 80% of the lower bound asked: short by more words on a longer tier. Two tiers in turn.
    targets = WordTargets(200)
    misses: dict[tuple[int, int], list[int]] = {(1000, 1500): [], (300, 450): []}
    for _ in range(15):
        for (low, high), missed in misses.items():
            asked = targets.request("m", low, high).low
            delivered = round(asked * 0.8)
            targets.observe("m", asked, delivered)
            missed.append(abs(delivered - (low + high) // 2))
    for missed in misses.values():
        assert missed[-1] <= 10 < missed[0]


def test_word_targets_are_seeded_from_the_history_once() -> None:
    reads: list[str] = []

    def history(model: str, limit: int) -> list[tuple[int, int]]:
        reads.append(model)
        return [(1000, 1100)] * 10  # a model that writes 100 words over

    targets = WordTargets(200, history)
    for _ in range(3):
        assert targets.request("m", 800, 1200).low == 1000 - 100
    assert reads == ["m"]


@dataclass
class ScriptedCalls:
    """Raises or answers by script; records what each call asked with."""

    script: list[BaseException | None]
    asked: list[dict[str, Any]] = field(default_factory=list)

    def complete(self, **kwargs: Any) -> Completion:
        self.asked.append(kwargs)
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step
        return Completion("{}", 1, 1, "stop")


def test_an_endpoint_refusing_a_schema_is_asked_in_json_mode_and_remembered() -> None:
    inner = ScriptedCalls([status_error(400)])
    llm = RetryingLlm(inner, RetryPolicy(attempts=1), Sleeps())
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    for _ in range(2):
        llm.complete(
            model="m", system="s", prompt="p", max_tokens=10, temperature=0, response_format=schema
        )
    json_mode = {"type": "json_object"}
    assert [a["response_format"] for a in inner.asked] == [schema, json_mode, json_mode]


def test_max_tokens_are_capped_per_model() -> None:
    inner = ScriptedCalls([])
    gate = ProviderGate(ModelLimits(max_output_tokens=4096), {"big": ModelLimits()})
    llm = RetryingLlm(inner, RetryPolicy(attempts=1), Sleeps(), gate)
    for model in ("m", "big"):
        llm.complete(model=model, system="s", prompt="p", max_tokens=6000, temperature=0)
    assert [a["max_tokens"] for a in inner.asked] == [4096, 6000]


def test_a_429_through_the_gate_reports_the_concurrency_change() -> None:
    inner = ScriptedCalls([status_error(429)])
    gate = ProviderGate()
    changes: list[Any] = []
    llm = RetryingLlm(inner, RetryPolicy(attempts=1), Sleeps(), gate)
    # Three calls of the model are in flight elsewhere, so the 429 meets four.
    others = [gate.enter("m", 1) for _ in range(3)]
    with pytest.raises(openai.RateLimitError):
        llm.complete(
            model="m",
            system="s",
            prompt="p",
            max_tokens=10,
            temperature=0,
            on_throttle=changes.append,
        )
    assert [(c.before, c.after) for c in changes] == [(4, 2)]
    assert gate.concurrency_limit("m") == 2
    for ticket in others:
        gate.leave(ticket, rate_limited=False)


@pytest.mark.parametrize(
    "status, words",
    [
        (401, "rejected the API key (401): check OPENAI_API_KEY"),
        (403, "refused access to model 'm' (403)"),
        (404, "model 'm' was not found at http://127.0.0.1:9/v1 (404)"),
    ],
)
def test_key_and_model_errors_are_fatal_and_name_the_endpoint(status: int, words: str) -> None:
    llm = OpenAiLlm("http://127.0.0.1:9/v1", "sk-secret-key", 1.0)
    error = status_error(status)
    fatal = llm._fatal(error, "m")  # the mapping, without a server
    assert fatal is not None and words in str(fatal) and "sk-secret" not in str(fatal)
    assert llm._fatal(status_error(400), "m") is None
    llm.close()


def test_an_endpoint_never_reached_is_fatal_once_the_retries_are_spent() -> None:
    # Port 9 (discard) is closed on loopback: connection refused, at once.
    sleeps = Sleeps()
    inner = OpenAiLlm("http://user:secret@127.0.0.1:9/v1?key=k", "k", 2.0)
    llm = RetryingLlm(inner, RetryPolicy(attempts=3), sleeps)
    with pytest.raises(EndpointUnreachableError) as e:
        llm.complete(model="m", system="s", prompt="p", max_tokens=10, temperature=0)
    assert str(e.value).startswith("cannot reach the API at http://127.0.0.1:9/v1 (")
    assert "secret" not in str(e.value) and "key=" not in str(e.value)
    assert len(sleeps.waits) == 2  # retried like any lost connection first
    inner.close()


def test_a_prompt_that_alone_passes_the_tokens_per_minute_limit_is_fatal() -> None:
    llm = RetryingLlm(
        ScriptedCalls([]), RetryPolicy(), Sleeps(), ProviderGate(ModelLimits(tpm=500))
    )
    with pytest.raises(FatalApiError, match=r"leaves no room for a reply within its limit of 500"):
        llm.complete(model="m", system="s", prompt="x" * 2000, max_tokens=100, temperature=0)


def test_budgets_shrink_to_fit_a_tokens_per_minute_limit() -> None:
    inner = ScriptedCalls([])
    llm = RetryingLlm(inner, RetryPolicy(), Sleeps(), ProviderGate(ModelLimits(tpm=3000)))
    llm.complete(model="m", system="s", prompt="x" * 300, max_tokens=8000, temperature=0)
    assert inner.asked[0]["max_tokens"] == 3000 * PACING - (300 + 1 + 2) // 3 - 16


class FakeSharedStore:
    """persistence's ReserveRate over one bucket per name, on a fake clock; can be 'down'."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down = False
        self.levels: dict[str, tuple[float, float]] = {}  # name: (level, updated)
        self.holders: dict[str, set[str]] = {}

    def reserve(
        self, name: str, per_minute: float, amount: float, holder: str
    ) -> tuple[float, int]:
        if self.down:
            raise ConnectionError("persistence is down")
        level, updated = self.levels.get(name, (per_minute, self.clock.now))
        level = min(per_minute, level + (self.clock.now - updated) * per_minute / 60) - amount
        self.levels[name] = (level, self.clock.now)
        if holder:
            self.holders.setdefault(name, set()).add(holder)
        return max(0.0, -level / (per_minute / 60)), len(
            self.holders.get(name, ())
        ) if holder else 0


def test_generators_sharing_a_bucket_together_get_one_limit() -> None:
    clock = FakeClock()
    store = FakeSharedStore(clock)
    a, b = (SharedBucket("m rpm", 100, store.reserve, who, clock=clock) for who in "ab")
    # The bucket holds 98: between them, the two get 98 at once, not 98 each.
    waits = [bucket.reserve(1) for _ in range(49) for bucket in (a, b)]
    assert waits == [0.0] * 98
    assert b.reserve(1) == pytest.approx(60 / (100 * PACING))
    assert a.holders == 2 or b.holders == 2
    with pytest.raises(RequestTooLargeError):
        a.reserve(99)


def test_a_generator_that_cannot_reach_the_shared_bucket_keeps_to_its_share() -> None:
    clock = FakeClock()
    store = FakeSharedStore(clock)
    buckets = [SharedBucket("m rpm", 60, store.reserve, who, clock=clock) for who in "abc"]
    for bucket in buckets:
        bucket.reserve(1)  # each says it draws on the bucket: 3 holders
    store.down = True
    a = buckets[2]
    # Its share: 60/3 a minute, started empty (no burst at the switch): one every 3 s or so.
    first = a.reserve(1)
    assert first == pytest.approx(60 / (20 * PACING))
    assert a.reserve(1) == pytest.approx(2 * 60 / (20 * PACING))
    store.down = False
    clock.now += 11  # after a while it asks the shared bucket again, and is back on it
    assert a.reserve(1) == 0.0


def test_what_a_cut_off_generator_spent_is_taken_from_the_shared_bucket_once_it_answers() -> None:
    clock = FakeClock()
    store = FakeSharedStore(clock)
    a, b = (SharedBucket("m rpm", 60, store.reserve, who, clock=clock) for who in "ab")
    a.reserve(1)
    b.reserve(1)
    store.down = True
    for _ in range(5):
        clock.now += 3.5  # a steady trickle on its share (30 a minute) for 17.5 s
        a.reserve(1)
    store.down = False
    clock.now += 11  # it asks the shared bucket again
    # The shared bucket refilled to full meanwhile, but the provider saw 5 requests it did not:
    # they are taken from it now, so its level is the provider's (a fuller one would let a
    # burst through to 429s), and only once.
    full = 60 * PACING
    a.reserve(1)
    assert store.levels["m rpm"][0] == pytest.approx(full - 6)
    assert a.reserve(1) == 0.0 and store.levels["m rpm"][0] == pytest.approx(full - 7)


def test_a_cut_off_generator_still_takes_a_call_bigger_than_its_share_and_waits_for_it() -> None:
    clock = FakeClock()
    store = FakeSharedStore(clock)
    store.down = True
    tokens = SharedBucket("m tpm", 30_000, store.reserve, "a", assumed_holders=4, clock=clock)
    # Its share is 7,500 tokens a minute; an 8,000-token call is the account's to make, paced.
    assert tokens.reserve(8_000) == pytest.approx(8_000 / (7_500 * PACING / 60))


def test_before_it_knows_the_holders_a_cut_off_generator_assumes_several() -> None:
    clock = FakeClock()
    store = FakeSharedStore(clock)
    store.down = True
    bucket = SharedBucket("m rpm", 60, store.reserve, "a", assumed_holders=4, clock=clock)
    assert bucket.reserve(1) == pytest.approx(60 / (15 * PACING))  # 60/4 a minute
