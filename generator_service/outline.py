"""Outlines: parse the model's reply, check it against the tier's heading ranges, make it fit,
and split the article's word target across its sections.

An outline is a list of sections: [{"h2": str, "h3": [str, …]}, …]. The pipeline asks for one,
asks once more (a repair) when it is unusable or has too few headings, then fits what it has:
too many headings are cut from the end (no call), too few are padded from the project's related
searches and entities, and when there is nothing to pad with the article fails saying so."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from generator_service.domain import ProjectInfo, TierShape
from generator_service.text import normalise_title, strip_fences
from generator_service.titles import NUMBERING

Outline = list[dict[str, Any]]

_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
# Longer than this (characters), a heading is a sentence: OUTLINE_HEADING_MAX_CHARS.
HEADING_MAX_CHARS = 100
# Markdown emphasis around a whole heading ("**Costs**"); inside it, `*` and backticks are the
# heading's own (the project's related searches may hold anything).
_WRAPPED = re.compile(r"^(\*\*|__|\*|`)(.+)\1$")
# Sections with more H3s get more words; every section gets at least this share of one "unit".
_SECTION_BASE_WEIGHT = 2


class OutlineError(ValueError):
    """The model's outline cannot be used; the message says why."""


@dataclass(frozen=True)
class FittedOutline:
    """An outline within the tier's ranges, and what was done to get it there ("" if nothing)."""

    sections: Outline
    fix: str = ""

    @property
    def h2_count(self) -> int:
        return len(self.sections)

    @property
    def h3_count(self) -> int:
        return h3_total(self.sections)


def h3_total(outline: Outline) -> int:
    """H3 headings over all sections."""
    return sum(len(section["h3"]) for section in outline)


def parse_outline(reply: str, max_heading_chars: int = HEADING_MAX_CHARS) -> Outline:
    """The outline sections from a model reply, its headings cleaned (clean_outline). Accepts
    fences and prose around the JSON; raises OutlineError naming what is wrong."""
    text = strip_fences(reply)
    match = _JSON_OBJECT.search(text)
    snippet = " ".join(text.split())[:80]
    if not match:
        raise OutlineError(f"outline reply is not JSON: {snippet!r}")
    try:
        data = json.loads(match.group(0))
    except json.JSONDecodeError as e:
        raise OutlineError(f"outline reply is not valid JSON ({e.msg}): {snippet!r}") from e
    sections = data.get("outline") if isinstance(data, dict) else None
    if not isinstance(sections, list) or not sections:
        raise OutlineError('outline reply has no non-empty "outline" list')
    outline: Outline = []
    for i, section in enumerate(sections):
        if not isinstance(section, dict) or not isinstance(section.get("h2"), str):
            raise OutlineError(f'outline section {i} has no "h2" text')
        h3 = section.get("h3", [])
        if not isinstance(h3, list) or not all(isinstance(h, str) for h in h3):
            raise OutlineError(f'outline section {i}: "h3" must be a list of strings')
        if not section["h2"].strip():
            raise OutlineError(f"outline section {i} has an empty H2")
        outline.append({"h2": section["h2"].strip(), "h3": [h.strip() for h in h3 if h.strip()]})
    return clean_outline(outline, max_heading_chars)


def clean_heading(text: str) -> str:
    """A heading without the list marker, numbering ("1.", "2.3", "## ") or emphasis a model
    put around it, nor a trailing full stop ("1. **Costs**." → "Costs")."""
    text = text.strip()
    for _ in range(2):  # "**1. Costs**" has its number inside the emphasis
        text = NUMBERING.sub("", text).strip()
        if wrapped := _WRAPPED.match(text):
            text = wrapped.group(2).strip()
    return text.removesuffix(".").strip()


def clean_outline(outline: Outline, max_chars: int = HEADING_MAX_CHARS) -> Outline:
    """Headings as headings (clean_heading: list markers, numbering such as "1." and wrapping
    markdown removed); dropped: a heading longer than `max_chars` (a sentence, not a
    heading; an H2's section goes with it), an H2 the outline has already, and an H3 that
    repeats its H2 or another H3 of its section (the same H3 under two H2s may be right:
    "Common Mistakes" of each). Too few left is the repair request's to fix
    (outline_shortfall). OutlineError when no section is left."""
    h2_seen: set[str] = set()
    cleaned: Outline = []
    for section in outline:
        h2 = clean_heading(section["h2"])
        key = normalise_title(h2)
        if not key or key in h2_seen or len(h2) > max_chars:
            continue
        h2_seen.add(key)
        in_section = {key}  # an H3 equal to its H2 is a repeat too
        h3s = []
        for heading in section["h3"]:
            h3 = clean_heading(heading)
            h3_key = normalise_title(h3)
            if h3_key and h3_key not in in_section and len(h3) <= max_chars:
                in_section.add(h3_key)
                h3s.append(h3)
        cleaned.append({"h2": h2, "h3": h3s})
    if not cleaned:
        raise OutlineError(
            f"outline has no usable H2: each was empty, a repeat or over {max_chars} characters"
        )
    return cleaned


