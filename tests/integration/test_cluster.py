"""More than one process of a kind, as a cluster runs them: two orchestrators and several
generators, each its own process, on one PostgreSQL. An orchestrator paused (SIGSTOP) past its
lease while the other takes its job over, then woken, writes nothing more for the job (its
lease epoch is refused); one job spreads over every generator and survives one killed; the
generators share one provider limit; and any orchestrator exports what another published."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from generator_service.llm.simulator import LlmSimulator, SimulatorConfig
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.export import write_files
from tests.helpers import (
    article_rows,
    free_port,
    job_file,
    sql_rows,
    stop_processes,
    wait_until_serving,
)
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.job.v1.job_pb2 import JobStatus
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb

# About deployments: PostgreSQL, the production database, only.
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

PASSWORD = "cluster-test-password"
LEASE_SECONDS = 2.0
WORKERS = 4


class Cluster:
    """persistence, the generators (one per simulator given) and two orchestrators, each a
    process of its own on a loopback port, started, paused, woken and killed by PID."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        simulators: list[LlmSimulator],
        **settings: str,
    ) -> None:
        self.tmp = tmp
        self.simulators = simulators
        self.generators = [f"generator{n}" for n in range(1, len(simulators) + 1)]
        names = ["persistence", *self.generators, "orchestrator1", "orchestrator2"]
        self.ports = {name: free_port() for name in names}
        generators = ",".join(self.address(g) for g in self.generators)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        self.env.update(
            DATABASE_URL=database_url,
            TIERWRITER_ADMIN_PASSWORD=PASSWORD,
            OPENAI_API_KEY="not-a-secret",
            LOG_LEVEL="WARNING",
            SERVICE_TOKEN="cluster-test-service-token",
            ORCHESTRATOR_LEASE_SECONDS=str(LEASE_SECONDS),
            PERSISTENCE_ADDRESS=self.address("persistence"),
            GENERATOR_ADDRESS=f"ipv4:{generators}",
            OUTPUT_DIR=str(tmp / "output"),
            GENERATOR_RECONNECT_ATTEMPTS="3",
            **settings,
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        env = dict(self.env)
        if name.startswith("generator"):
            env["GENERATOR_ADDRESS"] = self.address(name)  # where it listens
            env["OPENAI_BASE_URL"] = self.simulators[self.generators.index(name)].base_url
        elif name.startswith("orchestrator"):
            env["ORCHESTRATOR_ADDRESS"] = self.address(name)
        module = f"{name.rstrip('0123456789')}_service"
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", module], cwd=self.tmp, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_until_serving(self.address(name))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def woken_run_ended(self, name: str, job_id: int) -> bool:
        """Whether `name`'s run of the job ended fenced (its log says so)."""
        return f"job {job_id}: this run (lease epoch" in self.log(name)

    def start_all(self) -> Cluster:
        for name in ["persistence", *self.generators, "orchestrator1", "orchestrator2"]:
            self.start(name)
        return self

    def signal(self, name: str, signum: signal.Signals) -> None:
        os.kill(self.processes[name].pid, signum)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait(timeout=30)

    def stop_all(self) -> None:
        stop_processes(self.processes)

    def client(self, orchestrator: str) -> OrchestratorClient:
        return OrchestratorClient(self.address(orchestrator), "admin", PASSWORD)

    def holder(self, job_id: int, ask: str = "orchestrator1") -> str:
        """The orchestrator running the job now ("" while none does), as `ask` tells it."""
        with self.client(ask) as client:
            runner = client.get_job(job_id).job.runner
        pids = {p.pid: name for name, p in self.processes.items()}
        return pids.get(int(runner.split(":")[1]), "") if runner else ""


@pytest.fixture
def cluster_of(
    tmp_path: Path, database_url: str
) -> Iterator[Callable[..., tuple[Cluster, list[LlmSimulator]]]]:
    """cluster_of(generators, simulator config, shared=..., **settings): a started cluster
    whose generators have a simulator each (or one they share); stopped at the end."""
    started: list[Cluster] = []
    simulators: list[LlmSimulator] = []

    def make(
        generators: int, config: SimulatorConfig, shared: bool = False, **settings: str
    ) -> tuple[Cluster, list[LlmSimulator]]:
        own = [LlmSimulator(config).start() for _ in range(1 if shared else generators)]
        simulators.extend(own)
        per_generator = own * generators if shared else own
        cluster = Cluster(tmp_path, database_url, per_generator, **settings)
        started.append(cluster)
        return cluster.start_all(), own

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop_all()
        for simulator in simulators:
            simulator.stop()


class Watcher:
    """Every event one orchestrator streams for a job, collected on a thread."""

    def __init__(self, cluster: Cluster, orchestrator: str, job_id: int) -> None:
        self.events: list[pb.JobEvent] = []
        self.error: BaseException | None = None
        self._client = cluster.client(orchestrator)
        self._thread = threading.Thread(target=self._read, args=(job_id,), daemon=True)
        self._thread.start()

    def _read(self, job_id: int) -> None:
        try:
            for event in self._client.watch_jobs([job_id]):
                self.events.append(event)
        except BaseException as e:
            self.error = e

    def finish(self, timeout: float = 120) -> list[pb.JobEvent]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the watch did not end"
        self._client.__exit__()
        return self.events


def until(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Wait for `condition()` to hold (an event seen: a record, a lease, a file); its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.02)
    return value


def stored_events(database_url: str, job_id: int) -> dict[int, bytes]:
    rows = sql_rows(
        database_url, "SELECT seq, payload FROM job_events WHERE job_id = :j ORDER BY seq", j=job_id
    )
    return {int(r["seq"]): bytes(r["payload"]) for r in rows}


def assert_watchers_saw_only_stored_events(
    database_url: str, job_id: int, *watched: list[pb.JobEvent]
) -> None:
    stored = stored_events(database_url, job_id)
    for events in watched:
        assert events, "the watcher saw nothing"
        for event in events:
            assert stored.get(event.seq) == event.SerializeToString(), (
                f"a watcher was shown event {event.seq}, which the database does not hold"
            )
    finished = [
        s for s, payload in stored.items()
        if pb.JobEvent.FromString(payload).WhichOneof("event") == "run_finished"
    ]  # fmt: skip
    assert len(finished) == 1, f"the job's end was told {len(finished)} times"
    saved = [
        (e.article.tier, e.article.article_index)
        for e in map(pb.JobEvent.FromString, stored.values())
        if e.WhichOneof("event") == "article"
        and e.article.kind == article_pb.ARTICLE_EVENT_KIND_SAVED
    ]
    assert len(saved) == len(set(saved)), "an article was reported saved twice"


def one_record_each(database_url: str, job_id: int, count: int) -> list[dict[str, Any]]:
    rows = article_rows(database_url, job_id)
    assert sorted((r["tier"], r["article_index"]) for r in rows) == [
        ("tier1", i) for i in range(count)
    ]
    return rows


def _job(count: int, **fields: Any) -> str:
    tier = {"count": count, "min_word_count": 200, "max_word_count": 300}
    return job_file({"tier1": tier}, **{"max_workers": WORKERS, **fields})


def _submit(cluster: Cluster, job: str) -> tuple[int, str, str]:
    """Submit on orchestrator1; (job id, the orchestrator that claimed it, the other)."""
    with cluster.client("orchestrator1") as client:
        [job_id] = client.submit_job(job)
    holder = until(lambda: cluster.holder(job_id), "an orchestrator to claim the job")
    other = "orchestrator2" if holder == "orchestrator1" else "orchestrator1"
    return job_id, holder, other


def _taken_over(cluster: Cluster, job_id: int, other: str) -> None:
    until(lambda: cluster.holder(job_id, ask=other) == other, "the other orchestrator to take over")


def _status(cluster: Cluster, orchestrator: str, job_id: int) -> int:
    with cluster.client(orchestrator) as client:
        return client.get_job(job_id).job.status


def test_an_orchestrator_paused_during_articles_writes_nothing_once_it_wakes(
    cluster_of: Callable[..., tuple[Cluster, list[LlmSimulator]]], database_url: str
) -> None:
    articles = 12
    cluster, [simulator] = cluster_of(2, SimulatorConfig(latency=0.05), shared=True)
    simulator.hold("content")  # the first articles stop at content, in flight
    job_id, holder, other = _submit(cluster, _job(articles))
    watchers = [Watcher(cluster, name, job_id) for name in ("orchestrator1", "orchestrator2")]
    until(lambda: simulator.stats().in_flight == WORKERS, "the job's workers to be in flight")
    cluster.signal(holder, signal.SIGSTOP)  # a long GC pause, a frozen VM, a partition
    _taken_over(cluster, job_id, other)
    # The other one sends every article without a record, those in flight for the frozen one
    # included: their content calls are held too, until both runs' are out.
    until(lambda: simulator.stats().in_flight == 2 * WORKERS, "the new run's articles in flight")
    simulator.release()
    until(lambda: _status(cluster, other, job_id) == JobStatus.JOB_STATUS_COMPLETED, "the job")
    before = stored_events(database_url, job_id), article_rows(database_url, job_id)
    cluster.signal(holder, signal.SIGCONT)  # it wakes, its replies waiting for it
    until(lambda: cluster.woken_run_ended(holder, job_id), "the woken run to end")
    watched = [w.finish() for w in watchers]

    # Nothing it did after waking reached the database.
    assert (stored_events(database_url, job_id), article_rows(database_url, job_id)) == before
    one_record_each(database_url, job_id, articles)
    # Paid at most once more than the articles: those in flight when it froze.
    assert simulator.stats().by_kind["content"] <= articles + WORKERS
    assert_watchers_saw_only_stored_events(database_url, job_id, *watched)
    [job] = sql_rows(database_url, "SELECT status, lease_epoch FROM jobs WHERE id = :j", j=job_id)
    assert job["status"] == "completed" and job["lease_epoch"] == 2


def test_an_orchestrator_paused_during_titles_never_writes_them(
    cluster_of: Callable[..., tuple[Cluster, list[LlmSimulator]]], database_url: str
) -> None:
    articles = 8
    cluster, [simulator] = cluster_of(2, SimulatorConfig(latency=0.0), shared=True)
    simulator.hold("titles")
    job_id, holder, other = _submit(cluster, _job(articles))
    watchers = [Watcher(cluster, name, job_id) for name in ("orchestrator1", "orchestrator2")]
    until(lambda: simulator.stats().in_flight == 1, "the first run's titles call")
    cluster.signal(holder, signal.SIGSTOP)
    _taken_over(cluster, job_id, other)
    until(lambda: simulator.stats().in_flight == 2, "the second run's titles call")
    simulator.release()
    until(lambda: _status(cluster, other, job_id) == JobStatus.JOB_STATUS_COMPLETED, "the job")
    cluster.signal(holder, signal.SIGCONT)
    until(lambda: cluster.woken_run_ended(holder, job_id), "the woken run to end")
    watched = [w.finish() for w in watchers]

    rows = one_record_each(database_url, job_id, articles)
    [job] = sql_rows(
        database_url, "SELECT titles, title_api_calls FROM jobs WHERE id = :j", j=job_id
    )
    titles = job["titles"]  # PostgreSQL's JSON column, as a dict
    # One writer of the titles: every article carries the title stored at its index, and the
    # titles' cost is the one run's that wrote them (the frozen run's call was paid, not kept).
    assert [r["title"] for r in rows] == titles["tier1"][:articles]
    assert job["title_api_calls"] == 1 and simulator.stats().by_kind["titles"] == 2
    assert_watchers_saw_only_stored_events(database_url, job_id, *watched)


def test_an_orchestrator_paused_while_publishing_never_shows_its_files(
    cluster_of: Callable[..., tuple[Cluster, list[LlmSimulator]]],
    database_url: str,
    tmp_path: Path,
) -> None:
    # A page template slow to render: the export takes long enough to be paused in.
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "article.html").write_text(
        "{% for i in range(1500000) %}{% endfor %}<html><body>{{ body }}</body></html>"
    )
    articles = 16
    cluster, _simulators = cluster_of(
        2, SimulatorConfig(latency=0.0), shared=True, TEMPLATES_DIR=str(templates)
    )
    job_id, holder, other = _submit(cluster, _job(articles, deployment_targets=["one.example.net"]))
    watchers = [Watcher(cluster, name, job_id) for name in ("orchestrator1", "orchestrator2")]
    output = tmp_path / "output"
    first_run = output / ".runs" / str(job_id) / "1"
    until(lambda: list(first_run.rglob("*.html")), "the first run's first page", 120)
    cluster.signal(holder, signal.SIGSTOP)
    written_when_paused = len(list(first_run.rglob("*.html")))
    assert written_when_paused < articles, "the export ended before it could be paused"
    _taken_over(cluster, job_id, other)
    until(lambda: _status(cluster, other, job_id) == JobStatus.JOB_STATUS_COMPLETED, "the job")
    cluster.signal(holder, signal.SIGCONT)
    until(lambda: cluster.woken_run_ended(holder, job_id), "the woken run to end", 120)
    assert not first_run.exists()  # its files were never shown, and are gone
    watched = [w.finish() for w in watchers]

    # The job's folder is the second run's; every page in it is what the database holds.
    job_dir = output / str(job_id)
    assert os.readlink(job_dir) == f".runs/{job_id}/2"
    rows = one_record_each(database_url, job_id, articles)
    pages = sorted(p for p in job_dir.rglob("*.html") if p.name != "index.html")
    assert len(pages) == articles
    by_path = {Path(r["output_path"]).name: r["html"] for r in rows}
    assert all(p.read_text() == by_path[p.name] for p in pages)
    assert_watchers_saw_only_stored_events(database_url, job_id, *watched)
    # Exported from the orchestrator that did not publish: the files come from the database,
    # and are the files the publishing run wrote, byte for byte.
    out = tmp_path / "exported"
    with cluster.client(holder) as client:
        exported = {
            f.path.relative_to(out).as_posix() for f in write_files(client.export_job(job_id), out)
        }
    shown = {p.relative_to(job_dir).as_posix() for p in job_dir.rglob("*") if p.is_file()}
    assert exported == shown and len(shown) == articles + 3  # + the site's index, titles, job's
    assert all((out / path).read_bytes() == (job_dir / path).read_bytes() for path in shown)


