"""Tiers that link, through the real services: titles across tiers and jobs, outline control,
sites, URLs, the interlink graph, templates, sanitising and the export tree."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from generator_service.llm.simulator import SimulatorConfig
from generator_service.text import normalise_title
from orchestrator_service.client import OrchestratorClient
from tests.helpers import (
    TIER,
    article_pages,
    article_rows,
    articles_of,
    job_file,
    job_ids_of,
    run_job,
)
from tests.xss_payloads import PAYLOADS, active_content
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.runtime import ServiceCallError

MONEY = "https://example.com/cnc"
SITES = ["one.example.net", "two.example.net"]


def tier(count: int, **overrides: Any) -> dict[str, Any]:
    return {**TIER, "count": count, **overrides}


def article_part(html: str) -> str:
    """What is inside the page's <article>: the body, without the template around it."""
    return html.split("<article>", 1)[1].split("</article>", 1)[0]


def hrefs_in_article(html: str) -> list[str]:
    """The link targets inside the page's <article>, not the template's own links."""
    return re.findall(r'href="([^"]+)"', article_part(html))


def steps_of(events: list[pb.JobEvent]) -> list[pb.PostProcessingStep]:
    return [e.post_processing for e in events if e.WhichOneof("event") == "post_processing"]


def test_the_interlink_graph_of_a_three_tier_job(start_stack) -> None:
    # Every 5th outline is garbage (twice): two articles fail and must stay out of the graph.
    handle = start_stack(simulator=SimulatorConfig(latency=0.01, garbage_outline_every=5))
    tiers = {"tier1": tier(3), "tier2": tier(6), "tier3": tier(4)}
    events, finished = run_job(handle, job_file(tiers, deployment_targets=SITES))
    job_id = job_ids_of(events)[0]
    rows = article_rows(handle.database_url, job_id)
    failed = [r for r in rows if r["status"] == "failed"]
    ok = [r for r in rows if r["status"] != "failed"]
    assert len(failed) == 2 and len(ok) == 11 and finished.ok

    # Every successful article has a URL on its site and a written page; no failed one has.
    assert all(r["url"] == f"https://{r['site']}/{Path(r['output_path']).name}" for r in ok)
    assert all(Path(r["output_path"]).read_text() == r["html"] for r in ok)
    assert not any(r["url"] or r["output_path"] for r in failed)
    written = {r["url"] for r in ok}
    urls_of_tier = {n: {r["url"] for r in ok if r["tier"] == f"tier{n}"} for n in (1, 2, 3)}

    received: dict[str, int] = dict.fromkeys(written, 0)
    for r in ok:
        links = hrefs_in_article(r["html"])
        n = int(r["tier"][4:])
        assert set(links) <= written | {MONEY}, "a link to a failed or unwritten page"
        if n == 1:
            assert MONEY in links
        else:
            up = [link for link in links if link in urls_of_tier[n - 1]]
            assert 1 <= len(up) <= 2, (r["tier"], r["article_index"], links)
        for link in links:
            if link in received:
                received[link] += 1
    # Every tier-N article receives a link when tier N+1 has at least as many.
    for n in (1, 2):
        if len(urls_of_tier[n + 1]) >= len(urls_of_tier[n]):
            assert all(received[url] >= 1 for url in urls_of_tier[n]), n

    steps = steps_of(events)
    assert [s.step for s in steps] == [
        pb.POST_STEP_URLS,
        pb.POST_STEP_LINKS,
        pb.POST_STEP_TEMPLATES,
        pb.POST_STEP_EXPORT,
    ]
    assert all(not s.error for s in steps)
    skipped = steps[0].skipped
    assert sorted((s.tier, s.article_index) for s in skipped) == sorted(
        (r["tier"], r["article_index"]) for r in failed
    )
    assert all("failed at outline" in s.reason for s in skipped)
    assert steps[3].count == 11 and finished.summary.pages_written == 11
    assert finished.summary.links_placed == steps[1].count > 0

    # The export tree: pages per site, an index per site, the job's index and title lists.
    job_dir = handle.output_dir / str(job_id)
    assert {p.parent.name for p in article_pages(job_dir)} == set(SITES)
    for site in SITES:
        index = (job_dir / site / "index.html").read_text()
        on_site = [r for r in ok if r["site"] == site]
        assert all(f'href="{Path(r["output_path"]).name}"' in index for r in on_site)
    assert (job_dir / "index.html").is_file()
    for n in (1, 2, 3):
        lines = (job_dir / f"titles-tier{n}.txt").read_text().splitlines()
        assert lines == [r["title"] for r in rows if r["tier"] == f"tier{n}"]


