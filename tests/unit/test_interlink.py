"""Interlinking: the link graph's properties, and where links land in a body."""

import re

import pytest

from orchestrator_service.interlink import (
    AnchorTexts,
    Link,
    Published,
    href,
    place_links,
    plan_links,
    up_targets,
)

MONEY = "https://example.com/money"


def articles(tier: int, count: int, sites: tuple[str, ...] = ("a.net", "b.net")) -> list[Published]:
    return [
        Published(
            article_id=tier * 1000 + i,
            tier=tier,
            site=sites[i % len(sites)],
            slug=f"t{tier}-{i}",
            url=f"https://{sites[i % len(sites)]}/t{tier}-{i}.html",
            title=f"Title {tier}.{i}",
        )
        for i in range(count)
    ]


def anchors() -> AnchorTexts:
    return AnchorTexts("cnc machining", ["lathe", "spindle"], ["cnc machining cost"])


@pytest.mark.parametrize("sources", range(1, 13))
@pytest.mark.parametrize("targets", range(1, 13))
def test_up_links_reach_every_target_when_the_counts_allow(sources: int, targets: int) -> None:
    plan = up_targets(sources, targets)
    assert len(plan) == sources
    for chosen in plan:
        assert 1 <= len(chosen) <= 2 and len(set(chosen)) == len(chosen)
        assert all(0 <= t < targets for t in chosen)
    reached = {t for chosen in plan for t in chosen}
    expected = targets if sources >= targets else min(targets, 2 * sources)
    assert len(reached) == expected


def test_the_job_graph_links_money_site_and_tiers() -> None:
    tiers = {1: articles(1, 3), 2: articles(2, 7), 3: articles(3, 4)}
    plan = plan_links(tiers, MONEY, anchors())
    by_id = {a.article_id: a for tier in tiers.values() for a in tier}
    url_tier = {a.url: a.tier for a in by_id.values()}
    for a in tiers[1]:
        assert [link.href for link in plan.links if link.source_id == a.article_id] == [MONEY]
    for number in (2, 3):
        for a in tiers[number]:
            hrefs = [link.href for link in plan.links if link.source_id == a.article_id]
            assert 1 <= len(hrefs) <= 2
            assert all(url_tier[h] == number - 1 for h in hrefs)
    # Tier 2 has more articles than tier 1: every tier-1 article receives a link.
    received = {link.href for link in plan.links if link.kind == "up"}
    assert {a.url for a in tiers[1]} <= received
    assert plan.count("money") == 3 and plan.notes == []


def test_a_tier_with_no_successful_article_is_skipped_over_and_noted() -> None:
    tiers = {1: articles(1, 2), 2: [], 3: articles(3, 3)}
    plan = plan_links(tiers, "", anchors())
    assert plan.count("money") == 0
    assert any("no money_site_url" in note for note in plan.notes)
    assert any("tier2 has no article, linked to tier1" in note for note in plan.notes)
    assert {link.href for link in plan.links} <= {a.url for a in tiers[1]}


def test_see_also_links_stay_within_tier_and_site() -> None:
    tiers = {1: articles(1, 4)}
    plan = plan_links(tiers, MONEY, anchors(), see_also=True)
    see_also = [link for link in plan.links if link.kind == "see_also"]
    by_id = {a.article_id: a for a in tiers[1]}
    by_url = {a.url: a for a in tiers[1]}
    assert len(see_also) == 4
    for link in see_also:
        source, target = by_id[link.source_id], by_url[link.href]
        assert source.site == target.site and source is not target


def test_relative_links_point_into_the_exported_tree() -> None:
    one, two, three = articles(1, 3)
    assert href(one, three, "relative") == "t1-2.html"  # same site
    assert href(one, two, "relative") == "../b.net/t1-1.html"
    assert href(one, two, "absolute") == "https://b.net/t1-1.html"


def test_anchor_texts_vary_over_keyword_entities_searches_and_titles() -> None:
    texts = anchors()
    chosen = [texts.next("The Target") for _ in range(10)]
    assert set(chosen) == {"cnc machining", "lathe", "spindle", "cnc machining cost", "The Target"}


BODY = "\n".join(
    ["<h2>Intro</h2>"]
    + [f"<p>Paragraph {i} talks about shop work and tools.</p>" for i in range(8)]
)


def _paragraph_of_each_link(html: str) -> list[int]:
    paragraphs = re.findall(r"<p>(.*?)</p>", html, re.DOTALL)
    return [i for i, p in enumerate(paragraphs) for _ in re.findall(r"<a ", p)]


def test_links_are_spread_over_paragraphs_not_piled_at_the_end() -> None:
    links = [Link(1, f"https://x.net/{i}.html", f"anchor {i}", "up") for i in range(3)]
    html = place_links(BODY, links)
    where = _paragraph_of_each_link(html)
    assert len(where) == 3 and len(set(where)) == 3  # one paragraph each
    assert min(where) > 0 and max(where) < 7  # not the first, not the last
    assert html.count("<p>") == 8  # inside existing paragraphs, no new ones


def test_an_anchor_phrase_already_in_the_text_becomes_the_link() -> None:
    body = "<p>Intro.</p><p>Good tools matter in every shop.</p><p>End.</p>"
    html = place_links(body, [Link(1, "https://x.net/t.html", "tools", "up")])
    assert '<p>Good <a href="https://x.net/t.html">tools</a> matter in every shop.</p>' in html


def test_existing_links_and_tag_attributes_are_not_rewritten() -> None:
    body = '<p>Intro.</p><p><a href="https://y.net/">tools</a> and <em title="tools">x</em>.</p>'
    html = place_links(body, [Link(1, "https://x.net/t.html", "tools", "up")])
    assert '<a href="https://y.net/">tools</a>' in html and 'title="tools"' in html
    assert html.count("https://x.net/t.html") == 1


def test_anchor_text_and_href_are_escaped() -> None:
    link = Link(1, 'https://x.net/"><script>.html', "<b>bold</b> & co", "up")
    html = place_links("<p>One.</p><p>Two.</p>", [link])
    assert "<script>" not in html and "<b>bold" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html and "&quot;&gt;&lt;script&gt;" in html


def test_a_body_without_paragraphs_gets_one_at_the_end() -> None:
    html = place_links("<h2>Only a heading</h2>", [Link(1, "https://x.net/t.html", "t", "up")])
    assert html.startswith("<h2>Only a heading</h2>") and html.endswith("</a>.</p>")


def test_a_link_sentence_never_follows_a_lists_lead_in_or_a_fragment() -> None:
    body = (
        "<h2>Basics</h2><p>Basic concepts of CNC machinery include:</p><ul><li>axes</li></ul>"
        "<p>The spindle turns the tool.</p><p>and then the</p>"
    )
    links = [Link(i, f"https://x.net/{i}.html", f"anchor {i}", "up") for i in range(3)]
    html = place_links(body, links)
    assert "<p>Basic concepts of CNC machinery include:</p>" in html  # the lead-in untouched
    assert "<p>and then the</p>" in html  # so is a fragment
    assert html.count("https://x.net/") == 3  # every link placed: after the full sentence
    assert "<p>The spindle turns the tool. " in html


def test_links_no_paragraph_can_take_go_to_a_paragraph_of_their_own() -> None:
    html = place_links("<p>Tools include:</p>", [Link(1, "https://x.net/t.html", "t", "up")])
    assert html.startswith("<p>Tools include:</p>") and html.endswith("</a>.</p>")
