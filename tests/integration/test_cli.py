"""The `tierwriter` command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import pytest
import trustme

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from tests.helpers import (
    article_pages,
    article_rows,
    count_rows,
    free_port,
    job_file,
    rows_by_status,
)
from tierwriter.job.v1.job_pb2 import JobStatus

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
    (failed,) = [line for line in out.splitlines() if "FAILED at outline" in line]
    assert failed.endswith(")") and "(error record ID " in failed  # one line, no traceback
    assert "Traceback" not in out
    (record,) = [
        r
        for r in article_rows(f"sqlite:///{tmp_path / 'data' / 'demo.db'}", 1)
        if r["status"] == "failed"
    ]
    assert record["error_traceback"].startswith("Traceback (most recent call last)")
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
    assert "Outline unusable" in out and "asking once more" in out
    assert "API Error: Rate limit exceeded, retrying in" in out and "Retry successful" in out
    assert "[post-processing] Interlinking:" in out and "skipped tier" in out
    pages = article_pages(tmp_path / "output" / "demo")
    assert len(pages) == 14  # 15 articles, one failed on purpose
    job_dir = tmp_path / "output" / "demo" / "1"
    assert (job_dir / "index.html").is_file() and (job_dir / "titles-tier2.txt").is_file()
    assert {p.parent.name for p in pages} == {"blog-one.example.net", "blog-two.example.net"}
    # A reader can click from a tier-2 page to a tier-1 page to the money site, on disk.
    rows = article_rows(f"sqlite:///{tmp_path / 'data' / 'demo.db'}", 1)
    tier1_pages = {(tmp_path / r["output_path"]).resolve() for r in rows if r["tier"] == "tier1"}
    tier2 = tmp_path / next(r["output_path"] for r in rows if r["tier"] == "tier2" and r["url"])
    body = tier2.read_text().split("<article>")[1]
    targets = {(tier2.parent / h).resolve() for h in re.findall(r'<a href="([^"]+)"', body)}
    tier1_page = next(iter(targets & tier1_pages))
    assert 'href="https://example.com/cnc"' in tier1_page.read_text()


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


class _Lines:
    """The lines a subprocess prints, collected by a thread (select() on a buffered text pipe
    misses lines already in Python's buffer)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream: TextIO) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")  # end of output

    def until(self, marker: str, timeout: float = 60) -> str:
        """Everything printed up to and including the line that contains `marker`."""
        seen, deadline = "", time.monotonic() + timeout
        while marker not in seen:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{marker!r} not printed within {timeout}s:\n{seen}") from None
            if not line:
                raise AssertionError(f"the process ended before printing {marker!r}:\n{seen}")
            seen += line
        return seen

    def rest(self) -> str:
        """Everything printed after the last `until`, once the process has ended."""
        self._thread.join(timeout=30)
        return "".join(iter(self._queue.get_nowait, ""))


def _up_environment(tmp_path: Path) -> tuple[dict[str, str], int]:
    """The environment `tierwriter up` runs in here (free loopback ports, a database and output
    under tmp_path, the simulator, no admin password given, plaintext), and its orchestrator's
    port."""
    ports = [free_port() for _ in range(3)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "OPENAI_API_KEY", "OPENAI_BASE_URL", "TIERWRITER_ADMIN_PASSWORD", "TLS_CERT_FILE",
            "TLS_KEY_FILE", "TLS_SERVER_NAME",
        )
    }  # fmt: skip
    env.update(
        ORCHESTRATOR_ADDRESS=f"127.0.0.1:{ports[0]}",
        GENERATOR_ADDRESS=f"127.0.0.1:{ports[1]}",
        PERSISTENCE_ADDRESS=f"127.0.0.1:{ports[2]}",
        DATABASE_URL=f"sqlite:///{tmp_path}/tw.db",
        OUTPUT_DIR=str(tmp_path / "out"),
        LOG_LEVEL="WARNING",
    )
    return env, ports[0]


