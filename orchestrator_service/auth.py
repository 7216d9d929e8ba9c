"""Who is calling the orchestrator: credentials in call metadata (`authorization: Basic …` or
`Bearer <token>`), short-lived signed session tokens, and a brake on failed logins per client
address and per account. No gRPC here: the servicer maps the errors below onto status codes."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import secrets
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
from tierwriter.refused_calls import REFUSED, RefusedCalls, canonical_ip, peer_address
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
    # The account's token version when the caller was authenticated (a new password raises it).
    version: int = 0

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
    """Too many failed logins in a row from this address or at this account; try again in
    `retry_after` seconds."""

    def __init__(self, where: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"too many failed logins {where}: try again in {max(1, math.ceil(retry_after))} s"
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
    """Whose token it is, the account's token version when it was issued, the token's own id
    (what Logout revokes) and its expiry."""

    username: str
    version: int
    token_id: str = ""
    expires: float = 0.0


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
            "jti": secrets.token_urlsafe(16),  # the id Logout revokes it by
            "iss": _ISSUER,
            "iat": int(now),
            "exp": int(expires),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), float(int(expires))

    def claims(self, token: str, *, check_expiry: bool = True) -> TokenClaims:
        """Whose token this is; NotAuthenticatedError when it expired (unless `check_expiry` is
        false) or was not signed here (wrong key, altered claims, `alg: none`, garbage)."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=_ISSUER,
                options={
                    "require": ["sub", "ver", "jti", "iss", "iat", "exp"],
                    "verify_exp": check_expiry,
                },
            )
        except jwt.ExpiredSignatureError as e:
            raise NotAuthenticatedError(
                "your session token has expired: run `tierwriter login` again"
            ) from e
        except jwt.InvalidTokenError as e:
            raise NotAuthenticatedError(
                "invalid session token (not issued by this tierwriter): run `tierwriter login`"
            ) from e
        return TokenClaims(
            str(claims["sub"]), int(claims["ver"]), str(claims["jti"]), float(claims["exp"])
        )


FORWARDED_FOR_KEY = "x-forwarded-for"


def client_address(
    peer: str,
    metadata: Iterable[tuple[str, str | bytes]] = (),
    trusted_proxies: frozenset[str] = frozenset(),
) -> str:
    """The address a call comes from, without its port (see peer_address). Behind proxies named
    in `trusted_proxies`, `x-forwarded-for` is read from its end — where each proxy appends the
    address it saw — past every trusted proxy, to the first address one of them vouches for.
    Anyone else's `x-forwarded-for` is ignored, or a client could name any address it likes;
    so is an entry that is not an IP address."""
    address = peer_address(peer)
    forwarded = [
        part.strip()
        for key, value in metadata
        if key == FORWARDED_FOR_KEY and isinstance(value, str)
        for part in value.split(",")
    ]
    while address in trusted_proxies and forwarded:
        named = canonical_ip(forwarded.pop())
        if named is None:
            break  # not a bare IP (garbage, or with a port): the last proxy is as far as we trust
        address = named
    return address


def brake_key(address: str) -> str:
    """What the login brake counts an address under: an IPv6 address by its /64, which one
    host or customer usually holds whole (else each of its 2^64 addresses would start clean)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


@dataclass
class _Failures:
    count: int  # failed logins in a row
    last: float  # when the last one happened: the delay counts from it, and forgetting too
    admitted: float = 0.0  # when the brake last let an attempt through: the delay counts anew


class _FailureCounts:
    """Failed logins in a row per key (an address or a username); forgotten after
    `forget_after` seconds without a failure, and the least recently failed keys dropped beyond
    `max_tracked` so guesses at random names cannot grow it."""

    def __init__(self, forget_after: float, max_tracked: int) -> None:
        self._forget_after = forget_after
        self._max_tracked = max_tracked
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def get(self, key: str, now: float) -> _Failures | None:
        """The key's failures; None when it has none (or they were forgotten)."""
        failures = self._failures.get(key)
        if failures is not None and now - failures.last > self._forget_after:
            del self._failures[key]
            return None
        return failures

    def count(self, key: str, now: float) -> int:
        failures = self.get(key, now)
        return failures.count if failures else 0

    def add(self, key: str, now: float) -> int:
        """One more failure; how many in a row."""
        failures = self.get(key, now) or _Failures(0, now)
        failures.count, failures.last = failures.count + 1, now
        self._failures[key] = failures
        self._failures.move_to_end(key)
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
        return failures.count

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)


