"""The job report's SVGs and page: text a model or a user wrote is shown as text."""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator_service import publish, report

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_titles_and_reasons_are_text_in_the_graph_and_the_page() -> None:
    graph = report.link_graph(
        f"https://m.example/{HOSTILE}",
        [report.GraphPage(1, 1, HOSTILE, f"site/{HOSTILE}.html")],
        [(1, 0)],
    )
    tier = report.TierReport(
        "tier1", 2, 1, 0, 0, 0, 1, 0, 0.01, 300, 500, [420], report.word_histogram([420], 300, 500)
    )
    html = publish.render_job_index(
        publish.template_environment(None),
        job_id=1,
        project=HOSTILE,
        money_site_url="https://m.example",
        sites=[("one.example.net", 1)],
        titles_files=["titles-tier1.txt"],
        report=report.JobReport(
            tiers=[tier],
            failed=[report.FailedEntry("tier1", 2, HOSTILE, "outline", HOSTILE)],
            link_graph=graph,
            links=1,
            api_calls=5,
            tokens=1000,
            cost_usd=0.01,
            submitted=datetime(2026, 1, 1, tzinfo=UTC),
            written=datetime(2026, 1, 1, 0, 1, 5, tzinfo=UTC),
        ),
    )
    assert "<script" not in html and "<img" not in html and "onerror=alert(1)>" not in html
    assert html.count("&lt;script&gt;") >= 4  # the project, the node's title and href, the row
    assert "1m 05s after submission" in html


def test_the_histogram_marks_bars_below_the_minimum() -> None:
    svg = report.word_histogram([250, 260, 420, 480], 300, 500)
    bars = [part for part in svg.split("<rect") if 'class="bar"' in part]
    assert sum(report.SHORT_COLOUR in bar for bar in bars) == 1  # 250 and 260 share a bin
    assert sum(report.BAR_COLOUR in bar for bar in bars) == 2
