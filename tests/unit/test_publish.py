"""Post-processing helpers: slugs, URLs, sanitising and escaping, template sets."""

import errno
from pathlib import Path

import pytest

from orchestrator_service.publish import (
    ARTICLE_TEMPLATE,
    INDEX_TEMPLATE,
    article_url,
    assign_slugs,
    has_template_set,
    render_article,
    sanitise,
    site_template,
    slugify,
    template_environment,
)
from orchestrator_service.run_folder import OutputWriteError, write_atomically
from tests.xss_payloads import PAYLOADS, active_content


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
    page = _page(
        "<img src=x onerror=alert(1)>", "<h2>Ok</h2><p>Fine <b>bold</b></p><script>x()</script>"
    )
    assert "<img" not in page and "&lt;img" in page
    assert "<script>x()" not in page and "<h2>Ok</h2>" in page


def _page(title: str, body: str) -> str:
    return render_article(
        template_environment(None).get_template(ARTICLE_TEMPLATE),
        title=title,
        body=body,
        keyword="k",
        site="a.com",
        url="https://a.com/p.html",
        tier="tier1",
    ).html


@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_xss_payload_survives_into_a_page(payload: str) -> None:
    page = _page(f"Title {payload}", f"<h2>H</h2><p>Before {payload} after.</p>{payload}<p>End</p>")
    article = page.split("<article>", 1)[1].split("</article>", 1)[0]
    assert active_content(article) == [], payload
    # Outside the article only our template's own elements (its <style>, <meta>s) are active.
    assert active_content(page) == active_content(_page("Title", "<p>Body</p>")), payload


def test_the_checker_sees_what_a_browser_would_run() -> None:
    # The test above is only as good as active_content: it must flag the raw payloads.
    # One payload is inert as written and only turns into a script after a naive filter
    # removes the inner "<script>": it is there to catch such a filter, not the checker.
    evasion = "<scr<script>ipt>alert('xss-28')</scr</script>ipt>"
    missed = [p for p in PAYLOADS if p != evasion and not active_content(f"<p>{p} after</p>")]
    assert missed == []


def test_the_corpus_is_large_enough() -> None:
    assert len(PAYLOADS) >= 20


def test_slugs_avoid_the_ones_taken_on_the_site() -> None:
    slugs = assign_slugs([(1, "a.com", "Same"), (2, "b.com", "Same")], {"a.com": {"same"}})
    assert slugs == {1: "same-2", 2: "same"}


def test_a_site_template_set_is_used_and_the_default_otherwise(tmp_path: Path) -> None:
    (tmp_path / "magazine").mkdir()
    (tmp_path / "magazine" / "article.html").write_text("MAGAZINE {{ title }} {{ body }}")
    env = template_environment(tmp_path)
    assert has_template_set(env, "magazine") and not has_template_set(env, "missing")
    page = render_article(
        site_template(env, "magazine", ARTICLE_TEMPLATE),
        title="<T>",
        body="<p>x</p>",
        keyword="k",
        site="a.com",
        url="u",
        tier="tier1",
    )
    assert page.html == "MAGAZINE &lt;T&gt; <p>x</p>"
    # The set has no index.html: the default one is used for the site index.
    assert site_template(env, "magazine", INDEX_TEMPLATE).name == INDEX_TEMPLATE
    assert site_template(env, "", ARTICLE_TEMPLATE).name == ARTICLE_TEMPLATE


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full (No space left"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied (Permission"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only (Read"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ],
)
def test_a_failed_write_names_the_file_and_the_cause_in_words(error: OSError, cause: str) -> None:
    message = str(OutputWriteError(Path("/srv/output/1/titles-tier1.txt"), error))
    assert message.startswith(f"cannot write /srv/output/1/titles-tier1.txt: {cause}")


def test_write_atomically_reports_the_path_it_could_not_write(tmp_path: Path) -> None:
    (tmp_path / "1").write_text("a file where a folder must go")
    page = tmp_path / "1" / "site" / "page.html"
    with pytest.raises(OutputWriteError, match=r"cannot write .*/1/site/page\.html: Not a dir"):
        write_atomically(page, "<p>x</p>")
    assert [p.name for p in tmp_path.iterdir()] == ["1"]  # nothing half-written left
