"""Each service on its own: health, reflection, argument errors, dependencies down, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from generator_service.llm.simulator import SimulatorConfig
from persistence_service.client import PersistenceClient
from tests.helpers import (
    free_port,
    internal_channel,
    job_file,
    rows_by_status,
    run_job,
    wait_until_serving,
)
from tierwriter.article.v1.article_event_pb2 import ArticleStatus
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as gen_grpc
from tierwriter.job.v1 import job_pb2
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.persistence.v1 import persistence_service_pb2_grpc as db_grpc
from tierwriter.service_auth import required_token, token_metadata

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {
    "orchestrator_address": "tierwriter.orchestrator.v1.OrchestratorService",
    "generator_address": "tierwriter.generator.v1.GeneratorService",
    "persistence_address": "tierwriter.persistence.v1.PersistenceService",
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_serves_health_and_reflection(start_stack, service: str) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    with grpc.insecure_channel(getattr(handle.stack, service)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICES[service]), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = next(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICES[service], "grpc.health.v1.Health"} <= names


def _tier(name: str, min_word_count: int = 100) -> job_pb2.TierSpec:
    return job_pb2.TierSpec(
        name=name,
        count=2,
        min_word_count=min_word_count,
        max_word_count=200,
        min_h2_tags=1,
        max_h2_tags=2,
        min_h3_tags=0,
        max_h3_tags=2,
    )


def _settings(
    more_tiers: Sequence[job_pb2.TierSpec] = (), **overrides: object
) -> gen_pb.BatchSettings:
    settings = gen_pb.BatchSettings(
        job_id=1,
        project=gen_pb.ProjectContext(project_id=1, main_keyword="k"),
        tier=_tier("tier1"),
        more_tiers=more_tiers,
        max_workers=2,
    )
    for name, value in overrides.items():
        setattr(settings, name, value)
    return settings


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "first message of the stream must carry the batch settings"),
        (
            [gen_pb.GenerateArticlesRequest(article=gen_pb.ArticleRequest(title="t"))],
            "first message",
        ),
        (
            [gen_pb.GenerateArticlesRequest(settings=_settings(max_workers=0))],
            "settings.max_workers",
        ),
        (
            [gen_pb.GenerateArticlesRequest(settings=_settings(max_workers=1000))],
            "settings.max_workers",
        ),
        (
            [
                gen_pb.GenerateArticlesRequest(settings=_settings()),
                gen_pb.GenerateArticlesRequest(
                    article=gen_pb.ArticleRequest(article_index=7, title="t")
                ),
            ],
            "article.article_index: must be between 0 and 1, got 7",
        ),
        (
            [
                gen_pb.GenerateArticlesRequest(settings=_settings()),
                gen_pb.GenerateArticlesRequest(
                    article=gen_pb.ArticleRequest(article_index=0, title=" ")
                ),
            ],
            "article.title",
        ),
        (
            [
                gen_pb.GenerateArticlesRequest(settings=_settings()),
                gen_pb.GenerateArticlesRequest(
                    article=gen_pb.ArticleRequest(article_index=0, title="t", tier="tier9")
                ),
            ],
            "article.tier: 'tier9' is not one of the stream's tiers",
        ),
        (
            [
                gen_pb.GenerateArticlesRequest(
                    settings=_settings(more_tiers=[_tier("tier2", min_word_count=0)])
                )
            ],
            "settings.more_tiers[0]: need 0 < min_word_count <= max_word_count",
        ),
        (
            [gen_pb.GenerateArticlesRequest(settings=_settings(more_tiers=[_tier("tier1")]))],
            "settings.more_tiers[0].name: tier 'tier1' is in the stream twice",
        ),
        (
            [
                gen_pb.GenerateArticlesRequest(settings=_settings(more_tiers=[_tier("tier2")])),
                gen_pb.GenerateArticlesRequest(
                    article=gen_pb.ArticleRequest(article_index=2, title="t", tier="tier2")
                ),
            ],
            "article.article_index: must be between 0 and 1, got 2",
        ),
    ],
)
def test_generator_rejects_bad_streams_with_invalid_argument(
    start_stack, messages, problem
) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    with (
        internal_channel(handle.stack.generator_address, handle.stack.service_token) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        list(gen_grpc.GeneratorServiceStub(channel).GenerateArticles(iter(messages), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in error.value.details()
    assert handle.stack.simulator.stats().requests == 0


def test_generator_rejects_a_bad_title_count(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    with (
        internal_channel(handle.stack.generator_address, handle.stack.service_token) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        list(  # a stream: its status comes with the first read
            gen_grpc.GeneratorServiceStub(channel).GenerateTitles(
                gen_pb.GenerateTitlesRequest(
                    project=gen_pb.ProjectContext(main_keyword="k"), count=0
                ),
                timeout=10,
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "count: must be between 1 and 10000" in error.value.details()


@pytest.mark.parametrize(
    "call, code, problem",
    [
        (
            lambda s: s.GetJob(db_pb.GetJobRequest(job_id=424242), timeout=10),
            grpc.StatusCode.NOT_FOUND,
            "job 424242 does not exist",
        ),
        (
            lambda s: s.SaveArticle(
                db_pb.SaveArticleRequest(
                    article=db_pb.Article(
                        job_id=1,
                        tier="tier1",
                        status=ArticleStatus.ValueType(99),  # none such
                    )
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "article.status: must be one of generated, augmented, short, long, failed, skipped",
        ),
        (
            lambda s: s.SaveArticles(
                db_pb.SaveArticlesRequest(saves=[db_pb.SaveArticleRequest()] * 1001), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "saves: at most 1000 records a call, got 1001",
        ),
        (
            lambda s: s.ListArticles(
                db_pb.ListArticlesRequest(job_id=1, page_token="not-a-token"), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token: not one this service gave",
        ),
        (
            lambda s: s.GetJobStats(db_pb.GetJobStatsRequest(), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "job_ids: name at least one job",
        ),
        (
            lambda s: s.VerifyCredentials(
                db_pb.VerifyCredentialsRequest(username="admin", password="x"), timeout=10
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid username or password",
        ),
    ],
)
def test_persistence_maps_errors_to_status_codes(start_stack, call, code, problem) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    with (
        internal_channel(handle.stack.persistence_address, handle.stack.service_token) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        call(db_grpc.PersistenceServiceStub(channel))
    assert error.value.code() == code and problem in error.value.details()


def test_a_jobs_records_come_in_pages_with_or_without_their_text(start_stack) -> None:
    """A job of thousands of articles is larger than one message may be: ListArticles pages."""
    handle = start_stack(simulator=SimulatorConfig())
    events, _ = run_job(
        handle,
        job_file(
            {
                "tier1": {"count": 3, "min_word_count": 100, "max_word_count": 200},
                "tier2": {"count": 2, "min_word_count": 100, "max_word_count": 200},
            }
        ),
    )
    job_id = events[0].job_started.job_id
    client = PersistenceClient(
        handle.stack.persistence_address, service_token=handle.stack.service_token
    )
    with client:
        pages = list(client.article_pages(job_id, metadata_only=True))
        assert [len(page) for page in pages] == [5]
        keys = [(a.tier, a.article_index) for a in pages[0]]
        assert keys == [("tier1", 0), ("tier1", 1), ("tier1", 2), ("tier2", 0), ("tier2", 1)]
        assert all(a.title and a.url and not a.content and not a.html for a in pages[0])
        full = client.list_articles(job_id)
        assert [(a.tier, a.article_index) for a in full] == keys
        assert all(a.content and a.html for a in full)

    with internal_channel(handle.stack.persistence_address, handle.stack.service_token) as channel:
        stub, seen, token = db_grpc.PersistenceServiceStub(channel), [], ""
        while True:
            page = stub.ListArticles(
                db_pb.ListArticlesRequest(job_id=job_id, page_size=2, page_token=token),
                timeout=10,
            )
            seen.append([(a.tier, a.article_index) for a in page.articles])
            token = page.next_page_token
            if not token:
                break
    assert seen == [keys[0:2], keys[2:4], keys[4:5]]


def test_save_articles_answers_each_record_and_stores_the_good_ones(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    events, _ = run_job(
        handle, job_file({"tier1": {"count": 1, "min_word_count": 100, "max_word_count": 200}})
    )
    job_id = events[0].job_started.job_id
    with PersistenceClient(
        handle.stack.persistence_address, service_token=handle.stack.service_token
    ) as client:
        stored = client.list_articles(job_id)[0]

        def record(index: int, status: ArticleStatus.ValueType) -> db_pb.Article:
            return db_pb.Article(
                job_id=job_id,
                project_id=stored.project_id,
                tier="tier1",
                article_index=index,
                title=f"extra {index}",
                status=status,
            )

        epoch = client.get_job(job_id).lease_epoch  # the saves are fenced by it

        def save(article: db_pb.Article) -> db_pb.SaveArticleRequest:
            return db_pb.SaveArticleRequest(article=article, lease_epoch=epoch)

        results = client.save_articles(
            [
                save(record(0, stored.status)),  # the job's own article: stored already
                save(record(1, ArticleStatus.ARTICLE_STATUS_GENERATED)),
                save(record(2, ArticleStatus.ValueType(99))),
            ]
        )
        assert [(r.article_id, r.created) for r in results[:2]] == [
            (stored.id, False),
            (results[1].article_id, True),
        ]
        assert results[1].article_id and not results[0].error and not results[1].error
        assert results[2].error.startswith("article.status: must be one of")
        assert [a.title for a in client.list_articles(job_id)] == [stored.title, "extra 1"]


def test_an_unreachable_generator_fails_the_job_with_a_message_naming_it(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    generator = handle.stack._running.pop(1)  # stop just the generator
    generator.stop(0)
    events, finished = run_job(handle, job_file())
    assert not finished.ok
    assert "generator_service at" in finished.error and "unavailable" in finished.error
    job_id = events[0].job_started.job_id
    assert rows_by_status(handle.database_url, job_id) == {}
    assert finished.summary.processed_jobs == 0 and finished.summary.total_jobs == 1


@pytest.mark.parametrize(
    "module", ["persistence_service", "generator_service", "orchestrator_service"]
)
def test_sigterm_stops_a_service_gracefully(tmp_path: Path, module: str) -> None:
    ports = {name: free_port() for name in ("PERSISTENCE", "GENERATOR", "ORCHESTRATOR")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update({f"{name}_ADDRESS": f"127.0.0.1:{port}" for name, port in ports.items()})
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}", TIERWRITER_ADMIN_PASSWORD="pw-for-test"
    )
    own = f"127.0.0.1:{ports[module.split('_')[0].upper()]}"
    with subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            wait_until_serving(own)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
        output = process.stdout.read() if process.stdout else ""
    assert f"{module} listening on port" in output
    assert "received SIGTERM, stopping" in output
    assert "pw-for-test" not in output


def test_generator_rejects_an_article_sent_twice_and_writes_it_once(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    events, _ = run_job(
        handle, job_file({"tier1": {"count": 1, "min_word_count": 100, "max_word_count": 200}})
    )
    job_id = events[0].job_started.job_id
    with PersistenceClient(
        handle.stack.persistence_address, service_token=handle.stack.service_token
    ) as client:
        epoch = client.get_job(job_id).lease_epoch  # else the generator writes nothing for it
    settings = _settings(job_id=job_id, lease_epoch=epoch)
    article = gen_pb.ArticleRequest(article_index=1, title="Twice")
    messages = [
        gen_pb.GenerateArticlesRequest(settings=settings),
        gen_pb.GenerateArticlesRequest(article=article),
        gen_pb.GenerateArticlesRequest(article=article),
    ]
    with (
        internal_channel(handle.stack.generator_address, handle.stack.service_token) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        list(gen_grpc.GeneratorServiceStub(channel).GenerateArticles(iter(messages), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "article.article_index: tier1 article 1 was sent twice" in error.value.details()
    outlines = handle.stack.simulator.stats().by_kind.get("outline", 0)
    assert outlines == 2  # the job's one article, and the first copy; never the second


def test_the_container_health_probe_tells_serving_from_down(start_stack) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    address = handle.stack.orchestrator_address
    probe = [sys.executable, "-m", "tierwriter.healthcheck"]
    assert subprocess.run([*probe, address], timeout=30).returncode == 0
    assert (
        subprocess.run([*probe, address, SERVICES["orchestrator_address"]], timeout=30).returncode
        == 0
    )
    assert subprocess.run([*probe, f"127.0.0.1:{free_port()}"], timeout=30).returncode == 1


class _Forwarder(socketserver.ThreadingTCPServer):
    """A TCP pipe from a loopback port to `upstream`: the database "comes up" when it starts."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", port), _Pipe)


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _Forwarder)
        with socket.create_connection(self.server.upstream) as upstream:

            def pump(source: socket.socket, target: socket.socket) -> None:
                try:
                    while data := source.recv(65536):
                        target.sendall(data)
                except OSError:
                    pass
                finally:
                    with contextlib.suppress(OSError):
                        target.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
            back.start()
            pump(self.request, upstream)
            back.join()


