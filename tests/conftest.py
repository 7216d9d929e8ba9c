"""Fixtures that start real servers and a real PostgreSQL, and always stop them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PostgresServer, free_port


def _postgres_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(autouse=True)
def _refused_calls_start_afresh() -> None:
    """The log of refused calls is per process and counts a minute per client: a test that
    reads its lines must not find them held back by an earlier test's refusals."""
    from tierwriter.refused_calls import REFUSED

    REFUSED.forget()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as the `postgres` user when we are root.
    In CI a missing or broken PostgreSQL fails the run instead of skipping it."""
    bindir = _postgres_bindir()
    if bindir is None:
        message = "PostgreSQL binaries (initdb, pg_ctl) not found; .ci/run installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp_path: that is 0700 root and the postgres user could not enter it.
    base = Path(tempfile.mkdtemp(prefix="tierwriter-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run(
            [*as_postgres, *args], check=True, capture_output=True, text=True, timeout=120
        )

    pg_ctl = (str(bindir / "pg_ctl"), "-D", str(data))
    start_options = (
        "-l",
        str(base / "postgres.log"),
        "-o",
        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
    )
    try:
        run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        )
        run(*pg_ctl, *start_options, "-w", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr or e.stdout}")
    try:
        yield PostgresServer("127.0.0.1", port, (*as_postgres, *pg_ctl), start_options)
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: an SQLite file, or a new database on the throwaway cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tierwriter.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"tw_{uuid.uuid4().hex[:12]}")


@dataclass
class StackHandle:
    """A started LocalStack plus what tests need to drive and inspect it."""

    stack: Any
    database_url: str
    output_dir: Path
    password: str


@pytest.fixture
def start_stack(database_url: str, tmp_path: Path) -> Iterator[Callable[..., StackHandle]]:
    """start_stack(simulator=SimulatorConfig(...), concurrent_workers=..., ...) → StackHandle.
    Every stack started here is stopped when the test ends, pass or fail."""
    from orchestrator_service.stack import LocalStack, StackConfig

    started: list[LocalStack] = []
    password = uuid.uuid4().hex  # one per test: a second stack shares the database and its admin

    def start(**overrides: Any) -> StackHandle:
        config = StackConfig.on_loopback(
            database_url=overrides.pop("database_url", database_url),
            output_dir=overrides.pop("output_dir", tmp_path / f"output{len(started)}"),
            admin_password=overrides.pop("admin_password", password),
            **overrides,
        )
        stack = LocalStack(config).__enter__()
        started.append(stack)
        return StackHandle(
            stack, config.database_url or "", config.output_dir or tmp_path, password
        )

    try:
        yield start
    finally:
        for stack in reversed(started):
            stack.stop()
