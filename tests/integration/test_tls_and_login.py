"""The CLI's side of security through the real services: `login` keeps a token only its owner
can read and the other commands use it, admins manage users from the command line, and with a
certificate the orchestrator speaks TLS only, which the CLI trusts through --ca-file."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service import cli, token_file
from orchestrator_service.cli import common
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.config import Settings
from orchestrator_service.stack import LocalStack, StackConfig
from tests.helpers import free_port
from tierwriter import healthcheck
from tierwriter.runtime import ServiceCallError, read_tls_files

PASSWORD = "admin-password-for-cli-tests"


def _stack(tmp_path: Path) -> LocalStack:
    return LocalStack(
        StackConfig.on_loopback(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            output_dir=tmp_path / "output",
            simulator=SimulatorConfig(latency=0.01),
            admin_password=PASSWORD,
        )
    )


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    monkeypatch.setenv("TIERWRITER_TOKEN_FILE", str(tmp_path / "home" / "token.json"))
    for name in ("TIERWRITER_USER", "TIERWRITER_PASSWORD", "TIERWRITER_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    with _stack(tmp_path) as started:
        yield started


def run(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """cli.main with `stdin` as standard input (not a terminal); (exit code, out, err)."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO(stdin))
        code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_login_keeps_a_private_token_that_the_other_commands_use(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--address", stack.orchestrator_address]
    code, _, err = run(capsys, "jobs", "list", *address)
    assert code == cli.EXIT_UNAUTHENTICATED and "not logged in: run `tierwriter login`" in err

    code, out, _ = run(capsys, "login", "-u", "admin", "-p", PASSWORD, *address)
    assert code == 0 and "as admin (admin)" in out
    token_path = tmp_path / "home" / "token.json"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert PASSWORD not in token_path.read_text()

    code, out, _ = run(capsys, "users", "create", "ann", *address, stdin="ann-password-1\n")
    assert code == 0 and "Created user ann (user)" in out
    code, out, _ = run(capsys, "users", "list", *address)
    assert code == 0 and [line.split()[:3] for line in out.splitlines()[1:]] == [
        ["admin", "admin", "active"],
        ["ann", "user", "active"],
    ]
    code, out, _ = run(capsys, "users", "disable", "ann", *address)
    assert code == 0 and "ann is disabled" in out
    code, _, err = run(capsys, "jobs", "list", "-u", "ann", "-p", "ann-password-1", *address)
    assert code == cli.EXIT_UNAUTHENTICATED and "invalid username or password" in err
    assert run(capsys, "users", "enable", "ann", *address)[0] == 0
    code, out, _ = run(capsys, "users", "passwd", "ann", *address, stdin="ann-password-2\n")
    assert code == 0 and "New password set for ann" in out

    # ann, logged in by environment and prompt-free, may not manage users: exit 3, as denied.
    code, _, err = run(capsys, "users", "list", "-u", "ann", "-p", "ann-password-2", *address)
    assert code == cli.EXIT_UNAUTHENTICATED and "only an admin can manage users" in err

    copied = json.loads(token_path.read_text())["token"]
    code, out, _ = run(capsys, "logout")
    assert code == 0 and not token_path.exists()
    assert "the token is revoked on the server" in out
    assert run(capsys, "jobs", "list", *address)[0] == cli.EXIT_UNAUTHENTICATED
    # A copy of the token is refused too: logout ended the session on the server.
    with (
        OrchestratorClient(stack.orchestrator_address, token=copied) as thief,
        pytest.raises(ServiceCallError) as refused,
    ):
        thief.list_jobs()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "this session token was logged out" in refused.value.details
    assert run(capsys, "logout")[1:] == ("Not logged in.\n", "")


def test_logout_keeps_the_token_file_when_the_server_cannot_revoke_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token.json"
    monkeypatch.setenv("TIERWRITER_TOKEN_FILE", str(path))
    unused_port = free_port()
    session = token_file.SavedSession(f"127.0.0.1:{unused_port}", "ann", "tok", time.time() + 60)
    token_file.save(session, path)
    code, _, err = run(capsys, "logout")
    assert code == cli.EXIT_UNAVAILABLE and path.exists()
    assert "the token could not be revoked" in err and "run `tierwriter logout` again" in err


def test_a_missing_password_is_asked_for_on_a_terminal_only(
    stack: LocalStack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    address = ["--address", stack.orchestrator_address]
    code, _, err = run(capsys, "jobs", "list", "-u", "admin", *address)
    assert code == cli.EXIT_UNAUTHENTICATED and "no password for 'admin'" in err

    asked: list[str] = []

    def answer(prompt: str) -> str:
        asked.append(prompt)
        return PASSWORD

    monkeypatch.setattr(common, "interactive", lambda: True)
    monkeypatch.setattr(common.getpass, "getpass", answer)
    assert cli.main(["jobs", "list", "-u", "admin", *address]) == 0
    assert asked == ["Password for admin: "]


def test_a_token_file_others_can_read_is_not_used(
    stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = ["--address", stack.orchestrator_address]
    assert run(capsys, "login", "-u", "admin", "-p", PASSWORD, *address)[0] == 0
    (tmp_path / "home" / "token.json").chmod(0o644)
    code, _, err = run(capsys, "jobs", "list", *address)
    assert code == cli.EXIT_UNAUTHENTICATED and "can be read by other users" in err


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 it signed, and an unrelated CA."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server-key.pem",
        "other_ca": tmp_path / "other-ca.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    return files


def test_with_a_certificate_the_orchestrator_speaks_tls_only(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    certificates: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TLS_CERT_FILE", str(certificates["cert"]))
    monkeypatch.setenv("TLS_KEY_FILE", str(certificates["key"]))
    monkeypatch.setenv("TIERWRITER_TOKEN_FILE", str(tmp_path / "token.json"))
    with _stack(tmp_path) as stack:
        address = stack.orchestrator_address
        ca = certificates["ca"].read_bytes()
        with OrchestratorClient(address, root_certificates=ca) as client:
            assert client.login("admin", PASSWORD).user.role == "admin"
        for roots in (None, certificates["other_ca"].read_bytes()):
            with OrchestratorClient(address, "admin", PASSWORD, root_certificates=roots) as c:
                with pytest.raises(ServiceCallError) as error:
                    c.list_jobs()
                assert error.value.code == grpc.StatusCode.UNAVAILABLE

        code, _, _ = run(
            capsys,
            *("jobs", "list", "-u", "admin", "-p", PASSWORD, "--address", address),
            *("--ca-file", str(certificates["ca"])),
        )
        assert code == 0
        code, _, err = run(capsys, "login", "-u", "admin", "-p", PASSWORD, "--address", address)
        assert code == cli.EXIT_UNAVAILABLE and "serves TLS needs --ca-file" in err, err
        assert healthcheck.check(address, root_certificates=ca)
        assert not healthcheck.check(address)
        # The container probe: TLS because TLS_CERT_FILE is set, trusting TIERWRITER_CA_FILE.
        probe = subprocess.run(
            [sys.executable, "-m", "tierwriter.healthcheck", address],
            env={**os.environ, "TIERWRITER_CA_FILE": str(certificates["ca"])},
            capture_output=True,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stderr


def test_tls_settings_need_both_files_and_readable_pem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set both to serve TLS, or neither"):
        Settings(TLS_CERT_FILE=tmp_path / "server.pem")
    not_pem, key = tmp_path / "server.pem", tmp_path / "key.pem"
    not_pem.write_text("hello")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="TLS_KEY_FILE: cannot read"):
        read_tls_files(not_pem, tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=r"TLS_CERT_FILE: .* is not a PEM file"):
        read_tls_files(not_pem, key)


def test_the_health_probe_checks_the_name_clients_use_not_the_address_it_dials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real certificate names a host, not 127.0.0.1: the probe must still verify it.
    ca = trustme.CA()
    server = ca.issue_cert("tierwriter.example.com")
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("TLS_KEY_FILE", str(key))
    with _stack(tmp_path) as stack:
        env = {**os.environ, "TIERWRITER_CA_FILE": str(ca_file)}

        def probe(name: str) -> int:
            named = {**env, "TLS_SERVER_NAME": name} if name else env
            command = [sys.executable, "-m", "tierwriter.healthcheck", stack.orchestrator_address]
            return subprocess.run(command, env=named, capture_output=True, timeout=60).returncode

        assert probe("tierwriter.example.com") == 0
        assert probe("") == 1  # unset: the 127.0.0.1 it dials is not the certificate's name
        assert probe("other.example.com") == 1
