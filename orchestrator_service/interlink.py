"""Interlinking: which article links where (plan_links), and where in its body a link goes
(place_links). Plain functions over published articles; no gRPC, no files.

The graph: every tier-1 article links to the money site; every tier N+1 article links to one or
two tier-N articles, spread so that every tier-N article receives a link when there are at least
as many tier N+1 articles; optionally each article links to the next one of its tier on its site
("see also"). Failed articles are never in the input, so nothing links to or from them."""

from __future__ import annotations

import html
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Sentences a link is added with when its anchor text does not occur in the paragraph already.
_LEADS = [
    "Read more about {a}.",
    "See our guide to {a}.",
    "For a closer look, read {a}.",
    "We cover {a} in more depth elsewhere.",
    "Related reading: {a}.",
    "Learn more about {a}.",
]
_PARAGRAPH = re.compile(r"(<p\b[^>]*>)(.*?)(</p>)", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
# A paragraph a sentence may follow ends with a full sentence: ". ! ?" (then quotes or brackets),
# not a list's lead-in ("… include:") or a fragment.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


@dataclass(frozen=True)
class Published:
    """A successful article with its URL: what links are made between."""

    article_id: int
    tier: int  # 1, 2, …
    site: str
    slug: str
    url: str
    title: str


@dataclass(frozen=True)
class Link:
    """One link to place in an article's body."""

    source_id: int
    href: str
    anchor: str
    kind: str  # "money", "up" or "see_also"
    target_id: int = 0  # the article linked to; 0 for the money site


@dataclass(frozen=True)
class LinkPlan:
    """The links of a job, and the tiers that could not link up (and why)."""

    links: list[Link]
    notes: list[str]

    def count(self, kind: str) -> int:
        return sum(link.kind == kind for link in self.links)


def href(source: Published, target: Published, link_style: str) -> str:
    """The target's absolute URL, or with link_style "relative" its path from the source's page
    in the exported tree (output/<job>/<site>/<slug>.html)."""
    if link_style != "relative":
        return target.url
    if source.site == target.site:
        return f"{target.slug}.html"
    return posixpath.join("..", target.site or "unassigned", f"{target.slug}.html")


def up_targets(source_count: int, target_count: int) -> list[list[int]]:
    """For each of `source_count` articles, the indexes of the one or two target articles it
    links to. The first links go round the targets, so every target is reached when there are
    at least as many sources; when there are fewer, a second link per source reaches more."""
    if target_count == 0:
        return [[] for _ in range(source_count)]
    plan = []
    for i in range(source_count):
        first = i % target_count
        chosen = [first]
        second = (i + source_count) % target_count
        # Two links when they reach targets not reached otherwise, or on every other source.
        if second != first and (source_count < target_count or i % 2 == 1):
            chosen.append(second)
        plan.append(chosen)
    return plan


class AnchorTexts:
    """Varied anchor texts: the keyword, entities, related searches and the target's title, in
    rotation over the job's links."""

    def __init__(self, keyword: str, entities: Sequence[str], related: Sequence[str]) -> None:
        self._phrases = [p for p in [keyword, *entities, *related] if p.strip()]
        self._n = 0

    def next(self, title: str = "") -> str:
        choices = [*self._phrases, title] if title else list(self._phrases)
        if not choices:
            return title or "read more"
        anchor = choices[self._n % len(choices)]
        self._n += 1
        return anchor


def plan_links(
    tiers: dict[int, list[Published]],
    money_site_url: str,
    anchors: AnchorTexts,
    link_style: str = "absolute",
    see_also: bool = False,
) -> LinkPlan:
    """Every link of a job's successful articles, grouped by tier number (1, 2, …)."""
    links: list[Link] = []
    notes: list[str] = []
    numbers = sorted(tiers)
    for number in numbers:
        sources = tiers[number]
        if number == 1:
            if not money_site_url:
                notes.append("tier1: the project has no money_site_url, so no link to it")
            for article in sources:
                if money_site_url:
                    links.append(Link(article.article_id, money_site_url, anchors.next(), "money"))
            continue
        # The tier above; when it has no successful article, the nearest one that has.
        below = [n for n in numbers if n < number and tiers[n]]
        if not below:
            if sources:
                notes.append(f"tier{number}: no lower-tier article succeeded, nothing to link to")
            continue
        if below[-1] != number - 1:
            notes.append(
                f"tier{number}: tier{number - 1} has no article, linked to tier{below[-1]} instead"
            )
        targets = tiers[below[-1]]
        for source, chosen in zip(sources, up_targets(len(sources), len(targets)), strict=True):
            for t in chosen:
                target = targets[t]
                links.append(
                    Link(
                        source.article_id,
                        href(source, target, link_style),
                        anchors.next(target.title),
                        "up",
                        target.article_id,
                    )
                )
    if see_also:
        for number in numbers:
            by_site: dict[str, list[Published]] = {}
            for article in tiers[number]:
                by_site.setdefault(article.site, []).append(article)
            for group in by_site.values():
                if len(group) < 2:
                    continue
                for i, source in enumerate(group):
                    target = group[(i + 1) % len(group)]
                    links.append(
                        Link(
                            source.article_id,
                            href(source, target, link_style),
                            target.title,
                            "see_also",
                            target.article_id,
                        )
                    )
    return LinkPlan(links, notes)


def _link_html(link: Link) -> str:
    return f'<a href="{html.escape(link.href)}">{html.escape(link.anchor, quote=False)}</a>'


def _wrap_phrase(paragraph: str, link: Link) -> str | None:
    """The paragraph with the first occurrence of the anchor text in its text (not in a tag or
    an existing link) made the link; None when the phrase does not occur."""
    phrase = html.escape(link.anchor, quote=False)
    pattern = re.compile(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", re.IGNORECASE)
    depth = 0  # inside an <a> already
    parts = re.split(r"(<[^>]*>)", paragraph)
    for n, part in enumerate(parts):
        if part.startswith("<"):
            if re.match(r"<a\b", part, re.IGNORECASE):
                depth += 1
            elif re.match(r"</a\s*>", part, re.IGNORECASE):
                depth = max(0, depth - 1)
            continue
        match = pattern.search(part) if depth == 0 else None
        if match:
            parts[n] = (
                part[: match.start()]
                + f'<a href="{html.escape(link.href)}">{match.group(0)}</a>'
                + part[match.end() :]
            )
            return "".join(parts)
    return None


def _ends_a_sentence(text: str) -> bool:
    return bool(_SENTENCE_END.search(_TAG.sub("", text).rstrip()))


def place_links(body: str, links: Sequence[Link], seed: int = 0) -> str:
    """`body` with each link inside a paragraph, the links spread over the body's paragraphs
    (one per paragraph while there are enough). Where the anchor text already occurs in the
    paragraph it becomes the link; otherwise a short sentence with the link closes the
    paragraph — only one that ends with a full sentence (never a list's lead-in such as
    "… include:"): else the link moves on to the next such paragraph. A body without one, and
    links left over, get a paragraph of links at its end."""
    if not links:
        return body

    def sentence(i: int, link: Link) -> str:
        return _LEADS[(seed + i) % len(_LEADS)].format(a=_link_html(link))

    paragraphs = list(_PARAGRAPH.finditer(body))
    if not paragraphs:
        return f"{body}\n<p>{' '.join(sentence(i, link) for i, link in enumerate(links))}</p>"
    # Paragraph k of n for link i: evenly spaced, skipping the first paragraph when there is room.
    count = len(paragraphs)
    slots: dict[int, list[tuple[int, Link]]] = {}
    for i, link in enumerate(links):
        position = (i + 1) * count // (len(links) + 1) if count > len(links) else i % count
        slots.setdefault(position, []).append((i, link))
    pieces: list[str] = []
    last = 0
    carried: list[tuple[int, Link]] = []  # links whose paragraph could not take a sentence
    for k, match in enumerate(paragraphs):
        pieces.append(body[last : match.start()])
        opening, text, closing = match.groups()
        waiting, carried = carried + slots.get(k, []), []
        for i, link in waiting:
            wrapped = _wrap_phrase(text, link)
            if wrapped is not None:
                text = wrapped
            elif _ends_a_sentence(text):
                text = f"{text.rstrip()} {sentence(i, link)}"
            else:
                carried.append((i, link))
        pieces.append(opening + text + closing)
        last = match.end()
    pieces.append(body[last:])
    if carried:
        pieces.append(f"\n<p>{' '.join(sentence(i, link) for i, link in carried)}</p>")
    return "".join(pieces)
