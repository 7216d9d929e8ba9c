"""The docker-compose deployment as the README has a user run it: built from this tree, driven
with the project's own CLI from the host, on a real Docker engine.

Runs where an engine answers (`../shared/docker/engine.sh up` starts one; `.ci/run` calls it).
Elsewhere it is skipped, saying how to run it; in CI (CI set) it is never skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.helpers import free_port

# Builds, three `up`s and jobs: well past the suite's 300 s per test, teardown included.
pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
USER_UID = 4242  # stands for the host user who made ./output
COMPOSE = ["docker-compose"]
ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex[:12]
# Every character a URL cares about: the database password must still work.
# The simulated provider's limit, told to the generators as the account's: low enough that a
# job that ignored it would be refused with 429 within seconds.
SIMULATOR_RPM = 120
POSTGRES_PASSWORD = "p@ss/w:rd%20#?&" + uuid.uuid4().hex[:6]
COPY_IGNORE = shutil.ignore_patterns(
    ".git", "data", "output", "tls", ".env", "*.egg-info", "__pycache__", ".*_cache", ".venv"
)


def _engine_answers() -> bool:
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return False
    return subprocess.run(["docker", "version"], capture_output=True).returncode == 0


@dataclass
class Deployment:
    """A copy of this tree deployed as one compose project; the commands a user types."""

    folder: Path
    project: str
    port: int
    token_file: Path
    port2: int  # the second orchestrator's (profile `replica`)

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """docker-compose in the project's folder; fails the test when it fails."""
        result = subprocess.run(
            [*COMPOSE, "-p", self.project, *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stderr}"
        return result

    def up(self, *extra: str) -> None:
        """`up -d` with three generators, then wait until every container is healthy."""
        self.compose("up", "-d", "--build", "--scale", "generator=3", *extra)
        self.wait_healthy()

    def wait_healthy(self, *options: str) -> None:
        """Until every container (of the profiles `options` name too) is healthy."""
        # compose v1 (Debian's) has no `up --wait`: poll the engine's health states.
        deadline = time.monotonic() + 240
        while True:
            states = self.health(*options)
            if states and all(state == "healthy" for state in states.values()):
                return
            assert time.monotonic() < deadline, f"not healthy in 240 s: {states}"
            time.sleep(2)

    def health(self, *options: str) -> dict[str, str]:
        """Each container's health status, by name."""
        ids = self.compose(*options, "ps", "-q").stdout.split()
        if not ids:
            return {}
        inspected = subprocess.run(
            ["docker", "inspect", "-f", "{{.Name}} {{.State.Health.Status}}", *ids],
            capture_output=True,
            text=True,
        ).stdout  # a container replaced meanwhile is missing here: the next poll sees it
        return dict(line.split(maxsplit=1) for line in inspected.splitlines() if " " in line)

    def cli(self, *args: str, tls: bool = False, port: int = 0) -> subprocess.CompletedProcess[str]:
        """The project's CLI on the host, in the project's folder (on the first orchestrator
        unless `port` names another)."""
        address = f"{'localhost' if tls else '127.0.0.1'}:{port or self.port}"
        extra = ["--ca-file", str(self.folder / "tls" / "ca.pem")] if tls else []
        return subprocess.run(
            [sys.executable, "-m", "orchestrator_service.cli", *args, "--address", address, *extra],
            cwd=self.folder,
            env={**os.environ, "TIERWRITER_TOKEN_FILE": str(self.token_file)},
            capture_output=True,
            text=True,
            timeout=300,
        )

    def service_of_host(self, hostname: str) -> str:
        """The compose service of the container with this hostname."""
        ids = self.compose("--profile", "replica", "ps", "-q").stdout.split()
        inspected = subprocess.run(
            ["docker", "inspect", "-f", '{{.Config.Hostname}} {{index .Config.Labels '
             '"com.docker.compose.service"}}', *ids],
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
        services = dict(line.split() for line in inspected.splitlines() if " " in line)
        return services.get(hostname, "")

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service).stdout

    def simulator(self, path: str, post: bool = False) -> str:
        """The shared simulator's answer at `path` (it is published nowhere: asked from inside)."""
        method = "data=b''" if post else "data=None"
        ask = (
            "import urllib.request; print(urllib.request.urlopen("
            f"'http://127.0.0.1:8900{path}', {method}, timeout=10).read().decode())"
        )
        return self.compose("exec", "-T", "simulator", "python", "-c", ask).stdout


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """This tree copied to a temporary folder with a .env, as a fresh clone would be; taken
    down with its volumes and images afterwards, pass or fail."""
    if not _engine_answers():
        message = (
            "no Docker engine: run `../shared/docker/engine.sh up` (installs Debian's docker.io "
            "and docker-compose and starts the engine), then `pytest -m compose`"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path / "tierwriter"
    shutil.copytree(ROOT, folder, ignore=COPY_IGNORE)
    port, port2 = free_port(), free_port()
    (folder / ".env").write_text(
        f"POSTGRES_PASSWORD={POSTGRES_PASSWORD}\n"
        f"SERVICE_TOKEN={uuid.uuid4().hex}{uuid.uuid4().hex}\n"
        f"TIERWRITER_ADMIN_PASSWORD={ADMIN_PASSWORD}\n"
        f"ORCHESTRATOR_PORT={port}\n"
        f"ORCHESTRATOR2_PORT={port2}\n"
        "ORCHESTRATOR_LEASE_SECONDS=5\n"
        "COMPOSE_FILE=docker-compose.yml:docker-compose.simulator.yml\n"
        "SIMULATOR_LATENCY=0.2\n"
        f"SIMULATOR_RPM={SIMULATOR_RPM}\n"
        f"LLM_RPM_LIMIT={SIMULATOR_RPM}\n"
    )
    running = Deployment(
        folder, f"twe2e{uuid.uuid4().hex[:8]}", port, tmp_path / "token.json", port2
    )
    try:
        yield running
    finally:
        everything = ["-p", running.project, "--profile", "replica"]
        down = subprocess.run(
            [*COMPOSE, *everything, "down", "-v", "--rmi", "local", "--timeout", "5"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        left = subprocess.run(
            [
                "docker",
                "ps",
                "-aq",
                "--filter",
                f"label=com.docker.compose.project={running.project}",
            ],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert down.returncode == 0 and not left, f"not cleaned up: {down.stderr} {left}"


def _written(shown: str) -> int:
    """Articles written (generated + augmented + failed) by `jobs show`'s output; 0 if none."""
    found = re.search(r"articles: (\d+) generated, (\d+) augmented, (\d+) failed", shown)
    return sum(int(n) for n in found.groups()) if found else 0


def _job(name: str, max_workers: int = 5, **tiers: int) -> str:
    """A job file of the given tiers (tier1=3, tier2=6) on two sites."""
    shape = {"min_word_count": 300, "max_word_count": 450}
    project = {
        "name": name,
        "main_keyword": "cnc machining",
        "entities": ["lathe", "spindle"],
        "related_searches": ["cnc machining cost", "cnc near me"],
        "money_site_url": "https://example.com/cnc",
    }
    job = {
        "project": project,
        "tiers": {tier: {"count": count, **shape} for tier, count in tiers.items()},
        "deployment_targets": ["blog-one.example.net", "blog-two.example.net"],
        "max_workers": max_workers,
    }
    return json.dumps({"jobs": [job]})


def test_the_compose_deployment_works_as_the_readme_says(deployment: Deployment) -> None:
    d = deployment
    d.up()

    # The services run as the unprivileged user; the orchestrator is published on loopback only.
    for service in ("orchestrator", "generator", "persistence"):
        status = d.compose("exec", "-T", service, "cat", "/proc/1/status").stdout
        uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
        assert uid and uid.group(1) != "0", (service, status[:200])
    assert d.compose("port", "orchestrator", "50051").stdout.strip() == f"127.0.0.1:{d.port}"

    # A fresh clone's first job writes its pages where the user is, and says so; the engine
    # made ./output for the mount (root's), so the service user got it.
    assert d.cli("login", "-u", "admin", "-p", ADMIN_PASSWORD).returncode == 0
    (d.folder / "job.json").write_text(_job("compose-e2e", tier1=3, tier2=6))
    run = d.cli("generate-batch", "-j", "job.json")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    assert "Open output/1/index.html to browse the sites" in run.stdout
    assert (d.folder / "output" / "1" / "index.html").is_file()
    pages = [p for p in (d.folder / "output" / "1").rglob("*.html") if p.name != "index.html"]
    assert len(pages) == 9

    # Three generators share the work: the job's article stream (its tiers share one) and its
    # tiers' title calls go round-robin, and each generator logs a line per call it serves.
    generators = d.logs("generator")
    workers = set(
        re.findall(
            r"(generator_\d+)\s+\|.*(?:job 1: article stream|project 1 tier\d: \d+ titles)",
            generators,
        )
    )
    assert len(workers) >= 2, workers

    # Persistence restarted in the middle of a job: the job completes, every article once.
    (d.folder / "job2.json").write_text(_job("compose-restart", tier1=30))
    command = [sys.executable, "-m", "orchestrator_service.cli", "generate-batch", "-j"]
    with subprocess.Popen(
        [*command, "job2.json", "--address", f"127.0.0.1:{d.port}"],
        cwd=d.folder,
        env={**os.environ, "TIERWRITER_TOKEN_FILE": str(d.token_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as job:
        assert job.stdout is not None
        seen = []
        for line in job.stdout:
            seen.append(line)
            if "Saved (ID:" in line:
                break  # articles are being stored: now take persistence away
        d.compose("restart", "-t", "5", "persistence")
        rest = job.stdout.read()
        assert job.wait(timeout=300) == 0, "".join(seen) + rest
    shown = d.cli("jobs", "show", "2")
    assert shown.returncode == 0 and re.search(r"(\d+) generated, (\d+) augmented", shown.stdout)
    written = re.search(r"articles: (\d+) generated, (\d+) augmented, (\d+) failed", shown.stdout)
    assert written and sum(int(n) for n in written.groups()) == 30, shown.stdout

    # Two orchestrators on one database (profile `replica`): the one running a job is killed
    # (SIGKILL) mid-job; the other takes the job over when its lease expires, and a watcher on
    # it sees the job to its end with every article once.
    # --no-deps: compose v1's `up` of one service would scale the generators back to one.
    d.compose("--profile", "replica", "up", "-d", "--build", "--no-deps", "orchestrator-2")
    d.wait_healthy("--profile", "replica")
    # One at a time (~20 s), so the kill lands well inside the job.
    (d.folder / "job-takeover.json").write_text(_job("compose-takeover", max_workers=1, tier1=30))
    submitted = d.cli("generate-batch", "-j", "job-takeover.json", "--detach")
    assert submitted.returncode == 0, submitted.stderr
    found = re.search(r"Submitted: job (\d+)", submitted.stdout)
    assert found, submitted.stdout
    job_id = found.group(1)
    # Either orchestrator may claim it; `jobs show` names the one that runs it (host:pid:id,
    # the host being the container's hostname): watch on the other, kill that one.
    deadline = time.monotonic() + 120
    while not (
        runner := re.search(r"running on: ([^:\s]+):", d.cli("jobs", "show", job_id).stdout)
    ):
        assert time.monotonic() < deadline, "no orchestrator claimed the job"
        time.sleep(0.5)
    victim = d.service_of_host(runner.group(1))
    assert victim in ("orchestrator", "orchestrator-2"), victim
    port = d.port2 if victim == "orchestrator" else d.port
    watch = [sys.executable, "-m", "orchestrator_service.cli", "jobs", "watch", job_id]
    with subprocess.Popen(
        # The saved session is for the first orchestrator's address: log in by password here.
        [*watch, "--address", f"127.0.0.1:{port}", "-u", "admin", "-p", ADMIN_PASSWORD],
        cwd=d.folder,
        env={**os.environ, "TIERWRITER_TOKEN_FILE": str(d.token_file)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as watcher:
        assert watcher.stdout is not None
        seen = []
        for line in watcher.stdout:
            seen.append(line)
            if "Saved (ID:" in line:
                break  # the job's orchestrator is mid-job: kill it
        d.compose("--profile", "replica", "kill", "-s", "SIGKILL", victim)
        rest = watcher.stdout.read()
        assert watcher.wait(timeout=300) == 0, "".join(seen) + rest
    assert "taken over" in rest, rest[-2000:]
    shown = d.cli("jobs", "show", job_id, "-u", "admin", "-p", ADMIN_PASSWORD, port=port)
    written = re.search(r"articles: (\d+) generated, (\d+) augmented, (\d+) failed", shown.stdout)
    assert written and sum(int(n) for n in written.groups()) == 30, shown.stdout

    # One job over all three generators, with both orchestrators up (the killed one back), under
    # the account's limit (the simulator refuses past SIMULATOR_RPM with 429, as a provider
    # would; the generators are told the same LLM_RPM_LIMIT and share it): each generator writes
    # a share, one is killed (SIGKILL) mid-job, the others finish it, every article once.
    d.compose("--profile", "replica", "up", "-d", "--no-deps", victim)  # both orchestrators
    d.wait_healthy("--profile", "replica")
    d.simulator("/_simulator/reset", post=True)
    (d.folder / "job-spread.json").write_text(_job("compose-spread", max_workers=6, tier1=65))
    submitted = d.cli("generate-batch", "-j", "job-spread.json", "--detach")
    found = re.search(r"Submitted: job (\d+)", submitted.stdout)
    assert submitted.returncode == 0 and found, submitted.stdout + submitted.stderr
    job_id = found.group(1)
    opened = rf"(generator_\d+)\s+\|.*job {job_id}: article stream for"
    deadline = time.monotonic() + 240
    while (
        len(streams := set(re.findall(opened, d.logs("generator")))) < 3
        or _written(d.cli("jobs", "show", job_id).stdout) < 6
    ):
        assert time.monotonic() < deadline, f"the job did not reach every generator: {streams}"
        time.sleep(1)
    killed_generator = sorted(streams)[0]
    subprocess.run(["docker", "kill", "-s", "KILL", f"{d.project}_{killed_generator}"],
                   check=True, capture_output=True)  # fmt: skip
    watched = d.cli("jobs", "watch", job_id)
    assert watched.returncode == 0, watched.stdout[-2000:] + watched.stderr
    shown = d.cli("jobs", "show", job_id).stdout
    assert "status completed" in shown and " 0 failed" in shown and _written(shown) == 65, shown
    ending = rf"(generator_\d+)\s+\|.*job {job_id}: article stream ended: (\d+) saved"
    ended = re.findall(ending, d.logs("generator"))
    saved = {name: 0 for name in streams - {killed_generator}}
    for name, count in ended:
        saved[name] = saved.get(name, 0) + int(count)
    # The survivors each wrote some.
    assert killed_generator not in saved and all(saved.values()), saved
    stats = json.loads(d.simulator("/_simulator/stats"))
    assert stats["rate_limited"] == 0, stats  # never past the account's limit
    assert stats["requests"] > SIMULATOR_RPM, stats  # more than the bucket held: it paced them

    d.compose("--profile", "replica", "rm", "-s", "-f", "orchestrator-2")

    # An output folder the user made (README: mkdir -p output): the pages are the user's.
    d.compose("down", "--timeout", "10")
    shutil.rmtree(d.folder / "output")
    (d.folder / "output").mkdir()
    os.chown(d.folder / "output", USER_UID, USER_UID)
    d.up()
    (d.folder / "job3.json").write_text(_job("compose-mine", tier1=2))
    mine = d.cli("generate-batch", "-j", "job3.json")
    assert mine.returncode == 0, mine.stdout[-2000:] + mine.stderr
    owners = {p.stat().st_uid for p in (d.folder / "output").rglob("*")}
    assert owners == {USER_UID}, owners

    # TLS as the README sets it up: the key 0600 for the host user, a certificate naming
    # localhost (no IP address): the orchestrator serves it and its health probe passes.
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    tls = d.folder / "tls"
    tls.mkdir(exist_ok=True)  # the engine made it for the bind mount at the first up
    server.cert_chain_pems[0].write_to_path(str(tls / "server.pem"))
    server.private_key_pem.write_to_path(str(tls / "server-key.pem"))
    ca.cert_pem.write_to_path(str(tls / "ca.pem"))
    (tls / "server-key.pem").chmod(0o600)
    with (d.folder / ".env").open("a") as env:
        env.write(
            "TLS_CERT_FILE=/app/tls/server.pem\nTLS_KEY_FILE=/app/tls/server-key.pem\n"
            "TIERWRITER_CA_FILE=/app/tls/ca.pem\nTLS_SERVER_NAME=localhost\n"
        )
    d.up()
    assert d.cli("login", "-u", "admin", "-p", ADMIN_PASSWORD, tls=True).returncode == 0
    listed = d.cli("jobs", "list", tls=True)
    assert listed.returncode == 0 and "compose-restart" in listed.stdout, listed.stderr
    assert d.cli("jobs", "list").returncode != 0  # plaintext is refused

    # down and up again: jobs and logins are in the database volume.
    d.compose("down", "--timeout", "10")
    d.up()
    again = d.cli("jobs", "list", tls=True)  # the session saved before still works
    assert again.returncode == 0 and "compose-e2e" in again.stdout, again.stderr

    # Every service stops promptly on SIGTERM (exit 0, not killed after the timeout).
    d.compose("stop", "--timeout", "20")
    for container in d.compose("ps", "-q").stdout.split():
        name, code = subprocess.run(
            ["docker", "inspect", "-f", "{{.Name}} {{.State.ExitCode}}", container],
            capture_output=True,
            text=True,
        ).stdout.split()
        if "postgres" not in name:  # ours: 137 would mean killed after the timeout
            assert code == "0", (name, code)


def test_secrets_stay_out_of_git_and_the_image() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/.env" in ignored and "/tls/" in ignored
    docker_ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in docker_ignored and "tls" in docker_ignored
    assert stat.S_IMODE((ROOT / "scripts" / "lock_requirements.sh").stat().st_mode) & 0o100
