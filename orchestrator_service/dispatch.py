"""A job's articles spread over every generator replica that answers.

GENERATOR_ADDRESS names the generators as gRPC does (a DNS name such as `dns:///generator:50052`
or `generator:50052`, whose every address is a replica, or `ipv4:10.0.0.1:50052,10.0.0.2:50052`).
GeneratorPool resolves it itself, again every few seconds (a new replica joins running jobs),
and keeps a channel per replica. ArticleDispatch gives a job's tiers one article stream on each
replica it uses and feeds them: an article goes out when fewer than the job's `max_workers` are
in flight over all of them, to the stream with the fewest. A replica that dies loses only the
articles in flight on it: they come back to the job's thread, which sends those without a
record again (each paid at most once more) while the other replicas go on.

Threads: the dispatcher (one per group of tiers) pulls articles from the feed and sends them;
a reader per stream turns its events into items on one queue; the job's thread reads them
(ArticleDispatch.items), so every decision about records and reports stays on that thread."""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from generator_service.client import ArticleStream, GeneratorClient
from tierwriter import healthcheck
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.runtime import CallFailure, ServiceCallError
from tierwriter.statuses import TERMINAL_ARTICLE_EVENTS

log = logging.getLogger(__name__)

# A lost generator shows as one of these on its stream; anything else is not retried.
GENERATOR_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
# How often the generators' name is resolved again, so that a new replica joins.
RESOLVE_SECONDS = 5.0
# A replica whose stream broke is left out this long (doubling while it keeps failing), then
# asked for its health before it gets a stream again.
DOWN_SECONDS = 1.0
DOWN_MAX_SECONDS = 30.0
RECONNECT_MAX_DELAY = 30.0
POLL_SECONDS = 0.2  # how often a wait looks at the stop and fence flags

Key = tuple[str, int]  # (tier, article index)