def test_one_job_spreads_over_every_generator_and_survives_one_killed(
    cluster_of: Callable[..., tuple[Cluster, list[LlmSimulator]]], database_url: str
) -> None:
    articles = 30
    cluster, simulators = cluster_of(3, SimulatorConfig(latency=0.1))
    job_id, holder, _other = _submit(cluster, _job(articles, max_workers=6))
    until(
        lambda: all(s.stats().by_kind.get("content", 0) >= 2 for s in simulators),
        "every generator to write articles",
    )
    victim = cluster.generators[0]
    cluster.kill(victim)  # kill -9: its articles in flight are lost with it
    until(lambda: _status(cluster, holder, job_id) == JobStatus.JOB_STATUS_COMPLETED, "the job")

    one_record_each(database_url, job_id, articles)
    outlines = [s.stats().by_kind.get("outline", 0) for s in simulators]
    assert all(outlines), f"a generator wrote nothing: {outlines}"
    # Only what was in flight on the killed one was paid again.
    assert sum(outlines) <= articles + 6
    with cluster.client(holder) as client:
        info = client.get_job(job_id)
    assert info.job.status == JobStatus.JOB_STATUS_COMPLETED


def test_generators_share_one_provider_limit(
    cluster_of: Callable[..., tuple[Cluster, list[LlmSimulator]]], database_url: str
) -> None:
    # A provider that allows 240 requests a minute (and refuses more with 429), and a job that
    # needs about 1.2 minutes' worth: each of two generators told the account's 240 would,
    # alone with its own bucket, send it all at once.
    limit, articles = 240, 140
    cluster, [simulator] = cluster_of(
        2,
        SimulatorConfig(latency=0.0, rpm_limit=limit),
        shared=True,
        LLM_RPM_LIMIT=str(limit),
    )
    job_id, holder, _other = _submit(cluster, _job(articles, max_workers=8))
    until(
        lambda: _status(cluster, holder, job_id) == JobStatus.JOB_STATUS_COMPLETED, "the job", 120
    )
    stats = simulator.stats()
    assert stats.rate_limited == 0, f"{stats.rate_limited} requests were refused with 429"
    assert stats.requests > limit  # more than the bucket held: the refill paced the rest
    one_record_each(database_url, job_id, articles)
    holders = sql_rows(database_url, "SELECT COUNT(*) AS n FROM rate_holders")[0]["n"]
    assert holders == 2  # both generators drew on the one bucket
