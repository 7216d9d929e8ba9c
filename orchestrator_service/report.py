"""The job report: what output/<job id>/index.html shows besides its links. Per tier its counts,
cost and word counts against the tier's target band (an inline SVG histogram), the link graph
(an inline SVG: the money site on top, the tiers as layers, each placed link an edge), the
failed articles with their stage and reason, tokens, cost and timing. Plain data and SVG text
built here; the template lays them out. No script and no external asset: the page is one file
that opens anywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

BAR_COLOUR = "#4a6fa5"
SHORT_COLOUR = "#c0392b"  # bars below the tier's minimum
BAND_COLOUR = "#e3efe3"


@dataclass(frozen=True)
class TierReport:
    """One tier's numbers."""

    name: str
    requested: int
    generated: int
    augmented: int
    short: int
    long: int
    failed: int
    skipped: int
    cost_usd: float
    min_words: int
    max_words: int
    words: list[int]  # of every article with content
    histogram: Markup


@dataclass(frozen=True)
class FailedEntry:
    """A failed article as the report lists it."""

    tier: str
    number: int  # 1-based, as the console shows it
    title: str
    stage: str
    reason: str


@dataclass(frozen=True)
class JobReport:
    """Everything the job's index shows of its run."""

    tiers: list[TierReport]
    failed: list[FailedEntry]
    link_graph: Markup
    links: int
    api_calls: int
    tokens: int
    cost_usd: float
    submitted: datetime
    written: datetime  # when these pages were written

    @property
    def elapsed(self) -> str:
        """From submission to the pages, as 1h 02m 03s."""
        seconds = max(0, round((self.written - self.submitted).total_seconds()))
        hours, rest = divmod(seconds, 3600)
        minutes, seconds = divmod(rest, 60)
        return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


@dataclass(frozen=True)
class GraphPage:
    """An article in the link graph."""

    article_id: int
    tier: int
    title: str
    href: str  # relative to the job's folder


def word_histogram(words: Sequence[int], low: int, high: int, bins: int = 12) -> Markup:
    """An SVG histogram of word counts, with the target band [low, high] shaded and the bars
    below `low` in red."""
    width, height, pad = 480, 170, 30
    if not words:
        return Markup(
            f'<svg class="histogram" viewBox="0 0 {width} 40" role="img" '
            'aria-label="no article with content"><text x="10" y="25">no article with content'
            "</text></svg>"
        )
    lowest = min(min(words), math.floor(low * 0.8))
    stop = max(max(words), math.ceil(high * 1.1)) + 1
    step = max(1, math.ceil((stop - lowest) / bins))
    # The minimum is a bin edge: a bar is wholly below it (red) or wholly not.
    start = low - math.ceil((low - lowest) / step) * step
    bins = math.ceil((stop - start) / step)
    counts = [0] * bins
    for w in words:
        counts[min((w - start) // step, bins - 1)] += 1
    tallest = max(counts)
    plot_w, plot_h = width - 2 * pad, height - 2 * pad

    def x(words_at: float) -> float:
        return pad + (words_at - start) / (step * bins) * plot_w

    parts = [
        f'<svg class="histogram" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="word counts of {len(words)} articles against {low}-{high}">',
        f'<rect class="band" x="{x(low):.1f}" y="{pad}" width="{x(high) - x(low):.1f}" '
        f'height="{plot_h}" fill="{BAND_COLOUR}"><title>target {low}-{high} words</title></rect>',
    ]
    bar_w = plot_w / bins
    for n, count in enumerate(counts):
        if not count:
            continue
        bar_h = count / tallest * plot_h
        first = start + n * step
        colour = SHORT_COLOUR if first + step <= low else BAR_COLOUR
        parts.append(
            f'<rect class="bar" x="{pad + n * bar_w + 1:.1f}" y="{pad + plot_h - bar_h:.1f}" '
            f'width="{bar_w - 2:.1f}" height="{bar_h:.1f}" fill="{colour}">'
            f"<title>{first}-{first + step - 1} words: {count}</title></rect>"
        )
    baseline = pad + plot_h
    parts += [
        f'<line x1="{pad}" y1="{baseline}" x2="{width - pad}" y2="{baseline}" stroke="#555"/>',
        f'<text x="{x(low):.1f}" y="{baseline + 16}" text-anchor="middle" font-size="11">'
        f"{low}</text>",
        f'<text x="{x(high):.1f}" y="{baseline + 16}" text-anchor="middle" font-size="11">'
        f"{high}</text>",
        f'<text x="{pad}" y="{pad - 10}" font-size="11">{tallest} articles</text>',
        "</svg>",
    ]
    return Markup("".join(parts))


def link_graph(
    money_site_url: str,
    pages: Sequence[GraphPage],
    edges: Sequence[tuple[int, int]],
) -> Markup:
    """An SVG of the link pyramid: the money site on top, tier 1 below it, each lower tier a
    layer further down; an edge per link (source article id, target article id, 0 for the money
    site). Each node names its article and links to its page."""
    layers: dict[int, list[GraphPage]] = {}
    for page in pages:
        layers.setdefault(page.tier, []).append(page)
    numbers = sorted(layers)
    widest = max((len(layers[n]) for n in numbers), default=1)
    width = max(480, min(1600, widest * 24 + 60))
    row = 90
    height = 30 + row * len(numbers) + 30
    where: dict[int, tuple[float, float]] = {0: (width / 2, 30.0)}
    for depth, number in enumerate(numbers, start=1):
        layer = layers[number]
        gap = (width - 60) / len(layer)
        for i, page in enumerate(layer):
            where[page.article_id] = (30 + gap * (i + 0.5), 30.0 + row * depth)
    radius = 6 if widest <= 60 else 3
    parts = [
        f'<svg class="link-graph" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{len(edges)} links between {len(pages)} articles">'
    ]
    for source, target in edges:
        if source in where and target in where:
            (x1, y1), (x2, y2) = where[source], where[target]
            parts.append(
                f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                'stroke="#8894a8" stroke-opacity="0.45"/>'
            )
    money = escape(money_site_url or "no money site")
    parts.append(
        f'<circle class="node money" cx="{width / 2}" cy="30" r="10" fill="#2e7d32">'
        f"<title>{money}</title></circle>"
    )
    for depth, number in enumerate(numbers, start=1):
        parts.append(f'<text x="4" y="{30 + row * depth - 12}" font-size="11">tier{number}</text>')
        for page in layers[number]:
            cx, cy = where[page.article_id]
            parts.append(
                f'<a href="{escape(page.href)}"><circle class="node" cx="{cx:.1f}" '
                f'cy="{cy:.1f}" r="{radius}" fill="{BAR_COLOUR}"><title>{escape(page.title)}'
                "</title></circle></a>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))
