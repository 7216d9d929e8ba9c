"""Content gates: what a content reply must be before it may become an article.

A reply is an article when it is prose in HTML (not JSON, not markdown, not the prompt said
back), follows its outline (enough of the outline's H2s and H3s as headings, the prose in
paragraphs rather than in headings) and has no paragraph twice. What needs no call is mended
first (mend: copied word counts dropped, markdown or loose text made HTML, repeated paragraphs
dropped); the pipeline asks once more, with the reason, for a reply that then fails a gate
(check_reply), and a second failure fails the article with the gate's name. A draft over the
tier's maximum is cut at a section boundary where that lands in the range (trim_to_max).

Each gate has a name that the record keeps (ArticleRecord.quality_gates) when it fires; the
README lists them. Plain functions of the text: no model, no I/O."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from markdown_it import MarkdownIt

from generator_service.outline import HEADING_MAX_CHARS, Outline
from generator_service.text import count_text_words, normalise_title, visible_text

# Gate names, as records and the README spell them.
JSON_REPLY = "json"  # the reply is JSON (a model echoing the outline it was given)
MARKDOWN = "markdown"  # a code fence left in the reply (markdown itself is mended)
NO_PARAGRAPHS = "no_paragraphs"  # no <p> (or list) prose at all
ECHO = "echo"  # the prompt's instructions said back
PROSE_IN_HEADINGS = "prose_in_headings"  # the text sits in <h2>/<h3>, not in paragraphs
OUTLINE_NOT_FOLLOWED = "outline_not_followed"  # too few of the outline's headings used
REPEATED_PARAGRAPHS = "repeated_paragraphs"  # mended: the repeats are dropped
MARKUP_MENDED = "markup_mended"  # mended: markdown, or text loose under headings, made HTML
WORD_COUNTS_DROPPED = "word_counts_dropped"  # mended: the outline's "(about N words)" removed
TRIMMED = "trimmed"  # mended: over the maximum, trailing sections cut
SHORTENED = "shortened"  # over the maximum after trimming: asked once to shorten
LONG = "long"  # still over the maximum: recorded with status `long`

# A share of the outline's H2s must appear as <h2> (the H3s: half that share), matched on their
# normalised words (OUTLINE_MATCH_JACCARD of them shared is the same heading).
OUTLINE_SHARE = 0.5
OUTLINE_MATCH_JACCARD = 0.6
# Past this share of the words in sentences inside headings, the prose is in the headings. A
# heading is a sentence when longer than an outline's heading may be, or when it ends in a full
# stop after SENTENCE_WORDS words or more.
HEADING_WORD_SHARE = 0.35
SENTENCE_WORDS = 12
# A paragraph this short ("Read more.") may repeat; a longer one may not.
REPEAT_MIN_WORDS = 6
# Prompt lines at least this long are instructions; one of them in the reply is an echo.
ECHO_MIN_CHARS = 30

# Built once: render() keeps its state per call, so the parser serves every thread.
_COMMONMARK = MarkdownIt("commonmark", {"html": True})
_BUDGET_ECHO = re.compile(r"[ \t]*\(about \d+ words\)")  # the outline's word budgets said back
_H2_START = re.compile(r"<h2\b", re.IGNORECASE)
_WORDS = re.compile(r"[^\W_]+")

_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_PROSE = frozenset({"p", "li"})
_HIDDEN = frozenset({"script", "style"})
# Tags that start a block of their own; text outside any of them is loose (not in a paragraph).
# `br` is inline: a line break inside a paragraph.
_BLOCKS = _HEADINGS | _PROSE | {"ul", "ol", "div", "section", "article", "blockquote", "table",
                                "tr", "td", "th", "pre", "hr"}  # fmt: skip


@dataclass(frozen=True)
class Block:
    """A run of text, the block element it sits in ("" outside any: loose text), and where it
    is in the source: html[start:end] (a paragraph's or heading's tags included)."""

    tag: str
    text: str
    start: int
    end: int

    @property
    def words(self) -> int:
        return count_text_words(self.text)


class _Blocks(HTMLParser):
    """An HTML fragment as blocks, forgiving as browsers are: a model's `<p>` is often never
    closed, and the next block's start closes it."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.html = html
        self.blocks: list[Block] = []
        self.tags: set[str] = set()
        self._line_starts = [0] + [i + 1 for i, c in enumerate(html) if c == "\n"]
        self._tag = ""  # the open block's tag, "" for loose text
        self._start = 0  # where the open block (or loose run) starts in the source
        self._parts: list[str] = []  # its text so far
        self._hidden = 0  # inside script or style

    def _at(self) -> int:
        line, column = self.getpos()
        return self._line_starts[line - 1] + column

    def _close(self, end: int, next_start: int) -> None:
        text = " ".join("".join(self._parts).split())
        if text:
            self.blocks.append(Block(self._tag, text, self._start, end))
        self._tag, self._start, self._parts = "", next_start, []

    def close(self) -> None:
        super().close()
        self._close(len(self.html), len(self.html))  # the last block has no tag to close it

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag in _HIDDEN:
            self._hidden += 1
        elif tag in _BLOCKS:
            at = self._at()
            after = at + len(self.get_starttag_text() or "")
            self._close(at, after)
            if tag in _HEADINGS | _PROSE:  # the block is the element, its tags included
                self._tag, self._start = tag, at
        else:
            self._parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BLOCKS:
            after = self.html.find(">", self._at()) + 1 or len(self.html)
            self._close(after if self._tag == tag else self._at(), after)
        else:
            self._parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._parts.append(data)


