"""Bad job files through the real services and the real CLI: each is rejected with a message that
names the field, the command exits 2, and the database is exactly as it was."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import click
import pytest
from sqlalchemy import create_engine, inspect, text

from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from orchestrator_service import cli
from orchestrator_service.client import OrchestratorClient
from tests.helpers import TIER, job_file
from tierwriter.runtime import ServiceCallError

BASE: dict[str, Any] = {
    "project": {"name": "limits", "main_keyword": "cnc machining"},
    "tiers": {"tier1": dict(TIER)},
}


def job(**changes: Any) -> str:
    """The base job with `changes` applied; a dotted key reaches into nested objects."""
    spec = copy.deepcopy(BASE)
    for path, value in changes.items():
        target = spec
        *parents, last = path.split("__")
        for key in parents:
            target = target[key]
        target[last] = value
    return json.dumps({"jobs": [spec]})


def tier(**fields: Any) -> dict[str, Any]:
    return {"tier1": {**TIER, **fields}}


# (job file text, what the message must name); one case a line, however long
CORPUS: list[tuple[str, str]] = [
    ("", "(file): the job file is empty"),
    ("   \n\t ", "(file): the job file is empty"),
    ("{", "(file): not valid JSON"),
    ('{"jobs": [}', "(file): not valid JSON"),
    ("[]", "(file): Input should be a valid dictionary"),
    ("null", "(file): Input should be a valid dictionary"),
    ('"jobs"', "(file): Input should be a valid dictionary"),
    ("{}", "jobs: Field required"),
    ('{"jobs": []}', "jobs: List should have at least 1 item"),
    ('{"jobs": {}}', "jobs: Input should be a valid list"),
    ('{"jobs": [1]}', "jobs[0]: Input should be a valid dictionary"),
    (json.dumps({"jobs": [BASE] * 101}), "jobs: List should have at most 100 items"),
    (job(unexpected=True), "jobs[0].unexpected: Extra inputs are not permitted"),
    (json.dumps({"jobs": [BASE], "extra": 1}), "extra: Extra inputs are not permitted"),
    (job(tiers={}), "jobs[0].tiers: name at least one tier"),
    (job(tiers={"first": TIER}), "jobs[0].tiers: tier names are tier1, tier2"),
    (job(tiers={f"tier{i}": TIER for i in range(1, 12)}), "jobs[0].tiers: at most 10 tiers"),
    (job(tiers=tier(count=0)), "jobs[0].tiers.tier1.count: Input should be greater than or equal to 1"),
    (job(tiers=tier(count=10_001)), "jobs[0].tiers.tier1.count: Input should be less than or equal to 10000"),
    (job(tiers=tier(count="ten")), "jobs[0].tiers.tier1.count: Input should be a valid integer"),
    (job(tiers=tier(count=1.5)), "jobs[0].tiers.tier1.count: Input should be a valid integer"),
    (job(tiers=tier(min_word_count=49)), "jobs[0].tiers.tier1.min_word_count: Input should be greater than or equal to 50"),
    (job(tiers=tier(max_word_count=20_001)), "jobs[0].tiers.tier1.max_word_count: Input should be less than or equal to 20000"),
    (job(tiers=tier(min_word_count=900, max_word_count=600)), "jobs[0].tiers.tier1: min_word_count (900) is above max_word_count (600)"),
    (job(tiers=tier(min_h2_tags=5, max_h2_tags=2)), "jobs[0].tiers.tier1: min_h2_tags (5) is above max_h2_tags (2)"),
    (job(tiers=tier(min_h3_tags=9, max_h3_tags=1)), "jobs[0].tiers.tier1: min_h3_tags (9) is above max_h3_tags (1)"),
    (job(tiers=tier(max_h2_tags=51)), "jobs[0].tiers.tier1.max_h2_tags: Input should be less than or equal to 50"),
    (job(tiers=tier(colour="red")), "jobs[0].tiers.tier1.colour: Extra inputs are not permitted"),
    (job(max_workers=0), "jobs[0].max_workers: Input should be greater than or equal to 1"),
    (job(max_workers=257), "jobs[0].max_workers: Input should be less than or equal to 256"),
    (job(max_workers="many"), "jobs[0].max_workers: Input should be a valid integer"),
    (job(continue_on_error="sometimes"), "jobs[0].continue_on_error: Input should be a valid boolean"),
    (job(project=None), "jobs[0]: give either project (inline) or project_id"),
    (job(project_id=1), "jobs[0]: give either project (inline) or project_id"),
    (job(project__name=""), "jobs[0].project.name: String should have at least 1 character"),
    (job(project__name="n" * 201), "jobs[0].project.name: String should have at most 200 characters"),
    (job(project__main_keyword="k" * 501), "jobs[0].project.main_keyword: String should have at most 500 characters"),
    (job(project__entities=["e"] * 101), "jobs[0].project.entities: List should have at most 100 items"),
    (job(project__entities="lathe"), "jobs[0].project.entities: Input should be a valid list"),
    (job(project__related_searches=[""]), "jobs[0].project.related_searches[0]: String should have at least 1"),
    (job(project__money_site_url="javascript:alert(1)"), "jobs[0].project.money_site_url: must be an http:// or https:// URL"),
    (job(project__money_site_url="ftp://example.com"), "jobs[0].project.money_site_url: must be an http:// or https:// URL"),
    (job(project__name="a\u0000b"), "jobs[0].project.name: contains a control character"),
    (job(project__main_keyword="cnc\u001bmachining"), "jobs[0].project.main_keyword: contains a control character"),
    (job(deployment_targets=["../../etc"]), "jobs[0].deployment_targets[0].hostname: '../../etc' is not a valid hostname"),
    (job(deployment_targets=["a b.example.com"]), "is not a valid hostname"),
    (job(deployment_targets=["xn--\u202e.example.com"]), "is not a valid hostname"),
    (job(deployment_targets=[{"hostname": "a.example.com", "template": "../x"}]), "jobs[0].deployment_targets[0].template"),
    (job(deployment_targets=["a.example.com"] * 1001), "jobs[0].deployment_targets: List should have at most 1000 items"),
    (job(models={"content": "m" * 201}), "jobs[0].models.content: String should have at most 200 characters"),
    (job(link_style="both"), "jobs[0].link_style: Input should be 'absolute' or 'relative'"),
    ('{"a": "' + "x" * (1024 * 1024) + '"}', "(file): larger than 1024 KiB"),
    ("[" * 100_000 + "]" * 100_000, "(file): nested deeper than 32 levels at line 1 column 33"),
    ('{"jobs": [' + "{" * 40 + "}" * 40 + "]}", "(file): nested deeper than 32 levels"),
    (job(max_workers=7_654_321).replace("7654321", "9" * 100_000), "jobs[0].max_workers: a number of 100,000 digits; at most 30"),
    (job(tiers=tier(count=7_654_321)).replace("7654321", "1" + "0" * 5000), "jobs[0].tiers.tier1.count: a number of 5,001 digits"),
    (job(max_cost_usd=float("inf")), "jobs[0].max_cost_usd: Input should be less than or equal to"),
]  # fmt: skip


def _database_state(database_url: str) -> Any:
    """The database as bytes (SQLite: the files) or as every table's rows (PostgreSQL)."""
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.parent.glob(path.name + "*"))
        }
    return _rows_of_every_table(database_url)