def resolve(target: str) -> list[str]:
    """The replicas' addresses behind a gRPC target, each dialable on its own: `ipv4:`/`ipv6:`
    lists are split, a DNS name (with or without `dns:///`) is looked up, an IP address stays
    as it is. [] when the name does not resolve (no replica answers yet)."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return [a.strip() for a in target.removeprefix(scheme).split(",") if a.strip()]
    if target.startswith("dns:"):
        target = target.removeprefix("dns:").lstrip("/")
        if "/" in target:  # dns://authority/host:port: the authority is the DNS server's
            target = target.split("/", 1)[1]
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return [target]  # unix:, or something gRPC understands and we do not: use it whole
    try:
        ipaddress.ip_address(host)
        return [_address(host, port)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({_address(str(info[4][0]), port) for info in infos})


def _address(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class GeneratorPool:
    """The generator replicas behind GENERATOR_ADDRESS, a client (channel) for each; shared by
    every job of this orchestrator. Thread-safe. Title calls go over one round-robin channel on
    the whole name (`titles`), article streams to one replica each."""

    def __init__(
        self,
        target: str,
        service_token: str | None = None,
        resolver: Callable[[str], list[str]] = resolve,
        probe: Callable[[str], bool] = lambda address: healthcheck.check(address, timeout=1.0),
    ) -> None:
        self.target = target
        self._token = service_token
        self._resolver = resolver
        self._probe = probe
        self.titles = GeneratorClient(target, service_token)
        self._lock = threading.Lock()
        self._clients: dict[str, GeneratorClient] = {}
        self._resolved: list[str] = []
        self._resolved_at = float("-inf")
        self._down: dict[str, tuple[float, float]] = {}  # address: (until, how long it was)

    def replicas(self) -> list[str]:
        """The replicas that may take a stream now: the name's addresses (resolved again every
        RESOLVE_SECONDS), less those that failed lately and do not say SERVING yet."""
        now = time.monotonic()
        with self._lock:
            if now - self._resolved_at >= RESOLVE_SECONDS or not self._resolved:
                self._resolved, self._resolved_at = self._resolver(self.target), now
            resolved = list(self._resolved)
            down = dict(self._down)
        ready = []
        for address in resolved:
            until, _length = down.get(address, (0.0, 0.0))
            if until > now:
                continue
            if address in down and not self._probe(address):
                self.mark_down(address)
                continue
            with self._lock:
                self._down.pop(address, None)
            ready.append(address)
        return ready

    def mark_down(self, address: str) -> None:
        """A stream to `address` broke: leave it out for a while, longer each time in a row."""
        with self._lock:
            _until, length = self._down.get(address, (0.0, 0.0))
            length = min(DOWN_MAX_SECONDS, length * 2 if length else DOWN_SECONDS)
            self._down[address] = (time.monotonic() + length, length)
            self._resolved_at = float("-inf")  # it may be gone for good: ask the name again

    def client(self, address: str) -> GeneratorClient:
        with self._lock:
            found = self._clients.get(address)
            if found is None:
                found = self._clients[address] = GeneratorClient(address, self._token)
            return found

    def close(self) -> None:
        """Close every channel."""
        self.titles.close()
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


# What ArticleDispatch.items() yields to the job's thread, besides the generators' events.


@dataclass(frozen=True)
class StreamLost:
    """A replica's stream broke. `returned` are the articles that were in flight on it: the job's
    thread sends again (ArticleDispatch.resend) those that have no record, and settles the rest
    (ArticleDispatch.settle)."""

    address: str
    error: ServiceCallError
    returned: list[gen_pb.ArticleRequest]
    others: int  # streams still open on other replicas


@dataclass(frozen=True)
class Reconnecting:
    """No replica answers while articles wait: the next try is in `delay` seconds."""

    error: str
    delay: float
    attempt: int
    attempts: int


@dataclass(eq=False)
class _Stream:
    """One replica's stream and the articles in flight on it (under ArticleDispatch's lock)."""

    stream: ArticleStream
    in_flight: dict[Key, gen_pb.ArticleRequest] = field(default_factory=dict)
    sent: int = 0


_END = object()


class ArticleDispatch:
    """The article streams of one group of tiers (see the module's docstring). Use as a context
    manager: leaving it ends the dispatcher and cancels any stream still open."""

    def __init__(
        self,
        pool: GeneratorPool,
        settings: Callable[[], gen_pb.BatchSettings],
        feed: Iterator[gen_pb.ArticleRequest],
        *,
        max_workers: int,
        max_replicas: int | None,
        stopped: Callable[[], bool],
        stop_reason: Callable[[], str],
        grace_seconds: Callable[[], float],
        fenced: Callable[[], bool],
        reconnect_attempts: int,
    ) -> None:
        """`settings()` is read for each stream opened (a budget is read again after a loss);
        `feed` blocks while titles come and ends once every article is out. `max_replicas`:
        1 keeps the group on one generator at a time (jobs that stop at their first failure or
        keep a budget, whose bookkeeping is the generator's); None uses every replica."""
        self._pool = pool
        self._settings = settings
        self._feed = feed
        self._cap = max(1, max_workers)
        self._max_replicas = max_replicas
        self._stopped = stopped
        self._stop_reason = stop_reason
        self._grace_seconds = grace_seconds
        self._fenced = fenced
        self._attempts = reconnect_attempts
        self._items: queue.Queue[object] = queue.Queue()
        self._cond = threading.Condition()  # guards everything below
        self._streams: dict[str, _Stream] = {}
        self._owner: dict[Key, _Stream] = {}  # in flight: on which stream
        self._returned: set[Key] = set()  # back from a lost stream, for the job's thread
        self._resend: deque[gen_pb.ArticleRequest] = deque()
        self._fed = False  # the feed ended
        self._stop_sent = False
        self._done = False  # the dispatcher is finished with sending
        self._exited = False  # the job's thread left: nobody reads the items any more
        self._dispatcher = threading.Thread(target=self._dispatch, name="dispatch", daemon=True)

    def __enter__(self) -> ArticleDispatch:
        self._dispatcher.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._cond:
            self._done = self._exited = True
            streams = list(self._streams.values())
            self._cond.notify_all()
        for s in streams:
            s.stream.cancel()
        self._dispatcher.join()  # the feed must have been stopped: it may be waiting for titles

    # The job's thread -----------------------------------------------------------------------

    def in_flight(self, tier: str) -> int:
        """Articles of `tier` sent and not terminal, or back from a lost stream and not yet
        settled or sent again."""
        with self._cond:
            waiting = sum(1 for tier_name, _ in self._owner if tier_name == tier)
            waiting += sum(1 for tier_name, _ in self._returned if tier_name == tier)
            return waiting + sum(1 for r in self._resend if r.tier == tier)

    def replicas_used(self) -> list[str]:
        with self._cond:
            return list(self._streams)

    def resend(self, articles: list[gen_pb.ArticleRequest]) -> None:
        """Send these articles (back from a lost stream, without a record) again, first."""
        with self._cond:
            for article in articles:
                self._returned.discard((article.tier, article.article_index))
                self._resend.append(article)
            self._cond.notify_all()

    def settle(self, keys: list[Key]) -> None:
        """These articles back from a lost stream have their record: nothing more to send."""
        with self._cond:
            self._returned.difference_update(keys)
            self._cond.notify_all()

    def items(self) -> Iterator[article_pb.ArticleEvent | StreamLost | Reconnecting]:
        """The streams' events as they come, a StreamLost for each stream that broke with
        articles in flight, and a Reconnecting while no replica answers; ends once every article
        sent is terminal and the feed is done (or after a stop, once those in flight ended; or
        at once when the run is fenced). ServiceCallError when no replica answered in all the
        reconnect attempts, or a stream failed in a way another replica cannot fix."""
        while not self._fenced():
            try:
                item = self._items.get(timeout=POLL_SECONDS)
            except queue.Empty:
                with self._cond:
                    self._cond.notify_all()  # a stop or fence the dispatcher should see
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Reconnecting):
                yield item
                continue
            assert isinstance(item, tuple)
            stream, what = item
            if isinstance(what, article_pb.ArticleEvent):
                if what.kind in TERMINAL_ARTICLE_EVENTS:
                    self._terminal(stream, (what.tier, what.article_index))
                yield what
            elif (lost := self._stream_ended(stream, what)) is not None:
                yield lost

    def _terminal(self, stream: _Stream, key: Key) -> None:
        with self._cond:
            stream.in_flight.pop(key, None)
            if self._owner.get(key) is stream:
                del self._owner[key]
            self._cond.notify_all()

    def _stream_ended(self, stream: _Stream, error: ServiceCallError | None) -> StreamLost | None:
        """A stream's events ended, normally or broken: what was in flight on it comes back
        (StreamLost) for the job's thread to send again; an error another replica cannot fix
        ends the group."""
        address = stream.stream.address
        with self._cond:
            if self._streams.get(address) is stream:
                del self._streams[address]
            returned = list(stream.in_flight.values())
            stream.in_flight.clear()
            for article in returned:
                key = (article.tier, article.article_index)
                self._owner.pop(key, None)
                self._returned.add(key)
            others = len(self._streams)
            self._cond.notify_all()
        if error is None and not returned:
            return None  # the generator ended it: every article had its terminal event
        if error is None:  # it stopped (SIGTERM) with articles still in flight
            error = ServiceCallError(
                "generator_service",
                address,
                CallFailure(grpc.StatusCode.UNAVAILABLE, "the stream ended before its articles"),
            )
        if error.code not in GENERATOR_LOST:
            raise error
        self._pool.mark_down(address)
        if not returned:
            log.warning("generator %s lost (%s) with no article in flight", address, error)
            return None
        log.warning("generator %s lost (%s): %d articles in flight", address, error, len(returned))
        return StreamLost(address, error, returned, others)

    # The dispatcher -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        try:
            self._send_all()
        except ServiceCallError as e:  # no replica answers, or persistence (a stream's budget)
            self._items.put(e)
        except Exception as e:  # a bug must still end the group, not hang it
            log.exception("dispatch: unexpected error")
            self._items.put(e)
        finally:
            self._finish()

    def _next_to_send(
        self, pending: gen_pb.ArticleRequest | None
    ) -> tuple[bool, gen_pb.ArticleRequest | None]:
        """Wait until there is something to do: (go on, the article to send, or None to pull
        the next from the feed); (False, _) when sending is over (done, stopped, or every
        article out and terminal)."""
        with self._cond:
            while True:
                if self._done or self._fenced():
                    return False, None
                if self._stopped():
                    self._send_stop_locked()
                    return False, None
                if self._room():
                    if pending is not None:
                        return True, pending
                    if self._resend:
                        return True, self._resend.popleft()
                    if not self._fed:
                        return True, None
                if self._fed and not (self._owner or self._returned or self._resend):
                    return False, None
                self._cond.wait(POLL_SECONDS)

    def _send_all(self) -> None:
        pending: gen_pb.ArticleRequest | None = None
        attempt = 0
        while True:
            go_on, pending = self._next_to_send(pending)
            if not go_on:
                return
            if pending is None:
                pending = next(self._feed, None)  # blocks while titles come
                if pending is None:
                    with self._cond:
                        self._fed = True
                        self._cond.notify_all()
                    continue
            stream = self._stream_for_next()
            if stream is None:
                attempt += 1
                if attempt > self._attempts:
                    raise ServiceCallError(
                        "generator_service",
                        self._pool.target,
                        CallFailure(grpc.StatusCode.UNAVAILABLE, "no generator answers"),
                    )
                delay = min(RECONNECT_MAX_DELAY, 2.0 ** (attempt - 1))
                self._items.put(
                    Reconnecting("no generator answers", delay, attempt, self._attempts)
                )
                self._sleep(delay)
                continue  # `pending` goes out once one answers
            attempt = 0
            key = (pending.tier, pending.article_index)
            with self._cond:
                if self._stopped() or self._done:
                    return  # not sent: no record, a resume writes it
                if self._streams.get(stream.stream.address) is not stream:
                    continue  # it ended since it was chosen: choose again (`pending` is kept)
                stream.in_flight[key] = pending
                stream.sent += 1
                self._owner[key] = stream
            if stream.stream.send(pending):
                pending = None
                continue
            with self._cond:  # its side closed meanwhile (it broke)
                if stream.in_flight.pop(key, None) is not None:
                    self._owner.pop(key, None)  # another stream takes it
                else:
                    pending = None  # its end returned it already: the job's thread resends it

    def _room(self) -> bool:
        return len(self._owner) + len(self._returned) < self._cap

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            while not (self._done or self._stopped() or self._fenced()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, POLL_SECONDS))

    def _stream_for_next(self) -> _Stream | None:
        """The stream with the fewest articles in flight, after opening one on each replica
        that has none (up to max_replicas); None when no replica answers."""
        replicas = self._pool.replicas()
        with self._cond:
            open_ = dict(self._streams)
        wanted = [a for a in replicas if a not in open_]
        if self._max_replicas is not None:
            wanted = wanted[: max(0, self._max_replicas - len(open_))]
        for address in wanted:
            if (opened := self._open(address)) is not None:
                open_[address] = opened
        if not open_:
            return None
        return min(open_.values(), key=lambda s: (len(s.in_flight), s.sent))

    def _open(self, address: str) -> _Stream | None:
        stream = _Stream(self._pool.client(address).open_articles(self._settings()))
        with self._cond:
            if self._done:
                stream.stream.cancel()
                return None
            self._streams[address] = stream
        threading.Thread(
            target=self._read, args=(stream,), name=f"read-{address}", daemon=True
        ).start()
        log.info("article stream opened on generator %s", address)
        return stream

    def _read(self, stream: _Stream) -> None:
        try:
            for event in stream.stream.events():
                self._items.put((stream, event))
        except ServiceCallError as e:
            self._items.put((stream, e))
        else:
            self._items.put((stream, None))

    def _send_stop_locked(self) -> None:
        if self._stop_sent:
            return
        self._stop_sent = True
        reason, grace = self._stop_reason(), self._grace_seconds()
        self._resend.clear()  # not sent again: no record, a resume writes them
        self._returned.clear()
        for s in self._streams.values():
            s.stream.stop(reason, grace)

    def _finish(self) -> None:
        """No more sending: close our side of every stream (each ends once its articles are
        terminal), then tell the job's thread once every stream has ended."""
        with self._cond:
            self._done = True
            for s in self._streams.values():
                s.stream.close()
        threading.Thread(target=self._end_when_drained, name="dispatch-end", daemon=True).start()

    def _end_when_drained(self) -> None:
        with self._cond:
            while self._streams and not self._fenced() and not self._exited:
                self._cond.wait(POLL_SECONDS)
        self._items.put(_END)