def test_a_link_sentence_never_lands_in_a_lists_lead_in(start_stack) -> None:
    # A model fond of lists: every other paragraph ends "… The basic concepts include:".
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, list_lead_ins=True))
    tiers = {"tier1": tier(3), "tier2": tier(6)}
    events, finished = run_job(handle, job_file(tiers, deployment_targets=SITES))
    assert finished.ok, finished.error
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    linked = [r for r in rows if "<a " in r["html"]]
    assert len(linked) == len(rows)  # every page links (up, or to its siblings)
    for row in rows:
        assert row["html"].count("include:</p>") == row["content"].count("include:</p>")
        assert not re.search(r"include:\s*(?:<[^>]+>\s*)*[A-Z][^<]*<a ", row["html"]), row["title"]


def test_relative_links_let_a_reader_click_through_the_export(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.01))
    tiers = {"tier1": tier(2), "tier2": tier(3)}
    events, finished = run_job(
        handle, job_file(tiers, deployment_targets=SITES, link_style="relative")
    )
    assert finished.ok, finished.error
    job_dir = handle.output_dir / str(job_ids_of(events)[0])
    for page in article_pages(job_dir):
        for link in hrefs_in_article(page.read_text()):
            if link != MONEY:
                assert (page.parent / link).resolve().is_file(), (page, link)
    # Tier 2 → tier 1 → money site, by following files.
    tier2 = next(
        r for r in article_rows(handle.database_url, job_ids_of(events)[0]) if r["tier"] == "tier2"
    )
    page = Path(tier2["output_path"])
    up = next(link for link in hrefs_in_article(page.read_text()) if link != MONEY)
    assert MONEY in hrefs_in_article((page.parent / up).read_text())


def test_titles_are_never_repeated_across_tiers_and_jobs_and_a_shortfall_is_reported(
    start_stack,
) -> None:
    # A model that only ever writes the same three titles, in varying case and punctuation.
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, repeat_titles=True))
    first = json.loads(job_file({"tier1": tier(2), "tier2": tier(2)}))
    project = first["jobs"][0]["project"]
    second = {"project": project, "tiers": {"tier1": tier(2)}}
    first["jobs"].append(second)
    events, _ = run_job(handle, json.dumps(first))

    # One project's jobs run one after the other, so the second sees the first's titles.
    ready = [e.titles_ready for e in events if e.WhichOneof("event") == "titles_ready"]
    assert [(t.count, t.shortfall) for t in ready] == [(2, 0), (1, 1), (0, 2)]
    summaries = [e.run_finished.summary for e in events if e.WhichOneof("event") == "run_finished"]
    assert [s.title_shortfall for s in summaries] == [1, 2]
    assert [s.requested_articles for s in summaries] == [4, 2]
    assert sum(s.generated_articles + s.augmented_articles for s in summaries) == 3
    titles = [
        r["title"]
        for job_id in job_ids_of(events)
        for r in article_rows(handle.database_url, job_id)
    ]
    keys = [normalise_title(t) for t in titles]
    assert len(titles) == 3 and len(set(keys)) == 3
    # The top-up rounds are bounded: 1 + 3 calls per tier at most, then it stops.
    assert handle.stack.simulator.stats().by_kind["titles"] <= 3 * 4


