"""WordTargets: the word bounds a content prompt asks for, learned per model (invariant 4).

Models miss length targets, and consistently so: the seed measured 150-200 words short
"regardless of target". Until a model has MIN_SAMPLES finished drafts, the prompt adds the fixed
compensation (WORD_COUNT_COMPENSATION) to both of the tier's bounds. From then on it asks for
the bounds that, at the model's measured shortfall (words asked for as the lower bound minus
words delivered: the median over the NEAREST of its last WINDOW drafts whose length came closest
to the target), land the draft in the middle of the tier's range: few below the minimum (an
augmentation call each) and few over the maximum. Choosing the drafts nearest the target keeps
tiers of different lengths from mixing: a model that delivers a share of what it is asked
falls short by more words on a longer article.

The shortfall is measured in words, not as a ratio: against a model that is short by a fixed
number of words, a learned ratio over- and undershoots in turn (asked 500, delivered 150: ask
for 1,250 next), while a learned shortfall lands at once. Against a model that delivers a fixed
share of what it is asked, each correction of the shortfall at the new operating point gets
closer, by the share's distance from 1 each time. The drafts are kept in the database, so the
next job of the model starts from what earlier jobs learned."""

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
NEAREST = 7
MIN_SAMPLES = 5
# A draft this far off what was asked is a broken reply, not a model's habit.
_MAX_SHARE_OFF = 0.8


@dataclass(frozen=True)
class WordRequest:
    """The bounds to ask for, and where they came from."""

    low: int
    high: int
    learned_shortfall: int | None = None  # words; None: the fixed compensation


class WordTargets:
    """Per model word bounds; thread-safe, one per generator."""

    def __init__(
        self, compensation: int, history: History | None = None, window: int = WINDOW
    ) -> None:
        self._compensation = compensation
        self._history = history
        self._window = window
        self._samples: dict[str, deque[tuple[int, int]]] = {}  # (asked, delivered)
        self._lock = threading.Lock()
        self._seeding: dict[str, threading.Lock] = {}

    def _drafts(self, model: str) -> deque[tuple[int, int]]:
        """The model's drafts, read from the history once per generator."""
        with self._lock:
            if model in self._samples:
                return self._samples[model]
            seeding = self._seeding.setdefault(model, threading.Lock())
        with seeding:  # one reader per model; the others wait for its result
            with self._lock:
                if model in self._samples:
                    return self._samples[model]
            seeded: deque[tuple[int, int]] = deque(maxlen=self._window)
            if self._history is not None:
                try:
                    for asked, delivered in self._history(model, self._window):
                        if _plausible(asked, delivered):
                            seeded.append((asked, delivered))
                except Exception as e:  # no history is no reason to fail an article
                    log.warning("word targets of %s: history unavailable (%s)", model, e)
            with self._lock:
                return self._samples.setdefault(model, seeded)

    def request(self, model: str, min_words: int, max_words: int) -> WordRequest:
        """The bounds to ask `model` for, for a tier of `min_words` to `max_words`."""
        drafts = self._drafts(model)
        target = (min_words + max_words) // 2
        with self._lock:
            nearest = sorted(drafts, key=lambda d: abs(d[1] - target))[:NEAREST]
        if len(nearest) < MIN_SAMPLES:
            return WordRequest(min_words + self._compensation, max_words + self._compensation)
        learned = round(statistics.median(asked - delivered for asked, delivered in nearest))
        low = max(1, target + learned)
        return WordRequest(low, low + max_words - min_words, learned)

    def observe(self, model: str, asked_low: int, delivered: int) -> None:
        """A draft of `delivered` words came back for a prompt asking from `asked_low`."""
        if _plausible(asked_low, delivered):
            drafts = self._drafts(model)
            with self._lock:
                drafts.append((asked_low, delivered))


def _plausible(asked: int, delivered: int) -> bool:
    return asked > 0 and delivered > 0 and abs(asked - delivered) <= asked * _MAX_SHARE_OFF
