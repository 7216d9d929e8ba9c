"""Crashes: each service runs as its own process, and one is killed with SIGKILL mid-job.
Every requested article still ends as exactly one record, and nothing finished is paid twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from tests.helpers import (
    PostgresServer,
    articles_of,
    free_port,
    job_file,
    rows_by_status,
    stop_processes,
    wait_until_serving,
)
from tests.integration.test_failures import duplicate_keys
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

MODULES = {
    "persistence": "persistence_service",
    "generator": "generator_service",
    "orchestrator": "orchestrator_service",
    "orchestrator2": "orchestrator_service",  # a second one on the same database
}
LEASE_SECONDS = 2.0
# Heavy, and about deployments: these run on PostgreSQL, the production database, only.

PASSWORD = "crash-test-password"
ARTICLES = 24


class Services:
    """The three services as subprocesses on fixed loopback ports, started and killed by PID."""

    def __init__(self, tmp: Path, database_url: str, simulator: LlmSimulator) -> None:
        self.ports = {name: free_port() for name in MODULES}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        self.env.update(
            {f"{name.upper()}_ADDRESS": f"127.0.0.1:{port}" for name, port in self.ports.items()}
        )
        self.env.update(
            DATABASE_URL=database_url,
            TIERWRITER_ADMIN_PASSWORD=PASSWORD,
            OPENAI_BASE_URL=simulator.base_url,
            OPENAI_API_KEY="not-a-secret",
            OUTPUT_DIR=str(tmp / "output"),
            LOG_LEVEL="WARNING",
            SERVICE_TOKEN="crash-test-service-token",
            ORCHESTRATOR_LEASE_SECONDS=str(LEASE_SECONDS),
        )
        self.tmp = tmp
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        env = self.env
        if name == "orchestrator2":
            env = {**env, "ORCHESTRATOR_ADDRESS": self.address(name)}
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", MODULES[name]],
            cwd=self.tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until_serving(self.address(name))

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        stop_processes(self.processes)


@pytest.fixture
def services(tmp_path: Path, database_url: str) -> Iterator[tuple[Services, LlmSimulator]]:
    with LlmSimulator(SimulatorConfig(latency=0.15)) as simulator:
        running = Services(tmp_path, database_url, simulator)
        try:
            for name in ("persistence", "generator", "orchestrator"):
                running.start(name)
            yield running, simulator
        finally:
            running.stop_all()


class Run:
    """A job submitted, then watched on a thread, so the test can kill things while it goes."""

    def __init__(self, address: str, job: str = "", job_ids: list[int] | None = None) -> None:
        self.events: list[pb.JobEvent] = []
        self.error: BaseException | None = None
        if job_ids is None:
            with OrchestratorClient(address, "admin", PASSWORD) as submitter:
                job_ids = submitter.submit_job(job)
        self.job_ids = job_ids
        self._client = OrchestratorClient(address, "admin", PASSWORD)
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    @classmethod
    def watching(cls, address: str, job_ids: list[int]) -> Run:
        """Watch jobs submitted already, on the orchestrator at `address`."""
        return cls(address, job_ids=job_ids)

    def _consume(self) -> None:
        try:
            for event in self._client.watch_jobs(self.job_ids):
                self.events.append(event)
        except BaseException as e:  # the orchestrator dying ends the stream with an error
            self.error = e

    def saved(self) -> set[int]:
        return {
            a.article_index
            for a in articles_of(self.events)
            if a.kind == article_pb.ARTICLE_EVENT_KIND_SAVED
        }

    def wait_saved(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.saved()) < count:
            assert time.monotonic() < deadline, f"fewer than {count} articles saved"
            time.sleep(0.05)

    def wait_for(self, kind: str, timeout: float = 60) -> None:
        """Until an event of this kind (e.g. "tier_finished": the tier boundary) was seen."""
        deadline = time.monotonic() + timeout
        while not any(e.WhichOneof("event") == kind for e in list(self.events)):
            assert time.monotonic() < deadline, f"no {kind} event within {timeout}s"
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> Any:
        self._thread.join(timeout)
        self._client.__exit__()
        assert not self._thread.is_alive(), "the run did not end"
        return self.events[-1].run_finished if self.events else None


def _job() -> str:
    tier1 = {"count": ARTICLES, "min_word_count": 300, "max_word_count": 400}
    return job_file({"tier1": tier1}, max_workers=3)


def _two_tiers() -> str:
    tiers = {
        "tier1": {"count": 4, "min_word_count": 300, "max_word_count": 400},
        "tier2": {"count": 4, "min_word_count": 300, "max_word_count": 400},
    }
    return job_file(tiers, max_workers=2)


def test_a_killed_generator_is_waited_for_and_only_unrecorded_articles_are_resent(
    services: tuple[Services, LlmSimulator], database_url: str
) -> None:
    running, _simulator = services
    run = Run(running.address("orchestrator"), _job())
    run.wait_saved(5)
    running.kill("generator")
    saved_before = run.saved()
    time.sleep(1.0)
    running.start("generator")
    finished = run.finish()
    assert finished is not None and finished.ok, (run.error, finished)

    assert sum(rows_by_status(database_url, 1).values()) == ARTICLES
    assert duplicate_keys(database_url, 1) == 0
    notices = [e.notice.message for e in run.events if e.WhichOneof("event") == "notice"]
    assert any("lost the generator" in n for n in notices), notices
    # After the loss, no article saved before it was started again.
    lost_at = next(i for i, e in enumerate(run.events) if e.WhichOneof("event") == "notice")
    restarted = {
        a.article_index
        for a in articles_of(run.events[lost_at:])
        if a.kind == article_pb.ARTICLE_EVENT_KIND_STARTED
    }
    assert restarted and not restarted & saved_before


def test_a_killed_persistence_loses_nothing_and_saves_nothing_twice(
    services: tuple[Services, LlmSimulator], database_url: str
) -> None:
    running, _simulator = services
    run = Run(running.address("orchestrator"), _job())
    run.wait_saved(5)
    running.kill("persistence")
    time.sleep(1.5)  # saves made meanwhile wait for it
    running.start("persistence")
    finished = run.finish()
    assert finished is not None and finished.ok, (run.error, finished)
    rows = rows_by_status(database_url, 1)
    assert sum(rows.values()) == ARTICLES and duplicate_keys(database_url, 1) == 0
    s = finished.summary
    assert s.generated_articles + s.augmented_articles + s.failed_articles == ARTICLES


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_killed_orchestrator_is_taken_over_by_another_and_no_article_is_paid_twice(
    services: tuple[Services, LlmSimulator], database_url: str
) -> None:
    running, simulator = services
    running.start("orchestrator2")
    with OrchestratorClient(running.address("orchestrator"), "admin", PASSWORD) as client:
        [job_id] = client.submit_job(_job())
        # Either orchestrator may claim it: find the one that runs it (`host:pid:id`).
        deadline = time.monotonic() + 60
        while not (runner := client.get_job(job_id).job.runner):
            assert time.monotonic() < deadline, "no orchestrator claimed the job"
            time.sleep(0.05)
    pid = int(runner.split(":")[1])
    victim = next(name for name, p in running.processes.items() if p.pid == pid)
    survivor = "orchestrator2" if victim == "orchestrator" else "orchestrator"
    run = Run.watching(running.address(survivor), [job_id])  # from the job's first event
    run.wait_saved(5)
    running.kill(victim)  # SIGKILL: no hand-off, its lease just stops being renewed
    finished = run.finish()
    assert finished is not None and finished.ok, (run.error, finished)
    assert run.error is None  # the watcher on the survivor saw the job to its end
    notices = [e.notice.message for e in run.events if e.WhichOneof("event") == "notice"]
    assert any(n.startswith("taken over") for n in notices), notices
    assert sum(rows_by_status(database_url, 1).values()) == ARTICLES
    assert duplicate_keys(database_url, 1) == 0
    # Every article was paid for once: one outline call each, none twice.
    assert simulator.stats().by_kind["outline"] == ARTICLES
    seqs = [e.seq for e in run.events]
    assert seqs == sorted(set(seqs))  # one stream, in order, nothing twice


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_watch_whose_orchestrator_restarts_reconnects_and_misses_nothing(
    services: tuple[Services, LlmSimulator], database_url: str
) -> None:
    running, simulator = services
    run = Run(running.address("orchestrator"), _job())
    run.wait_saved(5)
    running.kill("orchestrator")  # the watch's stream breaks (UNAVAILABLE)
    running.start("orchestrator")  # same address: the watch reconnects; the job is taken over
    finished = run.finish()
    assert finished is not None and finished.ok, (run.error, finished)
    assert run.error is None
    seqs = [e.seq for e in run.events]
    assert seqs == sorted(set(seqs))  # picked up after the last event seen: nothing twice
    notices = [e.notice.message for e in run.events if e.WhichOneof("event") == "notice"]
    assert any(n.startswith("taken over") for n in notices), notices
    assert sum(rows_by_status(database_url, 1).values()) == ARTICLES
    assert simulator.stats().by_kind["outline"] == ARTICLES


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_persistence_down_for_45_seconds_at_a_tier_boundary_is_waited_out(
    services: tuple[Services, LlmSimulator], database_url: str
) -> None:
    running, simulator = services
    run = Run(running.address("orchestrator"), _two_tiers())
    run.wait_for("tier_finished")
    running.kill("persistence")
    time.sleep(45)  # the outage itself: what this test is about
    running.start("persistence")
    finished = run.finish(timeout=180)
    assert finished is not None and finished.ok, (run.error, finished)
    rows = rows_by_status(database_url, 1)
    assert sum(rows.values()) == 8 and duplicate_keys(database_url, 1) == 0
    assert simulator.stats().by_kind["outline"] == 8
    with OrchestratorClient(running.address("orchestrator"), "admin", PASSWORD) as client:
        assert client.get_job(1).job.status == JobStatus.JOB_STATUS_COMPLETED


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_down_for_15_seconds_at_a_tier_boundary_is_waited_out(
    services: tuple[Services, LlmSimulator], database_url: str, request: pytest.FixtureRequest
) -> None:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    running, simulator = services
    run = Run(running.address("orchestrator"), _two_tiers())
    run.wait_for("tier_finished")
    server.stop()
    try:
        time.sleep(15)  # the outage itself: what this test is about
    finally:
        server.start()
    finished = run.finish(timeout=180)
    assert finished is not None and finished.ok, (run.error, finished)
    assert sum(rows_by_status(database_url, 1).values()) == 8
    assert duplicate_keys(database_url, 1) == 0
    assert simulator.stats().by_kind["outline"] == 8


def test_sigterm_on_the_generator_drains_it_and_the_job_still_completes(
    services: tuple[Services, LlmSimulator], database_url: str
) -> None:
    running, _simulator = services
    run = Run(running.address("orchestrator"), _job())
    run.wait_saved(5)
    process = running.processes.pop("generator")
    process.send_signal(signal.SIGTERM)
    # While it drains, its health says NOT_SERVING (or it is already gone). A deadline long
    # enough for the answer to come under load: 2 s once ran out in CI.
    with grpc.insecure_channel(running.address("generator")) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=30)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
    assert process.wait(timeout=60) == 0
    running.start("generator")
    finished = run.finish()
    assert finished is not None and finished.ok, (run.error, finished)
    assert sum(rows_by_status(database_url, 1).values()) == ARTICLES
    assert duplicate_keys(database_url, 1) == 0