def test_outlines_are_repaired_once_and_kept_in_range(start_stack) -> None:
    # Every 2nd outline has too few sections; the repair comes back in range.
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, short_outline_every=2))
    shape = {"min_h2_tags": 3, "max_h2_tags": 4, "min_h3_tags": 4, "max_h3_tags": 6}
    events, finished = run_job(handle, job_file({"tier1": tier(6, **shape)}))
    assert finished.ok and finished.summary.failed_articles == 0
    repairs = [
        a for a in articles_of(events) if a.kind == article_pb.ARTICLE_EVENT_KIND_OUTLINE_REPAIRING
    ]
    assert len(repairs) == 3 and all(", the tier needs at least 3" in a.error for a in repairs)
    assert handle.stack.simulator.stats().by_kind["outline_repair"] == 3
    for r in article_rows(handle.database_url, job_ids_of(events)[0]):
        outline = r["outline"] if isinstance(r["outline"], list) else json.loads(r["outline"])
        assert 3 <= len(outline) <= 4 and 4 <= sum(len(s["h3"]) for s in outline) <= 6
        # The body follows the outline's headings, in order.
        assert re.findall(r"<h2>(.*?)</h2>", r["content"]) == [s["h2"] for s in outline]
        assert re.findall(r"<h3>(.*?)</h3>", r["content"]) == [h for s in outline for h in s["h3"]]


def test_an_outline_that_stays_garbage_fails_with_its_reason(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, garbage_outline_every=1))
    events, _finished = run_job(handle, job_file({"tier1": tier(2)}))
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("not JSON" in r["error"] and "after one repair request" in r["error"] for r in rows)


def test_no_xss_payload_reaches_an_exported_page(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, payloads=PAYLOADS))
    events, finished = run_job(
        handle, job_file({"tier1": tier(3), "tier2": tier(4)}, deployment_targets=SITES)
    )
    assert finished.ok, finished.error
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    # They were there: text around them loose under headings is mended into paragraphs (which
    # may re-quote them), and a draft cut at a section boundary may lose its last ones.
    for marker in ("alert('xss-1')", "evil.example/x.js", "xss-3"):
        assert any(marker in r["content"] for r in rows), marker
    job_dir = handle.output_dir / str(job_ids_of(events)[0])
    pages = list(job_dir.rglob("*.html"))
    assert len(pages) == 7 + 2 + 1
    for page in pages:
        html = page.read_text()
        found = set(active_content(html))
        own = {"<body>", "<meta>", "<style>", "<link>"}  # the template's
        if page == job_dir / "index.html":
            own.add("<svg>")  # the report's own drawings, checked for handlers like the rest
        assert found <= own, (page, found)
        if page.name != "index.html":
            assert active_content(article_part(html)) == []


def test_slugs_are_unique_per_site_across_jobs_and_stable_on_republish(start_stack) -> None:
    # Two projects, one site, a model with only three titles: the jobs get the same titles.
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, repeat_titles=True))
    site = ["one.example.net"]
    first_events, _ = run_job(handle, job_file({"tier1": tier(3)}, deployment_targets=site))
    second_events, _ = run_job(handle, job_file({"tier1": tier(3)}, deployment_targets=site))
    first, second = job_ids_of(first_events)[0], job_ids_of(second_events)[0]
    urls_first = [r["url"] for r in article_rows(handle.database_url, first)]
    urls_second = [r["url"] for r in article_rows(handle.database_url, second)]
    assert len(set(urls_first + urls_second)) == 6
    assert [u.removesuffix(".html") + "-2.html" for u in urls_first] == urls_second

    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        steps = c.publish_job(first)
        with pytest.raises(ServiceCallError) as missing:
            c.publish_job(9999)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert steps[0].detail == "0 new, 3 kept from an earlier run" and not steps[-1].error
    assert [r["url"] for r in article_rows(handle.database_url, first)] == urls_first


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system of its own (a tmpfs: mounting needs root, which CI has), unmounted
    afterwards. Ask for it before start_stack, so the services stop before it goes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:  # lazily: detached now even while a service still holds a file there
        unmounted = subprocess.run(
            ["umount", "--lazy", str(disk)], capture_output=True, text=True, check=False
        )
        if unmounted.returncode != 0:  # say so, without hiding the test's own failure
            warnings.warn(f"{disk} is still mounted: {unmounted.stderr.strip()}", stacklevel=1)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no room left; the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_costs_the_publish_step_not_the_articles(small_disk, start_stack) -> None:
    output = small_disk / "output"
    handle = start_stack(simulator=SimulatorConfig(latency=0.0), output_dir=output)
    filler = fill(small_disk)  # full before the tier writes its titles file
    events, finished = run_job(handle, job_file({"tier1": tier(3)}, deployment_targets=SITES[:1]))
    job_id = job_ids_of(events)[0]
    titles_file = output / str(job_id) / "titles-tier1.txt"
    notices = [e.notice.message for e in events if e.WhichOneof("event") == "notice"]
    assert (
        f"titles file not written (cannot write {titles_file}: the disk is full (No space left "
        "on device)); the titles are stored and the articles go on: publishing writes the file"
    ) in notices
    # Every article was generated and recorded all the same: the tier did not stop.
    assert {r["status"] for r in article_rows(handle.database_url, job_id)} <= {
        "generated",
        "augmented",
    }
    assert finished.summary.generated_articles + finished.summary.augmented_articles == 3
    export_step = steps_of(events)[-1]
    assert export_step.step == pb.POST_STEP_EXPORT
    assert export_step.error.startswith(f"failed: cannot write {output / str(job_id)}/")
    assert "the disk is full" in export_step.error
    assert f"`tierwriter jobs publish {job_id}` finishes it" in export_step.error
    assert not finished.ok and "post-processing failed: cannot write" in finished.error

    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        try:
            read_only = c.publish_job(job_id)[-1].error
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        assert "the file system is read-only" in read_only
        filler.unlink()  # room again: publishing finishes the job, titles file included
        again = c.publish_job(job_id)
    assert not any(s.error for s in again) and again[-1].count == 3
    assert len(article_pages(output / str(job_id))) == 3
    assert len(titles_file.read_text().splitlines()) == 3