def blocks_of(html: str) -> tuple[list[Block], set[str]]:
    """The fragment's blocks in order, and the tags it uses."""
    parser = _Blocks(html)
    parser.feed(html)
    parser.close()
    return parser.blocks, parser.tags


@dataclass(frozen=True)
class GateFailure:
    """A reply that is not an article: the gate's name and why, in words for the record and for
    the model (the second request quotes it)."""

    gate: str
    reason: str

    def __str__(self) -> str:
        return f"quality gate {self.gate}: {self.reason}"


class ContentGateError(ValueError):
    """A content reply failed a gate, and so did the one reply asked for with the reason."""

    def __init__(self, failure: GateFailure) -> None:
        super().__init__(f"{failure} (also after one more request with the reason)")
        self.failure = failure


def check_reply(
    html: str, outline: Outline, instructions: str, max_heading_chars: int = HEADING_MAX_CHARS
) -> GateFailure | None:
    """The first gate the reply fails, or None when it is an article. `instructions` are those
    of the prompt it answers (prompts.instructions_of), for the echo gate; a heading longer
    than `max_heading_chars` (OUTLINE_HEADING_MAX_CHARS) is a sentence."""
    if failure := _json_reply(html) or _markdown(html):
        return failure
    blocks, tags = blocks_of(html)  # parsed once for the gates that read the blocks
    return (
        _prose_in_headings(blocks, max_heading_chars)
        or _no_paragraphs(blocks, tags)
        or _echo(html, instructions)
        or _outline_not_followed(blocks, outline)
    )


def _json_reply(html: str) -> GateFailure | None:
    text = visible_text(html).strip()  # JSON a mend wrapped in <p> (and escaped) is still JSON
    if text.startswith(("{", "[")):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            pass  # starts like JSON, is not: the later gates judge it
        else:
            return GateFailure(JSON_REPLY, "the reply is JSON, not an article in HTML")
    if re.search(r'[{,]\s*"(outline|h2|h3)"\s*:', text):
        return GateFailure(JSON_REPLY, "the reply contains the outline's JSON instead of prose")
    return None


def _markdown(html: str) -> GateFailure | None:
    if "```" in html:
        return GateFailure(MARKDOWN, "the reply has markdown code fences; write plain HTML")
    return None


def _no_paragraphs(blocks: list[Block], tags: set[str]) -> GateFailure | None:
    if not any(b.words for b in blocks if b.tag in _PROSE):
        found = f"(tags found: {', '.join(sorted(tags)[:8])})" if tags else "(no HTML tags at all)"
        return GateFailure(NO_PARAGRAPHS, f"the reply has no prose in <p> elements {found}")
    return None


def _echo(html: str, instructions: str) -> GateFailure | None:
    """A line of the prompt's instructions (not its outline, whose headings belong in the
    article) found in the reply's text."""
    text = _squash(visible_text(html))
    for line in instructions.splitlines():
        line = _squash(line)
        if len(line) >= ECHO_MIN_CHARS and line in text:
            return GateFailure(ECHO, "the reply repeats the prompt's instructions")
    return None


def _prose_in_headings(blocks: list[Block], max_heading_chars: int) -> GateFailure | None:
    """Sentences in headings (longer than a heading may be, or a full sentence of many words)
    carrying more than HEADING_WORD_SHARE of the words. Headings of a short draft are many of
    its words, and that is no fault."""
    total = sum(b.words for b in blocks)
    in_sentences = 0
    for b in blocks:
        if b.tag not in _HEADINGS:
            continue
        if len(b.text) > max_heading_chars or (b.text.endswith(".") and b.words >= SENTENCE_WORDS):
            in_sentences += b.words
    if total and in_sentences / total > HEADING_WORD_SHARE:
        return GateFailure(
            PROSE_IN_HEADINGS,
            f"{in_sentences} of its {total} words are sentences inside headings; prose belongs "
            "in <p>",
        )
    return None


