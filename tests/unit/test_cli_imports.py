"""The client commands start fast: they import the gRPC client and the protos, never the
services, the openai SDK or SQLAlchemy (measured by loading them, not by timing them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Top-level packages a client command has no use for: the model SDK, the database, templating,
# the server's auth and settings, and our three services' server sides.
HEAVY = {"openai", "sqlalchemy", "alembic", "jinja2", "jwt", "argon2", "pydantic_settings", "nh3"}
SERVER_MODULES = (
    "generator_service",
    "persistence_service",
    "orchestrator_service.runner",
    "orchestrator_service.servicer",
    "orchestrator_service.stack",
    "orchestrator_service.auth",
)
PROBE = """
import json, sys
from orchestrator_service import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["jobs", "--help"],
        ["jobs", "list", "-u", "ann", "-p", "pw", "--address", "127.0.0.1:1"],
        ["login", "-u", "ann", "-p", "pw", "--address", "127.0.0.1:1"],
    ],
    ids=["help", "jobs-help", "jobs-list", "login"],
)
def test_client_commands_import_nothing_of_the_servers(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] == (0 if "--help" in argv else 4), result.stderr  # 4: unreachable
    loaded = set(report["modules"])
    assert not {m.split(".")[0] for m in loaded} & HEAVY
    assert not [m for m in loaded if m.startswith(SERVER_MODULES)]
