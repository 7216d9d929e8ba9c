"""Provider limits, enforced by us rather than discovered by failing (invariant 9).

Per model:
- token buckets for requests and tokens per minute, counted the way providers count them (one
  request; prompt tokens + max_tokens), so a provider with the same limits never refuses us.
  The limits are the account's: the buckets are shared by every generator on the database
  (SharedBucket, through persistence), so N replicas together stay within one limit, and a
  replica that cannot reach persistence falls back to its share of it rather than to none;
- adaptive concurrency (AIMD), per generator: a 429 halves the calls in flight for the model,
  each round of successes adds one back, until it is where it was before the first 429.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class ModelLimits:
    """What a provider allows one model (0: no limit)."""

    rpm: int = 0  # requests per minute
    tpm: int = 0  # tokens per minute, prompt + max_tokens
    max_output_tokens: int = 8192  # the most max_tokens any call asks for


class RequestTooLargeError(ValueError):
    """One call needs more tokens than the model's whole per-minute limit: it can never go."""


# Our buckets hold and refill this share of the limit: at exactly the provider's size and rate,
# the provider's bucket is as empty as ours, and requests that arrive closer together than they
# left (threads, the network) are refused; the slack absorbs that.
PACING = 0.98


class Bucket(Protocol):
    """Takes what a call costs and says how long to wait before it goes."""

    def reserve(self, amount: float) -> float: ...


class TokenBucket:
    """A continuously refilling bucket, full at start, holding one minute's limit: the shape
    OpenAI and PyPI's llmock enforce. Ours never holds more than the provider's (a little
    smaller, a little slower, started later), so what it lets out the provider accepts."""

    def __init__(
        self,
        per_minute: float,
        clock: Clock = time.monotonic,
        start_empty: bool = False,
        largest: float | None = None,
    ) -> None:
        self.limit = per_minute
        self.capacity = per_minute * PACING
        # The largest call it takes (the rest of it is waited for); a share of a bigger limit
        # takes that limit's calls.
        self.largest = self.capacity if largest is None else largest
        self._rate = per_minute / 60.0 * PACING
        self._clock = clock
        self._level = 0.0 if start_empty else self.capacity
        self._updated = clock()
        self._lock = threading.Lock()

    def reserve(self, amount: float) -> float:
        """Take `amount` now and return the seconds to wait before using it. Reservations may
        run the bucket into debt; later ones wait longer, so callers go out in order."""
        if amount > self.largest:
            raise RequestTooLargeError(
                f"a call needs {amount:,.0f}, more than the limit of {self.limit:,} a minute "
                f"allows at once ({PACING:.0%} of it)"
            )
        with self._lock:
            now = self._clock()
            self._level = min(self.capacity, self._level + (now - self._updated) * self._rate)
            self._updated = now
            self._level -= amount
            return max(0.0, -self._level / self._rate)


# Takes `amount` from the shared bucket `name` of `per_minute`, for `holder` (a generator's id,
# or "" not to be counted): (seconds to wait, generators drawing on it; 0 when not counted).
Reserve = Callable[[str, float, float, str], tuple[float, int]]

# How often a generator says it draws on a bucket (so the others' count of holders is fresh).
HOLDER_REFRESH_SECONDS = 10.0
# After the shared bucket could not be reached, how long the local share is used before it is
# asked again (each try of an unreachable persistence costs the call its deadline).
FALLBACK_SECONDS = 10.0


