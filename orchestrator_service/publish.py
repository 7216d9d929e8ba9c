"""The publishing parts of post-processing: slugs and URLs, sanitising, templates, output paths.

Plain functions; orchestrator_service.postprocess runs them in order over a job's records."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import jinja2
import nh3
from markupsafe import Markup

from generator_service.text import count_text_words, visible_text
from orchestrator_service.report import JobReport

BUNDLED_TEMPLATES = Path(__file__).parent / "templates"
ARTICLE_TEMPLATE = "article.html"
INDEX_TEMPLATE = "index.html"
JOB_INDEX_TEMPLATE = "job_index.html"
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
class IndexEntry:
    """One article as a site's index page lists it."""

    title: str
    href: str
    description: str
    tier: str


def slugify(title: str, max_length: int = 80) -> str:
    """A URL slug: ASCII lowercase words joined by hyphens ("CNC Machining: A Guide" →
    "cnc-machining-a-guide"); never empty."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "article"


def assign_slugs(
    articles: list[tuple[int, str, str]], taken: dict[str, set[str]] | None = None
) -> dict[int, str]:
    """(article id, site, title) → slug, unique per site: a slug in `taken[site]` or given
    earlier in the list gets -2, -3, …; the same input gives the same slugs."""
    used_by_site = {site: set(slugs) for site, slugs in (taken or {}).items()}
    slugs: dict[int, str] = {}
    for article_id, site, title in articles:
        base = slug = slugify(title)
        used = used_by_site.setdefault(site, set())
        n = 2
        while slug in used:
            slug, n = f"{base}-{n}", n + 1
        used.add(slug)
        slugs[article_id] = slug
    return slugs


def article_url(site: str, slug: str) -> str:
    """https://{site}/{slug}.html, or a site-relative /{slug}.html when no site is assigned."""
    return f"https://{site}/{slug}.html" if site else f"/{slug}.html"


def slug_of(url: str) -> str:
    """The slug of a URL made by article_url."""
    return url.rsplit("/", 1)[-1].removesuffix(".html")


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
    """Jinja2 with autoescape on. TEMPLATES_DIR's own article.html and index.html win over the
    bundled ones; its subfolders are template sets that sites can name."""
    folders = [str(templates_dir)] if templates_dir else []
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([*folders, str(BUNDLED_TEMPLATES)]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def meta_description(visible: str, limit: int = 155) -> str:
    """The first words of a page's visible text (visible_text), cut at a word boundary."""
    text = " ".join(visible.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + "…"


@dataclass(frozen=True)
class RenderedPage:
    """An article's page, and the description its site's index shows for it."""

    html: str
    description: str


def has_template_set(env: jinja2.Environment, template_set: str) -> bool:
    """Whether TEMPLATES_DIR has the folder `template_set` with an article.html in it."""
    try:
        env.get_template(f"{template_set}/{ARTICLE_TEMPLATE}")
    except jinja2.TemplateNotFound:
        return False
    return True


def site_template(env: jinja2.Environment, template_set: str, name: str) -> jinja2.Template:
    """`name` (article.html or index.html) from the site's template set, else the default."""
    candidates = [f"{template_set}/{name}", name] if template_set else [name]
    return env.select_template(candidates)


def render_article(
    template: jinja2.Template,
    *,
    title: str,
    body: str,
    keyword: str,
    site: str,
    url: str,
    tier: str,
    index_href: str = "index.html",
) -> RenderedPage:
    """One article page. Title and description are escaped by autoescape; the body is sanitised
    first and only then marked safe. Its HTML is parsed once (the most costly step)."""
    clean = sanitise(body)
    visible = visible_text(clean)
    description = meta_description(visible)
    html = template.render(
        title=title,
        body=Markup(clean),
        description=description,
        keyword=keyword,
        site=site or NO_SITE,
        url=url,
        tier=tier,
        word_count=count_text_words(visible),
        index_href=index_href,
    )
    return RenderedPage(html, description)


def render_index(
    template: jinja2.Template, *, site: str, keyword: str, entries: list[IndexEntry]
) -> str:
    """A site's index.html: every article published on it, linked."""
    return template.render(site=site or NO_SITE, keyword=keyword, entries=entries)


def render_job_index(
    env: jinja2.Environment,
    *,
    job_id: int,
    project: str,
    money_site_url: str,
    sites: list[tuple[str, int]],
    titles_files: list[str],
    report: JobReport,
) -> str:
    """output/<job id>/index.html: the job's report (report.py), its sites, each with its page
    count, and title lists."""
    return env.get_template(JOB_INDEX_TEMPLATE).render(
        job_id=job_id,
        project=project,
        money_site_url=money_site_url,
        sites=[(site or NO_SITE, count) for site, count in sites],
        titles_files=titles_files,
        report=report,
    )


def job_dir(output_root: Path, job_id: int) -> Path:
    """output/<job id>"""
    return output_root / str(job_id)


def page_path(site: str, slug: str) -> str:
    """Where a page lies inside its job's folder: <site>/<slug>.html"""
    return f"{site or NO_SITE}/{slug}.html"


def titles_name(tier: str) -> str:
    """A tier's title list inside its job's folder: titles-<tier>.txt"""
    return f"titles-{tier}.txt"