@pytest.mark.postgres
def test_persistence_is_not_serving_until_its_database_answers(tmp_path: Path, postgres_server):
    url = postgres_server.create_database(f"tw_{uuid.uuid4().hex[:12]}")
    db_port, own_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(
        DATABASE_URL=url.replace(f":{postgres_server.port}/", f":{db_port}/"),
        PERSISTENCE_ADDRESS=f"127.0.0.1:{own_port}",
        TIERWRITER_ADMIN_PASSWORD="pw-for-test",
        DATABASE_WAIT_SECONDS="60",
    )
    with subprocess.Popen(
        [sys.executable, "-m", "persistence_service"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{own_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest()
                status = health.Check(request, timeout=30, wait_for_ready=True).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                with _Forwarder(db_port, (postgres_server.host, postgres_server.port)) as forwarder:
                    threading.Thread(target=forwarder.serve_forever, daemon=True).start()
                    deadline = time.monotonic() + 30
                    while health.Check(request, timeout=5).status != (
                        health_pb2.HealthCheckResponse.SERVING
                    ):
                        assert time.monotonic() < deadline, "never became SERVING"
                        time.sleep(0.2)
                    process.send_signal(signal.SIGTERM)
                    assert process.wait(timeout=30) == 0
                    forwarder.shutdown()
        finally:
            if process.poll() is None:
                process.kill()
        output = process.stdout.read() if process.stdout else ""
    assert "the database does not answer yet" in output


@pytest.mark.parametrize("token", [None, "a-wrong-token"])
def test_internal_services_answer_only_the_other_services(start_stack, token) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    metadata = token_metadata(token)
    for address, call in [
        (
            handle.stack.persistence_address,
            lambda channel: db_grpc.PersistenceServiceStub(channel).ListJobs(
                db_pb.ListJobsRequest(), timeout=10, metadata=metadata
            ),
        ),
        (
            handle.stack.generator_address,
            lambda channel: list(
                gen_grpc.GeneratorServiceStub(channel).GenerateTitles(
                    gen_pb.GenerateTitlesRequest(), timeout=10, metadata=metadata
                )
            ),
        ),
        (
            handle.stack.generator_address,
            lambda channel: list(
                gen_grpc.GeneratorServiceStub(channel).GenerateArticles(
                    iter([]), timeout=10, metadata=metadata
                )
            ),
        ),
    ]:
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as error:
                call(channel)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "answers only tierwriter's own services" in error.value.details()
            # Health stays open for probes.
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert handle.stack.simulator.stats().requests == 0


def test_a_service_listening_beyond_loopback_needs_a_service_token() -> None:
    assert required_token(None, "127.0.0.1:50052", "generator_service") is None
    assert required_token("t", "0.0.0.0:50052", "generator_service") == "t"
    with pytest.raises(
        ValueError, match=r"SERVICE_TOKEN must be set to listen on 0\.0\.0\.0:50053"
    ):
        required_token(None, "0.0.0.0:50053", "persistence_service")