def _outline_not_followed(blocks: list[Block], outline: Outline) -> GateFailure | None:
    found: dict[str, list[set[str]]] = {"2": [], "3": []}  # the reply's H2s and H3s
    for b in blocks:
        if b.tag in ("h2", "h3"):
            found[b.tag[1]].append(_word_set(b.text))
    h2s = [section["h2"] for section in outline]
    h3s = [h3 for section in outline for h3 in section["h3"]]
    for level, wanted, share in (("2", h2s, OUTLINE_SHARE), ("3", h3s, OUTLINE_SHARE / 2)):
        if not wanted:
            continue
        used = sum(any(_same_heading(_word_set(w), f) for f in found[level]) for w in wanted)
        if used < share * len(wanted):
            return GateFailure(
                OUTLINE_NOT_FOLLOWED,
                f"{used} of the outline's {len(wanted)} H{level} headings are in the reply as "
                f"<h{level}>; use the outline's headings, in order",
            )
    return None


def mend(reply: str) -> tuple[str, list[str]]:
    """What is wrong with a reply that needs no call to put right: the outline's word counts
    copied after its headings dropped, markdown (or text loose under its headings) made HTML,
    repeated paragraphs dropped. (the reply, the mends' gate names). A code fence is left: it
    fails the markdown gate."""
    fired = []
    reply, copied = _BUDGET_ECHO.subn("", reply)
    if copied:
        fired.append(WORD_COUNTS_DROPPED)
    if "```" not in reply:
        mended = _loose_text_as_html(reply)
        if mended != reply:
            reply = mended
            fired.append(MARKUP_MENDED)
    reply, dropped = drop_repeated_paragraphs(reply)
    if dropped:
        fired.append(REPEATED_PARAGRAPHS)
    return reply, fired


def _loose_text_as_html(html: str) -> str:
    """Every run of text outside a block element rendered as CommonMark (paragraphs, `##`
    headings, lists, emphasis; inline HTML in it kept); the blocks as they are."""
    for block in reversed(blocks_of(html)[0]):  # from the end: earlier offsets stay right
        if block.tag == "" and block.words:
            rendered = _COMMONMARK.render(html[block.start : block.end].strip()).strip()
            html = f"{html[: block.start].rstrip()}\n{rendered}\n{html[block.end :].lstrip()}"
    return html.strip()


def drop_repeated_paragraphs(html: str) -> tuple[str, int]:
    """`html` without the second and later copies of any paragraph of REPEAT_MIN_WORDS or more
    words (compared on their words, case and markup aside; closed or not); and how many were
    dropped."""
    seen: set[str] = set()
    repeats = []
    for block in blocks_of(html)[0]:
        if block.tag != "p":
            continue
        words = _WORDS.findall(block.text.lower())
        key = " ".join(words)
        if len(words) >= REPEAT_MIN_WORDS and key in seen:
            repeats.append(block)
        seen.add(key)
    for block in reversed(repeats):
        html = html[: block.start].rstrip() + "\n" + html[block.end :].lstrip()
    return html.strip(), len(repeats)


def trim_to_max(html: str, max_words: int, min_words: int, min_sections: int) -> str | None:
    """`html` cut at a section boundary (before an <h2>) to at most `max_words` words, keeping
    at least `min_words` words and `min_sections` H2 sections; None when no cut does that.
    Sections go from the end: the start of an article carries its subject."""
    starts = [m.start() for m in _H2_START.finditer(html)]
    for sections in range(len(starts) - 1, max(min_sections, 1) - 1, -1):
        kept = html[: starts[sections]].rstrip()
        words = count_text_words(visible_text(kept))
        if words <= max_words:
            return kept if words >= min_words else None
    return None


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def _word_set(heading: str) -> set[str]:
    return set(_WORDS.findall(normalise_title(heading)))


def _same_heading(wanted: set[str], found: set[str]) -> bool:
    """The outline's heading and one in the reply are the same: equal words, one's words all in
    the other's, or enough of them shared (a model rewords a little)."""
    if not wanted or not found:
        return False
    if wanted <= found or found <= wanted:
        return True
    return len(wanted & found) / len(wanted | found) >= OUTLINE_MATCH_JACCARD
