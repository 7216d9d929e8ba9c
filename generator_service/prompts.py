"""The prompts tierwriter sends. Kept in one place: the simulator recognises these shapes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SYSTEM = (
    "You are an expert writer of long-form, factual web articles. Follow the instructions "
    "exactly and return only what is asked for."
)
# The prompt lists at most this many titles to avoid; deduplication itself is done in code.
MAX_TITLES_IN_PROMPT = 50


@dataclass(frozen=True)
class Prompt:
    """A system message and a user prompt."""

    system: str
    user: str


def _context(keyword: str, entities: list[str], related: list[str]) -> str:
    return (
        f"Main keyword: {keyword}\n"
        f"Entities: {', '.join(entities) or 'none'}\n"
        f"Related searches: {', '.join(related) or 'none'}\n"
    )


def titles_prompt(
    keyword: str,
    entities: list[str],
    related: list[str],
    count: int,
    avoid: list[str],
    length: tuple[int, int],
) -> Prompt:
    """Ask for `count` titles, one per line."""
    avoid_block = ""
    if avoid:
        shown = "\n".join(f"- {t}" for t in avoid[-MAX_TITLES_IN_PROMPT:])
        avoid_block = f"Do not repeat or rephrase any of these existing titles:\n{shown}\n"
    return Prompt(
        SYSTEM,
        f"Write {count} distinct article titles.\n"
        + _context(keyword, entities, related)
        + avoid_block
        + f"Each title is {length[0]} to {length[1]} characters long.\n"
        + "Return only the titles, one per line, without numbering, quotes, markdown or any "
        "other text.",
    )


def outline_prompt(
    title: str,
    keyword: str,
    entities: list[str],
    related: list[str],
    h2: tuple[int, int],
    h3: tuple[int, int],
) -> Prompt:
    """Ask for a JSON outline within the tier's heading ranges."""
    return Prompt(
        SYSTEM,
        f'Create an outline for the article titled "{title}".\n'
        + _context(keyword, entities, related)
        + f"Use between {h2[0]} and {h2[1]} H2 sections and between {h3[0]} and {h3[1]} "
        "H3 subsections in total.\n"
        'Return only JSON of the form {"outline": [{"h2": "...", "h3": ["...", "..."]}]}.',
    )


