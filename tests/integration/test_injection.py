"""Injection strings (SQL, HTML, shell, template, path traversal) in every text field of a job
file, in a password, and in what the model writes: through the real services they are stored as
the very data they were, rendered harmlessly, and never become a path, a command or a query.
Where a field has a grammar (hostnames, template sets, usernames), they are refused instead."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from tests.helpers import TIER, article_rows, count_rows, job_ids_of, run_job, sql_rows
from tests.xss_payloads import active_content
from tierwriter.runtime import ServiceCallError

PWNED = Path("/tmp/tierwriter-injection-pwned")
INJECTIONS = [
    "'; DROP TABLE jobs; --",
    'x" OR "1"="1',
    "Robert'); DELETE FROM users WHERE ('1'='1",
    "<script>alert('inj')</script>",
    "<img src=x onerror=alert('inj')>",
    "\"><svg onload=alert('inj')>",
    f"$(touch {PWNED})",
    f"`touch {PWNED}`; rm -rf ~",
    "../../../../etc/passwd",
    "..\\..\\windows\\system32\\config",
    "{{ 7*7 }} {% include '/etc/passwd' %}",
    "%s%s%n%x ${jndi:ldap://x}",
]
# Template markup is escaped text in every page (the template's own head is allowed).
TEMPLATE_OWN = {"<body>", "<meta>", "<style>", "<link>"}


def hostile_job() -> dict[str, Any]:
    """A job whose every free-text field holds injection strings."""
    return {
        "project": {
            "name": "../../" + INJECTIONS[0],
            "main_keyword": INJECTIONS[1] + " " + INJECTIONS[3],
            "entities": INJECTIONS,
            "related_searches": list(reversed(INJECTIONS)),
            "money_site_url": "https://example.com/a?q=%27%3B+DROP+TABLE+jobs&x=<script>alert(1)"
            "</script>&p=../../etc/passwd",
        },
        "tiers": {"tier1": {**TIER, "count": 2}, "tier2": {**TIER, "count": 2}},
        "models": {"title": INJECTIONS[6], "outline": INJECTIONS[8], "content": INJECTIONS[10]},
        "deployment_targets": ["blog.example.net"],
    }


def _project_row(database_url: str, job_id: int) -> dict[str, Any]:
    (found,) = sql_rows(
        database_url,
        "SELECT p.name, p.main_keyword, p.entities, p.related_searches, p.money_site_url, j.spec"
        " FROM projects p JOIN jobs j ON j.project_id = p.id WHERE j.id = :j",
        j=job_id,
    )
    for column in ("entities", "related_searches", "spec"):
        if isinstance(found[column], str):  # SQLite hands JSON back as text
            found[column] = json.loads(found[column])
    return found


def test_injection_strings_in_every_text_field_are_stored_as_data_and_rendered_harmlessly(
    start_stack,
) -> None:
    PWNED.unlink(missing_ok=True)
    handle = start_stack(simulator=SimulatorConfig(latency=0.0, payloads=INJECTIONS))
    job = hostile_job()
    events, finished = run_job(handle, json.dumps({"jobs": [job]}))
    assert finished.ok, finished.error
    job_id = job_ids_of(events)[0]

    # Stored exactly as given: the strings are data, and every table is still there.
    stored = _project_row(handle.database_url, job_id)
    for field in ("name", "main_keyword", "entities", "related_searches", "money_site_url"):
        assert stored[field] == job["project"][field], field
    assert stored["spec"]["models"] == job["models"]
    for table in ("jobs", "projects", "generated_content"):  # still there: counting would raise
        assert count_rows(handle.database_url, table) > 0
    assert count_rows(handle.database_url, "users") == 1
    rows = article_rows(handle.database_url, job_id)
    # Titles with template braces are refused as titles (and asked for again): what the model
    # could not replace is a shortfall, never a stored title with braces.
    assert len(rows) + finished.summary.title_shortfall == 4 and len(rows) >= 2
    assert all(r["status"] in ("generated", "augmented") for r in rows)
    assert all("{" not in r["title"] for r in rows)
    assert all(any(s in r["title"] for s in INJECTIONS) for r in rows)  # the model's titles
    assert all(INJECTIONS[0] in r["content"] for r in rows)  # and bodies carried them

    # Every file was written under the job's output folder (its runs' folders, which the job's
    # folder shows), named by job id, slug and site.
    output = handle.output_dir.resolve()
    written = [p for p in output.rglob("*") if p.is_file()]
    runs = output / ".runs" / str(job_id)
    assert (output / str(job_id)).resolve().is_relative_to(runs)
    assert written and all(p.resolve().is_relative_to(runs) for p in written)
    assert all(".." not in p.relative_to(output).parts for p in written)
    assert not PWNED.exists()  # no shell ever saw a field

    pages = [p for p in written if p.suffix == ".html"]
    assert len(pages) == len(rows) + 1 + 1  # the articles, the site's index, the job's index
    report = (output / str(job_id) / "index.html").resolve()
    plain = {s for s in INJECTIONS if "<" not in s}
    shown_somewhere: set[str] = set()
    for page in pages:
        content = page.read_text(encoding="utf-8")
        # The job's report draws its own SVGs (no script, no handler: active_content checks).
        own = TEMPLATE_OWN | ({"<svg>"} if page.resolve() == report else set())
        assert set(active_content(content)) <= own, page
        if page.name != "index.html":
            # The strings are on the pages as text: template syntax is shown, not evaluated.
            # (Text a hostile tag's payload swallowed goes with the tag the sanitiser drops, so
            # a page may lack one; together they show every one.)
            shown = html.unescape(content)
            assert "{{ 7*7 }}" in shown and " 49 " not in shown, page  # not evaluated
            shown_somewhere |= {s for s in plain if s in shown}
    assert shown_somewhere == plain
    job_index = (output / str(job_id) / "index.html").read_text(encoding="utf-8")
    assert job["project"]["name"] in html.unescape(job_index)
    assert job["project"]["name"] not in job_index  # it was escaped on the way in


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        ("deployment_targets", ["'; DROP TABLE sites; --"], "is not a valid hostname"),
        ("deployment_targets", ["../../etc/passwd"], "is not a valid hostname"),
        ("deployment_targets", ["$(reboot).example.net"], "is not a valid hostname"),
        ("deployment_targets", ["<script>.example.net"], "is not a valid hostname"),
        (
            "deployment_targets",
            [{"hostname": "ok.example.net", "template": "../../etc"}],
            "a template set is a folder name",
        ),
        (
            "deployment_targets",
            [{"hostname": "ok.example.net", "template": "x; rm -rf /"}],
            "a template set is a folder name",
        ),
        ("tiers", {"tier1/../../x": dict(TIER)}, "tier names are tier1, tier2"),
    ],
)
def test_injection_strings_in_fields_with_a_grammar_are_refused_naming_the_field(
    start_stack, where: str, value: Any, problem: str
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    job = hostile_job()
    job[where] = value
    with pytest.raises(ServiceCallError) as error:
        run_job(handle, json.dumps({"jobs": [job]}))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"jobs[0].{where}" in error.value.details and problem in error.value.details
    assert count_rows(handle.database_url, "jobs") == 0
    assert count_rows(handle.database_url, "projects") == 0


def test_a_password_full_of_injection_strings_is_just_a_password(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    password = "'; DROP TABLE users; -- $(reboot) <script>"
    address = handle.stack.orchestrator_address
    with OrchestratorClient(address, "admin", handle.password) as admin:
        admin.create_user("eve", password)
    with OrchestratorClient(address) as anonymous:
        assert anonymous.login("eve", password).user.username == "eve"
        with pytest.raises(ServiceCallError) as error:
            anonymous.login("eve", "' OR '1'='1")
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert count_rows(handle.database_url, "users") == 2