class SharedBucket:
    """One limit of the account, shared by every generator: each call's cost is taken from one
    bucket in the database (through persistence), timed by the database's clock, so the
    generators together let out what one bucket would. When persistence cannot be reached, the
    generator falls back to a bucket of its own holding its share of the limit (the limit over
    the generators that drew on it in the last minute, or `assumed_holders` before it knew),
    started empty so that the switch adds no burst. What it spent meanwhile reached the
    provider but not the shared bucket: it is taken from the shared bucket once that answers
    (as part of the next reservations), so the shared bucket is not fuller than the provider's."""

    def __init__(
        self,
        name: str,
        per_minute: float,
        reserve: Reserve,
        holder: str,
        assumed_holders: int = 4,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.limit = per_minute
        self.capacity = per_minute * PACING
        self._reserve = reserve
        self._holder = holder
        self._clock = clock
        self._lock = threading.Lock()
        self.holders = 0  # generators drawing on it, as persistence last said; 0: not known
        self._assumed = max(1, assumed_holders)
        self._said_at = float("-inf")  # when we last told persistence we draw on it
        self._fallback: TokenBucket | None = None
        self._fallback_until = float("-inf")
        self._owed = 0.0  # spent on the local share, not yet taken from the shared bucket

    def reserve(self, amount: float) -> float:
        if amount > self.capacity:
            raise RequestTooLargeError(
                f"a call needs {amount:,.0f}, more than the limit of {self.limit:,.0f} a minute "
                f"allows at once ({PACING:.0%} of it)"
            )
        now = self._clock()
        with self._lock:
            local = self._fallback if now < self._fallback_until else None
            say = now - self._said_at >= HOLDER_REFRESH_SECONDS
            if say:
                self._said_at = now
        if local is None:
            with self._lock:  # a reservation holds at most the bucket: the rest waits its turn
                paid = min(self._owed, self.capacity - amount)
                self._owed -= paid
            try:
                wait, holders = self._reserve(
                    self.name, self.capacity, amount + paid, self._holder if say else ""
                )
            except Exception as e:  # persistence away: our share, not no limit
                with self._lock:
                    self._owed += paid
                local = self._fall_back(e, now)
            else:
                with self._lock:
                    if holders:
                        self.holders = holders
                    self._fallback = None
                return wait
        wait = local.reserve(amount)
        with self._lock:
            self._owed += amount
        return wait

    def _fall_back(self, error: Exception, now: float) -> TokenBucket:
        with self._lock:
            share = self.holders or self._assumed
            if self._fallback is None:
                log.warning(
                    "%s: the shared limit cannot be reached (%s): using this generator's share, "
                    "1/%d of it, until it can", self.name, error, share,
                )  # fmt: skip
                self._fallback = TokenBucket(
                    self.limit / share, self._clock, start_empty=True, largest=self.capacity
                )
            self._fallback_until = now + FALLBACK_SECONDS
            self._said_at = float("-inf")  # say so again once it answers
            return self._fallback


# Makes the bucket of one limit ("rpm" or "tpm") of one model.
BucketFactory = Callable[[str, str, int], Bucket]


def local_buckets(clock: Clock = time.monotonic) -> BucketFactory:
    """Buckets of this process only (tests, and a generator told to keep its limits to itself)."""
    return lambda _model, _kind, per_minute: TokenBucket(per_minute, clock)


@dataclass(frozen=True)
class ConcurrencyChange:
    """The model's concurrency moved: halved after a 429, or back to where it was."""

    model: str
    before: int
    after: int
    restored: bool = False  # True once the throttle is lifted again


@dataclass
class _Ticket:
    epoch: int  # the throttle's epoch when the call started


class AdaptiveConcurrency:
    """AIMD on one model's calls in flight. Unlimited until a 429; then the limit is half the
    calls in flight (never below 1), at most once per epoch (429s of calls that started before
    the last cut say nothing new); after `limit` successes it grows by one, and at the level it
    had before the first cut the throttle is lifted. The jobs' own worker counts stay the cap."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._cond = threading.Condition()
        self._limit: int | None = None  # None: not throttled
        self._ceiling = 0  # calls in flight when the throttle first engaged
        self._in_flight = 0
        self._epoch = 0
        self._successes = 0

    @property
    def limit(self) -> int | None:
        with self._cond:
            return self._limit

    def enter(self) -> _Ticket:
        """Wait for a free slot under the current limit and take it."""
        with self._cond:
            while self._full():
                self._cond.wait()
            self._in_flight += 1
            return _Ticket(self._epoch)

    def try_enter(self) -> _Ticket | None:
        """A slot if one is free now, else None."""
        with self._cond:
            if self._full():
                return None
            self._in_flight += 1
            return _Ticket(self._epoch)

    def _full(self) -> bool:
        return self._limit is not None and self._in_flight >= self._limit

    def abandon(self, ticket: _Ticket) -> None:
        """Give a slot back whose call never went out (it says nothing about the provider)."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def leave(self, ticket: _Ticket, rate_limited: bool) -> ConcurrencyChange | None:
        """Give the slot back, saying whether the call got a 429; returns a change, if any."""
        with self._cond:
            change = None
            before = self._limit if self._limit is not None else self._in_flight
            if rate_limited and ticket.epoch == self._epoch and before > 1:
                if self._limit is None:
                    self._ceiling = self._in_flight
                self._limit = max(1, before // 2)
                self._epoch += 1
                self._successes = 0
                change = ConcurrencyChange(self._model, before, self._limit)
            elif not rate_limited and self._limit is not None:
                self._successes += 1
                if self._successes >= self._limit:
                    self._successes = 0
                    self._limit += 1
                    if self._limit >= self._ceiling:
                        before = self._limit - 1
                        change = ConcurrencyChange(self._model, before, self._ceiling, True)
                        self._limit = None
            self._in_flight -= 1
            self._cond.notify_all()
            return change


@dataclass
class _ModelGate:
    limits: ModelLimits
    concurrency: AdaptiveConcurrency
    requests: Bucket | None = None
    tokens: Bucket | None = None


@dataclass
class GateTicket:
    """A call let through the gate; hand it back with ProviderGate.leave."""

    model: str
    concurrency: _Ticket


@dataclass
class ProviderGate:
    """Every model's buckets and throttle; thread-safe, one per generator. `buckets` makes each
    model's buckets: shared by every generator in production, this process's own by default."""

    default: ModelLimits = field(default_factory=ModelLimits)
    per_model: dict[str, ModelLimits] = field(default_factory=dict)
    clock: Clock = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    buckets: BucketFactory | None = None
    _gates: dict[str, _ModelGate] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def limits(self, model: str) -> ModelLimits:
        """The model's limits: its own entry, else the defaults."""
        return self.per_model.get(model, self.default)

    def _gate(self, model: str) -> _ModelGate:
        with self._lock:
            gate = self._gates.get(model)
            if gate is None:
                limits = self.limits(model)
                make = self.buckets or local_buckets(self.clock)
                gate = self._gates[model] = _ModelGate(
                    limits,
                    AdaptiveConcurrency(model),
                    make(model, "rpm", limits.rpm) if limits.rpm else None,
                    make(model, "tpm", limits.tpm) if limits.tpm else None,
                )
            return gate

    def enter(self, model: str, tokens: int) -> GateTicket:
        """Wait until the model's limits let a call costing `tokens` go, then let it go.

        The concurrency slot comes first and the buckets after, while holding it: calls held
        back by a throttle then still go out at the buckets' pace, not all at once when it
        lifts. RequestTooLargeError when the call exceeds the per-minute token limit alone."""
        gate = self._gate(model)
        ticket = gate.concurrency.enter()
        try:
            wait = gate.tokens.reserve(tokens) if gate.tokens is not None else 0.0
            if gate.requests is not None:
                wait = max(wait, gate.requests.reserve(1))
        except RequestTooLargeError as e:
            gate.concurrency.abandon(ticket)
            raise RequestTooLargeError(f"{model}: {e}") from e
        if wait > 0:
            self.sleep(wait)
        return GateTicket(model, ticket)

    def leave(self, ticket: GateTicket, rate_limited: bool) -> ConcurrencyChange | None:
        """The call is over; a 429 (`rate_limited`) lowers the model's concurrency."""
        return self._gate(ticket.model).concurrency.leave(ticket.concurrency, rate_limited)

    def concurrency_limit(self, model: str) -> int | None:
        """The model's current throttle, None when it is not throttled."""
        return self._gate(model).concurrency.limit


def estimate_prompt_tokens(*texts: str) -> int:
    """Prompt tokens as a provider estimates them before counting: about 4 characters a token;
    we assume 3, so our estimate errs high and a tokens-per-minute limit is never overrun."""
    return math.ceil(sum(len(t) for t in texts) / 3) + 16
