"""Post-processing helpers: slugs, URLs, sanitising and escaping."""

from orchestrator_service.publish import (
    ARTICLE_TEMPLATE,
    article_url,
    assign_slugs,
    render_article,
    sanitise,
    slugify,
    template_environment,
)


def test_slugs_are_ascii_words_joined_by_hyphens() -> None:
    assert slugify("CNC Machining: A Guide (2026)!") == "cnc-machining-a-guide-2026"
    assert slugify("Über Fräsen") == "uber-frasen"
    assert slugify("!!!") == "article"


def test_slugs_are_unique_per_site_and_reused_across_sites() -> None:
    slugs = assign_slugs([(1, "a.com", "Same"), (2, "a.com", "same!"), (3, "b.com", "Same")])
    assert slugs == {1: "same", 2: "same-2", 3: "same"}


def test_urls_use_the_site_when_there_is_one() -> None:
    assert article_url("a.com", "x") == "https://a.com/x.html"
    assert article_url("", "x") == "/x.html"


def test_scripts_handlers_and_javascript_urls_do_not_survive() -> None:
    dirty = (
        '<p onclick="steal()">Hi<script>alert(1)</script><a href="javascript:alert(2)">x</a>'
        '<iframe src="https://evil"></iframe><style>p{}</style></p>'
    )
    clean = sanitise(dirty)
    for bad in ("<script", "onclick", "javascript:", "<iframe", "<style"):
        assert bad not in clean.lower()
    assert "Hi" in clean


def test_title_is_escaped_and_body_is_sanitised_in_the_page() -> None:
    page = render_article(
        template_environment(None).get_template(ARTICLE_TEMPLATE),
        title="<img src=x onerror=alert(1)>",
        body="<h2>Ok</h2><p>Fine <b>bold</b></p><script>x()</script>",
        keyword="k",
        site="a.com",
        url="https://a.com/p.html",
        tier="tier1",
    )
    assert "<img" not in page and "&lt;img" in page
    assert "<script>x()" not in page and "<h2>Ok</h2>" in page
