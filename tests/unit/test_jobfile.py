"""Job file validation: every error names the field and the problem."""

import json

import pytest

from orchestrator_service.jobfile import JobFileError, parse_job_file, parse_project_file

TIER = {"count": 3, "min_word_count": 600, "max_word_count": 900}


def job(**fields: object) -> str:
    spec = {"project": {"name": "p", "main_keyword": "k"}, "tiers": {"tier1": dict(TIER)}}
    spec.update(fields)
    return json.dumps({"jobs": [spec]})


def test_a_minimal_job_gets_the_documented_defaults() -> None:
    spec = parse_job_file(job()).jobs[0]
    assert spec.max_workers is None and spec.continue_on_error is True
    tier = spec.tiers["tier1"]
    assert (tier.min_h2_tags, tier.max_h2_tags, tier.min_h3_tags, tier.max_h3_tags) == (3, 5, 3, 8)


def test_tiers_run_in_numeric_order() -> None:
    spec = parse_job_file(job(tiers={"tier10": TIER, "tier2": TIER, "tier1": TIER})).jobs[0]
    assert [name for name, _ in spec.ordered_tiers()] == ["tier1", "tier2", "tier10"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "(file): the job file is empty"),
        ("{", "(file): not valid JSON at line 1"),
        ('{"jobs": []}', "jobs: List should have at least 1 item"),
        (job(max_workers=0), "jobs[0].max_workers: Input should be greater than or equal to 1"),
        (job(max_workers=257), "jobs[0].max_workers: Input should be less than or equal to 256"),
        (job(max_workers="five"), "jobs[0].max_workers: Input should be a valid integer"),
        (job(tiers={}), "jobs[0].tiers: name at least one tier"),
        (job(tiers={"first": TIER}), "jobs[0].tiers: tier names are tier1, tier2"),
        (
            job(tiers={"tier1": {**TIER, "min_word_count": 1000}}),
            "jobs[0].tiers.tier1: min_word_count (1000) is above max_word_count (900)",
        ),
        (
            job(tiers={"tier1": {**TIER, "count": 0}}),
            "jobs[0].tiers.tier1.count: Input should be greater",
        ),
        (
            job(tiers={"tier1": {**TIER, "colour": "red"}}),
            "jobs[0].tiers.tier1.colour: Extra inputs",
        ),
        (job(project=None), "jobs[0]: give either project (inline) or project_id"),
        (job(project_id=4), "jobs[0]: give either project (inline) or project_id, not both"),
        (
            job(deployment_targets=["not a host"]),
            "jobs[0].deployment_targets[0].hostname: 'not a host' is not",
        ),
        (
            job(deployment_targets=[{"hostname": "a.example.net", "template": "../../etc"}]),
            "jobs[0].deployment_targets[0].template: a template set is a folder name",
        ),
        (
            job(
                deployment_targets=[
                    {"hostname": "a.example.net", "template": "one"},
                    {"hostname": "a.example.net", "template": "two"},
                ]
            ),
            "a.example.net is given two templates, 'one' and 'two'",
        ),
        (
            job(link_style="local"),
            "jobs[0].link_style: Input should be 'absolute' or 'relative'",
        ),
        (
            job(project={"name": "p", "main_keyword": "k", "money_site_url": "ftp://x"}),
            "jobs[0].project.money_site_url: must be an http:// or https:// URL",
        ),
        (
            job(project={"name": "", "main_keyword": "k"}),
            "jobs[0].project.name: String should have at least 1",
        ),
    ],
)
def test_bad_job_files_are_rejected_naming_the_field(text: str, expected: str) -> None:
    with pytest.raises(JobFileError) as error:
        parse_job_file(text)
    assert expected in str(error.value)


def test_deployment_targets_are_normalised_to_lowercase() -> None:
    spec = parse_job_file(job(deployment_targets=["Blog.Example.NET"])).jobs[0]
    assert [site.hostname for site in spec.deployment_targets] == ["blog.example.net"]


def test_a_tier_goes_to_its_own_sites_or_else_the_jobs() -> None:
    tiers = {
        "tier1": {"count": 2, "min_word_count": 600, "max_word_count": 900},
        "tier2": {
            "count": 4,
            "min_word_count": 600,
            "max_word_count": 900,
            "deployment_targets": ["c.example.net"],
        },
    }
    spec = parse_job_file(
        job(
            tiers=tiers,
            deployment_targets=["a.example.net", {"hostname": "b.example.net", "template": "mag"}],
        )
    ).jobs[0]
    assert spec.sites_of(spec.tiers["tier1"]) == ["a.example.net", "b.example.net"]
    assert spec.sites_of(spec.tiers["tier2"]) == ["c.example.net"]
    assert [(s.hostname, s.template) for s in spec.all_sites()] == [
        ("a.example.net", ""),
        ("b.example.net", "mag"),
        ("c.example.net", ""),
    ]


def test_a_project_file_is_validated_like_a_job_files_project() -> None:
    project = parse_project_file('{"name": "p", "main_keyword": "k", "entities": ["e"]}')
    assert (project.name, project.entities) == ("p", ["e"])
    with pytest.raises(JobFileError, match="main_keyword: Field required"):
        parse_project_file('{"name": "p"}')
    with pytest.raises(JobFileError, match="not valid JSON at line 1"):
        parse_project_file("{")