def outline_response_format() -> dict[str, Any]:
    """The outline's JSON schema as `response_format`: endpoints with structured outputs
    (OpenAI, vLLM, llama.cpp) then return parseable JSON even from weak models. The heading
    counts stay in the prompt: strict schemas do not all take minItems/maxItems."""
    heading_list = {"type": "array", "items": {"type": "string"}}
    section = {
        "type": "object",
        "properties": {"h2": {"type": "string"}, "h3": heading_list},
        "required": ["h2", "h3"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {"outline": {"type": "array", "items": section}},
        "required": ["outline"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "outline", "strict": True, "schema": schema},
    }


def outline_repair_prompt(
    title: str, h2: tuple[int, int], h3: tuple[int, int], problem: str, previous_reply: str
) -> Prompt:
    """Ask once more for an outline, saying what was wrong with the last one."""
    shown = previous_reply.strip()[:2000] or "(empty)"
    return Prompt(
        SYSTEM,
        f'Repair the outline for the article titled "{title}". Your previous reply could not be '
        f"used: {problem}.\n"
        f"Use between {h2[0]} and {h2[1]} H2 sections and between {h3[0]} and {h3[1]} "
        "H3 subsections in total.\n"
        'Return only JSON of the form {"outline": [{"h2": "...", "h3": ["...", "..."]}]}.\n'
        f"Previous reply:\n{shown}",
    )


def content_prompt(
    title: str,
    keyword: str,
    entities: list[str],
    related: list[str],
    outline: list[dict[str, Any]],
    budgets: list[int],
    min_words: int,
    max_words: int,
) -> Prompt:
    """Ask for the article body: the outline's headings in order, each H2 section with its own
    word budget. The bounds given here already include the compensation.

    The outline goes as the HTML skeleton to fill, not as JSON: a small model (Qwen2.5 0.5B)
    answered a JSON outline with the JSON itself in one reply of five, never a skeleton."""
    skeleton = "".join(
        f"<h2>{section['h2']}</h2> (about {words} words)\n"
        + "".join(f"<h3>{h3}</h3>\n" for h3 in section["h3"])
        for section, words in zip(outline, budgets, strict=True)
    )
    return Prompt(
        SYSTEM,
        f'Write the article titled "{title}" as an HTML fragment using only h2, h3, p, ul, ol, '
        "li, strong and em tags (no html, head or body).\n"
        + _context(keyword, entities, related)
        + f"Length: between {min_words} and {max_words} words.\n"
        + "Use exactly the headings of the outline below, in order, as <h2> and <h3> elements, "
        "and write the prose under each in <p> elements. Give each H2 section (with its H3s) "
        "about the number of words in brackets after it; do not write the brackets."
        + OUTLINE_MARKER
        + skeleton,
    )


# Where a content prompt's outline starts: what comes before it are the instructions.
OUTLINE_MARKER = "\nOutline:\n"
_SKELETON_LINE = re.compile(r"^<(h[23])>(.*)</\1>(?: \(about (\d+) words\))?$")


def outline_in_prompt(prompt: str) -> list[dict[str, Any]]:
    """The outline (sections with their "words" budgets) a content prompt asks for; [] when it
    has none. For the simulator and the tests: the one place that reads the skeleton."""
    if OUTLINE_MARKER not in prompt:
        return []
    sections: list[dict[str, Any]] = []
    for line in prompt.split(OUTLINE_MARKER, 1)[1].splitlines():
        match = _SKELETON_LINE.match(line)
        if not match:
            break
        tag, heading, words = match.groups()
        if tag == "h2":
            sections.append({"h2": heading, "h3": [], "words": int(words or 0)})
        elif sections:
            sections[-1]["h3"].append(heading)
    return sections


def augment_prompt(content: str, word_count: int, min_words: int, max_words: int) -> Prompt:
    """Ask to lengthen an article that came out below the tier's minimum, by the gap up to the
    middle of the tier's range and never past its maximum."""
    gap = (min_words + max_words) // 2 - word_count
    return Prompt(
        SYSTEM,
        f"The article below has {word_count} words; it needs between {min_words} and "
        f"{max_words} words. Add about {gap} words, to at least {min_words} words and at most "
        f"{max_words}, by deepening its existing sections with facts, examples and "
        "explanations, keeping every heading. Return the whole article as an HTML fragment."
        "\n<article>\n" + content + "\n</article>",
    )


def content_retry_prompt(original: Prompt, problem: str) -> Prompt:
    """Ask once more for an article whose reply failed a quality gate, saying why. The original
    request comes after the reason, unchanged (its outline last)."""
    return Prompt(
        original.system,
        f"Your previous reply could not be used: {problem}. Write the article itself: prose in "
        "<p> elements under the outline's <h2> and <h3> headings, as an HTML fragment; no JSON, "
        "no markdown, no code fences, and do not repeat these instructions.\n" + original.user,
    )


def shorten_prompt(content: str, word_count: int, min_words: int, max_words: int) -> Prompt:
    """Ask to shorten an article that came out over the tier's maximum and that no section
    boundary cuts into its range, to the middle of the range."""
    target = (min_words + max_words) // 2
    return Prompt(
        SYSTEM,
        f"The article below has {word_count} words; it must have between {min_words} and "
        f"{max_words} words. Shorten it to about {target} words by tightening its paragraphs, "
        "keeping every heading. Return the whole article as an HTML fragment."
        "\n<article>\n" + content + "\n</article>",
    )


def instructions_of(prompt: str) -> str:
    """The instructions of a user prompt, without the outline or the article it carries: what a
    reply must not say back."""
    for marker in (OUTLINE_MARKER, "<article>"):
        prompt = prompt.split(marker, 1)[0]
    return prompt


def continuation_prompt(original: Prompt, text_so_far: str) -> Prompt:
    """Ask to go on with a reply that the token limit cut off."""
    return Prompt(
        original.system,
        "Continue the text below exactly where it stops, without repeating anything, in the same "
        "format, and finish it.\n<original-request>\n"
        + original.user
        + "\n</original-request>\n<text-so-far>\n"
        + text_so_far[-4000:]
        + "\n</text-so-far>",
    )
