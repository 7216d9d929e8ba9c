"""Token budgets: each call's max_tokens from what it asks for.

A provider that counts prompt + max_tokens against a tokens-per-minute limit (OpenAI does)
refuses calls that ask for far more than they need, so budgets fit the request: the words asked
for at the tokens an English word takes in HTML, with headroom. A reply that still runs out is
continued (finish_reason "length"), so a tight budget costs a call, never an article. The LLM
layer caps every budget at the model's max_output_tokens."""

from __future__ import annotations

import math

TOKENS_PER_WORD = 1.4  # English prose takes ~1.3 tokens a word; tags and headings add some
HEADROOM = 1.25  # models overshoot the asked upper bound now and then
REPLY_OVERHEAD = 100  # a fence, a sentence of preamble
TOKENS_PER_HEADING = 30  # a heading of ~8 words plus its JSON punctuation
TOKENS_PER_TITLE = 40  # a title of up to 120 characters, one a line


def content_tokens(max_words: int) -> int:
    """An article body (or an augmented one) of at most `max_words` words."""
    return math.ceil(max_words * TOKENS_PER_WORD * HEADROOM) + REPLY_OVERHEAD


def outline_tokens(max_h2: int, max_h3: int) -> int:
    """A JSON outline with at most this many headings, twice over: a model that writes too
    many is trimmed locally, which is cheaper than a cut-off reply and a repair."""
    return (max_h2 + max_h3) * TOKENS_PER_HEADING * 2 + REPLY_OVERHEAD


def titles_tokens(count: int) -> int:
    """`count` titles, one a line."""
    return count * TOKENS_PER_TITLE + REPLY_OVERHEAD