def outline_shortfall(outline: Outline, tier: TierShape) -> str:
    """Why the outline has too few headings for the tier, or "" when it has enough (too many
    are trimmed by fit_outline, no call needed)."""
    problems = []
    if len(outline) < tier.min_h2:
        problems.append(f"H2 sections: {len(outline)}, the tier needs at least {tier.min_h2}")
    h3 = h3_total(outline[: tier.max_h2])  # the H3s that survive trimming the extra H2s
    if h3 < tier.min_h3:
        problems.append(f"H3 subsections: {h3}, the tier needs at least {tier.min_h3}")
    return "; ".join(problems)


def _key(heading: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", heading.casefold()).split())


def padding_headings(project: ProjectInfo) -> tuple[list[str], list[str]]:
    """Headings an outline can be padded with: (H2 candidates, H3 candidates). They come from
    what the project says its readers search for, so a padded section is still on topic."""
    related = [r[:1].upper() + r[1:] for r in project.related_searches]
    entities = [f"Working With {e[:1].upper() + e[1:]}" for e in project.entities]
    return related, related + entities


def fit_outline(outline: Outline, tier: TierShape, project: ProjectInfo) -> FittedOutline:
    """The outline made to fit the tier: extra H2 sections and H3s are cut from the end, missing
    ones are padded from the project's related searches and entities. OutlineError when there is
    not enough to pad with (the message says how many were missing)."""
    sections: Outline = [{"h2": s["h2"], "h3": list(s["h3"])} for s in outline[: tier.max_h2]]
    fixes = []
    if len(outline) > tier.max_h2:
        fixes.append(f"{len(outline) - tier.max_h2} H2s cut")
    used = {_key(s["h2"]) for s in sections} | {_key(h) for s in sections for h in s["h3"]}
    h2_pool, h3_pool = padding_headings(project)

    def take(pool: list[str]) -> str:
        """The pool's first heading not in the outline yet (the caller checked there is one)."""
        while _key(pool[0]) in used:
            pool.pop(0)
        heading = pool.pop(0)
        used.add(_key(heading))
        return heading

    missing_h2 = tier.min_h2 - len(sections)
    if missing_h2 > 0:
        fresh = [h for h in h2_pool if _key(h) not in used]
        if len(fresh) < missing_h2:
            raise OutlineError(
                f"H2 sections: {len(sections)}, the tier needs at least {tier.min_h2}, "
                f"and the project's related searches give only {len(fresh)} more to pad with"
            )
        for _ in range(missing_h2):
            heading = take(h2_pool)
            sections.append({"h2": heading, "h3": []})
        fixes.append(f"{missing_h2} H2s padded")

    excess = h3_total(sections) - tier.max_h3
    if excess > 0:
        fixes.append(f"{excess} H3s cut")
        for section in reversed(sections):
            cut = min(excess, len(section["h3"]))
            del section["h3"][len(section["h3"]) - cut :]
            excess -= cut
    missing_h3 = tier.min_h3 - h3_total(sections)
    if missing_h3 > 0:
        fresh = [h for h in h3_pool if _key(h) not in used]
        if len(fresh) < missing_h3:
            raise OutlineError(
                f"H3 subsections: {h3_total(sections)}, the tier needs at least "
                f"{tier.min_h3}, and the project's related searches and entities give only "
                f"{len(fresh)} more to pad with"
            )
        for _ in range(missing_h3):
            heading = take(h3_pool)
            min(sections, key=lambda s: len(s["h3"]))["h3"].append(heading)  # thinnest first
        fixes.append(f"{missing_h3} H3s padded")
    return FittedOutline(sections, ", ".join(fixes))


def section_budgets(outline: Outline, total_words: int) -> list[int]:
    """The article's word target split across its H2 sections, weighted by their H3s; sums to
    `total_words`. Per-section budgets hit length targets far better than one global number
    (LongWriter, LIFEBench)."""
    weights = [_SECTION_BASE_WEIGHT + len(section["h3"]) for section in outline]
    budgets = [total_words * w // sum(weights) for w in weights]
    for i in range(total_words - sum(budgets)):  # the rounding remainder, one word each
        budgets[i % len(budgets)] += 1
    return budgets
