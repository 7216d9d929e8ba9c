"""GeneratorClient: how the orchestrator calls the generator; every call has a deadline."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator

import grpc

from tierwriter import runtime
from tierwriter.generator.v1 import generator_service_pb2 as pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as pb_grpc

TITLES_DEADLINE = 600.0  # many title calls may queue behind a slow model
# A stream carries a whole tier: long, but bounded, so a hung generator cannot hang a job forever.
ARTICLES_DEADLINE = 24 * 3600.0


class GeneratorClient:
    """A channel to generator_service."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = runtime.open_channel(address)
        self._stub = pb_grpc.GeneratorServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> runtime.ServiceCallError:
        return runtime.ServiceCallError("generator_service", self.address, error)

    def generate_titles(self, request: pb.GenerateTitlesRequest) -> pb.GenerateTitlesResponse:
        try:
            return self._stub.GenerateTitles(request, timeout=TITLES_DEADLINE)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def generate_articles(
        self, settings: pb.BatchSettings, articles: Iterable[pb.ArticleRequest]
    ) -> Generator[pb.ArticleEvent, None, None]:
        """Send the settings, then every article; yield events as they come back. Closing the
        iterator early cancels the stream, and the generator starts no further article."""

        def requests() -> Iterator[pb.GenerateArticlesRequest]:
            yield pb.GenerateArticlesRequest(settings=settings)
            for article in articles:
                yield pb.GenerateArticlesRequest(article=article)

        responses = self._stub.GenerateArticles(requests(), timeout=ARTICLES_DEADLINE)
        try:
            for response in responses:
                yield response.event
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            responses.cancel()  # a no-op when the stream already ended
