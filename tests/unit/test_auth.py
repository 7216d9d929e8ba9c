"""The pieces of authentication on their own: credentials in metadata, signed tokens, the brake
on failed logins, and the token file only its owner can read."""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
from pydantic import ValidationError

from orchestrator_service import token_file
from orchestrator_service.auth import (
    Authenticator,
    LoginThrottle,
    NotAuthenticatedError,
    PasswordCredentials,
    Principal,
    TokenClaims,
    TokenSigner,
    credentials_from_metadata,
)
from orchestrator_service.config import Settings as OrchestratorSettings
from orchestrator_service.credentials import basic_credentials, bearer_credentials
from persistence_service.config import Settings as PersistenceSettings

SECRET = "unit-test-signing-secret-0123456789abcdef"


def test_credentials_are_read_from_basic_or_bearer_metadata() -> None:
    assert credentials_from_metadata(basic_credentials("ann", "p:ss")) == PasswordCredentials(
        "ann", "p:ss"
    )
    assert credentials_from_metadata(bearer_credentials("abc.def.ghi")) == "abc.def.ghi"
    for malformed in ("Basic !!!", "Basic " + "Zm9v", "Digest x", "Bearer", ""):
        assert credentials_from_metadata([("authorization", malformed)]) is None, malformed
    assert credentials_from_metadata([]) is None
    assert "p:ss" not in repr(PasswordCredentials("ann", "p:ss"))


def test_a_token_names_its_user_until_it_expires() -> None:
    now = time.time()
    token, expires = TokenSigner(SECRET, 600, clock=lambda: now).issue("ann", version=4)
    assert TokenSigner(SECRET, 600).claims(token) == TokenClaims("ann", 4)
    assert expires == int(now + 600)
    old, _ = TokenSigner(SECRET, 600, clock=lambda: now - 601).issue("ann")
    with pytest.raises(NotAuthenticatedError, match="expired"):
        TokenSigner(SECRET, 600).claims(old)


@pytest.mark.parametrize(
    "forge",
    [
        lambda: TokenSigner("some-other-secret-0123456789abcdef", 600).issue("admin")[0],
        lambda: jwt.encode(
            {"sub": "admin", "ver": 1, "iss": "tierwriter", "iat": 1, "exp": 2**40},
            "",
            algorithm="none",
        ),
        lambda: jwt.encode({"sub": "admin", "ver": 1, "exp": 2**40}, SECRET, algorithm="HS256"),
        lambda: jwt.encode(
            {"sub": "admin", "ver": 1, "iss": "someone", "iat": 1, "exp": 2**40},
            SECRET,
            algorithm="HS256",
        ),
        lambda: "",
        lambda: "a.b.c",
    ],
)
def test_a_token_not_signed_here_is_refused(forge) -> None:
    with pytest.raises(NotAuthenticatedError, match="invalid session token"):
        TokenSigner(SECRET, 600).claims(forge())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_logins_make_the_next_attempt_wait_ever_longer_per_user() -> None:
    clock = Clock()
    throttle = LoginThrottle(free_attempts=3, base_delay=1.0, max_delay=8.0, clock=clock)
    assert [throttle.attempt("ann") for _ in range(3)] == [0, 0, 0]
    assert throttle.standing("ann") == (3, 1.0)
    assert throttle.attempt("ann") == 1.0 and throttle.attempt("bob") == 0
    assert throttle.standing("ann") == (3, 1.0)  # a refused attempt is not counted
    delays = []
    for _ in range(4):
        clock.now += throttle.standing("ann")[1]
        assert throttle.attempt("ann") == 0
        delays.append(throttle.standing("ann")[1])
    assert delays == [2.0, 4.0, 8.0, 8.0]  # doubling, capped
    throttle.succeeded("ann")
    assert throttle.standing("ann") == (0, 0.0)


def test_guesses_sent_in_parallel_are_held_back_like_guesses_in_a_row() -> None:
    throttle = LoginThrottle(free_attempts=3, base_delay=1.0, clock=Clock())
    with ThreadPoolExecutor(16) as pool:
        waits = list(pool.map(lambda _: throttle.attempt("ann"), range(16)))
    assert waits.count(0) == 3  # three went ahead before any had answered; the rest wait


def test_the_throttle_forgets_the_oldest_names_beyond_its_bound() -> None:
    throttle = LoginThrottle(free_attempts=1, clock=Clock(), max_tracked=3)
    for name in ("a", "b", "c", "d"):
        throttle.attempt(name)
    assert throttle.standing("a") == (0, 0.0) and throttle.standing("d")[0] == 1


def test_an_admin_owns_everything_and_a_user_their_own() -> None:
    admin, ann = Principal("root", "admin"), Principal("ann", "user")
    assert admin.owns("ann") and ann.owns("ann") and not ann.owns("bob")
    assert admin.scope == "" and ann.scope == "ann"


def test_the_token_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "config" / "tierwriter" / "token.json"
    session = token_file.SavedSession("127.0.0.1:1", "ann", "tok", time.time() + 60)
    token_file.save(session, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert token_file.load(path, "127.0.0.1:1") == session
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind

    with pytest.raises(token_file.TokenFileError, match=r"not logged in to 127\.0\.0\.1:2"):
        token_file.load(path, "127.0.0.1:2")
    os.chmod(path, 0o644)
    with pytest.raises(token_file.TokenFileError, match="can be read by other users"):
        token_file.load(path, "127.0.0.1:1")
    token_file.save(token_file.SavedSession("127.0.0.1:1", "ann", "tok", time.time() - 1), path)
    with pytest.raises(token_file.TokenFileError, match="has expired"):
        token_file.load(path, "127.0.0.1:1")
    assert token_file.delete(path) and not token_file.delete(path)
    assert token_file.load(path, "127.0.0.1:1") is None


def test_the_token_file_path_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TIERWRITER_TOKEN_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert token_file.default_path() == tmp_path / "tierwriter" / "token.json"
    monkeypatch.setenv("TIERWRITER_TOKEN_FILE", str(tmp_path / "t.json"))
    assert token_file.default_path() == tmp_path / "t.json"


@pytest.mark.parametrize(
    ("settings", "variable", "value"),
    [
        (PersistenceSettings, "TIERWRITER_ADMIN_PASSWORD", "Xq7-pw"),  # too short
        (OrchestratorSettings, "TOKEN_SIGNING_SECRET", "Xq7-signing-secret"),  # too short
        (OrchestratorSettings, "TOKEN_TTL_SECONDS", "Xq7-not-a-number"),
    ],
)
def test_a_rejected_setting_is_named_but_its_value_never_repeated(
    settings, variable: str, value: str
) -> None:
    with pytest.raises(ValidationError) as error:
        settings(**{variable: value})
    assert variable in str(error.value) and value not in str(error.value)


def test_impossible_credentials_are_refused_without_a_lookup_or_a_throttle_entry() -> None:
    class NoPersistence:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"persistence was asked: {name}")

    throttle = LoginThrottle(clock=Clock())
    authenticator = Authenticator(NoPersistence(), SECRET, 600, throttle)  # type: ignore[arg-type]
    for username, password in [("x" * 100_000, "long-enough"), ("ann", "p" * 2000), ("", "pw")]:
        with pytest.raises(NotAuthenticatedError, match="invalid username or password"):
            authenticator.check_password(username, password)
    assert throttle.standing("ann") == (0, 0.0)
