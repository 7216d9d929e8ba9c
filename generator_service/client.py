"""GeneratorClient: how the orchestrator calls the generator; every call has a deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator, Sequence

import grpc

from tierwriter import runtime
from tierwriter.article.v1 import article_event_pb2 as article_pb
from tierwriter.generator.v1 import generator_service_pb2 as pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as pb_grpc
from tierwriter.service_auth import token_metadata

TITLES_DEADLINE = 600.0  # many title calls may queue behind a slow model
# A stream carries a whole tier: long, but bounded, so a hung generator cannot hang a job forever.
ARTICLES_DEADLINE = 24 * 3600.0
# How often an open request stream checks whether the caller asked to stop (cancel latency).
STOP_POLL_SECONDS = 0.2
TERMINAL_KINDS = frozenset(
    {
        article_pb.ARTICLE_EVENT_KIND_SAVED,
        article_pb.ARTICLE_EVENT_KIND_FAILED,
        article_pb.ARTICLE_EVENT_KIND_SKIPPED,
    }
)


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

    def generate_titles(self, request: pb.GenerateTitlesRequest) -> pb.GenerateTitlesResponse:
        try:
            return self._stub.GenerateTitles(
                request, timeout=TITLES_DEADLINE, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise self._error(e) from e

    def generate_articles(
        self,
        settings: pb.BatchSettings,
        articles: Sequence[pb.ArticleRequest],
        stop: threading.Event,
        stop_reason: Callable[[], str] = lambda: "the job was cancelled",
        grace_seconds: Callable[[], float] = lambda: 0.0,
    ) -> Generator[article_pb.ArticleEvent, None, None]:
        """Send the settings and every article; yield events as they come back until each
        article has had its terminal event. Setting `stop` asks the generator to start no
        further article; the events of those in flight (failed as cancelled when they outlive
        `grace_seconds()`, read when the stop goes out; 0: never), and SKIPPED for the rest,
        still come.
        Closing the iterator early cancels the stream outright."""
        all_terminal = threading.Event()
        if not articles:
            all_terminal.set()  # nothing to wait for: close our side right after the settings

        def requests() -> Iterator[pb.GenerateArticlesRequest]:
            yield pb.GenerateArticlesRequest(settings=settings)
            for article in articles:
                yield pb.GenerateArticlesRequest(article=article)
            # Our side stays open so that a stop can still be sent; it closes once every
            # article is terminal (the generator then ends the stream) or right after a stop.
            # Wait on all_terminal, not on stop: the end of a tier must not wait out a poll.
            while not all_terminal.wait(STOP_POLL_SECONDS):
                if stop.is_set():
                    stop_message = pb.StopBatch(reason=stop_reason(), grace_seconds=grace_seconds())
                    yield pb.GenerateArticlesRequest(stop=stop_message)
                    return

        responses = self._stub.GenerateArticles(
            requests(), timeout=ARTICLES_DEADLINE, metadata=self._metadata
        )
        remaining = len(articles)
        try:
            for response in responses:
                if response.event.kind in TERMINAL_KINDS:
                    remaining -= 1
                    if remaining == 0:
                        all_terminal.set()
                yield response.event
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            all_terminal.set()
            responses.cancel()  # a no-op when the stream already ended