class LoginBrake:
    """Slows password guessing down without locking the real user out. Only failures count
    (a wrong password, or a username that does not exist): attempts in flight and successes
    never do, so correct logins sent in parallel are never refused.

    - Per address: after `address_free` failures in a row from one client address, each
      further attempt from it (at any account) waits a delay that doubles from `base_delay` up
      to `max_delay` after its last failure. A success does not clear it (an attacker with an
      account of their own could otherwise reset it between guesses); `forget_after` seconds
      without a failure do.
    - Per account: after `account_free` failures in a row at one username, from wherever,
      attempts at it wait the same way, except from an address with no failures on record:
      the real user, at their own machine, still gets in while others guess. A success clears
      the account's count.

    Once a brake's delay has passed, one attempt goes through and the delay starts again, so a
    braked address or account gets one guess per delay even when it sends many at once. An
    IPv6 address counts by its /64 (brake_key)."""

    def __init__(
        self,
        account_free: int = 3,
        address_free: int = 10,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        forget_after: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 10_000,
    ) -> None:
        self._account_free = account_free
        self._address_free = address_free
        self._base = base_delay
        self._max = max_delay
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses = _FailureCounts(forget_after, max_tracked)
        self._accounts = _FailureCounts(forget_after, max_tracked)

    def _wait(self, failures: _Failures, free: int, now: float) -> float:
        """Seconds a key braked with these failures must still wait. The delay runs from its
        last failure, or from the last attempt the brake let through."""
        delay = min(self._max, self._base * 2 ** (failures.count - free))
        return max(0.0, max(failures.last, failures.admitted) + delay - now)

    def check(self, address: str, username: str) -> None:
        """ThrottledError when an attempt at `username` from `address` must wait. Once a
        brake's delay has passed, the attempt goes through and the delay starts again: a braked
        address or account gets one attempt per delay, not a burst of them at once."""
        key = brake_key(address)
        with self._lock:
            now = self._clock()
            if self._addresses.count(key, now) == 0:
                return  # no failures from here: neither brake is for this caller
            braked: list[_Failures] = []
            for counts, name, free, where in (
                (self._addresses, key, self._address_free, "from your address"),
                (self._accounts, username, self._account_free, f"for {username!r}"),
            ):
                failures = counts.get(name, now)
                if failures is None or failures.count < free:
                    continue
                wait = self._wait(failures, free, now)
                if wait > 0:
                    raise ThrottledError(where, wait)
                braked.append(failures)
            for failures in braked:  # both let it through: their delays start again
                failures.admitted = now

    def failed(self, address: str, username: str) -> tuple[int, int]:
        """Record a failure: (failures in a row from the address, at the account)."""
        with self._lock:
            now = self._clock()
            return (
                self._addresses.add(brake_key(address), now),
                self._accounts.add(username, now),
            )

    def succeeded(self, username: str) -> None:
        """The account's count starts over; the address's stays (see the class)."""
        with self._lock:
            self._accounts.clear(username)

    def failures(self, address: str, username: str) -> tuple[int, int]:
        """(failures in a row from the address, at the account), for tests and logs."""
        with self._lock:
            now = self._clock()
            return (
                self._addresses.count(brake_key(address), now),
                self._accounts.count(username, now),
            )


