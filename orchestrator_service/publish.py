"""Post-processing of a tier, in order: a URL per article, then one HTML file per article.

Plain functions over article records; the runner calls them after every article of the tier has
its terminal record."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import jinja2
import nh3
from markupsafe import Markup

from generator_service.text import count_words, visible_text

BUNDLED_TEMPLATES = Path(__file__).parent / "templates"
ARTICLE_TEMPLATE = "article.html"
NO_SITE = "unassigned"
# What the model may put in a body. No script, style, iframe, event handlers or javascript: URLs.
ALLOWED_TAGS = {
    "h2",
    "h3",
    "h4",
    "p",
    "ul",
    "ol",
    "li",
    "strong",
    "em",
    "b",
    "i",
    "a",
    "blockquote",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "br",
    "code",
    "pre",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}}


@dataclass(frozen=True)
class Publication:
    """Where one article is published and written."""

    article_id: int
    url: str
    path: Path


def slugify(title: str, max_length: int = 80) -> str:
    """A URL slug: ASCII lowercase words joined by hyphens ("CNC Machining: A Guide" →
    "cnc-machining-a-guide"); never empty."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "article"


def assign_slugs(articles: list[tuple[int, str, str]]) -> dict[int, str]:
    """(article id, site, title) → slug, unique per site: repeats get -2, -3, …; stable for
    the same input order."""
    taken: dict[str, set[str]] = {}
    slugs: dict[int, str] = {}
    for article_id, site, title in articles:
        base = slug = slugify(title)
        used = taken.setdefault(site, set())
        n = 2
        while slug in used:
            slug, n = f"{base}-{n}", n + 1
        used.add(slug)
        slugs[article_id] = slug
    return slugs


def article_url(site: str, slug: str) -> str:
    """https://{site}/{slug}.html, or a site-relative /{slug}.html when no site is assigned."""
    return f"https://{site}/{slug}.html" if site else f"/{slug}.html"


def sanitise(html: str) -> str:
    """The model's HTML with only the allowlisted tags and attributes (nh3/ammonia)."""
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener",
    )


def template_environment(templates_dir: Path | None) -> jinja2.Environment:
    """Jinja2 with autoescape on; a custom folder's templates win over the bundled ones."""
    folders = [str(templates_dir)] if templates_dir else []
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([*folders, str(BUNDLED_TEMPLATES)]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def meta_description(html: str, limit: int = 155) -> str:
    """The first words of the visible text, cut at a word boundary."""
    text = " ".join(visible_text(html).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "…"


def render_article(
    env: jinja2.Environment,
    *,
    title: str,
    content: str,
    keyword: str,
    site: str,
    url: str,
    tier: str,
) -> str:
    """One article page. Title and description are escaped by autoescape; the body is sanitised
    first and only then marked safe."""
    body = sanitise(content)
    return env.get_template(ARTICLE_TEMPLATE).render(
        title=title,
        body=Markup(body),
        description=meta_description(body),
        keyword=keyword,
        site=site or NO_SITE,
        url=url,
        tier=tier,
        word_count=count_words(body),
    )


def output_path(output_root: Path, job_id: int, site: str, slug: str) -> Path:
    """output/<job id>/<site>/<slug>.html"""
    return output_root / str(job_id) / (site or NO_SITE) / f"{slug}.html"
