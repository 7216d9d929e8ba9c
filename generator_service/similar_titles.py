"""Titles that are the same title: "CNC Machining: Cost, tolerances, vs 3D Printing" and "CNC
Machining: Costs, Tolerances, 3D Printing" differ in case, plurals and little words, and in
nothing a reader would call a different article.

A title's key is its set of content words: normalised (text.normalise_title), without
stop words, plurals made singular. Two titles whose keys share TITLE_SIMILARITY of their words
(token Jaccard) are near-duplicates. TitleIndex finds an earlier one without comparing against
every title: prefix filtering (two sets that similar must share one of the first few words of
each, in one fixed order), so a tier of thousands against a project's tens of thousands stays
fast. And a title made only of the project's own keyword, entities and related searches, two
or more of them, is the keyword list pasted together, not a title."""

from __future__ import annotations

import math
from collections import defaultdict

from generator_service.domain import ProjectInfo
from generator_service.text import normalise_title

# Token Jaccard at or above this is the same title (TITLE_SIMILARITY).
TITLE_SIMILARITY = 0.8
_STOP_WORDS = frozenset(
    {
        "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "how", "in", "into",
        "is", "it", "its", "of", "on", "or", "the", "to", "vs", "versus", "what", "when",
        "where", "which", "who", "why", "with", "you", "your",
    }
)  # fmt: skip


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def title_words(title: str) -> frozenset[str]:
    """The content words of a title, as near-duplicates are compared."""
    return frozenset(_singular(w) for w in normalise_title(title).split() if w not in _STOP_WORDS)


class TitleIndex:
    """Titles seen so far (a job's and its project's earlier ones), to refuse a new title that
    repeats one: the same normalised form, or a near-duplicate. Not thread-safe: one writer."""

    def __init__(
        self, threshold: float = TITLE_SIMILARITY, common: frozenset[str] = frozenset()
    ) -> None:
        """`common`: words most titles will have (the project's keyword and entities); they go
        last in the order, so that an index of thousands of titles is not one long list."""
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self._threshold = threshold
        self._common = common
        self._keys: dict[str, str] = {}  # normalised form → the title
        self._titles: list[tuple[str, frozenset[str]]] = []
        self._by_word: defaultdict[str, list[int]] = defaultdict(list)

    def same_as(self, title: str) -> str:
        """The earlier title `title` repeats, or "" when it is new."""
        key = normalise_title(title)
        if key in self._keys:
            return self._keys[key]
        words = title_words(title)
        if not words:
            return ""
        seen: set[int] = set()
        for word in self._prefix(words):
            for i in self._by_word.get(word, ()):
                if i in seen:
                    continue
                seen.add(i)
                other, other_words = self._titles[i]
                if len(words & other_words) / len(words | other_words) >= self._threshold:
                    return other
        return ""

    def add(self, title: str) -> None:
        self._keys.setdefault(normalise_title(title), title)
        words = title_words(title)
        if not words:
            return
        self._titles.append((title, words))
        for word in self._prefix(words):
            self._by_word[word].append(len(self._titles) - 1)

    def _prefix(self, words: frozenset[str]) -> list[str]:
        """The words a set similar to `words` must share at least one of, in one fixed order:
        the rarer words first (not common, longer)."""
        ordered = sorted(words, key=lambda w: (w in self._common, -len(w), w))
        return ordered[: len(ordered) - math.ceil(self._threshold * len(ordered)) + 1]


def keyword_list(title: str, project: ProjectInfo) -> bool:
    """Whether the title is only the project's keyword, entities and related searches pasted
    together: every word one of theirs, and two or more entities or related searches whole in
    it."""
    words, keyword = title_words(title), title_words(project.keyword)
    listed = [t for t in map(title_words, (*project.entities, *project.related_searches)) if t]
    if not words or not words <= keyword.union(*listed):
        return False
    # The keyword alone is a title's subject, and so are terms that are parts of it.
    return sum(t <= words and not t <= keyword for t in listed) >= 2
