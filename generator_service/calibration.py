"""WordTargets: the word bounds a content prompt asks for, learned per model (invariant 4).

Models miss length targets, and consistently so (the seed measured 150-200 words short). Until a
model has MIN_SAMPLES finished drafts, the prompt adds the fixed compensation
(WORD_COUNT_COMPENSATION) to both of the tier's bounds. From then on it asks for the bounds
that, at the model's measured ratio of delivered to asked words, land the draft in the middle
of the tier's range: few below the minimum (an augmentation call each) and few over the
maximum. The ratio is the median over the model's last WINDOW drafts, seeded from the database
(so the next job of the model starts from it) and updated as drafts come in."""

from __future__ import annotations

import logging
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# (lower bound asked, words delivered) of a model's latest drafts, oldest first.
History = Callable[[str, int], list[tuple[int, int]]]
WINDOW = 200
MIN_SAMPLES = 5
# A ratio outside this is a broken reply, not a model's habit.
_RATIO_RANGE = (0.2, 5.0)


@dataclass(frozen=True)
class WordRequest:
    """The bounds to ask for, and where they came from."""

    low: int
    high: int
    learned_ratio: float | None = None  # None: the fixed compensation


class WordTargets:
    """Per model word bounds; thread-safe, one per generator."""

    def __init__(
        self, compensation: int, history: History | None = None, window: int = WINDOW
    ) -> None:
        self._compensation = compensation
        self._history = history
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._seeding: dict[str, threading.Lock] = {}

    def _ratios(self, model: str) -> deque[float]:
        """The model's ratios, read from the history once per generator."""
        with self._lock:
            if model in self._samples:
                return self._samples[model]
            seeding = self._seeding.setdefault(model, threading.Lock())
        with seeding:  # one reader per model; the others wait for its result
            with self._lock:
                if model in self._samples:
                    return self._samples[model]
            seeded: deque[float] = deque(maxlen=self._window)
            if self._history is not None:
                try:
                    for asked, delivered in self._history(model, self._window):
                        if (ratio := _ratio(asked, delivered)) is not None:
                            seeded.append(ratio)
                except Exception as e:  # no history is no reason to fail an article
                    log.warning("word targets of %s: history unavailable (%s)", model, e)
            with self._lock:
                return self._samples.setdefault(model, seeded)

    def request(self, model: str, min_words: int, max_words: int) -> WordRequest:
        """The bounds to ask `model` for, for a tier of `min_words` to `max_words`."""
        ratios = self._ratios(model)
        with self._lock:
            ratio = statistics.median(ratios) if len(ratios) >= MIN_SAMPLES else None
        if ratio is None:
            return WordRequest(min_words + self._compensation, max_words + self._compensation)
        low = max(1, round((min_words + max_words) / 2 / ratio))
        return WordRequest(low, low + max_words - min_words, ratio)

    def observe(self, model: str, asked_low: int, delivered: int) -> None:
        """A draft of `delivered` words came back for a prompt asking from `asked_low`."""
        ratio = _ratio(asked_low, delivered)
        if ratio is not None:
            ratios = self._ratios(model)
            with self._lock:
                ratios.append(ratio)


def _ratio(asked: int, delivered: int) -> float | None:
    if asked <= 0 or delivered <= 0:
        return None
    ratio = delivered / asked
    return ratio if _RATIO_RANGE[0] <= ratio <= _RATIO_RANGE[1] else None
