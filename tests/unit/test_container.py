"""The image's entrypoint and the settings a compose deployment relies on."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from persistence_service.config import Settings as PersistenceSettings
from tierwriter.container import own_folders, private_tls_copies, service_identity

ROOT = Path(__file__).resolve().parents[2]


def test_tls_files_are_copied_for_the_services_group_into_a_folder_made_anew(
    tmp_path: Path,
) -> None:
    key = tmp_path / "server-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    target = tmp_path / "private"
    target.mkdir()
    (target / "tls_key_file.pem").symlink_to(tmp_path / "elsewhere")  # left by a service
    environ = {"TLS_KEY_FILE": str(key), "TLS_CERT_FILE": "", "TIERWRITER_CA_FILE": "/missing"}
    uid, gid = os.getuid(), os.getgid()
    updates = private_tls_copies(environ, target, gid, owner=uid)
    assert list(updates) == ["TLS_KEY_FILE"]  # unset and missing ones are left alone
    copy = Path(updates["TLS_KEY_FILE"])
    assert not copy.is_symlink() and copy.read_text() == key.read_text()
    assert not (tmp_path / "elsewhere").exists()  # the planted link was not followed
    assert stat.S_IMODE(copy.stat().st_mode) == 0o640 and copy.stat().st_gid == gid
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


@pytest.mark.skipif(os.geteuid() != 0, reason="giving folders to other users needs root")
def test_the_service_runs_as_the_owner_of_a_user_made_output_folder(tmp_path: Path) -> None:
    output = tmp_path / "output"
    assert service_identity(output, (999, 999)) == (999, 999)  # no folder: the service user
    output.mkdir()
    os.chown(output, 4242, 4343)
    assert service_identity(output, (999, 999)) == (4242, 4343)
    os.chown(output, 0, 0)  # made by the engine for the mount: the service user, and given
    assert service_identity(output, (999, 999)) == (999, 999)
    own_folders((output, tmp_path / "absent"), 999, 999)
    assert output.stat().st_uid == 999 and not (tmp_path / "absent").exists()


def test_postgres_settings_by_parts_survive_any_password(monkeypatch: pytest.MonkeyPatch) -> None:
    password = "p@ss/w:rd%20#?"
    for name, value in {"POSTGRES_HOST": "postgres", "POSTGRES_PASSWORD": password}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = make_url(PersistenceSettings().database_url)
    assert (url.host, url.port, url.username, url.password, url.database) == (
        "postgres",
        5432,
        "tierwriter",
        password,
        "tierwriter",
    )
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")  # an explicit URL wins
    assert PersistenceSettings().database_url == "sqlite:///x.db"


def test_a_dot_env_file_is_not_read_by_the_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compose .env holds container paths; `tierwriter demo` in the same folder must not
    # pick them up.
    (tmp_path / ".env").write_text("DATABASE_URL=postgresql+psycopg2://x@postgres/x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("POSTGRES_HOST", raising=False)
    assert PersistenceSettings().database_url.startswith("sqlite")


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    name = re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_dependency_the_package_declares() -> None:
    # The image installs the package with --no-deps after the lock: a dependency missing from
    # the lock would only show as an ImportError when a container starts.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pinned = {_name(line) for line in lines if line and not line.startswith("#")}
    assert all("==" in line for line in lines if line and not line.startswith("#"))
    missing = {_name(d) for d in declared} - pinned
    assert not missing, f"add to requirements.lock (scripts/lock_requirements.sh): {missing}"