def test_a_site_uses_its_template_set(start_stack, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    (templates / "magazine").mkdir(parents=True)
    (templates / "magazine" / "article.html").write_text(
        "<html><body class=magazine><h1>{{ title }}</h1><article>{{ body }}</article></body></html>"
    )
    handle = start_stack(simulator=SimulatorConfig(latency=0.0), templates_dir=templates)
    targets = [{"hostname": "mag.example.net", "template": "magazine"}, "plain.example.net"]
    events, finished = run_job(handle, job_file({"tier1": tier(4)}, deployment_targets=targets))
    assert finished.ok, finished.error
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    for r in rows:
        magazine = "<body class=magazine>" in r["html"]
        assert magazine == (r["site"] == "mag.example.net")
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        sites = {s.hostname: s.template for s in c.list_sites()}
    assert sites == {"mag.example.net": "magazine", "plain.example.net": ""}

    # A template set that does not exist is a bad job file: nothing runs.
    bad = job_file({"tier1": tier(1)}, deployment_targets=[{"hostname": "x.net", "template": "no"}])
    with pytest.raises(ServiceCallError) as error:
        run_job(handle, bad)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "template set 'no' not found" in error.value.details


def test_a_tier_can_have_its_own_sites(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    tiers = {"tier1": tier(2), "tier2": tier(3, deployment_targets=["three.example.net"])}
    events, finished = run_job(handle, job_file(tiers, deployment_targets=SITES))
    assert finished.ok, finished.error
    rows = article_rows(handle.database_url, job_ids_of(events)[0])
    assert [r["site"] for r in rows if r["tier"] == "tier1"] == SITES
    assert {r["site"] for r in rows if r["tier"] == "tier2"} == {"three.example.net"}


def test_a_failed_export_is_reported_and_publish_runs_it_again(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    # The fresh database's first job is job 1, and its first run writes under lease epoch 1: a
    # file where that run's site folder must go breaks the export.
    blocker = handle.output_dir / ".runs" / "1" / "1" / SITES[0]
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    events, finished = run_job(handle, job_file({"tier1": tier(2)}, deployment_targets=SITES[:1]))
    steps = steps_of(events)
    assert [s.step for s in steps][-1] == pb.POST_STEP_EXPORT
    assert "failed: " in steps[-1].error and "jobs publish 1" in steps[-1].error
    assert not finished.ok and "job 1: post-processing failed" in finished.error
    assert finished.summary.generated_articles + finished.summary.augmented_articles == 2

    blocker.unlink()
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        again = c.publish_job(1)
    assert not any(s.error for s in again) and again[-1].count == 2
    assert len(article_pages(handle.output_dir / "1")) == 2