class Authenticator:
    """Turns call metadata into a Principal and passwords into session tokens. The signing
    secret is TOKEN_SIGNING_SECRET, or one persistence generated and stores (fetched once)."""

    def __init__(
        self,
        persistence: PersistenceClient,
        signing_secret: str | None,
        token_ttl_seconds: float,
        brake: LoginBrake | None = None,
        trusted_proxies: frozenset[str] = frozenset(),
        refused: RefusedCalls = REFUSED,
    ) -> None:
        self._persistence = persistence
        self._secret = signing_secret
        self._ttl = token_ttl_seconds
        self._brake = brake or LoginBrake()
        self._trusted_proxies = trusted_proxies
        self._refused = refused
        self._signer: TokenSigner | None = None
        self._signer_lock = threading.Lock()

    def _refuse(self, address: str, kind: str, detail: str = "") -> None:
        """Log a refusal, once a minute per client (an IPv6 one by its /64, as the brake
        counts it) and kind."""
        self._refused.note(brake_key(address), kind, detail)

    def address(self, peer: str, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """Where a call comes from (see client_address), for the login brake and the log."""
        return client_address(peer, metadata, self._trusted_proxies)

    def signer(self) -> TokenSigner:
        """The token signer, built on first use (persistence may start after us)."""
        with self._signer_lock:
            if self._signer is None:
                secret = self._secret or self._persistence.stored_secret(SIGNING_SECRET_NAME)
                self._signer = TokenSigner(secret, self._ttl)
            return self._signer

    def check_password(self, username: str, password: str, address: str) -> db_pb.User:
        """The active user with these credentials, tried from `address`. ThrottledError while
        the address or the account must wait; NotAuthenticatedError otherwise. Failures are
        logged once per address, kind and minute, never with the password."""
        if not accounts.could_be_credentials(username, password):
            # No account can match: refused without a lookup, a hash, or a brake entry (a
            # megabyte "username" must not become a key that stays in memory).
            self._refuse(address, "impossible credentials (too long, or empty)")
            raise NotAuthenticatedError("invalid username or password")
        try:
            self._brake.check(address, username)
        except ThrottledError as e:
            self._refuse(address, "login held back by the brake", str(e))
            raise
        try:
            user = self._persistence.verify_credentials(username, password)
        except ServiceCallError as e:
            if e.code != grpc.StatusCode.UNAUTHENTICATED:
                raise  # busy or down: not a failed guess
            from_address, at_account = self._brake.failed(address, username)
            self._refuse(  # per address, not per name: rotating names floods nothing
                address,
                "failed login",
                f"{username!r}, {at_account} in a row at the account, {from_address} from the "
                "address",
            )
            raise NotAuthenticatedError("invalid username or password") from e
        self._brake.succeeded(username)
        return user

    def login(self, username: str, password: str, address: str) -> tuple[str, float, db_pb.User]:
        """(token, expiry, user) for valid credentials."""
        user = self.check_password(username, password, address)
        token, expires = self.signer().issue(user.username, user.token_version)
        log.info("%r logged in from %s", user.username, address)
        return token, expires, user

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]], address: str) -> Principal:
        """The caller named by the call's credentials, calling from `address`. A token's
        account is looked up on every call, so disabling a user takes effect at once."""
        credentials = credentials_from_metadata(metadata)
        if credentials is None:
            self._refuse(address, "no credentials")
            raise NotAuthenticatedError(
                "credentials required: run `tierwriter login`, or pass -u/-p "
                "(or set TIERWRITER_USER and TIERWRITER_PASSWORD)"
            )
        if isinstance(credentials, PasswordCredentials):
            user = self.check_password(credentials.username, credentials.password, address)
            return Principal(user.username, user.role, user.token_version)
        try:
            return self._token_holder(self.signer().claims(credentials))
        except NotAuthenticatedError as e:
            self._refuse(address, "session token refused", str(e))
            raise

    def recheck(
        self, metadata: Iterable[tuple[str, str | bytes]], address: str, opened: Principal
    ) -> None:
        """For a stream that runs long: NotAuthenticatedError once the credentials it was
        `opened` with no longer hold — its token logged out, its account disabled, given a new
        password or another role. A token that merely expires does not end a stream it opened
        (a watch of a long job outlives TOKEN_TTL_SECONDS), and a password is not hashed again
        (the costly part, and it was right when the stream opened): the account is read."""
        credentials = credentials_from_metadata(metadata)
        try:
            if isinstance(credentials, str):
                now = self._token_holder(self.signer().claims(credentials, check_expiry=False))
            else:  # a password (the stream opened, so there were credentials)
                now = self._account_of(opened.username)
            if now.role != opened.role or now.version != opened.version:
                raise NotAuthenticatedError(
                    "the account's password or role changed while this stream was open: log "
                    "in again"
                )
        except NotAuthenticatedError as e:
            self._refuse(address, "stream's credentials lapsed", str(e))
            raise

    def _account_of(self, username: str) -> Principal:
        """The active account of that name, as a Principal; NotAuthenticatedError otherwise."""
        try:
            user = self._persistence.get_user(username)
        except ServiceCallError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            user = db_pb.User(active=False)
        if not user.active:
            raise NotAuthenticatedError("the account is disabled: ask an admin")
        return Principal(user.username, user.role, user.token_version)

    def _token_holder(self, claims: TokenClaims) -> Principal:
        """The caller a signed session token names, if it was not logged out and its account
        is active with the same password."""
        try:
            user, revoked = self._persistence.token_holder(claims.username, claims.token_id)
        except ServiceCallError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            user, revoked = db_pb.User(active=False), False
        if revoked:
            raise NotAuthenticatedError(
                "this session token was logged out: run `tierwriter login` again"
            )
        if not user.active:
            raise NotAuthenticatedError(
                "the account of this session token is disabled: ask an admin"
            )
        if user.token_version != claims.version:
            raise NotAuthenticatedError(
                "the password changed after this session token was issued: run "
                "`tierwriter login` again"
            )
        return Principal(user.username, user.role, user.token_version)

    def logout(self, metadata: Iterable[tuple[str, str | bytes]], address: str) -> str:
        """Revoke the session token the call carries, on every orchestrator on the database;
        whose it was. Only its signature and expiry are checked — a token whose account is
        disabled or whose password changed can be logged out too, so it stays dead if that is
        undone. NotAuthenticatedError without a valid token; ValueError for a password."""
        credentials = credentials_from_metadata(metadata)
        if isinstance(credentials, PasswordCredentials):
            raise ValueError(
                "this call carries a password, not a session token: there is no session to log "
                "out (change the password to stop it working)"
            )
        if credentials is None:
            self._refuse(address, "no credentials")
            raise NotAuthenticatedError("no session token: there is nothing to log out")
        try:
            claims = self.signer().claims(credentials)
        except NotAuthenticatedError as e:
            self._refuse(address, "session token refused", str(e))
            raise
        self._persistence.revoke_token(claims.token_id, claims.username, claims.expires)
        log.info("%r logged out from %s", claims.username, address)
        return claims.username
