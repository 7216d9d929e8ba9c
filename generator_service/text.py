"""Text helpers the pipeline and the simulator share: word counting, fence cleanup, and the
comparison key of a title or heading."""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser

_WORD = re.compile(r"[^\W_]+(?:['\u2019\-][^\W_]+)*")  # CNC's, CNC\u2019s, high-speed
_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*[ \t]*\n(?P<body>.*?)\n?```\s*$", re.DOTALL)
_OPENING_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*[ \t]*\n")
_CLOSING_FENCE = re.compile(r"\n```$")
_INVISIBLE = {"script", "style", "head", "title", "template"}


class _VisibleText(HTMLParser):
    """Collects the text a reader sees: no tags, attributes, scripts or styles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _INVISIBLE:
            self._hidden_depth += 1
        else:
            self.parts.append(" ")  # block and inline tags both separate words

    def handle_endtag(self, tag: str) -> None:
        if tag in _INVISIBLE and self._hidden_depth:
            self._hidden_depth -= 1
        else:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def visible_text(html: str) -> str:
    """The text of an HTML fragment as a reader sees it."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def count_words(html: str) -> int:
    """Words in the visible text: tags, attributes and scripts do not count; "CNC's" and
    "high-speed" are one word each, numbers count, punctuation does not."""
    return count_text_words(visible_text(html))


def count_text_words(text: str) -> int:
    """count_words of text already made visible (visible_text): parsing HTML costs the most."""
    return len(_WORD.findall(text))


def strip_fences(text: str) -> str:
    """Remove a markdown code fence (```html … ```) that models like to wrap replies in, also
    half of one: a reply cut off by the token limit has the opening fence only."""
    text = text.strip()
    match = _FENCE.match(text)
    if match:
        return match.group("body").strip()
    return _OPENING_FENCE.sub("", _CLOSING_FENCE.sub("", text)).strip()


def normalise_title(title: str) -> str:
    """The comparison key of a title (or heading): case, punctuation and spacing do not make it
    new."""
    text = unicodedata.normalize("NFKC", title).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())
