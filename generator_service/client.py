"""GeneratorClient: how the orchestrator calls the generator; every call has a deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Iterator

import grpc

from tierwriter import runtime
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as pb_grpc
from tierwriter.service_auth import token_metadata
from tierwriter.statuses import TERMINAL_ARTICLE_EVENTS

# A titles stream runs beside its tier's articles, on the same model: bounded, but generous.
TITLES_DEADLINE = 3600.0
# A stream carries a whole tier: long, but bounded, so a hung generator cannot hang a job forever.
ARTICLES_DEADLINE = 24 * 3600.0
# How often an open request stream checks whether the caller asked to stop (cancel latency).
STOP_POLL_SECONDS = 0.2
# Articles sent ahead per worker, beyond those running (see generate_articles).
QUEUED_PER_WORKER = 2


class GeneratorClient:
    """A channel to generator_service."""

    def __init__(self, address: str, service_token: str | None = None) -> None:
        self.address = address
        self._metadata = token_metadata(service_token)
        self._channel = runtime.open_channel(address)
        self._stub = pb_grpc.GeneratorServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> runtime.ServiceCallError:
        return runtime.ServiceCallError("generator_service", self.address, error)

    def generate_titles(
        self,
        request: pb.GenerateTitlesRequest,
        on_titles: Callable[[list[str]], None] = lambda titles: None,
    ) -> pb.GenerateTitlesResponse:
        """The tier's titles and their totals, as one message; `on_titles` gets each batch of
        new titles as it streams in (in order), for articles to start on them."""
        merged = pb.GenerateTitlesResponse()
        stream = self._stub.GenerateTitles(
            request, timeout=TITLES_DEADLINE, metadata=self._metadata
        )
        try:
            for message in stream:
                if message.titles:
                    on_titles(list(message.titles))
                merged.MergeFrom(message)  # titles add up; the last message brings the totals
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            stream.cancel()  # a no-op once it ended
        return merged

    def generate_articles(
        self,
        settings: pb.BatchSettings,
        articles: Iterable[pb.ArticleRequest],
        stop: Callable[[], bool],
        stop_reason: Callable[[], str] = lambda: "the job was cancelled",
        grace_seconds: Callable[[], float] = lambda: 0.0,
    ) -> Generator[article_pb.ArticleEvent, None, None]:
        """Send the settings and every article (of settings.tier, or of one of
        settings.more_tiers, named by its `tier`); yield events as they come back until each
        article has had its terminal event. `articles` may be a feed that blocks while it waits
        for titles: each article goes out as it comes (at most QUEUED_PER_WORKER per worker
        waiting in the generator at a time), and the stream ends once the feed has
        ended and every article sent is terminal. Once `stop()` is true, a stop goes out before
        any further article: the generator starts none of them (each is reported SKIPPED), and
        the events of those in flight (failed as cancelled when they outlive `grace_seconds()`,
        read when the stop goes out; 0: never) still come. A feed should stop waiting for
        articles it does not have yet once `stop()` is true.
        Closing the iterator early cancels the stream outright."""
        lock = threading.Lock()  # guards the counts: the request thread sends, we receive
        sent = terminal = 0
        fed = False
        all_terminal = threading.Event()
        # Articles sent that have had no event yet wait in the generator's queue. Keeping at most
        # QUEUED_PER_WORKER per worker there means a worker never waits for the next, while a
        # tier of any size costs the generator the same memory.
        unstarted: set[tuple[str, int]] = set()
        room = threading.Condition(lock)
        queue_limit = QUEUED_PER_WORKER * max(1, settings.max_workers)

        def settle() -> None:
            with lock:
                if fed and terminal >= sent:
                    all_terminal.set()

        def stop_request() -> pb.GenerateArticlesRequest:
            return pb.GenerateArticlesRequest(
                stop=pb.StopBatch(reason=stop_reason(), grace_seconds=grace_seconds())
            )

        def requests() -> Iterator[pb.GenerateArticlesRequest]:
            nonlocal sent, fed
            yield pb.GenerateArticlesRequest(settings=settings)
            stop_sent = False
            for article in articles:
                if not stop_sent:
                    with room:
                        while (
                            len(unstarted) >= queue_limit
                            and not stop()
                            and not all_terminal.is_set()  # the stream ended or was closed
                        ):
                            room.wait(STOP_POLL_SECONDS)
                    if stop():
                        # Before the rest: they are then reported SKIPPED, none starts.
                        stop_sent = True
                        yield stop_request()
                with lock:
                    sent += 1
                    unstarted.add((article.tier or settings.tier.name, article.article_index))
                yield pb.GenerateArticlesRequest(article=article)
            with lock:
                fed = True
            settle()  # nothing sent, or all already terminal: close our side now
            # Our side stays open so that a stop can still be sent; it closes once every
            # article is terminal (the generator then ends the stream) or right after a stop.
            # Wait on all_terminal, not on stop: the end of a tier must not wait out a poll.
            while not stop_sent and not all_terminal.wait(STOP_POLL_SECONDS):
                if stop():
                    yield stop_request()
                    return

        responses = self._stub.GenerateArticles(
            requests(), timeout=ARTICLES_DEADLINE, metadata=self._metadata
        )
        try:
            for response in responses:
                key = (response.event.tier, response.event.article_index)
                with room:
                    if key in unstarted:  # its first event: it left the queue
                        unstarted.discard(key)
                        room.notify()
                if response.event.kind in TERMINAL_ARTICLE_EVENTS:
                    with lock:
                        terminal += 1
                    settle()
                yield response.event
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            all_terminal.set()
            responses.cancel()  # a no-op when the stream already ended
