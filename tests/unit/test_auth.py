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
    LoginBrake,
    NotAuthenticatedError,
    PasswordCredentials,
    Principal,
    ThrottledError,
    TokenClaims,
    TokenSigner,
    client_address,
    credentials_from_metadata,
)
from orchestrator_service.config import Settings as OrchestratorSettings
from orchestrator_service.credentials import basic_credentials, bearer_credentials
from persistence_service.config import Settings as PersistenceSettings
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb

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
    claims = TokenSigner(SECRET, 600).claims(token)
    assert claims == TokenClaims("ann", 4, claims.token_id, expires)
    assert expires == int(now + 600)
    another, _ = TokenSigner(SECRET, 600, clock=lambda: now).issue("ann", version=4)
    assert len(claims.token_id) >= 16 and TokenSigner(SECRET, 600).claims(another) != claims
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
        # Signed here but without an id (as tokens were before Logout): nothing to revoke.
        lambda: jwt.encode(
            {"sub": "admin", "ver": 1, "iss": "tierwriter", "iat": 1, "exp": 2**40},
            SECRET,
            algorithm="HS256",
        ),
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


def _wait_of(brake: LoginBrake, address: str, username: str) -> float:
    """0 when an attempt may go ahead now, else the seconds it is told to wait."""
    try:
        brake.check(address, username)
    except ThrottledError as e:
        return e.retry_after
    return 0.0


def test_failures_from_one_address_make_its_next_attempts_wait_ever_longer() -> None:
    clock = Clock()
    brake = LoginBrake(account_free=100, address_free=3, max_delay=8.0, clock=clock)
    for n in range(3):
        assert _wait_of(brake, "10.0.0.9", f"name-{n}") == 0
        brake.failed("10.0.0.9", f"name-{n}")  # a different account each time
    assert _wait_of(brake, "10.0.0.9", "ann") == 1.0
    assert _wait_of(brake, "10.0.0.7", "ann") == 0  # another address is not held back
    delays = []
    for _ in range(4):
        clock.now += _wait_of(brake, "10.0.0.9", "ann")
        assert _wait_of(brake, "10.0.0.9", "ann") == 0
        brake.failed("10.0.0.9", "ann")
        delays.append(_wait_of(brake, "10.0.0.9", "ann"))
    assert delays == [2.0, 4.0, 8.0, 8.0]  # doubling, capped
    brake.succeeded("ann")  # a success at an account does not clear the address
    assert _wait_of(brake, "10.0.0.9", "bob") == 8.0
    clock.now += 901  # 15 quiet minutes do
    assert brake.failures("10.0.0.9", "bob") == (0, 0)


def test_the_account_brake_lets_the_right_password_through_from_a_clean_address() -> None:
    clock = Clock()
    brake = LoginBrake(account_free=3, address_free=10, clock=clock)
    for _ in range(3):
        brake.failed("10.0.0.9", "admin")  # someone guesses at admin
    with pytest.raises(ThrottledError, match="too many failed logins for 'admin'"):
        brake.check("10.0.0.9", "admin")
    brake.check("10.0.0.9", "bob")  # the guesser's address may still try other accounts
    brake.check("192.168.1.5", "admin")  # the real admin's machine has no failures: let in
    brake.succeeded("admin")
    assert brake.failures("10.0.0.9", "admin") == (3, 0)
    brake.check("10.0.0.9", "admin")  # the account's count started over
    brake.failed("192.168.1.5", "admin")
    brake.failed("192.168.1.5", "admin")
    brake.failed("192.168.1.5", "admin")
    with pytest.raises(ThrottledError):  # once an address has failed too, it waits as well
        brake.check("192.168.1.5", "admin")


def test_attempts_in_flight_never_count_so_parallel_logins_go_through() -> None:
    brake = LoginBrake(account_free=3, address_free=3, clock=Clock())
    brake.failed("10.0.0.9", "admin")  # a typo each: below both brakes
    brake.failed("10.0.0.9", "admin")
    with ThreadPoolExecutor(16) as pool:
        waits = list(pool.map(lambda _: _wait_of(brake, "10.0.0.9", "admin"), range(24)))
    assert waits == [0.0] * 24
    assert brake.failures("10.0.0.9", "admin") == (2, 2)


def test_a_braked_address_gets_one_attempt_per_delay_however_many_it_sends() -> None:
    clock = Clock()
    brake = LoginBrake(account_free=100, address_free=3, clock=clock)
    for n in range(3):
        brake.failed("10.0.0.9", f"name-{n}")
    clock.now += 1.0  # the first delay has passed
    with ThreadPoolExecutor(16) as pool:
        waits = list(pool.map(lambda n: _wait_of(brake, "10.0.0.9", f"x{n}"), range(24)))
    assert waits.count(0.0) == 1 and all(w == 1.0 for w in waits if w)


def test_attempts_let_through_do_not_keep_the_failures_from_being_forgotten() -> None:
    clock = Clock()
    brake = LoginBrake(account_free=100, address_free=3, clock=clock)
    for n in range(3):
        brake.failed("10.0.0.9", f"name-{n}")
    for _ in range(4):  # correct logins keep coming, one per delay, and do not fail
        clock.now += 600
        assert _wait_of(brake, "10.0.0.9", "ann") == 0
    assert brake.failures("10.0.0.9", "ann") == (0, 0)  # 15 minutes after the last failure