def test_up_serves_until_ctrl_c_and_prints_the_generated_password_once(tmp_path: Path) -> None:
    env, port = _up_environment(tmp_path)
    command = [sys.executable, "-m", "orchestrator_service.cli", "up"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            output = _Lines(process)
            banner = output.until("tierwriter is up")
            password = re.search(r"generated password: (\S+)", banner)
            assert password, banner
            # It says which model it uses, and where.
            said = "model         gpt-4o-mini at the bundled LLM simulator at http://127.0.0.1:"
            assert said in banner
            # One process per service, so the three use every core.
            assert _child_modules(process.pid) == {
                "persistence_service", "generator_service", "orchestrator_service"
            }  # fmt: skip

            job = tmp_path / "job.json"
            job.write_text(
                job_file({"tier1": {"count": 2, "min_word_count": 300, "max_word_count": 400}})
            )
            run = tierwriter(
                "generate-batch",
                "-j",
                str(job),
                "-u",
                "admin",
                "-p",
                password.group(1),
                "--address",
                f"127.0.0.1:{port}",
                cwd=tmp_path,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            assert len(article_pages(tmp_path / "out")) == 2
            assert "(plaintext" in banner

            # The README's session: log in once, then commands need no credentials.
            session = {"TIERWRITER_TOKEN_FILE": str(tmp_path / "session" / "token.json")}
            address = ["--address", f"127.0.0.1:{port}"]
            login = tierwriter(
                "login", "-u", "admin", "-p", password.group(1), *address, cwd=tmp_path, env=session
            )
            assert login.returncode == 0, login.stderr
            listed = tierwriter("jobs", "list", *address, cwd=tmp_path, env=session)
            assert listed.returncode == 0 and "completed" in listed.stdout, listed.stderr

            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert "Stopping" in output.rest()

    # A second start finds the admin: no new password is printed.
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as again:
        try:
            assert "generated password" not in _Lines(again).until("tierwriter is up")
            # Killed outright, `up` cannot stop its services: they notice and stop themselves.
            services = _child_pids(again.pid)
            assert len(services) == 3
            again.kill()
            again.wait(timeout=60)
            deadline = time.monotonic() + 60
            while any(Path(f"/proc/{pid}").exists() for pid in services):
                assert time.monotonic() < deadline, "the services outlived their `up`"
                time.sleep(0.1)
        finally:
            if again.poll() is None:
                again.kill()


def test_up_serves_tls_with_a_certificate_for_another_name(tmp_path: Path) -> None:
    """`up` knows its orchestrator is ready even when the certificate names localhost only (not
    the 127.0.0.1 it probes), and the CLI reaches it over TLS by that name."""
    ca = trustme.CA()
    certificate = ca.issue_cert("localhost")
    certificate.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    env, port = _up_environment(tmp_path)
    env.update(
        TLS_CERT_FILE=str(tmp_path / "cert.pem"),
        TLS_KEY_FILE=str(tmp_path / "key.pem"),
        TIERWRITER_ADMIN_PASSWORD="tls-admin-password",
    )
    command = [sys.executable, "-m", "orchestrator_service.cli", "up"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            assert "(TLS with" in _Lines(process).until("tierwriter is up")
            listed = tierwriter(
                "jobs", "list", "--address", f"localhost:{port}", "--ca-file",
                str(tmp_path / "ca.pem"), "-u", "admin", "-p", "tls-admin-password",
                cwd=tmp_path,
            )  # fmt: skip
            assert listed.returncode == 0, listed.stdout + listed.stderr
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()


def _children(pid: int) -> dict[int, list[bytes]]:
    """The child processes of `pid` and their command lines (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        if parent == pid:
            children[int(stat.parent.name)] = command
    return children


def _child_pids(pid: int) -> list[int]:
    return list(_children(pid))


def _child_modules(pid: int) -> set[str]:
    """The `python -m <module>` children of process `pid`."""
    return {
        command[command.index(b"-m") + 1].decode()
        for command in _children(pid).values()
        if b"-m" in command
    }


def test_projects_sites_and_publish_from_the_command_line(start_stack, tmp_path: Path) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    env = {
        "TIERWRITER_USER": "admin",
        "TIERWRITER_PASSWORD": handle.password,
        "ORCHESTRATOR_ADDRESS": handle.stack.orchestrator_address,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return tierwriter(*args, cwd=tmp_path, env=env)

    by_flags = run(
        "projects", "create", "--name", "lathes", "--keyword", "cnc lathe",
        "--entity", "chuck", "--entity", "tailstock", "--money-site-url", "https://example.com",
    )  # fmt: skip
    assert by_flags.returncode == 0, by_flags.stderr
    assert "Project 1: lathes" in by_flags.stdout and "chuck, tailstock" in by_flags.stdout
    project_file = tmp_path / "project.json"
    project_file.write_text('{"name": "mills", "main_keyword": "cnc mill"}')
    assert run("projects", "create", "-f", str(project_file)).returncode == 0
    again = run("projects", "create", "-f", str(project_file))
    assert again.returncode == 2 and "project 'mills' already exists" in again.stderr
    project_file.write_text('{"name": "x"}')
    invalid = run("projects", "create", "-f", str(project_file))
    assert invalid.returncode == 2 and "main_keyword: Field required" in invalid.stderr

    listed = run("projects", "list")
    assert listed.returncode == 0 and "lathes" in listed.stdout and "mills" in listed.stdout
    assert "cnc lathe" in run("projects", "show", "lathes").stdout
    assert "cnc mill" in run("projects", "show", "2").stdout
    unknown = run("projects", "show", "nope")
    assert unknown.returncode == 2 and "project 'nope' does not exist" in unknown.stderr

    # A job that names the project by id, on a site; then its post-processing again.
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "jobs": [
                    {
                        "project_id": 1,
                        "tiers": {
                            "tier1": {"count": 2, "min_word_count": 300, "max_word_count": 400}
                        },
                        "deployment_targets": ["lathes.example.net"],
                    }
                ]
            }
        )
    )
    ran = run("generate-batch", "-j", str(job))
    assert ran.returncode == 0, ran.stderr
    assert "[post-processing] Export: 2 pages written" in ran.stdout
    assert "lathes.example.net" in run("sites", "list").stdout
    published = run("jobs", "publish", "1")
    assert published.returncode == 0, published.stderr
    assert "URLs: 2 URLs (0 new, 2 kept from an earlier run)" in published.stdout
    assert run("jobs", "publish", "99").returncode == 2


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_cancels_the_job_cleanly_and_twice_leaves_at_once(
    start_stack, tmp_path: Path, presses: int
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.1))
    job = tmp_path / "job.json"
    job.write_text(
        job_file({"tier1": {"count": 20, "min_word_count": 300, "max_word_count": 400}},
                 max_workers=2)
    )  # fmt: skip
    env = {
        **os.environ,
        "TIERWRITER_USER": "admin",
        "TIERWRITER_PASSWORD": handle.password,
        "ORCHESTRATOR_ADDRESS": handle.stack.orchestrator_address,
    }
    command = [sys.executable, "-m", "orchestrator_service.cli", "generate-batch", "-j", str(job)]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        try:
            output = _Lines(process)
            output.until("Saved (ID:")
            process.send_signal(signal.SIGINT)
            if presses == 2:
                output.until("press Ctrl-C again")
                process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130
        finally:
            if process.poll() is None:
                process.kill()
    rest = output.rest()
    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as c:
        list(c.watch_job(1))  # returns once the job has ended on the server
        status = c.get_job(1).job.status
    assert status == JobStatus.JOB_STATUS_CANCELLED
    if presses == 1:
        assert "Summary (run stopped early)" in rest and "cancelled by admin" in rest
    else:
        assert "Left at once" in rest and "Summary" not in rest
    assert sum(rows_by_status(handle.database_url, 1).values()) < 20


def test_detached_jobs_are_watched_later_and_a_busy_orchestrator_exits_5(
    start_stack, tmp_path: Path
) -> None:
    handle = start_stack(
        simulator=SimulatorConfig(latency=0.0),
        orchestrator_settings={"orchestrator_max_watches": 1},
    )
    env = {
        "TIERWRITER_USER": "admin",
        "TIERWRITER_PASSWORD": handle.password,
        "ORCHESTRATOR_ADDRESS": handle.stack.orchestrator_address,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return tierwriter(*args, cwd=tmp_path, env=env)

    job = tmp_path / "job.json"
    job.write_text(job_file({"tier1": {"count": 2, "min_word_count": 300, "max_word_count": 400}}))
    detached = run("generate-batch", "-j", str(job), "--detach")
    assert detached.returncode == 0, detached.stderr
    assert "Submitted: job 1" in detached.stdout and "tierwriter jobs watch 1" in detached.stdout

    # Attached later: the whole job from its first event, then its summary.
    watched = run("jobs", "watch", "1")
    assert watched.returncode == 0, watched.stderr
    assert "Job 1/1 (ID: 1)" in watched.stdout
    assert watched.stdout.count("Saved (ID:") == 2 and "Execution time:" in watched.stdout
    after = run("jobs", "watch", "1", "--after", "1")  # the first event (JobStarted) left out
    assert after.returncode == 0 and "Job 1/1 (ID: 1)" not in after.stdout
    assert after.stdout.count("Saved (ID:") == 2

    # A resume queued with --detach runs on its own; a watch then shows both runs.
    resumed = run("jobs", "resume", "1", "--detach")
    assert resumed.returncode == 0 and "Job 1 is queued to resume" in resumed.stdout
    both = run("jobs", "watch", "1")
    assert both.returncode == 0 and both.stdout.count("Execution time:") == 2, both.stdout

    # The one watch slot taken by a stream of a job held in flight: the CLI says busy, exit 5.
    simulator = handle.stack.simulator
    simulator.hold("outline")
    try:
        with OrchestratorClient(
            handle.stack.orchestrator_address, "admin", handle.password
        ) as client:
            [held] = client.submit_job(
                job_file({"tier1": {"count": 1, "min_word_count": 300, "max_word_count": 400}})
            )
            with client.watch_job(held) as stream:
                next(stream)  # the stream is open: the slot is taken
                busy = run("jobs", "watch", str(held))
                assert busy.returncode == 5, busy.stderr
                assert "Error: the orchestrator is busy:" in busy.stderr
                simulator.release()
                assert list(stream)[-1].run_finished.ok
    finally:
        simulator.release()


def test_a_failure_is_one_console_line_and_its_traceback_is_for_the_owner(
    start_stack, tmp_path: Path
) -> None:
    # Every 2nd outline reply is not JSON: 2 of the 4 articles fail at `outline`.
    handle = start_stack(simulator=SimulatorConfig(latency=0.01, garbage_outline_every=2))
    admin = ["-u", "admin", "-p", handle.password, "--address", handle.stack.orchestrator_address]
    job = tmp_path / "job.json"
    job.write_text(job_file({"tier1": {"count": 4, "min_word_count": 300, "max_word_count": 500}}))
    ran = tierwriter("generate-batch", "-j", str(job), *admin, cwd=tmp_path)
    assert ran.returncode == 6, ran.stderr  # completed, but not every article was written
    failed = [line for line in ran.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 2, ran.stdout
    assert all(
        re.fullmatch(
            r"\[tier1\]\[\d/4\] FAILED at outline: OutlineError: .+ \(error record ID \d+\)", line
        )
        for line in failed
    )
    assert "Traceback" not in ran.stdout + ran.stderr
    watched = tierwriter("jobs", "watch", "1", *admin, cwd=tmp_path)  # a script asking later
    assert watched.returncode == 6, watched.stderr

    shown = tierwriter("jobs", "show", "1", "--errors", *admin, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "failed articles: 2" in shown.stdout
    assert shown.stdout.count("FAILED at outline: OutlineError") == 2
    assert shown.stdout.count("    Traceback (most recent call last):") >= 2  # one each, or more

    # Another user sees neither the job nor its tracebacks.
    created = subprocess.run(
        [sys.executable, "-m", "orchestrator_service.cli", "users", "create", "bob", *admin],
        input="bob-password-123\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    bob = ["-u", "bob", "-p", "bob-password-123", "--address", handle.stack.orchestrator_address]
    refused = tierwriter("jobs", "show", "1", "--errors", *bob, cwd=tmp_path)
    assert refused.returncode == 3 and "job 1 is not one of your jobs" in refused.stderr
    assert "OutlineError" not in refused.stdout + refused.stderr
    exported = tierwriter("jobs", "export", "1", "-o", str(tmp_path / "bob"), *bob, cwd=tmp_path)
    assert exported.returncode == 3 and not (tmp_path / "bob").exists()


def test_a_title_shortfall_exits_6_with_the_missing_articles_counted(
    start_stack, tmp_path: Path
) -> None:
    # A model stuck on three titles, for a tier of five: two articles get no title.
    handle = start_stack(simulator=SimulatorConfig(repeat_titles=True))
    admin = ["-u", "admin", "-p", handle.password, "--address", handle.stack.orchestrator_address]
    job = tmp_path / "job.json"
    job.write_text(job_file({"tier1": {"count": 5, "min_word_count": 300, "max_word_count": 500}}))
    ran = tierwriter("generate-batch", "-j", str(job), *admin, cwd=tmp_path)
    assert ran.returncode == 6, ran.stdout + ran.stderr
    assert "Title shortfall:    2" in ran.stdout and "Failed:             0" in ran.stdout
    # Once the shortfall is known, the progress counts to the articles the tier will have.
    after = ran.stdout.split("distinct titles too few", 1)[1]
    assert "[tier1][3/3] " in after and "/5]" not in after, after


def test_json_output_is_one_object_per_event_and_one_document_per_listing(
    start_stack, tmp_path: Path
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.01, garbage_outline_every=3))
    admin = ["-u", "admin", "-p", handle.password, "--address", handle.stack.orchestrator_address]
    job = tmp_path / "job.json"
    job.write_text(
        job_file(
            {"tier1": {"count": 3, "min_word_count": 300, "max_word_count": 500}},
            deployment_targets=["one.example.net"],
        )
    )
    ran = tierwriter("generate-batch", "-j", str(job), "--json", *admin, cwd=tmp_path)
    assert ran.returncode == 6, ran.stderr  # the 3rd outline is garbage: one article failed
    events = [json.loads(line) for line in ran.stdout.splitlines()]  # every line is JSON
    assert "job_started" in events[0] and "run_finished" in events[-1]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    terminal = [
        e["article"]
        for e in events
        if e.get("article", {}).get("kind")
        in ("ARTICLE_EVENT_KIND_SAVED", "ARTICLE_EVENT_KIND_FAILED")
    ]
    summary = events[-1]["run_finished"]["summary"]
    assert len(terminal) == summary["requested_articles"] == 3
    assert summary.get("failed_articles", 0) == sum(
        a["kind"] == "ARTICLE_EVENT_KIND_FAILED" for a in terminal
    )
    job_id = events[0]["job_id"]

    watched = tierwriter("jobs", "watch", str(job_id), "--json", *admin, cwd=tmp_path)
    assert watched.returncode == 6, watched.stderr
    assert [json.loads(line) for line in watched.stdout.splitlines()] == events
    # A script resuming after the last event it printed: nothing more, and how the job ended.
    after = ["--after", str(events[-1]["seq"])]
    resumed = tierwriter("jobs", "watch", str(job_id), *after, "--json", *admin, cwd=tmp_path)
    assert (resumed.returncode, resumed.stdout) == (6, ""), resumed.stderr

    listed = tierwriter("jobs", "list", "--json", *admin, cwd=tmp_path)
    (listed_job,) = json.loads(listed.stdout)["jobs"]
    assert listed_job["job_id"] == job_id and listed_job["status"] == "JOB_STATUS_COMPLETED"
    shown = json.loads(
        tierwriter("jobs", "show", str(job_id), "--errors", "--json", *admin, cwd=tmp_path).stdout
    )
    assert shown["job"]["requested_articles"] == 3
    assert len(shown.get("failures", [])) == summary.get("failed_articles", 0)

    def listing(command: str) -> Any:
        return json.loads(tierwriter(command, "list", "--json", *admin, cwd=tmp_path).stdout)

    assert [p["name"] for p in listing("projects")["projects"]] == [listed_job["project"]]
    assert [u["username"] for u in listing("users")["users"]] == ["admin"]
    assert [site["hostname"] for site in listing("sites")["sites"]] == ["one.example.net"]
    detached = tierwriter(
        "generate-batch", "-j", str(job), "--detach", "--json", *admin, cwd=tmp_path
    )
    assert json.loads(detached.stdout) == {"job_ids": [job_id + 1]}


def test_a_terminal_gets_bars_per_tier_and_for_the_job_with_lines_above(
    start_stack, tmp_path: Path
) -> None:
    # rich's forced terminal mode: what a user at a terminal sees, bars redrawn in place.
    handle = start_stack(simulator=SimulatorConfig(latency=0.01, garbage_outline_every=4))
    admin = ["-u", "admin", "-p", handle.password, "--address", handle.stack.orchestrator_address]
    job = tmp_path / "job.json"
    tiers = {
        "tier1": {"count": 2, "min_word_count": 300, "max_word_count": 500},
        "tier2": {"count": 4, "min_word_count": 300, "max_word_count": 500},
    }
    job.write_text(job_file(tiers))
    ran = tierwriter(
        "generate-batch",
        "-j",
        str(job),
        *admin,
        cwd=tmp_path,
        env={"TTY_COMPATIBLE": "1", "COLUMNS": "160", "NO_COLOR": "1"},
    )
    assert ran.returncode == 6, ran.stderr  # one of the six failed, on purpose
    # Without cursor moves and styles, each redraw (which starts with a carriage return) on a
    # line of its own.
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", ran.stdout).replace("\r", "\n")
    assert "\x1b[" in ran.stdout  # it was drawn as on a terminal
    # The bars' last state: done/total, rate, ETA, failed, tokens and cost of each.
    final = {
        name: re.findall(
            # Columns are as wide as their widest cell: a rate of 920/min beside 1585/min is
            # padded, so any run of spaces between them.
            rf"^{name} +\S* +(\d+)/(\d+) +(\d+)/min +ETA +\S+ +(\d+) failed"
            r" +([\d,]+) tokens +\$([\d.]+)",
            screen,
            re.MULTILINE,
        )[-1]
        for name in ("tier1", "tier2", "job 1")
    }
    assert [final[n][:2] for n in ("tier1", "tier2", "job 1")] == [
        ("2", "2"),
        ("4", "4"),
        ("6", "6"),
    ]
    failed = sum(int(final[n][3]) for n in ("tier1", "tier2"))
    assert failed == int(final["job 1"][3]) >= 1
    assert int(final["job 1"][4].replace(",", "")) > 0 and float(final["job 1"][5]) > 0
    # Above the bars: each finished article once, the failure on one line, the summary; the
    # steps in between only move the bars.
    lines = screen.splitlines()
    assert sum("Saved (ID:" in line for line in lines) == 6 - failed
    assert sum(" FAILED at outline: " in line for line in lines) == failed
    assert "Generating outline..." not in screen and "Generated content:" not in screen
    assert "Articles requested: 6" in screen and "[tier2] Done:" in screen


def test_jobs_export_downloads_the_jobs_files_as_the_server_wrote_them(
    start_stack, tmp_path: Path
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.01))
    admin = ["-u", "admin", "-p", handle.password, "--address", handle.stack.orchestrator_address]
    job = tmp_path / "job.json"
    tiers = {
        "tier1": {"count": 2, "min_word_count": 300, "max_word_count": 500},
        "tier2": {"count": 3, "min_word_count": 300, "max_word_count": 500},
    }
    job.write_text(job_file(tiers, deployment_targets=["one.example.net", "two.example.net"]))
    assert tierwriter("generate-batch", "-j", str(job), *admin, cwd=tmp_path).returncode == 0
    server = handle.output_dir / "1"
    # A link the server's folder should never hand out.
    secret = tmp_path / "secret.txt"
    secret.write_text("not for export")
    (server / "link.txt").symlink_to(secret)

    local = tmp_path / "download"
    exported = tierwriter("jobs", "export", "1", "-o", str(local), *admin, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (
        f"under {local}/" in exported.stdout and f"Open {local / 'index.html'}" in exported.stdout
    )

    def tree(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()
        }

    served = tree(server)
    assert tree(local) == served  # file by file, byte for byte
    assert "index.html" in served and "titles-tier2.txt" in served
    assert sum(name.endswith(".html") and "/" in name for name in served) >= 5  # the pages
    assert not (local / "link.txt").exists()

    missing = tierwriter("jobs", "export", "99", "-o", str(local), *admin, cwd=tmp_path)
    assert missing.returncode == 2 and "job 99 does not exist" in missing.stderr


@pytest.mark.parametrize(
    "variable, value, problem, service",
    [
        ("TIERWRITER_ADMIN_PASSWORD", "short", "at least", "persistence_service"),
        ("CONCURRENT_WORKERS", "many", "valid integer", "orchestrator_service"),
    ],
)
def test_a_rejected_setting_is_one_error_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str, problem: str, service: str
) -> None:
    env = {variable: value, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    up = tierwriter("up", cwd=tmp_path, env=env)
    assert up.returncode == 2
    assert up.stderr.startswith(f"Error: {variable}: ") and problem in up.stderr
    assert "Traceback" not in up.stdout + up.stderr and f"{value}" not in up.stderr
    # The service that reads it, started on its own (as compose starts it), says the same.
    alone = subprocess.run(
        [sys.executable, "-m", service],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert alone.returncode == 2 and alone.stderr.startswith(f"Error: {variable}: ")
    assert "Traceback" not in alone.stderr


def test_a_job_file_past_the_users_quota_is_refused_with_exit_5_and_writes_nothing(
    start_stack, tmp_path: Path
) -> None:
    handle = start_stack(simulator=SimulatorConfig(latency=0.0))
    admin = {
        "TIERWRITER_USER": "admin",
        "TIERWRITER_PASSWORD": handle.password,
        "ORCHESTRATOR_ADDRESS": handle.stack.orchestrator_address,
    }
    created = subprocess.run(
        [sys.executable, "-m", "orchestrator_service.cli", "users", "create", "ann"],
        input="ann-password-1\n", env={**os.environ, **admin}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    quota = tierwriter("users", "quota", "ann", "--articles", "10", "--jobs", "2", cwd=tmp_path,
                       env=admin)  # fmt: skip
    assert quota.returncode == 0, quota.stderr
    assert "10 articles queued and running, 2 queued jobs" in quota.stdout
    ann = {**admin, "TIERWRITER_USER": "ann", "TIERWRITER_PASSWORD": "ann-password-1"}
    tier = {"count": 6, "min_word_count": 300, "max_word_count": 400}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(job_file({"tier1": tier}, deployment_targets=["ann-one.example.net"]))
    second.write_text(job_file({"tier1": tier}, deployment_targets=["ann-two.example.net"]))
    handle.stack.simulator.hold("outline")  # the first job runs on, its articles active
    try:
        accepted = tierwriter("generate-batch", "-j", str(first), "--detach", cwd=tmp_path,
                              env=ann)  # fmt: skip
        assert accepted.returncode == 0, accepted.stderr
        tables = ("jobs", "projects", "sites")
        before = {t: count_rows(handle.database_url, t) for t in tables}
        refused = tierwriter("generate-batch", "-j", str(second), cwd=tmp_path, env=ann)
        assert refused.returncode == 5, refused.stdout + refused.stderr
        assert "Error: quota: 6 more articles would make 12 queued and running" in refused.stderr
        assert "past your quota of 10 (you have 6)" in refused.stderr
        assert "busy" not in refused.stderr  # a limit of the user's, not of the server
        # Nothing of the refused file was written: no job, no project, no site.
        assert {t: count_rows(handle.database_url, t) for t in tables} == before
        shown = tierwriter("users", "quota", cwd=tmp_path, env=ann)
        assert shown.returncode == 0 and "Quota of ann: 10 articles" in shown.stdout, shown.stdout
        # Not an admin: a user cannot raise their own quota.
        raised = tierwriter("users", "quota", "ann", "--articles", "100", cwd=tmp_path, env=ann)
        assert raised.returncode == 3 and "only an admin can set quotas" in raised.stderr
    finally:
        handle.stack.simulator.release()
