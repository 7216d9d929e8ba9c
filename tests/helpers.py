"""Helpers shared by the tests: job files, running them, reading the database directly."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from sqlalchemy import create_engine, text

TIER = {
    "count": 10,
    "min_word_count": 600,
    "max_word_count": 900,
    "min_h2_tags": 2,
    "max_h2_tags": 4,
    "min_h3_tags": 2,
    "max_h3_tags": 6,
}


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster; trust authentication on loopback."""

    host: str
    port: int
    # pg_ctl with its data folder (as the postgres user), and how it was started: for outages.
    pg_ctl: tuple[str, ...] = ()
    start_options: tuple[str, ...] = ()

    def stop(self) -> None:
        """Stop the cluster (fast: sessions are cut), as an outage does."""
        subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "stop"], check=True, timeout=120)

    def start(self) -> None:
        """Start it again, on the same port."""
        subprocess.run([*self.pg_ctl, *self.start_options, "-w", "start"], check=True, timeout=120)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; its SQLAlchemy URL."""
        connection = psycopg2.connect(
            host=self.host, port=self.port, user="postgres", dbname="postgres"
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{name}"


def job_file(tiers: dict[str, dict[str, Any]] | None = None, **job: Any) -> str:
    """A one-job file with a unique project; tiers default to one tier of 10."""
    spec: dict[str, Any] = {
        "project": {
            "name": f"test-{uuid.uuid4().hex[:10]}",
            "main_keyword": "cnc machining",
            "entities": ["lathe", "spindle"],
            "related_searches": ["cnc machining cost"],
            "money_site_url": "https://example.com/cnc",
        },
        "tiers": tiers or {"tier1": copy.deepcopy(TIER)},
    }
    spec.update(job)
    return json.dumps({"jobs": [spec]})


def run_job(handle: Any, job_text: str) -> tuple[list[Any], Any]:
    """Run a job file through the orchestrator as admin; (all events, the RunFinished)."""
    from orchestrator_service.client import OrchestratorClient

    with OrchestratorClient(handle.stack.orchestrator_address, "admin", handle.password) as client:
        events = list(client.run_job(job_text))
    assert events[-1].WhichOneof("event") == "run_finished"
    return events, events[-1].run_finished


def articles_of(events: list[Any]) -> list[Any]:
    """The article events (ArticleEvent)."""
    return [e.article for e in events if e.WhichOneof("event") == "article"]


def job_ids_of(events: list[Any]) -> list[int]:
    """The ids of the jobs the run started."""
    return [e.job_started.job_id for e in events if e.WhichOneof("event") == "job_started"]


def sql_rows(database_url: str, statement: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of one query as dicts, read with SQL of our own (not our code), on a fresh engine."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [dict(row) for row in connection.execute(text(statement), params).mappings()]
    finally:
        engine.dispose()


def rows_by_status(database_url: str, job_id: int) -> dict[str, int]:
    """Counts of generated_content rows per status."""
    rows = sql_rows(
        database_url,
        "SELECT status, COUNT(*) AS n FROM generated_content WHERE job_id = :j GROUP BY status",
        j=job_id,
    )
    return {row["status"]: row["n"] for row in rows}


def count_rows(database_url: str, table: str) -> int:
    """Rows in a table."""
    return int(sql_rows(database_url, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])


def article_pages(folder: Path) -> list[Path]:
    """The exported article pages under `folder` (index pages left out), sorted."""
    return sorted(p for p in folder.rglob("*.html") if p.name != "index.html")


def article_rows(database_url: str, job_id: int) -> list[dict[str, Any]]:
    """A job's generated_content rows as dicts, in (tier, index) order."""
    return sql_rows(
        database_url,
        "SELECT id, tier, article_index, title, status, error, site, url, output_path, outline,"
        " content, html, word_count, asked_words, draft_words, cost_usd, error_traceback,"
        " error_stage, quality_gates"
        " FROM generated_content WHERE job_id = :j ORDER BY tier, article_index",
        j=job_id,
    )


def wait_until_serving(address: str, timeout: float = 60.0) -> None:
    """Block until the gRPC health service at `address` reports SERVING (a service may answer
    NOT_SERVING first, e.g. persistence while its database is not ready)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{address} did not become SERVING within {timeout}s"
            status = health.Check(
                health_pb2.HealthCheckRequest(), timeout=remaining, wait_for_ready=True
            ).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)


def stop_processes(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """Stop every service process the test started (emptying `processes`): SIGCONT first (a
    paused one would not hear SIGTERM), then SIGTERM, and SIGKILL for one still there after
    30 s."""
    for process in processes.values():
        os.kill(process.pid, signal.SIGCONT)
    for name in list(processes):
        process = processes.pop(name)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def internal_channel(address: str, service_token: str) -> Any:
    """A channel to generator_service or persistence_service that presents the stack's service
    token, as the other services do."""
    import grpc

    from tierwriter.service_auth import token_metadata

    @dataclass(frozen=True)
    class Details(grpc.ClientCallDetails):
        method: str
        timeout: float | None
        metadata: Any
        credentials: Any
        wait_for_ready: bool | None
        compression: Any

    class WithToken(
        grpc.UnaryUnaryClientInterceptor,
        grpc.UnaryStreamClientInterceptor,
        grpc.StreamUnaryClientInterceptor,
        grpc.StreamStreamClientInterceptor,
    ):
        def _details(self, d: Any) -> Any:
            metadata = [*(d.metadata or ()), *token_metadata(service_token)]
            return Details(
                d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression
            )

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
            return continuation(self._details(details), requests)

        def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
            return continuation(self._details(details), requests)

    return grpc.intercept_channel(grpc.insecure_channel(address), WithToken())


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
