"""The job's index.html is a report worth looking at: per-tier counts, word counts against the
target band, the link graph, the failures, tokens, cost and timing; rendered by a real browser
(Debian's headless Chromium) with no console error, no script and no external asset."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from generator_service.llm.simulator import SimulatorConfig
from tests.helpers import TIER, job_file, job_ids_of, run_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path) -> tuple[str, list[str]]:
    """The page's DOM after headless Chromium loaded it, and the console messages it logged."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    result = subprocess.run(
        [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={page.parent / '.chromium'}", "--enable-logging=stderr", "--v=0",
            "--dump-dom", page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def test_the_console_check_sees_a_page_that_errs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><p>x</p><script>throw new Error("kaboom")</script>')
    _dom, console = render(bad)
    assert any("kaboom" in line for line in console)


def test_the_job_report_shows_the_run_and_renders_cleanly(start_stack) -> None:
    # Every 5th outline reply is garbage: a failure to list; two tiers to draw.
    handle = start_stack(simulator=SimulatorConfig(latency=0.01, garbage_outline_every=5))
    tiers = {"tier1": {**TIER, "count": 3}, "tier2": {**TIER, "count": 6}}
    events, finished = run_job(handle, job_file(tiers, deployment_targets=["one.example.net"]))
    assert finished.ok, finished.error
    summary = finished.summary
    report = handle.output_dir / str(job_ids_of(events)[0]) / "index.html"
    html = report.read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://', "")
    dom, console = render(report)
    assert console == []
    assert dom.count('<svg class="histogram"') == 2 and dom.count('<svg class="link-graph"') == 1
    # One node per page plus the money site; one edge per link placed.
    pages = (
        summary.generated_articles
        + summary.augmented_articles
        + summary.short_articles
        + summary.long_articles
    )
    assert dom.count('class="node"') == pages and dom.count('class="node money"') == 1
    assert dom.count('<line class="edge"') == summary.links_placed
    # Per-tier counts, the failures, and the run's numbers, as the summary has them.
    table = dom.split('<table class="tier-counts">')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(tier\d)</td>((?:<td[^>]*>[^<]*</td>)+)</tr>", table)
    counts = {tier: [int(n) for n in re.findall(r">(\d+)</td>", cells)] for tier, cells in rows}
    # requested, generated, augmented, short, long, failed, skipped
    assert [counts[t][0] for t in ("tier1", "tier2")] == [3, 6]
    assert all(c[0] == sum(c[1:7]) for c in counts.values())
    failed = sum(c[5] for c in counts.values())
    assert failed == summary.failed_articles >= 1
    assert dom.count("OutlineError") == failed
    assert f"{summary.prompt_tokens + summary.completion_tokens:,}" in dom
    assert f"${summary.cost_usd:.4f}" in dom
    assert "after submission" in dom