def _rows_of_every_table(database_url: str) -> dict[str, Any]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return {
                table: connection.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()
                for table in sorted(inspect(connection).get_table_names())
            }
    finally:
        engine.dispose()


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40


def test_every_bad_job_file_is_rejected_naming_the_field_and_writes_nothing(
    start_stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    address = handle.stack.orchestrator_address
    credentials = ["-u", "admin", "-p", handle.password, "--address", address]
    assert cli.main(["jobs", "list", *credentials]) == 0  # the first call's one-time work
    before = _database_state(handle.database_url)
    for n, (text_, expected) in enumerate(CORPUS):
        path = tmp_path / f"bad-{n}.json"
        path.write_text(text_, encoding="utf-8", errors="surrogatepass")
        capsys.readouterr()
        code = cli.main(["generate-batch", "-j", str(path), *credentials])
        err = capsys.readouterr().err
        assert code == cli.EXIT_BAD_INPUT, (n, text_[:80], err)
        assert expected in err, (n, text_[:80], err)
    assert _database_state(handle.database_url) == before
    assert handle.stack.simulator.stats().requests == 0


API_KEY = "sk-test-RECOGNISABLE-api-key-5c1e7"
ADMIN_PASSWORD = "pw-RECOGNISABLE-admin-9f2d4"
SERVICE_TOKEN = "st-RECOGNISABLE-service-token-77ab0"
SIGNING_SECRET = "ss-RECOGNISABLE-signing-secret-0123456789abcdef"
USER_PASSWORD = "pw-RECOGNISABLE-user-3e8a1"


def test_no_secret_reaches_logs_events_the_database_or_the_output(
    start_stack, monkeypatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)  # every level, the SDK's and gRPC's debug logs included
    with LlmSimulator(SimulatorConfig(rate_limit_every=4, garbage_outline_every=3)) as simulator:
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", simulator.base_url)
        monkeypatch.setenv("TIERWRITER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        monkeypatch.setenv("SERVICE_TOKEN", SERVICE_TOKEN)
        monkeypatch.setenv("TOKEN_SIGNING_SECRET", SIGNING_SECRET)
        handle = start_stack(admin_password=None)  # the password comes from the environment
        address = handle.stack.orchestrator_address
        with OrchestratorClient(address, "admin", ADMIN_PASSWORD) as admin:
            admin.create_user("ann", USER_PASSWORD)
            admin.set_password("ann", USER_PASSWORD + "-2")
        with OrchestratorClient(address) as anonymous:
            token = anonymous.login("ann", USER_PASSWORD + "-2").token
        with OrchestratorClient(address, token=token) as c:
            events = list(c.run_job(job_file({"tier1": {**TIER, "count": 4}})))
            with pytest.raises(ServiceCallError) as denied:
                OrchestratorClient(address, "admin", "wrong").list_jobs()
        handle.stack.stop()
    assert events[-1].run_finished.summary.requested_articles == 4
    assert simulator.stats().rate_limited > 0  # retries happened and were logged
    places = {
        "logs": caplog.text,
        "console": "".join(capsys.readouterr()),
        "events": "\n".join(str(e) for e in events) + str(denied.value),
        "database": str(_rows_of_every_table(handle.database_url)),
        "output": "\n".join(
            p.read_text(errors="replace") for p in handle.output_dir.rglob("*") if p.is_file()
        ),
    }
    for where, text_ in places.items():
        for secret in (API_KEY, ADMIN_PASSWORD, SERVICE_TOKEN, SIGNING_SECRET, USER_PASSWORD):
            assert secret not in text_, f"{secret} leaked into the {where}"
        assert token not in text_, f"a session token leaked into the {where}"


def test_help_never_shows_a_secret_from_the_environment(
    monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERWRITER_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("TOKEN_SIGNING_SECRET", SIGNING_SECRET)
    paths: list[list[str]] = []

    def walk(group: click.Group, path: list[str]) -> None:
        paths.append(path)
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, [*path, name])
            else:
                paths.append([*path, name])

    walk(cli.cli, [])
    helps = []
    for path in paths:
        assert cli.main([*path, "--help"]) == 0
        helps.append(capsys.readouterr().out)
    assert len(helps) > 15 and any("users" in h for h in helps)
    for secret in (ADMIN_PASSWORD, API_KEY, SIGNING_SECRET):
        assert all(secret not in h for h in helps)


def test_a_runaway_reply_is_refused_before_it_is_parsed(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig(reply_padding=500_000))
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        events = list(c.run_job(job_file({"tier1": {**TIER, "count": 2}})))
    ready = next(e.titles_ready for e in events if e.WhichOneof("event") == "titles_ready")
    assert "ReplyTooLargeError" in ready.error and "at most 400,000 are accepted" in ready.error
    assert events[-1].run_finished.summary.failed_articles == 2
