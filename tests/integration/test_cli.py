"""The `tierwriter` command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from generator_service.llm.simulator import SimulatorConfig
from tests.helpers import job_file

ROOT = Path(__file__).resolve().parents[2]


def tierwriter(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator_service.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_demo_runs_end_to_end_with_no_setup(tmp_path: Path) -> None:
    result = tierwriter("demo", "--latency", "0.05", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tier1: Generating 5 articles (concurrency: 5)" in out
    assert "tier2: Generating 10 articles (concurrency: 5)" in out
    assert "FAILED at outline" in out and "Traceback (most recent call last)" in out
    for line in (
        "Jobs:               1/1 processed",
        "Articles requested: 15",
        "Failed:             1",
        "Augmentation rate:",
        "API calls:",
        "Tokens:",
        "Execution time:",
    ):
        assert line in out
    pages = list((tmp_path / "output" / "demo").rglob("*.html"))
    assert len(pages) == 14  # 15 articles, one failed on purpose


def test_generate_batch_prints_progress_and_exit_codes(start_stack, tmp_path: Path) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.01))
    address = handle.stack.orchestrator_address
    good = tmp_path / "job.json"
    good.write_text(job_file({"tier1": {"count": 3, "min_word_count": 300, "max_word_count": 500}}))
    ok = tierwriter(
        "generate-batch",
        "-j",
        str(good),
        "-u",
        "admin",
        "-p",
        handle.password,
        "--address",
        address,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[tier1][3/3] Saved (ID:" in ok.stdout and "Articles requested: 3" in ok.stdout

    bad = tmp_path / "bad.json"
    bad.write_text('{"jobs": [{"tiers": {}}]}')
    rejected = tierwriter(
        "generate-batch",
        "-j",
        str(bad),
        "--address",
        address,
        cwd=tmp_path,
        env={"TIERWRITER_USER": "admin", "TIERWRITER_PASSWORD": handle.password},
    )
    assert rejected.returncode == 2
    assert "jobs[0].tiers: name at least one tier" in rejected.stderr

    denied = tierwriter(
        "generate-batch",
        "-j",
        str(good),
        "-u",
        "admin",
        "-p",
        "nope",
        "--address",
        address,
        cwd=tmp_path,
    )
    assert denied.returncode == 3 and "invalid username or password" in denied.stderr

    listed = tierwriter(
        "jobs", "list", "-u", "admin", "-p", handle.password, "--address", address, cwd=tmp_path
    )
    assert listed.returncode == 0 and "completed" in listed.stdout

    shown = tierwriter(
        "jobs",
        "show",
        "1",
        "-u",
        "admin",
        "-p",
        handle.password,
        "--address",
        address,
        cwd=tmp_path,
    )
    assert shown.returncode == 0 and "tier1: " in shown.stdout

    missing = tierwriter(
        "jobs",
        "show",
        "999",
        "-u",
        "admin",
        "-p",
        handle.password,
        "--address",
        address,
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "job 999 does not exist" in missing.stderr


def test_an_unreachable_orchestrator_is_reported_with_exit_code_4(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(job_file())
    result = tierwriter(
        "generate-batch",
        "-j",
        str(job),
        "-u",
        "a",
        "-p",
        "b",
        "--address",
        "127.0.0.1:1",
        cwd=tmp_path,
    )
    assert result.returncode == 4
    assert "orchestrator_service at 127.0.0.1:1 is unavailable (is it running?)" in result.stderr


def test_help_lists_every_command() -> None:
    result = tierwriter("--help", cwd=ROOT)
    for command in ("generate-batch", "up", "demo", "jobs"):
        assert command in result.stdout