def test_an_ipv6_client_counts_by_its_64_so_rotating_addresses_does_not_start_clean() -> None:
    brake = LoginBrake(account_free=100, address_free=3, clock=Clock())
    for n in range(3):
        brake.failed(f"2001:db8:0:1::{n + 1}", f"name-{n}")
    assert _wait_of(brake, "2001:db8:0:1:ffff::9", "ann") == 1.0
    assert _wait_of(brake, "2001:db8:0:2::1", "ann") == 0  # another /64


def test_the_brake_forgets_the_least_recent_keys_beyond_its_bound() -> None:
    brake = LoginBrake(clock=Clock(), max_tracked=3)
    for name in ("a", "b", "c", "d"):
        brake.failed(f"10.0.0.{name.encode()[0]}", name)
    assert brake.failures("10.0.0.97", "a") == (0, 0)
    assert brake.failures("10.0.0.100", "d") == (1, 1)


@pytest.mark.parametrize(
    ("peer", "metadata", "expected"),
    [
        ("ipv4:10.0.0.5:4711", (), "10.0.0.5"),
        ("ipv6:[::1]:4711", (), "::1"),
        ("unix:/run/tw.sock", (), "unix:/run/tw.sock"),
        # Only a trusted proxy's x-forwarded-for counts, and only its last (own) entry.
        ("ipv4:10.0.0.5:4711", (("x-forwarded-for", "6.6.6.6"),), "10.0.0.5"),
        ("ipv4:10.0.0.2:4711", (("x-forwarded-for", "6.6.6.6, 203.0.113.9"),), "203.0.113.9"),
        ("ipv4:10.0.0.2:4711", (), "10.0.0.2"),
        # Several proxies, each appending what it saw: read back past the trusted ones.
        (
            "ipv4:10.0.0.2:4711",
            (("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.3"),),
            "203.0.113.9",
        ),
        ("ipv4:10.0.0.2:4711", (("x-forwarded-for", "203.0.113.9, not-an-ip"),), "10.0.0.2"),
        ("ipv6:%5B::1%5D:4711", (), "::1"),  # gRPC percent-encodes the brackets
        ("ipv6:%5B::ffff:10.0.0.5%5D:4711", (), "10.0.0.5"),  # a dual-stack socket's IPv4
        ("ipv4:10.0.0.2:4711", (("x-forwarded-for", "::ffff:203.0.113.9"),), "203.0.113.9"),
    ],
)
def test_the_client_address_is_the_peer_or_what_a_trusted_proxy_says(
    peer: str, metadata: tuple[tuple[str, str], ...], expected: str
) -> None:
    assert client_address(peer, metadata, frozenset({"10.0.0.2", "10.0.0.3"})) == expected


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
        (OrchestratorSettings, "ORCHESTRATOR_TRUSTED_PROXIES", "10.0.0.2,Xq7-proxy"),
    ],
)
def test_a_rejected_setting_is_named_but_its_value_never_repeated(
    settings, variable: str, value: str
) -> None:
    with pytest.raises(ValidationError) as error:
        settings(**{variable: value})
    assert variable in str(error.value) and value not in str(error.value)


def test_impossible_credentials_are_refused_without_a_lookup_or_a_brake_entry() -> None:
    class NoPersistence:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"persistence was asked: {name}")

    brake = LoginBrake(clock=Clock())
    authenticator = Authenticator(NoPersistence(), SECRET, 600, brake)  # type: ignore[arg-type]
    for username, password in [("x" * 100_000, "long-enough"), ("ann", "p" * 2000), ("", "pw")]:
        with pytest.raises(NotAuthenticatedError, match="invalid username or password"):
            authenticator.check_password(username, password, "10.0.0.9")
    assert brake.failures("10.0.0.9", "ann") == (0, 0)


def test_a_long_stream_ends_when_its_account_changes_but_not_when_its_token_expires() -> None:
    class Accounts:
        def __init__(self) -> None:
            self.user = db_pb.User(username="ann", role="user", active=True, token_version=1)

        def get_user(self, username: str) -> db_pb.User:
            return self.user

        def token_holder(self, username: str, token_id: str) -> tuple[db_pb.User, bool]:
            return self.user, False

        def verify_credentials(self, username: str, password: str) -> db_pb.User:
            raise AssertionError("a recheck must not hash the password again")

    accounts = Accounts()
    authenticator = Authenticator(accounts, SECRET, 600)  # type: ignore[arg-type]
    opened = Principal("ann", "user", 1)
    expired, _ = TokenSigner(SECRET, 60, clock=lambda: time.time() - 3600).issue("ann", 1)
    for metadata in (basic_credentials("ann", "ann-password-1"), bearer_credentials(expired)):
        accounts.user = db_pb.User(username="ann", role="user", active=True, token_version=1)
        authenticator.recheck(metadata, "10.0.0.9", opened)  # still hold: the stream goes on
        for changed, reason in [
            (db_pb.User(username="ann", role="user", active=False, token_version=1), "disabled"),
            (db_pb.User(username="ann", role="user", active=True, token_version=2), "password"),
            (db_pb.User(username="ann", role="admin", active=True, token_version=1), "role"),
        ]:
            accounts.user = changed
            with pytest.raises(NotAuthenticatedError, match=reason):
                authenticator.recheck(metadata, "10.0.0.9", opened)
