"""Who is calling the orchestrator: credentials in call metadata (`authorization: Basic …` or
`Bearer <token>`), short-lived signed session tokens, and a per-user brake on failed logins.
No gRPC here: the servicer maps the errors below onto status codes."""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import jwt

from orchestrator_service.credentials import METADATA_KEY
from persistence_service.client import PersistenceClient
from tierwriter import accounts
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.runtime import ServiceCallError

log = logging.getLogger(__name__)

SIGNING_SECRET_NAME = "token-signing"  # under this name persistence keeps a generated secret
_ISSUER = "tierwriter"
_ALGORITHM = "HS256"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: admins act on everything, users on what they own."""

    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def owns(self, owner: str) -> bool:
        """Whether this caller may see and act on something `owner` owns."""
        return self.is_admin or owner == self.username

    @property
    def scope(self) -> str:
        """The owner filter for listings: empty (everyone's) for admins."""
        return "" if self.is_admin else self.username


@dataclass(frozen=True)
class PasswordCredentials:
    """A username and password from `Basic` metadata."""

    username: str
    password: str

    def __repr__(self) -> str:  # never the password, should one ever be logged
        return f"PasswordCredentials(username={self.username!r})"


class NotAuthenticatedError(Exception):
    """Missing, wrong, expired or forged credentials, or a disabled account; the message says
    which and what to do (and never whether some other account exists)."""


class ThrottledError(Exception):
    """Too many failed logins for this username in a row; try again in `retry_after` seconds."""

    def __init__(self, username: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"too many failed logins for {username!r}: try again in {retry_after:.0f} s"
        )


def credentials_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]],
) -> PasswordCredentials | str | None:
    """Password credentials, a bearer token (str), or None when absent or malformed."""
    for key, value in metadata:
        if key != METADATA_KEY or not isinstance(value, str):
            continue
        scheme, _, rest = value.partition(" ")
        if scheme == "Bearer" and rest:
            return rest
        if scheme != "Basic":
            return None
        try:
            decoded = base64.b64decode(rest, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        return PasswordCredentials(username, password) if sep and username else None
    return None


@dataclass(frozen=True)
class TokenClaims:
    """Whose token it is, and the account's token version when it was issued."""

    username: str
    version: int


class TokenSigner:
    """Issues and checks HMAC-SHA256 signed JWTs naming a user and their token version, valid
    for `ttl_seconds`."""

    def __init__(
        self, secret: str, ttl_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret
        self._ttl = ttl_seconds
        self._clock = clock

    def issue(self, username: str, version: int = 1) -> tuple[str, float]:
        """(token, expiry as seconds since the epoch)."""
        now = self._clock()
        expires = now + self._ttl
        claims = {
            "sub": username,
            "ver": version,
            "iss": _ISSUER,
            "iat": int(now),
            "exp": int(expires),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), float(int(expires))

    def claims(self, token: str) -> TokenClaims:
        """Whose token this is; NotAuthenticatedError when it expired or was not signed here
        (wrong key, altered claims, `alg: none`, garbage)."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=_ISSUER,
                options={"require": ["sub", "ver", "iss", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError as e:
            raise NotAuthenticatedError(
                "your session token has expired: run `tierwriter login` again"
            ) from e
        except jwt.InvalidTokenError as e:
            raise NotAuthenticatedError(
                "invalid session token (not issued by this tierwriter): run `tierwriter login`"
            ) from e
        return TokenClaims(str(claims["sub"]), int(claims["ver"]))


class LoginThrottle:
    """Slows down password guessing per username: after `free_attempts` attempts in a row that
    did not succeed, each further attempt must wait a delay that doubles from `base_delay` up to
    `max_delay`. An attempt counts as failed from the moment it starts, so guesses sent in
    parallel are held back like guesses sent one by one; a success clears the count. Usernames
    that do not exist are counted too (so the answer does not tell them apart); the oldest
    entries are dropped beyond `max_tracked`."""

    def __init__(
        self,
        free_attempts: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 10_000,
    ) -> None:
        self._free = free_attempts
        self._base = base_delay
        self._max = max_delay
        self._clock = clock
        self._max_tracked = max_tracked
        self._lock = threading.Lock()
        # username → (attempts in a row without success, earliest time of the next attempt)
        self._attempts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def attempt(self, username: str) -> float:
        """Start an attempt: 0 when it may go ahead (and is counted), else the seconds to wait
        (and it is not counted)."""
        with self._lock:
            count, not_before = self._attempts.pop(username, (0, 0.0))
            now = self._clock()
            if now < not_before:
                self._attempts[username] = (count, not_before)
                return not_before - now
            count += 1
            delay = 0.0
            if count >= self._free:
                delay = min(self._max, self._base * 2 ** (count - self._free))
            self._attempts[username] = (count, now + delay)
            while len(self._attempts) > self._max_tracked:
                self._attempts.popitem(last=False)
            return 0.0

    def standing(self, username: str) -> tuple[int, float]:
        """(attempts in a row without success, seconds before the next may start)."""
        with self._lock:
            count, not_before = self._attempts.get(username, (0, 0.0))
        return count, max(0.0, not_before - self._clock())

    def succeeded(self, username: str) -> None:
        """Forget the user's attempts."""
        with self._lock:
            self._attempts.pop(username, None)


class Authenticator:
    """Turns call metadata into a Principal and passwords into session tokens. The signing
    secret is TOKEN_SIGNING_SECRET, or one persistence generated and stores (fetched once)."""

    def __init__(
        self,
        persistence: PersistenceClient,
        signing_secret: str | None,
        token_ttl_seconds: float,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self._persistence = persistence
        self._secret = signing_secret
        self._ttl = token_ttl_seconds
        self._throttle = throttle or LoginThrottle()
        self._signer: TokenSigner | None = None
        self._signer_lock = threading.Lock()

    def signer(self) -> TokenSigner:
        """The token signer, built on first use (persistence may start after us)."""
        with self._signer_lock:
            if self._signer is None:
                secret = self._secret or self._persistence.stored_secret(SIGNING_SECRET_NAME)
                self._signer = TokenSigner(secret, self._ttl)
            return self._signer

    def check_password(self, username: str, password: str) -> db_pb.User:
        """The active user with these credentials. ThrottledError while the user must wait;
        NotAuthenticatedError otherwise (a failure is logged without the password)."""
        if not accounts.could_be_credentials(username, password):
            # No account can match: refused without a lookup, a hash, or a throttle entry (a
            # megabyte "username" must not become a key that stays in memory).
            raise NotAuthenticatedError("invalid username or password")
        wait = self._throttle.attempt(username)
        if wait > 0:
            raise ThrottledError(username, wait)
        try:
            user = self._persistence.verify_credentials(username, password)
        except ServiceCallError as e:
            if e.code != grpc.StatusCode.UNAUTHENTICATED:
                raise
            failures, delay = self._throttle.standing(username)
            log.warning(
                "failed login for %r (%d in a row); next attempt allowed in %.0f s",
                username,
                failures,
                delay,
            )
            raise NotAuthenticatedError("invalid username or password") from e
        self._throttle.succeeded(username)
        return user

    def login(self, username: str, password: str) -> tuple[str, float, db_pb.User]:
        """(token, expiry, user) for valid credentials."""
        user = self.check_password(username, password)
        token, expires = self.signer().issue(user.username, user.token_version)
        log.info("%r logged in", user.username)
        return token, expires, user

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The caller named by the call's credentials. A token's account is looked up on every
        call, so disabling a user takes effect at once."""
        credentials = credentials_from_metadata(metadata)
        if credentials is None:
            raise NotAuthenticatedError(
                "credentials required: run `tierwriter login`, or pass -u/-p "
                "(or set TIERWRITER_USER and TIERWRITER_PASSWORD)"
            )
        if isinstance(credentials, PasswordCredentials):
            user = self.check_password(credentials.username, credentials.password)
        else:
            claims = self.signer().claims(credentials)
            try:
                user = self._persistence.get_user(claims.username)
            except ServiceCallError as e:
                if e.code != grpc.StatusCode.NOT_FOUND:
                    raise
                user = db_pb.User(active=False)
            if not user.active:
                raise NotAuthenticatedError(
                    "the account of this session token is disabled: ask an admin"
                )
            if user.token_version != claims.version:
                raise NotAuthenticatedError(
                    "the password changed after this session token was issued: run "
                    "`tierwriter login` again"
                )
        return Principal(user.username, user.role)
