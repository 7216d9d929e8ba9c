"""The image's entrypoint and the settings a compose deployment relies on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from persistence_service.config import Settings as PersistenceSettings
from tierwriter.container import own_folders, private_tls_copies


def test_tls_files_are_copied_private_to_the_service_user(tmp_path: Path) -> None:
    key = tmp_path / "server-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o600)
    environ = {"TLS_KEY_FILE": str(key), "TLS_CERT_FILE": "", "TIERWRITER_CA_FILE": "/missing"}
    uid, gid = os.getuid(), os.getgid()
    updates = private_tls_copies(environ, tmp_path / "private", uid, gid)
    assert list(updates) == ["TLS_KEY_FILE"]  # unset and missing ones are left alone
    copy = Path(updates["TLS_KEY_FILE"])
    assert copy.read_text() == key.read_text() and copy.parent == tmp_path / "private"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and copy.stat().st_uid == uid
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700


def test_only_existing_folders_are_given_to_the_service_user(tmp_path: Path) -> None:
    output = tmp_path / "output"
    output.mkdir()
    own_folders((output, tmp_path / "absent"), os.getuid(), os.getgid())
    assert output.stat().st_uid == os.getuid() and not (tmp_path / "absent").exists()


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
